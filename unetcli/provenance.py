"""Where a result came from: file hashes, the software environment, the time, the command line.

One home for the facts that model files (``checkpoint.save_model``), training runs and prediction
sidecars record, so that each is computed by one rule. The command line is never read here from
``sys.argv``: the command layer (``cli.run``) knows what ran and passes it down, so that a test runner
or a Python caller records its own invocation rather than the interpreter's.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import shlex
from typing import BinaryIO, Sequence

from unetcli import __version__

CHUNK = 1 << 22     # 4 MiB: large enough for full disk speed, small enough to stay out of the way


def utc_now() -> str:
    """The current time in UTC as ISO 8601 to the second, e.g. ``2026-11-21T11:57:15+00:00``."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def sha256_stream(fh: BinaryIO, limit: int | None = None) -> str:
    """SHA-256 (hex) of what ``fh`` yields from its position: to its end, or ``limit`` bytes at most."""
    h = hashlib.sha256()
    left = limit
    while left is None or left > 0:
        chunk = fh.read(CHUNK if left is None else min(CHUNK, left))
        if not chunk:
            break
        h.update(chunk)
        if left is not None:
            left -= len(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks (any size of file, bounded memory)."""
    with open(path, "rb") as fh:
        return sha256_stream(fh)


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    """SHA-256 (hex) of bytes already in memory (stdin, an encoded output)."""
    return hashlib.sha256(data).hexdigest()


def package_version(name: str) -> str | None:
    """The installed version of a distribution, without importing it; None when it is absent."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(packages: Sequence[str] = ("torch", "numpy")) -> dict:
    """The software a result was made with: unet, Python, the platform and ``packages``' versions."""
    env = {"unet": __version__, "python": platform.python_version()}
    for name in packages:
        env[name] = package_version(name)
    env["platform"] = platform.platform()
    return env


def command_line(argv: Sequence[str] | str | None) -> str | None:
    """One string for a command line as given to ``cli.run`` (quoted as a POSIX shell would need)."""
    if argv is None or isinstance(argv, str):
        return argv
    return shlex.join(str(a) for a in argv)


def stamp(command: Sequence[str] | str | None = None) -> dict:
    """The record every written model carries: unet's version, the time, and the command if known."""
    record = {"unet_version": __version__, "created": utc_now()}
    text = command_line(command)
    if text:
        record["command"] = text
    return record
