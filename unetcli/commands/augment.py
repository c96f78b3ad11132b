"""`unet augment`: not available in this version yet (exits 2)."""

from __future__ import annotations

import typer

from unetcli.errors import NotAvailableError

NAME = "augment"
HELP = ('Augmented training samples and previews: elastic deformation on a coarse grid, shifts, rotations, flips, scaling and gray-value changes.')
EPILOG = """Examples:

  unet augment image.tif --labels lab.png -n 16 -o outdir/ --seed 0

  unet augment image.tif --labels lab.png --preview grid.png"""
CONTEXT = {"ignore_unknown_options": True, "allow_extra_args": True}


def command(ctx: typer.Context) -> None:
    raise NotAvailableError("`unet augment` is not available yet in this version",
                            hint="see CHANGELOG.md for what this version provides")
