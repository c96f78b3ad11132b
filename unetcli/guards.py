"""Guards shared by every subcommand: nothing lost, nothing unbounded.

Each guard runs before the work it protects and raises a typed error of ``errors.py`` (never prints):

- :func:`check_outputs`: no output lands on an input (resolved paths: symlinks, ``..``, hard links,
  a folder output plus the names that will be added to it, an extension change in an input folder),
  and no two outputs land on one file.
- :class:`RunLock`: one writer per run folder (``fcntl.flock`` on ``.unet-lock`` inside it).
- :func:`cap_workers`, :func:`cap_threads`: worker processes and threads bounded by the cores this
  process may run on.
- :func:`check_memory`: the memory rule of the decoded-image guard (need > MemAvailable is refused),
  applied to any array a command will derive; :func:`format_bytes` words sizes for it.
- :func:`check_finite`: no NaN or infinity written where finite inputs overflowed.
- :func:`declared_shape`: an image's size from its header alone, a TIFF whose pages differ in size or
  type refused on the way (``images.check_tiff_series``, the reader's own rule).
- :class:`Terminated`, :func:`raise_on_sigterm`: SIGTERM as an exception that ``except Exception``
  blocks cannot swallow, so that temporary files are removed on the way out.
"""

from __future__ import annotations

import errno
import io
import math
import os
import signal
from pathlib import Path
from typing import Iterable

from unetcli.errors import ConfigError, ImageReadError, ImageShapeError, ImageWriteError, TooLargeError

LOCK_NAME = ".unet-lock"
"""The lock file :class:`RunLock` keeps inside a run folder (a run folder's own files should ignore it)."""

THREADS_PER_CORE = 4
"""``cap_threads`` refuses more than this many threads per core: beyond it they only wait for each other."""


# ------------------------------------------------------------------------------------------- outputs

def _is_stream(path) -> bool:
    return path is None or str(path) == "-"


def _resolved(path) -> Path:
    # realpath resolves each symlink before the '..' that follows it, as the kernel does
    return Path(os.path.realpath(str(path)))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _image_files(folder: Path) -> list[Path]:
    from unetcli.images import image_files

    try:
        return image_files(folder)
    except OSError:
        return []


def check_outputs(inputs: Iterable, outputs: Iterable) -> None:
    """Refuse, before any work, outputs that would replace an input or each other.

    ``inputs``: the paths the command reads, as given (files or folders; ``-`` and None are skipped);
    a folder stands for the image files in it. ``outputs``: the final file paths the command will
    write, with the names and extensions it will add (``-`` and None are skipped). Compared on resolved
    paths, so symlinks and ``..`` are seen through, and on inode, so hard links are too.

    Refused (ConfigError naming both paths):

    - an output that is an input file, or an input folder;
    - an output written into a folder given as an input under the name of one of its images with
      another extension (``--mask-out labels/`` writing ``labels/x.png`` beside ``labels/x.tif``):
      the next run over that folder would take the output for an input;
    - two outputs that are one file (the second would replace the first);
    - for Zarr images (``zarrio.check_inputs_outputs``): an output inside a Zarr input other than a
      label image in its ``labels/`` group, and an output that would replace a folder holding an input.
    """
    inputs, outputs = list(inputs), list(outputs)
    files: dict[Path, str] = {}
    idents: dict[tuple[int, int], str] = {}
    folders: dict[Path, str] = {}
    stems: dict[tuple[Path, str], str] = {}
    for given in inputs:
        if _is_stream(given):
            continue
        path = _resolved(given)
        if path.is_dir():
            folders[path] = str(given)
            for f in _image_files(path):
                member = f.resolve(strict=False)
                shown = os.path.join(str(given), f.name)
                files.setdefault(member, shown)
                stems.setdefault((path, f.stem), shown)
                ident = _identity(member)
                if ident is not None:
                    idents.setdefault(ident, shown)
        else:
            files.setdefault(path, str(given))
            ident = _identity(path)
            if ident is not None:
                idents.setdefault(ident, str(given))
    seen: dict[Path, str] = {}
    for given in outputs:
        if _is_stream(given):
            continue
        path = _resolved(given)
        ident = _identity(path)
        hit = files.get(path) or folders.get(path) or (idents.get(ident) if ident is not None else None)
        if hit is not None:
            raise ConfigError(f"{given}: output would overwrite the input {hit}",
                              hint="write the output somewhere else")
        beside = stems.get((path.parent, path.stem))
        if beside is not None:
            raise ConfigError(f"{given}: output would land in the input folder {path.parent} under the name "
                              f"of the input {beside}", hint="write the output to another folder")
        if path in seen:
            raise ConfigError(f"{given}: two outputs would be written to this one file (also {seen[path]})",
                              hint="give the outputs separate files or folders")
        seen[path] = str(given)
    from unetcli.zarrio import check_inputs_outputs

    check_inputs_outputs(inputs, outputs)


