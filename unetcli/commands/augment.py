"""`unet augment`: augmented copies of an image with its labels and weight map, and a preview sheet."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from unetcli.options import Seed

NAME = "augment"
HELP = ("Augmented training samples and previews: elastic deformation on a coarse grid, shifts, "
        "rotations, flips, scaling and gray-value changes, applied alike to the image, its labels "
        "(nearest neighbour) and its weight map (linear).")
EPILOG = """Examples:

  unet augment image.tif --labels lab.png --weights w.tif -n 16 -o outdir/ --seed 0

  unet augment image.tif --labels lab.png --preview grid.png

  unet augment slice.png --labels lab.png --only elastic --sigma 20 --preview strong.png

Writes IMAGE_NNN.EXT, IMAGE_NNN_labels.EXT and IMAGE_NNN_weights.tif (IMAGE_pPPP_NNN... for the
pages of a stack) into the output folder and prints their paths, one per line."""

# The defaults below are AugmentConfig's (a test checks that they agree); they are spelled out here so
# that `unet --help` does not import numpy.
STEPS = ("shift", "flip", "rotate", "scale", "elastic", "brightness", "contrast", "gamma", "noise")


def command(
    image: Annotated[str, typer.Argument(metavar="IMAGE",
                                         help="The image to augment; '-' reads stdin. A multi-page "
                                              "TIFF is a stack of images, each augmented -n times.")],
    labels: Annotated[Optional[str], typer.Option(
        "--labels", "-l", metavar="PATH",
        help="Label image of the same size (and pages), deformed alike with nearest neighbour.")] = None,
    weights: Annotated[Optional[str], typer.Option(
        "--weights", "-w", metavar="PATH",
        help="Weight map of the same size (and pages), deformed alike with linear interpolation.")] = None,
    count: Annotated[int, typer.Option("--count", "-n", metavar="N",
                                       help="Augmented samples per image (page).")] = 8,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="DIR",
        help="Folder for the samples (created if missing); their paths are printed on stdout.")] = None,
    preview: Annotated[Optional[str], typer.Option(
        "--preview", metavar="PNG",
        help="Write a contact sheet: the original, then the samples, label contours drawn in red.")] = None,
    preview_size: Annotated[int, typer.Option(
        "--preview-size", metavar="PX", help="Largest side of each picture on the contact sheet.")] = 256,
    seed: Seed = None,
    grid: Annotated[int, typer.Option("--grid", metavar="N",
                                      help="Elastic deformation: N x N coarse grid of random vectors.")] = 3,
    sigma: Annotated[float, typer.Option("--sigma", metavar="PX",
                                         help="Elastic deformation: standard deviation of the vectors.")] = 10.0,
    order: Annotated[int, typer.Option("--order", metavar="3|1",
                                       help="Image interpolation: 3 bicubic, 1 linear.")] = 3,
    rotate: Annotated[float, typer.Option("--rotate", metavar="DEG",
                                          help="Rotation by an angle up to DEG either way; 0 = off.")] = 180.0,
    flip: Annotated[bool, typer.Option("--flip/--no-flip",
                                       help="One of the 8 flips and 90-degree turns.")] = True,
    scale: Annotated[str, typer.Option("--scale", metavar="LO,HI",
                                       help="Zoom factor range (log-uniform); 1,1 = off.")] = "0.9,1.1",
    shift: Annotated[float, typer.Option("--shift", metavar="PX",
                                         help="Shift up to PX along each axis; 0 = off.")] = 20.0,
    brightness: Annotated[float, typer.Option(
        "--brightness", metavar="F", help="Add up to F x value range either way; 0 = off.")] = 0.1,
    contrast: Annotated[str, typer.Option("--contrast", metavar="LO,HI",
                                          help="Contrast factor range about the mean; 1,1 = off.")] = "0.8,1.25",
    gamma: Annotated[str, typer.Option("--gamma", metavar="LO,HI",
                                       help="Gamma exponent range; 1,1 = off.")] = "0.8,1.25",
    noise: Annotated[float, typer.Option("--noise", metavar="F",
                                         help="Gaussian noise, std up to F x value range; 0 = off.")] = 0.02,
    only: Annotated[Optional[str], typer.Option(
        "--only", metavar="STEPS",
        help="Switch on only these steps, comma-separated, from: " + ", ".join(STEPS) + "; or none.")] = None,
) -> None:
    """Augment IMAGE (with its labels and weights) -n times; write the samples and/or a preview."""
    import math

    import numpy as np

    from unetcli import console
    from unetcli.errors import ConfigError, ImageReadError, LabelError
    from unetcli.guards import check_finite, check_memory, check_outputs, declared_shape, read_stdin_once
    from unetcli.images import read_image, write_image, format_from_name
    from unetcli.transforms import (AugmentConfig, apply_params, contact_sheet, jacobian_determinant,
                                    preview_panel, sample_params)

    # ---- options -> configuration (every check before anything is read or written)
    if count < 1:
        raise ConfigError(f"-n/--count must be at least 1, not {count}")
    if preview_size < 16:
        raise ConfigError(f"--preview-size must be at least 16 px, not {preview_size}")
    if output is None and preview is None:
        raise ConfigError("nothing to write", hint="give -o FOLDER for the samples and/or --preview FILE.png")
    if output is not None and str(output) == "-":
        raise ConfigError("-o - cannot hold several files", hint="give -o an output folder")
    if preview is not None and preview != "-" and format_from_name(preview) != "png":
        raise ConfigError(f"{preview}: the preview is a PNG image", hint="name it .png")
    if preview == "-" and output is not None:
        raise ConfigError("--preview - writes the sheet to stdout, where -o would print paths",
                          hint="write the preview to a file")
    settings = dict(grid=grid, sigma=sigma, order=order, flip=flip, max_angle=rotate, max_shift=shift,
                    max_brightness=brightness, max_noise=noise, scale_range=_pair(scale, "--scale"),
                    contrast_range=_pair(contrast, "--contrast"), gamma_range=_pair(gamma, "--gamma"))
    if only is not None:
        names = [n.strip() for n in only.split(",") if n.strip()]
        if names != ["none"]:
            for n in names:
                if n not in STEPS:
                    raise ConfigError(f"--only: unknown step {n!r}", hint="choose from " + ", ".join(STEPS))
        switches = {n: n in names for n in STEPS}
        settings["flip"] = switches.pop("flip") and flip
        settings.update(switches)
    cfg = AugmentConfig(**settings)
    # Positions and gray values are computed in float32: beyond 2^24 px a position is no longer a
    # whole pixel, beyond float32's largest value a factor is infinite.
    checks = [("--shift", shift, shift, 2.0 ** 24), ("--sigma", sigma, sigma, 2.0 ** 24),
              ("--brightness", brightness, brightness, 3e38), ("--noise", noise, noise, 3e38),
              ("--rotate", rotate, rotate, 3e38)]
    for option, pair in (("--scale", cfg.scale_range), ("--contrast", cfg.contrast_range),
                         ("--gamma", cfg.gamma_range)):
        for v in pair:   # a factor and its inverse both enter the computation
            checks += [(option, v, v, 3e38), (option, v, 1.0 / v if v else math.inf, 3e38)]
    for option, shown, value, limit in checks:
        if not abs(value) <= limit:
            raise ConfigError(f"{option} {shown:g}: out of the range augmentation can compute "
                              f"(magnitudes up to {limit:g})", hint="give a magnitude that makes sense for "
                              "an image, e.g. the defaults in --help")
    folder = Path(output) if output is not None else None
    if folder is not None and folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder}: exists and is not a folder", hint="-o takes an output folder")

    # ---- inputs: headers first (stacks whose pages differ are refused), then the pixels
    sources = [p for p in (image, labels, weights) if p is not None]
    if sources.count("-") > 1:
        raise ConfigError("'-' (stdin) can stand for one input only")
    check_outputs(sources, [preview])
    stdin = read_stdin_once() if "-" in sources else None
    shapes = [declared_shape(stdin if src == "-" else src, "<stdin>" if src == "-" else None) for src in sources]
    what = f"augmenting with a {cfg.grid}x{cfg.grid} grid, --sigma {cfg.sigma:g}"
    if shapes[0] is not None:   # the least it can take (one grey channel), before decoding anything
        check_memory(_peak_bytes(cfg, shapes[0][1], shapes[0][2], 1, 0, False),
                     f"{what} on {shapes[0][1]}x{shapes[0][2]} pixels", "<stdin>" if image == "-" else image)

    def load(src):
        return read_image(src, stdin_bytes=stdin if src == "-" else None)

    img = load(image)
    n_pages, h, w, _ = img.shape
    lab = wts = None
    if labels is not None:
        lab = load(labels)
        if lab.shape[3] != 1:
            raise LabelError(f"{labels}: labels have {lab.shape[3]} channels, need one",
                             hint="give a single-channel label image")
        if lab.dtype.kind == "f":
            if not np.array_equal(lab, np.round(lab)):
                raise LabelError(f"{labels}: labels hold fractional values",
                                 hint="labels are whole numbers; give weights with --weights")
        _same_size(labels, lab, image, img, LabelError)
        lab = lab[..., 0]
    if weights is not None:
        wts = load(weights)
        if wts.shape[3] != 1:
            raise ImageReadError(f"{weights}: weight map has {wts.shape[3]} channels, need one",
                                 hint="give a single-channel weight map")
        _same_size(weights, wts, image, img, LabelError)
        if np.any(wts < 0):
            raise ImageReadError(f"{weights}: weight map holds negative values",
                                 hint="weights are 0 or more; make them with `unet weights`")
        wts = wts[..., 0].astype(np.float32)

    stem = "stdin" if image == "-" else Path(image).stem
    image_ext = _extension(image, img.dtype)
    label_ext = _extension(labels, lab.dtype) if lab is not None else None
    if folder is not None:   # every name this run will write, against the inputs, before any work
        names = [f"{stem}_{k:03d}" if n_pages == 1 else f"{stem}_p{page:03d}_{k:03d}"
                 for page in range(n_pages) for k in range(count)]
        planned = [folder / f"{n}{suffix}" for n in names
                   for suffix in (image_ext, *([f"_labels{label_ext}"] if lab is not None else []),
                                  *(["_weights.tif"] if wts is not None else []))]
        check_outputs(sources, [*planned, preview])
    check_memory(_peak_bytes(cfg, h, w, img.shape[3], lab.dtype.itemsize if lab is not None else 0,
                             wts is not None),
                 f"{what} on {h}x{w} pixels",
                 "<stdin>" if image == "-" else image)
    if folder is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{folder}: cannot create the output folder ({exc.strerror})") from None

    # ---- augment
    rng = np.random.default_rng(seed)
    panels: list[np.ndarray] = []
    folded = 0
    written: list[str] = []
    overflow = ("lower --brightness, --contrast, --gamma or --noise, or scale the image's values into "
                "float32's range")
    with console.progress(n_pages * count, "augment") as advance, \
            np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # checked below instead
        for page in range(n_pages):
            source, value_range = _as_float(img[page])
            check_finite(source, "<stdin>" if image == "-" else image, hint=overflow)
            tgt = lab[page] if lab is not None else None
            wmap = wts[page] if wts is not None else None
            if page == 0 and preview is not None:
                panels.append(preview_panel(source, tgt, value_range, preview_size))
            for k in range(count):
                params = sample_params(rng, cfg)
                if params.displacements is not None and \
                        jacobian_determinant(params.displacements, (h, w)).min() <= 0:
                    folded += 1
                out, out_lab, out_w = apply_params(rng, params, source, tgt, wmap, order=cfg.order,
                                                   value_range=value_range)
                check_finite(out, f"sample {k} of {'<stdin>' if image == '-' else image}", hint=overflow)
                if out_w is not None:
                    check_finite(out_w, f"sample {k} of {weights}", hint=overflow)
                if page == 0 and preview is not None:
                    panels.append(preview_panel(out, out_lab, value_range, preview_size))
                if folder is not None:
                    name = f"{stem}_{k:03d}" if n_pages == 1 else f"{stem}_p{page:03d}_{k:03d}"
                    path = folder / f"{name}{image_ext}"
                    write_image(path, _as_dtype(out, img.dtype), "YXC")
                    written.append(str(path))
                    if out_lab is not None:
                        path = folder / f"{name}_labels{label_ext}"
                        write_image(path, out_lab, "YX")
                        written.append(str(path))
                    if out_w is not None:
                        path = folder / f"{name}_weights.tif"
                        write_image(path, out_w, "YX")
                        written.append(str(path))
                advance()
    if folded:
        console.warn(f"the elastic deformation folds over in {folded} of {n_pages * count} samples at "
                     f"--sigma {cfg.sigma:g} with a {cfg.grid}x{cfg.grid} grid on {h}x{w} pixels; "
                     "lower --sigma or --grid")
    if preview is not None:
        sheet = contact_sheet(panels)
        write_image(preview, sheet, "YXC", fmt="png")
        if preview != "-":
            written.append(str(preview))
    if written:
        sys.stdout.write("".join(f"{p}\n" for p in written))
        sys.stdout.flush()
    total = n_pages * count
    console.info(f"augment: {total} sample{'s' if total != 1 else ''}"
                 + (f" in {folder}" if folder is not None else "")
                 + (f", preview {preview}" if preview not in (None, "-") else ""))


def _peak_bytes(cfg, h: int, w: int, channels: int, label_itemsize: int, weights: bool) -> float:
    """An upper estimate of the memory one page's augmentation takes beyond the decoded inputs.

    The image as float32; then the larger of two phases: the fold-over check (the Jacobian
    determinant: four float64 derivative maps and two temporaries) and the sampling (source
    positions, the output, gray-value temporaries, labels, weights, and the mirrored source window
    the sampler copies, bounded by the box every source position falls in: the image's extent, its
    diagonal when rotated, divided by the smallest zoom, widened by five standard deviations of the
    elastic vectors on each side). Plus the coarse grid's spline (an identity matrix of grid^2 and its
    four cubic coefficients). Measured on 2048x2048 pixels it is 1.0 to 1.5 times the real peak.
    Absurd options give inf or NaN, which check_memory refuses.
    """
    import math

    pixels = float(h) * float(w)
    elastic = cfg.elastic and cfg.sigma > 0
    extent = math.hypot(h, w) if cfg.rotate and cfg.max_angle > 0 else float(max(h, w))
    zoom = min(cfg.scale_range) if cfg.scale else 1.0
    reach = (extent / zoom if zoom > 0 else math.inf) + (12.0 * cfg.sigma if elastic else 0.0) + 8.0
    window = reach * reach * (4.0 * channels + label_itemsize + (4.0 if weights else 0.0))
    jacobian = 48.0 * pixels if elastic else 0.0
    sampling = pixels * (8.0 + 16.0 * channels + label_itemsize + (8.0 if weights else 0.0)) + window
    grid = (64.0 * cfg.grid ** 2 + 32.0 * cfg.grid * (h + w)) if elastic else 0.0
    return 4.0 * channels * pixels + max(jacobian, sampling) + grid


def _pair(text: str, option: str) -> tuple[float, float]:
    """'LO,HI' (or one number X meaning 1/X,X) as two floats."""
    from unetcli.errors import ConfigError

    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1 and values[0] > 0:
        x = values[0]
        return (min(x, 1 / x), max(x, 1 / x))
    if len(values) != 2:
        raise ConfigError(f"{option} takes LO,HI like 0.9,1.1, not {text!r}")
    return values[0], values[1]


def _same_size(path: str, data, image_path: str, image, error) -> None:
    n, h, w = image.shape[:3]
    if data.shape[1:3] != (h, w):
        raise error(f"{path}: is {data.shape[1]}x{data.shape[2]} pixels, but {image_path} is {h}x{w}",
                    hint="give labels and weights of the image's size")
    if data.shape[0] != n:
        raise error(f"{path}: has {data.shape[0]} pages, but {image_path} has {n}",
                    hint="give one label (weight) page per image page")


def _extension(path: str | None, dtype) -> str:
    """Write PNG where the input was PNG, JPEG or BMP and PNG can hold the pixels; TIFF otherwise."""
    from unetcli.images import TIFF, format_from_name

    fmt = None if path in (None, "-") else format_from_name(path)
    if fmt != TIFF and str(dtype) in ("uint8", "uint16", "bool"):
        return ".png" if fmt is not None else ".tif"
    return ".tif"


def _as_float(page):
    """(H, W, C) float32 pixels and the value range that gray-value magnitudes refer to."""
    import numpy as np

    if page.dtype == np.uint8:
        return page.astype(np.float32), (0.0, 255.0)
    if page.dtype == bool:
        return page.astype(np.float32), (0.0, 1.0)
    lo, hi = float(page.min()), float(page.max())
    return page.astype(np.float32), (lo, hi if hi > lo else lo + 1.0)


def _as_dtype(pixels, dtype):
    """Augmented float pixels back in the input's type: integers rounded and clipped to the type."""
    import numpy as np

    if dtype == bool:
        return pixels >= 0.5
    if np.dtype(dtype).kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(pixels), info.min, info.max).astype(dtype)
    return pixels.astype(np.float32)
