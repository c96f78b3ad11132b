"""`unet weights`: not available in this version yet (exits 2)."""

from __future__ import annotations

import typer

from unetcli.errors import NotAvailableError

NAME = "weights"
HELP = ("Per-pixel loss weight maps from label images: class balance plus the paper's border term w0*exp(-(d1+d2)^2/(2 sigma^2)) that separates touching objects.")
EPILOG = """Examples:

  unet weights labels.png -o weights.tif

  unet weights labels/*.png -o weights/ --preview check.png"""
CONTEXT = {"ignore_unknown_options": True, "allow_extra_args": True}


def command(ctx: typer.Context) -> None:
    raise NotAvailableError("`unet weights` is not available yet in this version",
                            hint="see CHANGELOG.md for what this version provides")
