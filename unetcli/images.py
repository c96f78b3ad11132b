"""Reading and writing image files: TIFF (pages, stacks, any integer or float type), PNG, JPEG, BMP.

Every image comes back in one canonical layout, ``(N, H, W, C)``: N pages (1 for a plain image), H rows,
W columns, C channels (1 for grey). Writers take an explicit layout and write atomically: the bytes go
to a temporary file in the target folder, which is renamed over the target only once complete, so an
interrupted or failed command never leaves a truncated output. ``-`` as a path means stdin or stdout: the caller hands over the bytes read or the stream to write to.

TIFF goes through tifffile; PNG through imagecodecs (libpng: 1- to 16-bit grey, grey+alpha, palette,
RGB and RGBA, interlaced or not, read and written exactly); JPEG and BMP through imageio's Pillow
plugin. An OME-Zarr folder (or Zarr array) is one image, read whole through ``zarrio`` (prediction
reads it a band of rows at a time instead). Palette images give their indices, not colours (label images are often stored so).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from unetcli.atomic import atomic_output
from unetcli.errors import ConfigError, ImageReadError, ImageShapeError, ImageWriteError, TooLargeError

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


def is_zarr(path: str | os.PathLike) -> bool:
    """True for a Zarr image (an OME-Zarr folder ``NAME.zarr`` or a Zarr array): one image, not a
    folder of images (``zarrio.is_zarr_path``; nothing of zarr imported)."""
    from unetcli.zarrio import is_zarr_path

    return is_zarr_path(path)


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The images directly in ``folder``, sorted by name: image files, and Zarr images (``NAME.zarr``
    folders); hidden files (``.name``) are left out.

    The one rule for "a folder given as input" (predict, evaluate, weights, training data, the output
    guards). Raises OSError where the folder cannot be listed.
    """
    return sorted(f for f in Path(folder).iterdir()
                  if not f.name.startswith(".") and ((f.is_file() and is_image_path(f))
                                                     or (f.name.lower().endswith(".zarr") and is_zarr(f))))


def expand_folders(args: list[str]) -> list[str]:
    """Input arguments with every folder replaced by its :func:`image_files` (``-``, files and Zarr
    images kept).

    Raises ImageReadError for a folder that holds no image file.
    """
    out: list[str] = []
    for arg in args:
        if arg != "-" and Path(arg).is_dir() and not is_zarr(arg):
            found = [str(f) for f in image_files(arg)]
            if not found:
                raise ImageReadError(f"{arg}: folder holds no image files (.tif, .png, .jpg, .bmp, .zarr)")
            out.extend(found)
        else:
            out.append(arg)
    return out


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


def _check_plausible(name: str, fmt: str, height: int, width: int, least: float, file_size: int) -> None:
    """Refuse a header that declares more pixels than the file's bytes can encode (a truncated file,
    or a decompression bomb): ``least`` is the fewest bytes any encoder needs for that many pixels."""
    if file_size < least:
        raise ImageReadError(f"{name}: damaged or truncated {fmt.upper()} file (its header declares "
                             f"{width}x{height} pixels, which {file_size} bytes cannot hold)")


def _file_size(source) -> int:
    return len(source.getvalue()) if isinstance(source, io.BytesIO) else os.path.getsize(source)


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
        if stdin_bytes is None:
            raise ConfigError("'-' (stdin): pass the bytes read from stdin as stdin_bytes",
                              hint="the command layer reads stdin; the library takes bytes")
        data = stdin_bytes
        source: BinaryIO | str = io.BytesIO(data)
        head, size = data[:16], len(data)
    else:
        p = Path(path)
        if not p.exists():
            raise ImageReadError(f"{name}: no such file", hint="check the path")
        if is_zarr(p):                       # an OME-Zarr image or a Zarr array: one image
            return _checked_pixels(_read_zarr(p, name, memory_budget), name)
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
            arr = (_read_png if fmt == PNG else _read_imageio)(source, name, fmt, memory_budget)
    except (ImageReadError, TooLargeError, ImageShapeError):
        raise
    except MemoryError as exc:
        raise TooLargeError(f"{name}: does not fit in memory") from exc
    except Exception as exc:  # codec errors come in many types; all mean a damaged file
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageReadError(f"{name}: damaged or truncated {fmt.upper()} file ({detail[:160]})") from exc
    return _checked_pixels(arr, name)


def _read_zarr(path: Path, name: str, budget: int | None) -> np.ndarray:
    """A whole OME-Zarr image (or Zarr array) as (N, H, W, C), refused before decoding when too large."""
    from unetcli import zarrio

    img = zarrio.open_image(path)
    _check_fits(name, img.canonical_shape, img.dtype.itemsize, budget)
    try:
        return img.read_all()
    except MemoryError as exc:
        raise TooLargeError(f"{name}: does not fit in memory") from exc


