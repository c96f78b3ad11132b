"""`unet train`: not available in this version yet (exits 2)."""

from __future__ import annotations

import typer

from unetcli.errors import NotAvailableError

NAME = "train"
HELP = ('Train a U-Net: weighted pixel-wise softmax cross-entropy, large tiles, heavy augmentation, checkpoints; on a GPU where there is one.')
EPILOG = """Examples:

  unet train --images train/images --labels train/labels --out runs/em

  unet train --resume runs/em"""
CONTEXT = {"ignore_unknown_options": True, "allow_extra_args": True}


def command(ctx: typer.Context) -> None:
    raise NotAvailableError("`unet train` is not available yet in this version",
                            hint="see CHANGELOG.md for what this version provides")
