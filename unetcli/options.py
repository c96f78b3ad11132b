"""Options shared by several commands, each spelled once so that it means the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def choices(*values: str):
    """Shell completion of a fixed set of values (bash, zsh, fish: `unet --install-completion`)."""
    def complete(incomplete: str) -> list[str]:
        return [v for v in values if v.startswith(incomplete)]
    return complete


def complete_models(incomplete: str) -> list[str]:
    """Shell completion of model names: the shipped models and those in the user's model folder."""
    from unetcli.checkpoint import list_models

    try:
        return [name for name, _path, _summary in list_models() if name.startswith(incomplete)]
    except Exception:   # completion must never print a traceback into the user's shell
        return []


Device = Annotated[str, typer.Option(
    "--device", metavar="DEVICE", autocompletion=choices("auto", "cpu", "cuda", "mps"),
    help="Where to compute: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")]
Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", metavar="NAME|PATH", autocompletion=complete_models,
    help="A shipped model name (see --list-models), a model in your user folder, or a .unet path.")]
Seed = Annotated[Optional[int], typer.Option(
    "--seed", metavar="INT", help="Seed of the random generator; the same seed gives the same output.")]
Format = Annotated[Optional[str], typer.Option(
    "--format", metavar="tiff|png", autocompletion=choices("tiff", "png"),
    help="Output format for stdout ('-') and for the files written into an output folder; otherwise "
         "taken from the output file's name.")]
PredictFormat = Annotated[Optional[str], typer.Option(
    "--format", metavar="tiff|png|zarr|zip|geojson", autocompletion=choices("tiff", "png", "zarr", "zip", "geojson"),
    help="Output format for stdout ('-') and for the files written into an output folder; otherwise "
         "taken from the output file's name. zarr: OME-Zarr; zip (ImageJ ROI set) and geojson (QuPath) "
         "hold the outlines of --output-type labels.")]
Foreground = Annotated[Optional[str], typer.Option(
    "--foreground", metavar="VALUES",
    help="Label values that mean object (e.g. 255 for the ISBI convention, where 0 is membrane); "
         "comma-separated.")]
Classes = Annotated[Optional[str], typer.Option(
    "--classes", metavar="VALUES",
    help="Treat labels as a multi-class map with these values, comma-separated, in class order "
         "(e.g. 0,1,2).")]
Output = Annotated[Optional[Path], typer.Option(
    "--output", "-o", metavar="PATH",
    help="Output file, or folder for several inputs; '-' writes to stdout.")]
OutputName = Annotated[Optional[str], typer.Option(
    "--output", "-o", metavar="PATH",
    help="Output file for one input; a folder (a name ending in '/', an existing folder, or a name "
         "without an image, .zarr, .zip or .geojson extension) for several; '-' writes to stdout.")]
