"""`unet weights`: the paper's loss weight maps, w_c(x) + w0 exp(-(d1 + d2)^2 / (2 sigma^2)), from label images."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from unetcli import options

NAME = "weights"
HELP = ("Per-pixel loss weight maps from label images: class balance plus the paper's border term "
        "w0*exp(-(d1+d2)^2/(2 sigma^2)) that separates touching objects.")
EPILOG = """Examples:

  unet weights labels.png -o weights.tif

  unet weights nuclei/labels/*.png -o weights/ --mask-out targets/ --preview check.png

  unet weights isbi2012/train-labels.tif -o weights.tif --foreground 255 --balance dataset

  unet weights classes.png --classes 0,128,255 -o weights.tif

  unet weights labels.png -o weights.tif --preview check.png --image image.png"""

# Defaults, equal to unetcli.labels.DEFAULT_BORDER_WIDTH and unetcli.weightmap.DEFAULT_W0 /
# DEFAULT_SIGMA (a test checks); spelled here so that `unet --help` needs no numpy.
_W0, _SIGMA, _BORDER_WIDTH = 10.0, 5.0, 2
_CACHE_BYTES = 512 * 2**20


class Balance(str, Enum):
    image = "image"
    dataset = "dataset"
    none = "none"


def command(
    labels: Annotated[list[str], typer.Argument(
        metavar="LABELS", show_default=False,
        help="Label images: instance labels (0 = background), binary masks (0/1, 0/255) or class maps "
             "with --classes; TIFF stacks are done page by page. A folder stands for the images in it; "
             "'-' reads stdin.")],
    output: options.Output = None,
    foreground: options.Foreground = None,
    classes: options.Classes = None,
    balance: Annotated[Balance, typer.Option(
        "--balance", case_sensitive=False,
        help="Class balance w_c = N / (K n_c): counted per image, over all inputs (dataset), or none "
             "(w_c = 1).")] = Balance.image,
    w0: Annotated[float, typer.Option(
        "--w0", metavar="FLOAT", help="Height w0 of the border term.")] = _W0,
    sigma: Annotated[float, typer.Option(
        "--sigma", metavar="PIXELS", help="Width sigma of the border term, in pixels.")] = _SIGMA,
    border_width: Annotated[int, typer.Option(
        "--border-width", metavar="PIXELS",
        help="Width of the background border carved between touching objects of instance labels "
             "(0: none).")] = _BORDER_WIDTH,
    mask_out: Annotated[Optional[Path], typer.Option(
        "--mask-out", metavar="PATH",
        help="Also write the training target the weights were computed for (carved borders; 0/255 for "
             "two classes, class indices otherwise): a file, or a folder for several inputs.")] = None,
    preview: Annotated[Optional[Path], typer.Option(
        "--preview", metavar="PNG",
        help="Write a picture of the first label image and its colour-mapped weight map (dark = low, "
             "yellow = high).")] = None,
    image: Annotated[Optional[Path], typer.Option(
        "--image", metavar="PATH",
        help="Raw image to draw the preview over, of the first label image's size.")] = None,
    fmt: options.Format = None,
) -> None:
    """Compute weight maps; write one float32 TIFF per input and print the paths written."""
    import numpy as np

    from unetcli import console
    from unetcli.errors import ConfigError, LabelError
    from unetcli.guards import check_finite, check_memory, check_outputs, declared_shape, read_stdin_once
    from unetcli.images import TIFF, expand_folders, format_from_name, read_image, write_image
    from unetcli.labels import label_planes, num_classes, parse_values, training_target
    from unetcli.weightmap import class_counts, class_weights_for, largest_window, peak_bytes, weight_map
    from unetcli.weightmap import preview as preview_picture

    fg = parse_values(foreground, option="--foreground")
    cls = parse_values(classes, option="--classes")
    if fg is not None and cls is not None:
        raise ConfigError("--foreground and --classes exclude each other",
                          hint="--foreground makes a two-class target, --classes a multi-class one")
    if not 0 < sigma < float("inf"):
        raise ConfigError(f"--sigma {sigma:g}: must be a positive number of pixels")
    if not 0 <= w0 < float("inf"):
        raise ConfigError(f"--w0 {w0:g}: must be a number >= 0")
    if image is not None and preview is None:
        raise ConfigError("--image only serves --preview", hint="add --preview check.png")
    if preview is not None and format_from_name(preview) != "png":
        raise ConfigError(f"{preview}: the preview is a PNG picture", hint="name it something.png")
    k = num_classes(cls)

    # ---- inputs and where their outputs go
    inputs = expand_folders(labels)
    expanded = any(arg != "-" and Path(arg).is_dir() for arg in labels)
    if "-" in inputs and len(inputs) > 1:
        raise ConfigError("'-' (stdin) can only be the one input")
    several = len(inputs) > 1 or expanded
    if output is None:
        raise ConfigError("say where to write the weight maps", hint="add -o weights.tif (or -o folder/)")

    def stem(path: str) -> str:
        return "stdin" if path == "-" else Path(path).stem

    def plan(target: Path, what: str, suffix: str | None) -> list[Path] | Path:
        """One path for one input, or a folder's paths (suffix None: decided per input) for several."""
        text = str(target)
        as_folder = several or target.is_dir() or text.endswith(("/", "\\"))
        if not as_folder:
            return target
        if text == "-":
            raise ConfigError(f"{what}: several inputs cannot all go to stdout", hint="give a folder")
        if format_from_name(target) is not None and not target.is_dir():
            raise ConfigError(f"{target}: {len(inputs)} inputs need an output folder, not one file",
                              hint=f"give a folder, e.g. {target.parent / target.stem}/")
        stems = [stem(i) for i in inputs]
        dupes = sorted({s for s in stems if stems.count(s) > 1})
        if dupes:
            raise ConfigError(f"{target}: several inputs are named {dupes[0]}, their outputs would collide",
                              hint="process them in separate runs or rename them")
        return [target / f"{s}{suffix or ''}" for s in stems]

    out_plan = plan(output, "-o", ".tif")
    if isinstance(out_plan, Path) and str(out_plan) != "-" and format_from_name(out_plan) != TIFF:
        raise ConfigError(f"{out_plan}: weight maps are float32 and need a TIFF file",
                          hint="name the output something.tif")
    if str(out_plan) == "-" and fmt is not None and fmt.lower() not in ("tif", "tiff"):
        raise ConfigError(f"--format {fmt}: weight maps are float32 and need TIFF", hint="use --format tiff")
    mask_plan = plan(mask_out, "--mask-out", None) if mask_out is not None else None
    if isinstance(mask_plan, Path) and str(mask_plan) != "-" and format_from_name(mask_plan) is None:
        raise ConfigError(f"{mask_plan}: unknown output format", hint="use a .png or .tif name")
    if str(out_plan) == "-" and mask_plan is not None and str(mask_plan) == "-":
        raise ConfigError("-o and --mask-out cannot both be stdout")

    # ---- headers: page counts for the final output names, stacks whose pages differ refused, and the
    # memory the maps will need at the least, all before any pixel is decoded
    stdin = read_stdin_once() if "-" in inputs else None
    declared = [declared_shape(stdin if path == "-" else path, "<stdin>" if path == "-" else None)
                for path in inputs]

    def final_paths(page_counts: list[int]) -> tuple[list[Path] | Path, list[Path] | Path | None]:
        """Every path this run writes: weight maps, and targets with the extension they will get."""
        if not isinstance(mask_plan, list):
            return out_plan, mask_plan
        return out_plan, [m.with_name(m.name + (".tif" if n > 1 else ".png"))
                          for m, n in zip(mask_plan, page_counts)]

    def check_paths(page_counts: list[int]) -> None:
        outs, masks = final_paths(page_counts)
        written = [*(outs if isinstance(outs, list) else [outs]),
                   *(masks if isinstance(masks, list) else [masks]), preview]
        check_outputs([*labels, *inputs, image], written)

    check_paths([d[0] if d is not None else 1 for d in declared])
    for path, d in zip(inputs, declared):
        if d is not None:
            check_memory(_least_bytes(*d), f"weight maps of {d[0]} x {d[1]}x{d[2]} pixels",
                         "<stdin>" if path == "-" else path)

    # ---- pass 1: read and check every input, count classes; nothing is written before all pass
    stdin_cache: dict[str, np.ndarray] = {}
    cache: dict[int, list] = {}
    cached = 0

    def load(i: int) -> np.ndarray:
        path = inputs[i]
        if path == "-":
            if "-" not in stdin_cache:
                stdin_cache["-"] = read_image("-", stdin_bytes=stdin)
            return stdin_cache["-"]
        return read_image(path)

    def targets_of(i: int) -> list:
        if i in cache:
            return cache[i]
        name = "<stdin>" if inputs[i] == "-" else inputs[i]
        return [training_target(plane, foreground=fg, classes=cls, border_width=border_width, name=name)
                for plane in label_planes(load(i), name)]

    counts = np.zeros(k, np.int64)
    pages: list[int] = []
    first_shape = None
    with console.progress(len(inputs), "checking labels") as advance:
        for i in range(len(inputs)):
            planes = targets_of(i)
            pages.append(len(planes))
            # now the objects are known: the memory of the largest distance transform, exactly
            h, w = planes[0][0].shape
            window = max((largest_window(inst, w0, sigma) for _, inst in planes if inst is not None),
                         default=0)
            need = _least_bytes(len(planes), h, w) + peak_bytes(0, 0, window)
            check_memory(need, f"weight maps of {len(planes)} x {h}x{w} pixels (an object's distance "
                         f"transform over {window:,} of them)", "<stdin>" if inputs[i] == "-" else inputs[i])
            if first_shape is None:
                first_shape = planes[0][0].shape
            counts += class_counts((t for t, _ in planes), k)
            size = sum(t.nbytes + (0 if inst is None else inst.nbytes) for t, inst in planes)
            if cached + size <= _CACHE_BYTES:
                cache[i], cached = planes, cached + size
            if mask_plan is not None and len(planes) > 1:
                target = mask_plan[i] if isinstance(mask_plan, list) else mask_plan
                if isinstance(mask_plan, Path) and format_from_name(target) != TIFF and str(target) != "-":
                    raise ConfigError(f"{target}: {inputs[i]} is a stack of {len(planes)} pages; PNG "
                                      "holds one", hint="name the --mask-out file something.tif")
            advance()
    picture_base = None
    if image is not None:
        raw = read_image(image)[0]
        if raw.shape[:2] != first_shape:
            raise LabelError(f"{inputs[0]}: label image is {first_shape[0]}x{first_shape[1]} pixels but "
                             f"--image {image} is {raw.shape[0]}x{raw.shape[1]}",
                             hint="give the raw image these labels belong to")
        picture_base = raw
    check_paths(pages)   # again, with the page counts read (a header may have said nothing)
    out_plan, mask_plan = final_paths(pages)
    if isinstance(out_plan, list):
        out_plan[0].parent.mkdir(parents=True, exist_ok=True)
    if isinstance(mask_plan, list):
        mask_plan[0].parent.mkdir(parents=True, exist_ok=True)
    console.detail(f"class pixel counts over all inputs: {', '.join(str(int(c)) for c in counts)}")

    # ---- pass 2: weight maps, targets, preview
    written = 0
    with console.progress(len(inputs), "weight maps") as advance:
        for i in range(len(inputs)):
            planes = targets_of(i)
            maps, masks = [], []
            for target, instances in planes:
                cw = class_weights_for(balance.value, target, k, counts)
                with np.errstate(over="ignore", invalid="ignore"):   # checked below instead
                    maps.append(weight_map(target, instances, w0=w0, sigma=sigma, class_weights=cw))
                masks.append(target * 255 if cls is None else target)
            stack = np.stack(maps)
            dest = out_plan[i] if isinstance(out_plan, list) else out_plan
            check_finite(stack, "<stdout>" if str(dest) == "-" else str(dest),
                         hint=f"weights above float32's largest value (3.4e38): lower --w0 {w0:g}")
            objects = sum(int(inst.max()) for _, inst in planes if inst is not None and inst.size)
            console.detail(f"{inputs[i]}: {len(planes)} page(s), {objects} object(s), weights "
                           f"{float(stack.min()):.4g} to {float(stack.max()):.4g}")
            layout = "ZYX" if len(maps) > 1 else "YX"
            write_image(dest, stack if len(maps) > 1 else stack[0], layout, fmt=TIFF if str(dest) == "-" else None)
            if mask_plan is not None:
                mdest = mask_plan[i] if isinstance(mask_plan, list) else mask_plan
                mstack = np.stack(masks)
                write_image(mdest, mstack if len(masks) > 1 else mstack[0], layout,
                            fmt=("png" if len(masks) == 1 else TIFF) if str(mdest) == "-" else None)
            if i == 0 and preview is not None:
                picture = preview_picture(maps[0], planes[0][0], picture_base)
                write_image(preview, picture, "YXC")
                console.info(f"preview: {preview} (weights {float(maps[0].min()):.3g} dark to "
                             f"{float(maps[0].max()):.3g} bright)")
            if str(dest) != "-":
                typer.echo(str(dest))
            written += 1
            advance()
    if str(out_plan) != "-":
        console.info(f"wrote {written} weight map{'s' if written != 1 else ''}")


def _least_bytes(pages: int, height: int, width: int) -> float:
    """The memory `unet weights` needs for one input at the least, before its objects are known.

    Per page kept for the whole input: the label as decoded (1 byte at the least), its target and
    instance map (5), its float32 map and the stack of them (8), its 0/255 target and that stack (2),
    and the compressed TIFF (at most 4); plus one map's computation (weightmap.peak_bytes without the
    object windows, which :func:`weightmap.largest_window` adds once the objects are known).
    """
    from unetcli.weightmap import peak_bytes

    return 20.0 * pages * height * width + peak_bytes(height, width)