# ------------------------------------------------------------------------------------- run-folder lock

class RunLock:
    """One writer per run folder: an exclusive ``fcntl.flock`` on ``FOLDER/.unet-lock``.

    Usage (in ``unet train``, once the run folder exists and before its first file is written)::

        from unetcli.guards import RunLock
        with RunLock(run_dir, what="unet train"):
            ...  # everything that writes into run_dir

    A second holder, in this process or another, gets ConfigError "FOLDER is in use by another unet
    train (pid N)". The lock is released when the block ends, however it ends, and by the kernel when
    the process dies (SIGKILL included), so a lock file left behind by a dead process is stale by
    construction and simply taken over. The file holds the holder's pid, for that message; it is
    removed on release. Where the filesystem cannot lock (some network filesystems), ``locked`` is False
    and ``problem`` says why; the block then runs unlocked.
    """

    def __init__(self, folder, what: str = "unet train"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.locked = False
        self.problem: str | None = None
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        if not self.folder.is_dir():
            raise ConfigError(f"{self.folder}: run folder does not exist", hint="create it before locking it")
        for _ in range(20):  # retried only when the file was replaced under us (see below)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as exc:
                raise ConfigError(f"{self.folder}: cannot create its lock file ({exc.strerror})",
                                  hint="check the folder's permissions") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    pid = _read_pid(fd)
                    os.close(fd)
                    raise ConfigError(f"{self.folder} is in use by another {self.what} "
                                      f"({'pid ' + str(pid) if pid else 'pid unknown'})",
                                      hint="wait for it to finish, or give another folder") from None
                os.close(fd)
                self.problem = f"cannot lock {self.path} ({exc.strerror})"
                return self
            # The holder before us may have removed the file between our open and our lock: then we
            # hold a lock on a file nobody else will find. Lock the file at the path, or try again.
            if _identity(self.path) != _identity_fd(fd):
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd, self.locked = fd, True
            return self
        raise ConfigError(f"{self.folder}: its lock file keeps changing", hint="is another unet running?")

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            # remove first, then unlock: a waiting opener then finds the file gone and retries
            if _identity(self.path) == _identity_fd(self._fd):
                os.unlink(self.path)
        except OSError:
            pass
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd, self.locked = None, False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _identity_fd(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


# ---------------------------------------------------------------------------------------- processors

def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask; the machine's count where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cap_workers(n: int, option: str = "--workers") -> int:
    """Refuse more worker processes than cores; return ``n`` unchanged otherwise.

    Each worker is a whole process with its own copy of the data pipeline; more of them than cores
    only adds memory and start-up time. Call before any worker starts, e.g. in ``unet train``::

        workers = cap_workers(workers)           # ConfigError for < 0 or > cores
    """
    cores = cpu_cores()
    if n < 0:
        raise ConfigError(f"{option} {n}: must be 0 (load in the main process) or more")
    if n > cores:
        raise ConfigError(f"{option} {n}: refused, more worker processes than the {cores} core"
                          f"{'s' if cores != 1 else ''} this machine gives us",
                          hint=f"use {option} {cores} or fewer")
    return n


def cap_threads(n: int, option: str = "--threads") -> int:
    """Refuse more than ``THREADS_PER_CORE`` threads per core; return ``n`` unchanged otherwise.

    A few threads per core can hide waits; thousands only crash the OpenMP runtime. Call before
    ``torch.set_num_threads``, e.g. in ``unet predict``::

        threads = cap_threads(threads)           # ConfigError for < 1 or > 4 x cores
    """
    cores = cpu_cores()
    if n < 1:
        raise ConfigError(f"{option} {n}: must be at least 1")
    if n > THREADS_PER_CORE * cores:
        raise ConfigError(f"{option} {n}: refused, more than {THREADS_PER_CORE} threads per core on the "
                          f"{cores} core{'s' if cores != 1 else ''} this machine gives us",
                          hint=f"use {option} {cores} (one per core) or up to {THREADS_PER_CORE * cores}")
    return n


# -------------------------------------------------------------------------------------------- memory

def format_bytes(n: float) -> str:
    """A size for a person, in the unit that keeps it readable: '512 bytes', '3.2 MiB', '12.4 GiB'."""
    if not math.isfinite(n):
        return "an unbounded amount"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 100 else f"{value:,.0f} {unit}"
    return f"{int(n)} bytes"


def check_memory(nbytes: float, what: str, name: str, budget: int | None = None) -> None:
    """Refuse work whose largest arrays would need more than the memory available.

    The rule of the decoded-image guard of ``images.py`` (need > MemAvailable, or > ``budget`` bytes
    when given), for arrays a command derives: ``nbytes`` is the caller's estimate of its peak, ``what``
    says what it is for ("weight maps of 65000x65000 pixels"), ``name`` the input it comes from.
    Non-finite or NaN estimates (from absurd options) are refused too. Raises TooLargeError.
    """
    from unetcli.images import available_memory

    limit = available_memory() if budget is None else budget
    if not nbytes <= limit:   # also true for NaN
        raise TooLargeError(f"{name}: {what} would need {format_bytes(nbytes)} of memory, more than the "
                            f"{format_bytes(limit)} available")


# -------------------------------------------------------------------------------------------- values

class NonFiniteError(ImageWriteError):
    """An output would hold NaN or infinity computed from finite inputs (an overflow)."""

    default_hint = "scale the inputs or options down"


def check_finite(array, name: str, hint: str | None = None) -> None:
    """Refuse to write ``array`` if it holds NaN or infinity (raise NonFiniteError naming ``name``).

    For outputs computed from finite inputs, where such values can only come from an overflow (a
    float64 value beyond float32's range, a huge option); call it just before the write.
    """
    import numpy as np

    arr = np.asarray(array)
    if arr.dtype.kind not in "fc":
        return
    bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise NonFiniteError(f"{name}: not written: {bad} of {arr.size} values are infinite or NaN, an "
                             "overflow of finite inputs", hint=hint)


# -------------------------------------------------------------------------------------------- stacks


def declared_shape(source, name: str | None = None) -> tuple[int, int, int] | None:
    """``(pages, height, width)`` an image file declares in its header, without decoding its pixels.

    ``source``: a path or the bytes of a file (as read from stdin). TIFFs are checked with
    ``images.check_tiff_series`` on the way (ImageShapeError). None where the header cannot be read: the
    reader's own errors then say what is wrong when the image is read.
    """
    from unetcli.images import TIFF, check_tiff_series, sniff_format

    label = name or str(source if not isinstance(source, (bytes, bytearray)) else "<stdin>")
    if not isinstance(source, (bytes, bytearray)):
        from unetcli.zarrio import declared_shape as zarr_shape, is_zarr_path

        if is_zarr_path(source):             # an OME-Zarr image: its metadata
            return zarr_shape(source)
    try:
        if isinstance(source, (bytes, bytearray)):
            head, stream = bytes(source[:16]), io.BytesIO(source)
        else:
            with open(source, "rb") as fh:
                head = fh.read(16)
            stream = str(source)
    except OSError:
        return None
    fmt = sniff_format(head)
    if fmt is None:
        return None
    try:
        if fmt == TIFF:
            import tifffile

            with tifffile.TiffFile(stream) as tf:
                check_tiff_series(tf, label)
                if not tf.series:
                    return None
                series = tf.series[0]
                axes, shape = series.axes, series.shape
                if "Y" not in axes or "X" not in axes:
                    return None
                pages = 1
                for axis, size in zip(axes, shape):
                    if axis not in "YXSC":
                        pages *= int(size)
                return pages, int(shape[axes.index("Y")]), int(shape[axes.index("X")])
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None   # we only read the header here; the size is what we want
        with Image.open(stream) as img:
            width, height = img.size
        return 1, int(height), int(width)
    except ImageShapeError:
        raise
    except Exception:   # a damaged header: read_image words that error
        return None



# ------------------------------------------------------------------------------------------- signals

class Terminated(BaseException):
    """SIGTERM, raised where the process was. A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` swallows it and every ``finally`` and temporary-file cleanup runs."""

    exit_code = 143


def raise_on_sigterm():
    """Make SIGTERM raise :class:`Terminated` in this (main) process; return the previous handler.

    A second SIGTERM during the clean-up is ignored (SIGKILL remains for the impatient). A forked
    child (a data-loader worker) that inherits the handler dies of the signal as usual instead.
    """
    owner = os.getpid()

    def handler(signum, _frame):
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        signal.signal(signum, signal.SIG_IGN)
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)
