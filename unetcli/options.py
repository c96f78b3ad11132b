"""Options shared by several commands, each spelled once so that it means the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Device = Annotated[str, typer.Option(
    "--device", metavar="DEVICE",
    help="Where to compute: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")]
Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", metavar="NAME|PATH",
    help="A shipped model name (see --list-models), a model in your user folder, or a .unet path.")]
Seed = Annotated[Optional[int], typer.Option(
    "--seed", metavar="INT", help="Seed of the random generator; the same seed gives the same output.")]
Format = Annotated[Optional[str], typer.Option(
    "--format", metavar="tiff|png",
    help="Output format when writing to stdout ('-'); otherwise taken from the file name.")]
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
