"""`unet predict`: not available in this version yet (exits 2)."""

from __future__ import annotations

import typer

from unetcli.errors import NotAvailableError

NAME = "predict"
HELP = ('Segment images with the overlap-tile strategy and mirrored borders: any image size, any number of files.')
EPILOG = """Examples:

  unet predict in.tif -o mask.tif --tile 572

  unet predict images/*.png -o masks/ --model em-membranes"""
CONTEXT = {"ignore_unknown_options": True, "allow_extra_args": True}


def command(ctx: typer.Context) -> None:
    raise NotAvailableError("`unet predict` is not available yet in this version",
                            hint="see CHANGELOG.md for what this version provides")
