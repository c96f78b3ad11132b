"""`unet evaluate`: not available in this version yet (exits 2)."""

from __future__ import annotations

import typer

from unetcli.errors import NotAvailableError

NAME = "evaluate"
HELP = ('Score predictions against ground truth: IoU, Dice, pixel error, Rand and information scores, warping error, object F1 and AP.')
EPILOG = """Examples:

  unet evaluate predictions/ --truth labels/

  unet evaluate pred.tif --truth truth.tif --json"""
CONTEXT = {"ignore_unknown_options": True, "allow_extra_args": True}


def command(ctx: typer.Context) -> None:
    raise NotAvailableError("`unet evaluate` is not available yet in this version",
                            hint="see CHANGELOG.md for what this version provides")
