"""Reading and writing image files: TIFF (pages, stacks, any integer or float type), PNG, JPEG, BMP.

Every image comes back in one canonical layout, ``(N, H, W, C)``: N pages (1 for a plain image), H rows,
W columns, C channels (1 for grey). Writers take an explicit layout and write atomically: the bytes go
to a temporary file in the target folder, which is renamed over the target only once complete, so an
interrupted or failed command never leaves a truncated output. ``-`` as a path means stdin or stdout.

TIFF goes through tifffile; PNG, JPEG and BMP through Pillow (which imageio brings), except 16-bit colour
PNG, which Pillow cannot hold: a small numpy codec below reads and writes those exactly.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import sys
import tempfile
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from unetcli.errors import ImageReadError, ImageShapeError, ImageWriteError, TooLargeError

TIFF, PNG, JPEG, BMP = "tiff", "png", "jpeg", "bmp"
READ_FORMATS = (TIFF, PNG, JPEG, BMP)
WRITE_FORMATS = (TIFF, PNG)
_EXTENSIONS = {".tif": TIFF, ".tiff": TIFF, ".png": PNG, ".jpg": JPEG, ".jpeg": JPEG, ".bmp": BMP}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYOUTS = ("YX", "YXC", "ZYX", "ZYXC")


# --------------------------------------------------------------------------------------------- formats

def format_from_name(path: str | os.PathLike) -> str | None:
    """The format its file name's extension names, or None."""
    return _EXTENSIONS.get(Path(str(path)).suffix.lower())


def sniff_format(head: bytes) -> str | None:
    """The format the first bytes of a file announce, or None."""
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return TIFF
    if head[:8] == _PNG_MAGIC:
        return PNG
    if head[:3] == b"\xff\xd8\xff":
        return JPEG
    if head[:2] == b"BM":
        return BMP
    return None


def is_image_path(path: str | os.PathLike) -> bool:
    """True if the name has an image extension this module reads."""
    return format_from_name(path) is not None