def _checked_pixels(arr: np.ndarray, name: str) -> np.ndarray:
    """``arr`` as read, or the error for pixels unet cannot use (none, NaN, beyond float32, complex)."""
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ImageShapeError(f"{name}: image has no pixels (shape {arr.shape[1]}x{arr.shape[2]})")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ImageReadError(f"{name}: contains NaN or infinite pixel values",
                             hint="replace them (e.g. with 0) before using the image")
    if arr.dtype.itemsize > 4 and arr.dtype.kind == "f" and arr.size:
        peak = float(np.abs(arr).max())
        if peak > 1e30:   # float32 (what every command computes in) ends at 3.4e38; keep room for sums
            raise ImageReadError(f"{name}: holds values up to {peak:.3g}, beyond the range unet computes "
                                 f"in (float32 arithmetic: magnitudes below 1e30)",
                                 hint="scale the image's values first")
    if arr.dtype.kind == "c":
        raise ImageShapeError(f"{name}: complex-valued pixels are not supported")
    return arr


_PLAIN_SERIES = ("generic", "shaped", "uniform")


def check_tiff_series(tf, name: str) -> None:
    """Refuse a TIFF whose pages tifffile splits into several plain series (raise ImageShapeError).

    Reading ``tf.series[0]`` alone would drop the other pages. Pages of different size or type give
    several series (generic, or shaped with tifffile's default metadata); so do pages of one size
    appended one ``imwrite`` at a time. Files whose extra series are by design (thumbnails of a slide
    scanner, OME images) are left alone. Call it on an open ``tifffile.TiffFile`` before reading.
    """
    series = tf.series
    if len(series) < 2 or not all(str(getattr(s, "kind", "")).lower() in _PLAIN_SERIES for s in series):
        return
    first = series[0]
    page = len(first.pages) + 1
    for other in series[1:]:
        a, b = first.pages[0], other.pages[0]
        if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
            raise ImageShapeError(
                f"{name}: stack with inconsistent pages, of different sizes or types (page 1 is "
                f"{'x'.join(map(str, a.shape))} {a.dtype}, page {page} is {'x'.join(map(str, b.shape))} "
                f"{b.dtype})", hint="every page of a stack needs the same size and pixel type; split it")
        page += len(other.pages)
    raise ImageShapeError(f"{name}: stack stored as {len(series)} separate images, of which only the first "
                          "would be read", hint="save the pages as one stack (e.g. tifffile.imwrite of a "
                                                "3-D array), or as separate files")


def check_tiff_complete(tf, name: str, size: int) -> None:
    """Refuse a TIFF whose pages point past the end of its ``size`` bytes (a cut-short copy), before any
    pixel is decoded."""
    for page in tf.pages:
        offsets = getattr(page, "dataoffsets", ()) or ()
        counts = getattr(page, "databytecounts", ()) or ()
        if any(o + c > size for o, c in zip(offsets, counts)):
            raise ImageReadError(f"{name}: truncated TIFF file (image data runs past the end)",
                                 hint="the file was cut short; copy or export it again")


def _read_tiff(source, name: str, size: int, budget: int | None) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(source) as tf:
        if not tf.series:
            raise ImageReadError(f"{name}: TIFF file holds no image")
        series = tf.series[0]
        check_tiff_series(tf, name)   # one rule: pages split into several series are never dropped
        _check_fits(name, tuple(series.shape), series.dtype.itemsize, budget)
        check_tiff_complete(tf, name, size)
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


def _png_chunks(raw: bytes, kinds: tuple[bytes, ...]) -> dict[bytes, bytes]:
    """The bodies of the ancillary chunks ``kinds`` that come before a PNG's image data."""
    found, pos = {}, 8
    while pos + 8 <= len(raw):
        length, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        if kind in (b"IDAT", b"IEND"):
            break
        if kind in kinds:
            found[kind] = raw[pos + 8:pos + 8 + length]
        pos += 12 + length
    return found


def _pack(pixels: np.ndarray) -> np.ndarray:
    """(..., C) uint8 colours, C in 3, 4, as one uint32 per colour."""
    key = np.zeros(pixels.shape[:-1], np.uint32)
    for c in range(pixels.shape[-1]):
        key = (key << 8) | pixels[..., c]
    return key


