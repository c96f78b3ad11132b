"""Files written atomically, and the temporaries of writers that died cleaned up.

Every output of unet goes to a temporary file beside its target, renamed over the target only once
complete, so an interrupted or failed command never leaves a truncated output. A SIGTERM or Ctrl-C
removes the temporary on the way out; a SIGKILL cannot, so the temporary's name carries the writer's
process id, and the next writer of the same target removes the temporaries whose process is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

from unetcli.errors import ImageWriteError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0   # someone else's process (or an impossible number: not ours to judge)
    return True


def remove_stale_temporaries(folder: Path, stem: str, suffix: str) -> list[Path]:
    """Remove ``.STEM.PID.XXXXXXXX.partSUFFIX`` files in ``folder`` whose process PID has ended."""
    pattern = re.compile(r"(\d{1,10})\.[A-Za-z0-9_]{8}\.part" + re.escape(suffix))
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            name = entry.name
            if not name.startswith(f".{stem}."):
                continue
            match = pattern.fullmatch(name[len(stem) + 2:])
            if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise ImageWriteError(f"{target}: folder {folder} does not exist", hint="create it first")
    # the temporary name must fit the file system's 255-byte limit whatever the target's length:
    # '.' + the name's first bytes + '.' + process id + '.' + 8 random characters + '.part' + suffix
    pid = os.getpid()
    budget = 255 - len(f"..{pid}.XXXXXXXX.part{suffix}".encode())
    stem = target.name.encode()[:max(budget, 1)].decode("utf-8", "ignore")
    remove_stale_temporaries(folder, stem, suffix)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.{pid}.", suffix=f".part{suffix}", dir=folder)
    except OSError as exc:
        raise ImageWriteError(f"{target}: cannot write in {folder} ({exc.strerror})") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike, payload: bytes) -> None:
    """Write any bytes (JSON, CSV) atomically."""
    try:
        with atomic_output(path) as tmp:
            tmp.write_bytes(payload)
    except OSError as exc:
        raise ImageWriteError(f"{path}: cannot write ({exc.strerror})") from exc