def available_memory() -> int:
    """Bytes of memory the system can still give us (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def _check_fits(name: str, shape: tuple[int, ...], itemsize: int, budget: int | None) -> None:
    need = int(np.prod(shape, dtype=np.float64)) * itemsize
    limit = available_memory() if budget is None else budget
    if need > limit:
        dims = "x".join(str(s) for s in shape)
        raise TooLargeError(f"{name}: declares {dims} pixels ({need / 2**30:.1f} GiB), more than the "
                            f"{limit / 2**30:.1f} GiB of memory available")


# ------------------------------------------------------------------------------------------------ read

def read_image(path: str | os.PathLike, *, memory_budget: int | None = None,
               stdin_bytes: bytes | None = None) -> np.ndarray:
    """Read an image file (or ``-`` for stdin) into an ``(N, H, W, C)`` array of its own dtype.

    ``stdin_bytes``: what was read from stdin already (for ``-``), when the caller needed the bytes too.

    Raises ImageReadError for a missing, foreign, truncated or non-finite image, TooLargeError when the
    declared size exceeds ``memory_budget`` bytes (default: the memory available), before allocating.
    """
    name = "<stdin>" if str(path) == "-" else str(path)
    if str(path) == "-":
        data = sys.stdin.buffer.read() if stdin_bytes is None else stdin_bytes
        source: BinaryIO | str = io.BytesIO(data)
        head, size = data[:16], len(data)
    else:
        p = Path(path)
        if not p.exists():
            raise ImageReadError(f"{name}: no such file", hint="check the path")
        if p.is_dir():
            raise ImageReadError(f"{name}: is a folder, not an image file", hint="give image files")
        try:
            with open(p, "rb") as fh:
                head = fh.read(16)
            size = p.stat().st_size
        except OSError as exc:
            raise ImageReadError(f"{name}: cannot read ({exc.strerror})") from exc
        source = str(p)
    if size == 0:
        raise ImageReadError(f"{name}: empty file")
    fmt = sniff_format(head)
    if fmt is None:
        raise ImageReadError(f"{name}: not an image file this tool reads (TIFF, PNG, JPEG, BMP)")
    try:
        if fmt == TIFF:
            arr = _read_tiff(source, name, size, memory_budget)
        else:
            arr = _read_pillow(source, name, fmt, memory_budget)
    except (ImageReadError, TooLargeError, ImageShapeError):
        raise
    except MemoryError as exc:
        raise TooLargeError(f"{name}: does not fit in memory") from exc
    except Exception as exc:  # codec errors come in many types; all mean a damaged file
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageReadError(f"{name}: damaged or truncated {fmt.upper()} file ({detail[:160]})") from exc
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ImageShapeError(f"{name}: image has no pixels (shape {arr.shape[1]}x{arr.shape[2]})")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ImageReadError(f"{name}: contains NaN or infinite pixel values",
                             hint="replace them (e.g. with 0) before using the image")
    if arr.dtype.kind == "c":
        raise ImageShapeError(f"{name}: complex-valued pixels are not supported")
    return arr


def _read_tiff(source, name: str, size: int, budget: int | None) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(source) as tf:
        if not tf.series:
            raise ImageReadError(f"{name}: TIFF file holds no image")
        series = tf.series[0]
        if len(tf.series) > 1 and all(getattr(s, "kind", "").lower() == "generic" for s in tf.series):
            # a plain multi-page TIFF whose pages differ: tifffile splits it, and reading series[0]
            # alone would silently drop pages
            a, b = tf.series[0], tf.series[1]
            first, other = a.pages[0], b.pages[0]
            raise ImageShapeError(f"{name}: stack with inconsistent pages (page 1 is "
                                  f"{'x'.join(map(str, first.shape))} {first.dtype}, page {len(a.pages) + 1} "
                                  f"is {'x'.join(map(str, other.shape))} {other.dtype})",
                                  hint="every page of a stack needs the same size and pixel type")
        _check_fits(name, tuple(series.shape), series.dtype.itemsize, budget)
        for page in tf.pages:
            offsets = getattr(page, "dataoffsets", ()) or ()
            counts = getattr(page, "databytecounts", ()) or ()
            if any(o + c > size for o, c in zip(offsets, counts)):
                raise ImageReadError(f"{name}: truncated TIFF file (image data runs past the end)",
                                     hint="the file was cut short; copy or export it again")
        arr = series.asarray()
        axes = series.axes
    return _to_canonical(np.asarray(arr), axes, name)


def _to_canonical(arr: np.ndarray, axes: str, name: str) -> np.ndarray:
    """Reorder a tifffile array with axes like 'YX', 'YXS', 'ZCYX' into (N, H, W, C)."""
    if "Y" not in axes or "X" not in axes:
        raise ImageShapeError(f"{name}: unsupported TIFF layout {axes!r} (needs rows and columns)")
    chan = "S" if "S" in axes else ("C" if "C" in axes else None)
    rest = [i for i, a in enumerate(axes) if a not in ("Y", "X") and a != chan]
    order = rest + [axes.index("Y"), axes.index("X")] + ([axes.index(chan)] if chan else [])
    arr = np.transpose(arr, order)
    n = int(np.prod([arr.shape[i] for i in range(len(rest))], dtype=np.int64)) if rest else 1
    h, w = arr.shape[len(rest)], arr.shape[len(rest) + 1]
    c = arr.shape[-1] if chan else 1
    return np.ascontiguousarray(arr.reshape(n, h, w, c))


def _png_header(head: bytes) -> tuple[int, int, int, int, int] | None:
    """(width, height, bit depth, colour type, interlace) from a PNG's first 33 bytes."""
    if len(head) < 33 or head[12:16] != b"IHDR":
        return None
    w, h, depth, ctype, _comp, _filt, interlace = struct.unpack(">IIBBBBB", head[16:29])
    return w, h, depth, ctype, interlace


def _read_pillow(source, name: str, fmt: str, budget: int | None) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # our own memory check below replaces Pillow's bomb guard
    if fmt == PNG:
        if isinstance(source, io.BytesIO):
            head = source.getvalue()[:33]
        else:
            with open(source, "rb") as fh:
                head = fh.read(33)
        hdr = _png_header(head)
        if hdr is None:
            raise ImageReadError(f"{name}: damaged PNG file (no IHDR header)")
        w, h, depth, ctype, interlace = hdr
        channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(ctype, 1)
        _check_fits(name, (h, w, channels), 2 if depth == 16 else 1, budget)
        if depth == 16 and ctype in (2, 4, 6) and interlace == 0:
            raw = source.getvalue() if isinstance(source, io.BytesIO) else Path(source).read_bytes()
            return decode_png(raw, name)[None]
    with Image.open(source) as img:
        _check_fits(name, (img.size[1], img.size[0], len(img.getbands())), 1, budget)
        img.load()
        mode = img.mode
        if mode == "1":
            arr = np.asarray(img, dtype=np.uint8)
        elif mode in ("I;16", "I;16B", "I;16L"):
            arr = np.asarray(img).astype(np.uint16)
        elif mode == "I":
            arr = np.asarray(img)
            if arr.min() >= 0 and arr.max() <= 0xFFFF:
                arr = arr.astype(np.uint16)
        elif mode in ("P", "PA"):
            arr = np.asarray(img.convert("L") if mode == "PA" else img)  # palette: keep the indices
        elif mode in ("L", "LA", "RGB", "RGBA", "F"):
            arr = np.asarray(img)
        else:
            arr = np.asarray(img.convert("RGB"))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr)[None]


