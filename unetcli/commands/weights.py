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
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", metavar="PATH",
        help="Output file, or folder for several inputs (an existing folder, or a name ending in '/'); "
             "'-' writes to stdout.")] = None,
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
    mask_out: Annotated[Optional[str], typer.Option(
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
    import sys

    from unetcli import console
    from unetcli.errors import ConfigError
    from unetcli.commands import read_stdin as read_stdin_once
    from unetcli.images import TIFF, expand_folders, format_from_name, is_zarr
    from unetcli.labels import parse_values
    from unetcli.weightfiles import Settings, weight_files

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

    # ---- inputs and where their outputs go
    inputs = expand_folders(labels)
    expanded = any(arg != "-" and Path(arg).is_dir() and not is_zarr(arg) for arg in labels)
    if "-" in inputs and len(inputs) > 1:
        raise ConfigError("'-' (stdin) can only be the one input")
    several = len(inputs) > 1 or expanded
    if output is None:
        raise ConfigError("say where to write the weight maps", hint="add -o weights.tif (or -o folder/)")
    out_plan = _plan(output, "-o", ".tif", inputs, several)
    if isinstance(out_plan, Path) and str(out_plan) != "-" and format_from_name(out_plan) != TIFF:
        raise ConfigError(f"{out_plan}: weight maps are float32 and need a TIFF file",
                          hint="name the output something.tif")
    if str(out_plan) == "-" and fmt is not None and fmt.lower() not in ("tif", "tiff"):
        raise ConfigError(f"--format {fmt}: weight maps are float32 and need TIFF", hint="use --format tiff")
    mask_plan = _plan(mask_out, "--mask-out", None, inputs, several) if mask_out is not None else None
    if isinstance(mask_plan, Path) and str(mask_plan) != "-" and format_from_name(mask_plan) is None:
        raise ConfigError(f"{mask_plan}: unknown output format", hint="use a .png or .tif name")
    if str(out_plan) == "-" and mask_plan is not None and str(mask_plan) == "-":
        raise ConfigError("-o and --mask-out cannot both be stdout")

    # ---- the work: stdin and stdout resolved here, everything else in the core
    def notes(level: str, text: str) -> None:
        (console.info if level == "info" else console.detail)(text)

    def stream(plan):
        return sys.stdout.buffer if isinstance(plan, Path) and str(plan) == "-" else plan

    settings = Settings(foreground=fg, classes=cls, balance=balance.value, w0=w0, sigma=sigma,
                        border_width=border_width)
    written = weight_files(inputs, stream(out_plan), settings, masks=stream(mask_plan),
                           stdin=read_stdin_once() if "-" in inputs else None, preview=preview, image=image,
                           sources=[*labels, *inputs], on_written=typer.echo, on_note=notes,
                           progress=console.progress)
    if str(out_plan) != "-":
        console.info(f"wrote {written} weight map{'s' if written != 1 else ''}")


def _plan(text: str, what: str, suffix: str | None, inputs: list[str], several: bool) -> list[Path] | Path:
    """One path for one input, or a folder's paths (suffix None: decided per input) for several. A name
    ending in '/' is a folder even for one input (typed as text: a Path would drop the slash)."""
    from unetcli.errors import ConfigError
    from unetcli.images import format_from_name

    target = Path(text)
    as_folder = several or target.is_dir() or text.endswith(("/", "\\"))
    if not as_folder:
        return target
    if text == "-":
        raise ConfigError(f"{what}: several inputs cannot all go to stdout", hint="give a folder")
    if format_from_name(target) is not None and not target.is_dir():
        raise ConfigError(f"{target}: {len(inputs)} inputs need an output folder, not one file",
                          hint=f"give a folder, e.g. {target.parent / target.stem}/")
    stems = ["stdin" if i == "-" else Path(i).stem for i in inputs]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise ConfigError(f"{target}: several inputs are named {dupes[0]}, their outputs would collide",
                          hint="process them in separate runs or rename them")
    return [target / f"{s}{suffix or ''}" for s in stems]
