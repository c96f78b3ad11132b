"""`unet augment`: augmented copies of an image with its labels and weight map, and a preview sheet."""

from __future__ import annotations

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
    import sys

    from unetcli import console
    from unetcli.augmentfiles import augment_files
    from unetcli.errors import ConfigError
    from unetcli.commands import read_stdin as read_stdin_once
    from unetcli.guards import check_outputs
    from unetcli.images import format_from_name
    from unetcli.transforms import AugmentConfig

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
    _check_magnitudes(cfg, shift=shift, sigma=sigma, brightness=brightness, noise=noise, rotate=rotate)
    folder = Path(output) if output is not None else None
    if folder is not None and folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder}: exists and is not a folder", hint="-o takes an output folder")
    sources = [p for p in (image, labels, weights) if p is not None]
    if sources.count("-") > 1:
        raise ConfigError("'-' (stdin) can stand for one input only")
    check_outputs(sources, [preview])

    # ---- the work: stdin and stdout resolved here, everything else in the core
    done = augment_files(image, cfg, labels=labels, weights=weights,
                         stdin=read_stdin_once() if "-" in sources else None, count=count, folder=folder,
                         preview=sys.stdout.buffer if preview == "-" else preview, preview_size=preview_size,
                         seed=seed, progress=console.progress)
    if done.folded:
        console.warn(f"the elastic deformation folds over in {done.folded} of {done.samples} samples at "
                     f"--sigma {cfg.sigma:g} with a {cfg.grid}x{cfg.grid} grid on {done.height}x{done.width} "
                     "pixels; lower --sigma or --grid")
    if done.written:
        sys.stdout.write("".join(f"{p}\n" for p in done.written))
        sys.stdout.flush()
    console.info(f"augment: {done.samples} sample{'s' if done.samples != 1 else ''}"
                 + (f" in {folder}" if folder is not None else "")
                 + (f", preview {preview}" if preview not in (None, "-") else ""))


def _check_magnitudes(cfg, **given: float) -> None:
    """Refuse magnitudes augmentation cannot compute. Positions and gray values are computed in
    float32: beyond 2^24 px a position is no longer a whole pixel, beyond float32's largest value a
    factor is infinite."""
    import math

    from unetcli.errors import ConfigError

    checks = [("--shift", given["shift"], given["shift"], 2.0 ** 24),
              ("--sigma", given["sigma"], given["sigma"], 2.0 ** 24),
              ("--brightness", given["brightness"], given["brightness"], 3e38),
              ("--noise", given["noise"], given["noise"], 3e38),
              ("--rotate", given["rotate"], given["rotate"], 3e38)]
    for option, pair in (("--scale", cfg.scale_range), ("--contrast", cfg.contrast_range),
                         ("--gamma", cfg.gamma_range)):
        for v in pair:   # a factor and its inverse both enter the computation
            checks += [(option, v, v, 3e38), (option, v, 1.0 / v if v else math.inf, 3e38)]
    for option, shown, value, limit in checks:
        if not abs(value) <= limit:
            raise ConfigError(f"{option} {shown:g}: out of the range augmentation can compute "
                              f"(magnitudes up to {limit:g})", hint="give a magnitude that makes sense for "
                              "an image, e.g. the defaults in --help")


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