# ------------------------------------------------------------------------- PNG codec (16-bit colour)

def decode_png(raw: bytes, name: str) -> np.ndarray:
    """Decode a non-interlaced grey, grey+alpha, RGB or RGBA PNG of 8 or 16 bits to (H, W, C), exactly.

    Pillow cannot hold 16-bit colour, so those files come here; the tests check this codec against
    Pillow on 8-bit files, which exercise the same five row filters.
    """
    pos, idat, hdr = 8, [], None
    while pos + 8 <= len(raw):
        length, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        body = raw[pos + 8:pos + 8 + length]
        if len(body) < length:
            raise ImageReadError(f"{name}: truncated PNG file")
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body[:13])
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if hdr is None or not idat:
        raise ImageReadError(f"{name}: truncated PNG file (no image data)")
    w, h, depth, ctype = hdr[:4]
    if depth not in (8, 16) or ctype not in (0, 2, 4, 6) or hdr[6] != 0:
        raise ImageReadError(f"{name}: unsupported PNG variant (depth {depth}, colour type {ctype})")
    c = {0: 1, 2: 3, 4: 2, 6: 4}[ctype]
    bpp = c * depth // 8
    stride = bpp * w
    try:
        data = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        raise ImageReadError(f"{name}: damaged PNG image data ({exc})") from exc
    if len(data) < h * (stride + 1):
        raise ImageReadError(f"{name}: truncated PNG file (image data ends early)")
    rows = np.frombuffer(data, np.uint8, h * (stride + 1)).reshape(h, stride + 1)
    out = np.zeros((h, stride), np.uint8)
    prev = np.zeros(stride, np.int64)
    for y in range(h):
        ftype, line = rows[y, 0], rows[y, 1:].astype(np.int64)
        if ftype == 0:
            cur = line
        elif ftype == 1:    # Sub: a running sum along the row, per byte of a pixel
            cur = np.cumsum(line.reshape(w, bpp), axis=0).reshape(-1) & 0xFF
        elif ftype == 2:    # Up
            cur = (line + prev) & 0xFF
        elif ftype in (3, 4):  # Average, Paeth: each byte needs its decoded left neighbour
            cur = line.copy()
            for x in range(stride):
                a = cur[x - bpp] if x >= bpp else 0
                b = prev[x]
                if ftype == 3:
                    pred = (a + b) >> 1
                else:
                    cc = prev[x - bpp] if x >= bpp else 0
                    p = a + b - cc
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - cc)
                    pred = a if (pa <= pb and pa <= pc) else (b if pb <= pc else cc)
                cur[x] = (cur[x] + pred) & 0xFF
        else:
            raise ImageReadError(f"{name}: damaged PNG file (filter type {ftype})")
        out[y] = cur
        prev = cur
    if depth == 8:
        return out.reshape(h, w, c)
    return out.view(">u2").reshape(h, w, c).astype(np.uint16)


def _encode_png16(arr: np.ndarray) -> bytes:
    """Encode (H, W, C) uint16 with C in 2, 3, 4 as a PNG (filter none, zlib level 6)."""
    h, w, c = arr.shape
    ctype = {2: 4, 3: 2, 4: 6}[c]
    body = arr.astype(">u2").reshape(h, w * c).view(np.uint8)
    scan = np.concatenate([np.zeros((h, 1), np.uint8), body], axis=1).tobytes()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0)
    return _PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(scan, 6)) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------------------- write

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise ImageWriteError(f"{target}: folder {folder} does not exist", hint="create it first")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".part{suffix}", dir=folder)
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


