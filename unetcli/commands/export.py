"""`unet export`: a model's network for other tools: ONNX, TorchScript, a bioimage.io package
(options -> ``export.export_model``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from unetcli.options import choices, complete_models

NAME = "export"
HELP = ("Export a model for other tools: a bioimage.io package (deepImageJ in Fiji, ilastik, napari), an "
        "ONNX file or a TorchScript file. The network takes normalised images of the sizes its padding allows "
        "and gives class probabilities.")
EPILOG = """Examples:

  unet export em-membranes --format bioimageio -o em.zip

  unet export runs/nuclei/best.unet -o nuclei.zip --example cells.png --author "A. Person"

  unet export em-membranes -o em.onnx

  unet export nuclei --format torchscript -o nuclei.pt

  unet export em-membranes --format onnx -o - > em.onnx"""


def command(
    model: Annotated[str, typer.Argument(
        metavar="MODEL", show_default=False, autocompletion=complete_models,
        help="A shipped model name (see unet predict --list-models), a model in your user folder, a .unet "
             "file, or a run folder (its best.unet).")],
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", metavar="PATH",
        help="The file to write (replaced if it exists); '-' writes to stdout.")] = None,
    fmt: Annotated[Optional[str], typer.Option(
        "--format", metavar="bioimageio|onnx|torchscript",
        autocompletion=choices("bioimageio", "onnx", "torchscript"),
        help="bioimageio: a zip with rdf.yaml, ONNX and TorchScript weights, test tensors, cover and "
             "model card; onnx; torchscript. Default: from the output's name (.zip, .onnx, .pt).")] = None,
    example: Annotated[Optional[Path], typer.Option(
        "--example", metavar="IMAGE",
        help="bioimageio: the image the test tensors and the cover are cut from, of the kind the model was "
             "trained on (default: the shipped model's example, else a synthetic picture).")] = None,
    name: Annotated[Optional[str], typer.Option(
        "--name", metavar="TEXT", help="bioimageio: the package's name (default: the model's).")] = None,
    author: Annotated[Optional[List[str]], typer.Option(
        "--author", metavar="NAME",
        help="bioimageio: an author of the model; repeat for several (default for the shipped models: "
             "the unet developers).")] = None,
) -> None:
    """Export one model; print the path written."""
    from unetcli import console, guards
    from unetcli.checkpoint import resolve_model
    from unetcli.errors import ConfigError, ImageWriteError

    if output is None:
        raise ConfigError("no output given", hint="add -o em.zip (bioimageio), -o em.onnx or -o em.pt")
    from unetcli.export import export_model, load_for_export, require_onnx, resolve_format

    fmt = resolve_format(fmt, output)
    if output != "-":
        target = Path(output)
        if target.is_dir():
            raise ImageWriteError(f"{output}: is a folder", hint=f"name the file, e.g. {output.rstrip('/')}/model.zip")
        folder = target.parent if str(target.parent) else Path(".")
        if not folder.is_dir():
            raise ImageWriteError(f"{output}: folder {folder} does not exist", hint="create it first")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ImageWriteError(f"{output}: cannot write in {folder} (permission denied)")
    if fmt in ("bioimageio", "onnx"):
        require_onnx()
    model_path = resolve_model(model)
    guards.check_outputs([str(model_path)] + ([str(example)] if example is not None else []), [output])

    mf = load_for_export(model_path)
    console.detail(f"model {mf.name} ({mf.path}); exporting as {fmt}")

    def note(level: str, text: str) -> None:
        (console.warn if level == "warn" else console.detail)(text)

    result = export_model(mf, fmt, output, stream=sys.stdout.buffer if output == "-" else None,
                          example=example, name=name, authors=list(author or []), note=note)
    for line in result.checks:
        console.detail(f"checked: {line}")
    if result.output != "-":
        sys.stdout.write(f"{result.output}\n")
        sys.stdout.flush()
    size = guards.format_bytes(result.nbytes)
    console.info(f"{mf.name} -> {result.output} ({fmt}, {size}, {result.seconds:.1f} s)")
