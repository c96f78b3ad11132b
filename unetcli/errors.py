"""Typed failures of the core library.

The core never prints and never exits: it raises one of these. ``cli.py`` turns them into one line on
stderr, ``unet: error: <message> (hint: <hint>)``, and exit status 1.
"""

from __future__ import annotations


class UnetError(Exception):
    """A failure the user can do something about; ``hint`` says what."""

    default_hint: str | None = None

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return self.message

    def one_line(self) -> str:
        """The message and its hint as one line, newlines folded."""
        text = self.message if not self.hint else f"{self.message} (hint: {self.hint})"
        return " ".join(text.split())


class ImageReadError(UnetError):
    """An input image is missing, unreadable, truncated, or holds values we cannot use."""

    default_hint = "check that the file is a complete TIFF, PNG, JPEG or BMP image"


class ImageWriteError(UnetError):
    """An output could not be written (folder missing, not writable, unsupported dtype for format)."""

    default_hint = "check the output path and its folder's permissions"


class ImageShapeError(UnetError):
    """An image has a shape or channel count the operation cannot use."""


class TooLargeError(UnetError):
    """An input's declared size would not fit in the memory available."""

    default_hint = "crop or tile the image first, or use a machine with more memory"


class ModelFileError(UnetError):
    """A model file is missing, truncated, of another format, or of a newer format version."""

    default_hint = "give a path to a .unet file, or a shipped model name (see `unet predict --list-models`)"


class ConfigError(UnetError):
    """An option or combination of options that cannot work."""


class TileSizeError(ConfigError):
    """A tile size the network cannot take."""


class LabelError(UnetError):
    """Label images that are not labels (fractions, unknown classes, mismatched sizes)."""


class RunFolderError(UnetError):
    """A training run folder that cannot be used (not empty, not a run, damaged state)."""