def _palette_indices(raw: bytes, colours: np.ndarray, name: str) -> np.ndarray:
    """The palette indices of a palette PNG that libpng decoded to RGB(A) colours: (H, W, 1) uint8.

    Where two palette entries have the same colour (and alpha), the pixel gets the lower index.
    """
    chunks = _png_chunks(raw, (b"PLTE", b"tRNS"))
    plte = chunks.get(b"PLTE", b"")
    palette = np.frombuffer(plte, np.uint8)[: len(plte) // 3 * 3].reshape(-1, 3)
    if colours.shape[-1] == 4:      # tRNS: one alpha per palette entry, 255 for entries beyond it
        alpha = np.full((len(palette), 1), 255, np.uint8)
        trns = np.frombuffer(chunks.get(b"tRNS", b""), np.uint8)[: len(palette)]
        alpha[: len(trns), 0] = trns
        palette = np.concatenate([palette, alpha], axis=1)
    keys, first = np.unique(_pack(palette), return_index=True)
    pixels = _pack(colours[..., : palette.shape[1]])
    pos = np.minimum(np.searchsorted(keys, pixels), max(len(keys) - 1, 0))
    if not len(keys) or not np.array_equal(keys[pos], pixels):
        raise ImageReadError(f"{name}: damaged PNG file (pixels outside its palette)")
    return first[pos].astype(np.uint8)[..., None]


class _InterlaceNote(logging.Filter):
    """Drops libpng's note that interlaced files need interlace handling: imagecodecs decodes them
    correctly all the same (the tests check it), and a core module must not print."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Interlace handling" not in record.getMessage()


@contextlib.contextmanager
def _quiet_libpng(interlaced: bool) -> Iterator[None]:
    if not interlaced:
        yield
        return
    logger, note = logging.getLogger("imagecodecs"), _InterlaceNote()
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)


def _read_png(source, name: str, fmt: str, budget: int | None) -> np.ndarray:
    import imagecodecs

    if isinstance(source, io.BytesIO):
        head = source.getvalue()[:33]
    else:
        with open(source, "rb") as fh:
            head = fh.read(33)
    hdr = _png_header(head)
    if hdr is None:
        raise ImageReadError(f"{name}: damaged PNG file (no IHDR header)")
    w, h, depth, ctype, interlace = hdr
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(ctype, 4)
    decoded = 4 if ctype == 3 else channels      # a palette decodes to RGB(A) before its indices
    # deflate never packs more than 1032 bytes into one; each row adds a filter byte
    row = (w * channels * depth + 7) // 8 + 1
    _check_plausible(name, fmt, h, w, h * row / 1032, _file_size(source))
    _check_fits(name, (h, w, decoded), 2 if depth == 16 else 1, budget)
    raw = source.getvalue() if isinstance(source, io.BytesIO) else Path(source).read_bytes()
    with _quiet_libpng(interlace):
        arr = imagecodecs.png_decode(raw)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if ctype == 3:
        arr = _palette_indices(raw, arr, name)
    elif arr.shape[2] > channels:               # libpng turns a tRNS colour key into an alpha channel
        arr = arr[:, :, :channels]
    if depth == 1 and ctype == 0:               # 1-bit masks read as 0/1, as they are stored
        arr = (arr > 0).astype(np.uint8)
    return np.ascontiguousarray(arr)[None]


_KEEP_MODES = ("1", "L", "LA", "RGB", "RGBA", "I;16", "I;16L", "I;16B")


def _read_imageio(source, name: str, fmt: str, budget: int | None) -> np.ndarray:
    """JPEG and BMP through imageio's Pillow plugin; palettes give indices, odd modes become RGB."""
    import imageio.v3 as iio
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # our own memory check below replaces Pillow's bomb guard
    data = source.getvalue() if isinstance(source, io.BytesIO) else source
    with iio.imopen(data, "r", plugin="pillow", extension=".jpg" if fmt == JPEG else f".{fmt}") as f:
        mode = f.metadata(index=0, exclude_applied=False).get("mode")
        props = f.properties(index=0)
        height, width = (int(v) for v in props.shape[:2])
        # JPEG: at least one bit per 8x8 block (its DC code); BMP's run-length coding: 255 pixels in 2 bytes
        least = ((height + 7) // 8) * ((width + 7) // 8) / 8 if fmt == JPEG else height * width / 128
        _check_plausible(name, fmt, height, width, least, _file_size(source))
        _check_fits(name, tuple(props.shape), props.dtype.itemsize, budget)
        arr = f.read(index=0, mode="P" if mode == "P" else (None if mode in _KEEP_MODES else "RGB"))
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr)[None]


# ----------------------------------------------------------------------------------------------- write

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


def encode_image(data: np.ndarray, fmt: str, layout: str | None = None, *, name: str = "output",
                 pixel_size: dict | None = None, classes: int | None = None, ome: bool = False,
                 channel_names: list[str] | None = None) -> bytes:
    """The bytes of ``data`` as a ``fmt`` file. TIFF is zlib-compressed; with a ``pixel_size``
    (``tiffmeta``) or ``classes`` (probabilities: pages x classes) it is an ImageJ TIFF carrying the
    calibration and the hyperstack axes, where ImageJ can hold the pixel type. With ``ome`` (grey
    data) it is an OME-TIFF instead: physical sizes and ``channel_names`` (the classes of
    probabilities) in its OME-XML."""
    data, layout = _normalise_layout(np.asarray(data), layout)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    buf = io.BytesIO()
    if fmt == TIFF:
        import tifffile

        if data.dtype.kind not in "uif" or data.dtype.itemsize > 8:
            raise ImageWriteError(f"{name}: cannot write {data.dtype} pixels to TIFF")
        from unetcli import tiffmeta

        colour = layout.endswith("C") and data.shape[-1] in (3, 4) and data.dtype == np.uint8
        if ome and not layout.endswith("C"):
            opts = tiffmeta.ome_options(data.shape, layout, pixel_size, classes, channel_names)
            shape = opts.pop("shape", None)
            tifffile.imwrite(buf, data.reshape(shape) if shape else data, compression="zlib", **opts)
            return buf.getvalue()
        imagej = tiffmeta.imagej_options(data, layout, pixel_size, classes)
        if imagej:
            shape = imagej.pop("shape", None)
            tifffile.imwrite(buf, data.reshape(shape) if shape else data, compression="zlib", **imagej)
            return buf.getvalue()
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
        import imagecodecs

        buf.write(imagecodecs.png_encode(np.ascontiguousarray(data), level=6))
    else:
        raise ImageWriteError(f"{name}: cannot write {fmt.upper()}; write .tif or .png")
    return buf.getvalue()


def write_stream(stream: BinaryIO, payload: bytes, chunk: int = 1 << 20) -> None:
    """Write ``payload`` to a stream (stdout) in pieces, then flush. One write of many megabytes into a
    pipe whose reader has gone can end without an error; a piece at a time, the next piece sees the
    broken pipe (BrokenPipeError: exit 141)."""
    view = memoryview(payload)
    for start in range(0, len(view), chunk):
        stream.write(view[start:start + chunk])
        stream.flush()
    stream.flush()


def write_image(path: str | os.PathLike, data: np.ndarray, layout: str | None = None, *,
                fmt: str | None = None, pixel_size: dict | None = None, classes: int | None = None,
                stream: BinaryIO | None = None, channel_names: list[str] | None = None) -> None:
    """Write ``data`` atomically to ``path`` (``-``: stdout, then ``fmt`` is needed).

    ``layout`` is 'YX', 'YXC', 'ZYX' or 'ZYXC' (the canonical layout of ``read_image``); 2-D and 4-D
    arrays need none. The format comes from ``fmt`` or the file name; a name ending ``.ome.tif`` or
    ``.ome.tiff`` gives an OME-TIFF (pixel size and ``channel_names`` in its OME-XML).
    """
    name = "<stdout>" if str(path) == "-" else str(path)
    fmt = fmt or (None if str(path) == "-" else format_from_name(path))
    if fmt is None:
        if str(path) == "-":
            raise ImageWriteError("<stdout>: say which format to write", hint="add --format tiff or --format png")
        raise ImageWriteError(f"{name}: unknown output format", hint="use a .tif, .tiff or .png name")
    if fmt not in WRITE_FORMATS:
        raise ImageWriteError(f"{name}: cannot write {fmt.upper()}; write .tif or .png")
    from unetcli.tiffmeta import is_ome_name

    payload = encode_image(data, fmt, layout, name=name, pixel_size=pixel_size, classes=classes,
                           ome=fmt == TIFF and is_ome_name(path), channel_names=channel_names)
    if str(path) == "-":
        if stream is None:
            raise ImageWriteError("<stdout>: no stream to write to", hint="pass stream=sys.stdout.buffer")
        write_stream(stream, payload)
        return
    try:
        with atomic_output(path) as tmp:
            tmp.write_bytes(payload)
    except OSError as exc:
        raise ImageWriteError(f"{name}: cannot write ({exc.strerror})") from exc


def pages(arr: np.ndarray) -> Iterator[np.ndarray]:
    """The ``(H, W, C)`` planes of a canonical array."""
    for i in range(arr.shape[0]):
        yield arr[i]
