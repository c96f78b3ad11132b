"""The one stderr console of the command line: messages for a person, never data.

Only ``cli.py`` and ``commands/`` use this module. Progress bars appear only when stderr is a
terminal and ``--quiet`` is off; ``NO_COLOR`` turns colour off (rich honours it).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator

from rich.console import Console

QUIET = 0
NORMAL = 1
VERBOSE = 2

_level = NORMAL
_console: Console | None = None


def console() -> Console:
    """The shared stderr console, created on first use."""
    global _console
    if _console is None:
        _console = Console(stderr=True, highlight=False, no_color="NO_COLOR" in os.environ or None)
        if not _console.is_terminal:         # a log file or a pipe: one line per message, never wrapped
            _console.soft_wrap = True
    return _console


def set_level(quiet: bool = False, verbose: bool = False) -> None:
    global _level
    _level = QUIET if quiet else (VERBOSE if verbose else NORMAL)


def level() -> int:
    return _level


def info(message: str) -> None:
    """A note for a person, hidden by ``--quiet``."""
    if _level >= NORMAL:
        console().print(message, markup=False)


def detail(message: str) -> None:
    """A note shown only with ``--verbose``."""
    if _level >= VERBOSE:
        console().print(message, markup=False, style="dim")


def warn(message: str) -> None:
    """A warning, shown even with ``--quiet``."""
    console().print(f"unet: warning: {message}", markup=False, style="yellow")


def error(line: str) -> None:
    """The one-line error; plain text so that scripts can grep it."""
    sys.stderr.write(line.rstrip("\n") + "\n")
    sys.stderr.flush()


def interactive() -> bool:
    """True when progress bars make sense: stderr is a terminal and we are not quiet."""
    try:
        return _level >= NORMAL and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def progress(total: int | None, description: str, keep: bool = False) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, **fields)``; draws a rich progress bar only on an interactive stderr.

    ``keep`` leaves the finished bar on the screen (with its last fields) instead of removing it."""
    if not interactive():
        yield lambda n=1, **fields: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
    with Progress(*columns, console=console(), transient=not keep) as bar:
        task = bar.add_task(description, total=total, status="")

        def advance(n: int = 1, **fields) -> None:
            status = "  ".join(f"{k} {v}" for k, v in fields.items())
            bar.update(task, advance=n, **({"status": status} if fields else {}))

        yield advance