def _normalise_layout(data: np.ndarray, layout: str | None) -> tuple[np.ndarray, str]:
    if layout is None:
        if data.ndim == 2:
            layout = "YX"
        elif data.ndim == 4:
            layout = "ZYXC"
        else:
            raise ValueError("a 3-D array needs an explicit layout: 'YXC' or 'ZYX'")
    if layout not in LAYOUTS or len(layout) != data.ndim:
        raise ValueError(f"layout {layout!r} does not fit an array of shape {data.shape}")
    if layout == "ZYXC":  # fold the canonical layout back to the simplest one
        if data.shape[3] == 1:
            data, layout = data[..., 0], "ZYX"
        if data.shape[0] == 1:
            data, layout = data[0], layout[1:]
    if layout == "YXC" and data.shape[2] == 1:
        data, layout = data[..., 0], "YX"
    return data, layout


def encode_image(data: np.ndarray, fmt: str, layout: str | None = None, *, name: str = "output") -> bytes:
    """The bytes of ``data`` as a ``fmt`` file. TIFF is zlib-compressed."""
    data, layout = _normalise_layout(np.asarray(data), layout)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    buf = io.BytesIO()
    if fmt == TIFF:
        import tifffile

        if data.dtype.kind not in "uif" or data.dtype.itemsize > 8:
            raise ImageWriteError(f"{name}: cannot write {data.dtype} pixels to TIFF")
        colour = layout.endswith("C") and data.shape[-1] in (3, 4) and data.dtype == np.uint8
        tifffile.imwrite(buf, data, compression="zlib", photometric="rgb" if colour else "minisblack",
                         planarconfig="contig" if layout.endswith("C") else None,
                         extrasamples=("unassalpha",) if colour and data.shape[-1] == 4 else None,
                         metadata=None)
    elif fmt == PNG:
        if layout.startswith("Z"):
            raise ImageWriteError(f"{name}: PNG holds one image, not a stack of {data.shape[0]}",
                                  hint="write a .tif for stacks and multi-page outputs")
        if data.dtype not in (np.uint8, np.uint16):
            raise ImageWriteError(f"{name}: PNG holds 8- or 16-bit unsigned pixels, not {data.dtype}",
                                  hint="write a .tif for float or 32-bit data")
        channels = data.shape[2] if layout == "YXC" else 1
        if channels not in (1, 2, 3, 4):
            raise ImageWriteError(f"{name}: PNG holds 1 to 4 channels, not {channels}")
        if data.dtype == np.uint16 and channels > 1:
            buf.write(_encode_png16(data))
        else:
            from PIL import Image

            if data.dtype == np.uint16:
                img = Image.frombytes("I;16", (data.shape[1], data.shape[0]), data.astype("<u2").tobytes())
            else:
                img = Image.fromarray(np.ascontiguousarray(data), mode={1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels])
            img.save(buf, format="PNG", compress_level=6)
    else:
        raise ImageWriteError(f"{name}: cannot write {fmt.upper()}; write .tif or .png")
    return buf.getvalue()


def write_image(path: str | os.PathLike, data: np.ndarray, layout: str | None = None, *,
                fmt: str | None = None) -> None:
    """Write ``data`` atomically to ``path`` (``-``: stdout, then ``fmt`` is needed).

    ``layout`` is 'YX', 'YXC', 'ZYX' or 'ZYXC' (the canonical layout of ``read_image``); 2-D and 4-D
    arrays need none. The format comes from ``fmt`` or the file name.
    """
    name = "<stdout>" if str(path) == "-" else str(path)
    fmt = fmt or (None if str(path) == "-" else format_from_name(path))
    if fmt is None:
        if str(path) == "-":
            raise ImageWriteError("<stdout>: say which format to write", hint="add --format tiff or --format png")
        raise ImageWriteError(f"{name}: unknown output format", hint="use a .tif, .tiff or .png name")
    if fmt not in WRITE_FORMATS:
        raise ImageWriteError(f"{name}: cannot write {fmt.upper()}; write .tif or .png")
    payload = encode_image(data, fmt, layout, name=name)
    if str(path) == "-":
        sys.stdout.buffer.write(payload)
        sys.stdout.buffer.flush()
        return
    try:
        with atomic_output(path) as tmp:
            tmp.write_bytes(payload)
    except OSError as exc:
        raise ImageWriteError(f"{name}: cannot write ({exc.strerror})") from exc


def write_bytes_atomic(path: str | os.PathLike, payload: bytes) -> None:
    """Write any bytes (JSON, CSV) atomically."""
    try:
        with atomic_output(path) as tmp:
            tmp.write_bytes(payload)
    except OSError as exc:
        raise ImageWriteError(f"{path}: cannot write ({exc.strerror})") from exc


def pages(arr: np.ndarray) -> Iterator[np.ndarray]:
    """The ``(H, W, C)`` planes of a canonical array."""
    for i in range(arr.shape[0]):
        yield arr[i]
