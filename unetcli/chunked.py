"""Predicting one large image block by block, each block on its own: the pieces a cluster runs.

A *block* is a rectangle of output pixels made of whole tiles of the image's tile plan
(:mod:`unetcli.tiling`), the plan that single-process prediction uses for the same tile size: tiles
start at the same positions, read the same input pixels (mirrored at the IMAGE border only, by
``tiling.mirror_index``), and each output pixel is assembled from the same tiles in the same order
(valid padding: the one tile that owns it; same padding: the overlapping tiles blended with the same
window, summed in the same order). So a block's pixels are bit-identical to the whole image's, on a CPU,
whatever the block size, and with ``tta`` too (each of the 8 flips and rotations is planned on its own
transformed image, as :class:`~unetcli.inference.Predictor` does). A block reads only the input window
its tiles need: the block plus the network's context (``netspec.margin``: 92 pixels a side for the
paper's network) plus the overhang of its last tile.

Blocks are about ``chunk`` pixels a side: a whole number of tile strides (the stride is the tile's
output rounded down to a multiple of ``2**depth``), so that output chunks and tiles line up.

This module also reads the input a window at a time, in any process (:class:`ImageRef`: an OME-Zarr
image or Zarr array through :mod:`unetcli.zarrio`, or a TIFF through ``tifffile``'s Zarr view), finds
the source that per-image statistics come from (:func:`statistics_source`, the pipeline's reading
rule), and writes the output as an OME-Zarr image chunked by blocks (:class:`BlockOutput`, a
``zarrio.ZarrOutput``; :func:`write_region` from the workers) and scratch arrays
(:func:`scratch_store`). It is a library: typed errors, no printing; neither torch (until a block is
predicted) nor dask is imported here (:mod:`unetcli.cluster` distributes the blocks).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from unetcli.errors import ConfigError, ImageReadError, ImageShapeError, ImageWriteError
from unetcli.tiling import AxisPlan, TilePlan, blend_window, mirror_index, plan_tiles
from unetcli.zarrio import ZarrOutput

DEFAULT_CHUNK = 1024
"""Block side (output pixels) when neither ``--chunk`` nor the input's own chunking says otherwise."""

IDENTITY = (False, False, False)


# ------------------------------------------------------------------------------------------ geometry

Rect = tuple[int, int, int, int]        # y0, y1, x0, x1 (output pixels, end excluded)


def _stride(axis: AxisPlan) -> int:
    return axis.starts[1] - axis.starts[0] if axis.count > 1 else axis.length


@dataclass(frozen=True)
class BlockGrid:
    """The blocks of an ``height`` x ``width`` image for one tile size: ``block`` output pixels a side
    (a whole number of tile strides), the last row and column of blocks cut by the image border."""

    height: int
    width: int
    block: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        """Blocks down and across."""
        return -(-self.height // self.block[0]), -(-self.width // self.block[1])

    @property
    def count(self) -> int:
        ny, nx = self.shape
        return ny * nx

    def rect(self, by: int, bx: int) -> Rect:
        hy, hx = self.block
        return by * hy, min((by + 1) * hy, self.height), bx * hx, min((bx + 1) * hx, self.width)

    def rects(self) -> list[tuple[int, int, Rect]]:
        ny, nx = self.shape
        return [(by, bx, self.rect(by, bx)) for by in range(ny) for bx in range(nx)]


def block_grid(plan: TilePlan, chunk: int | tuple[int, int]) -> BlockGrid:
    """Blocks of about ``chunk`` pixels a side made of whole tile strides of ``plan``."""
    cy, cx = (chunk, chunk) if isinstance(chunk, int) else chunk
    if min(cy, cx) < 1:
        raise ConfigError(f"--chunk must be at least 1 pixel, not {min(cy, cx)}")

    def side(axis: AxisPlan, want: int) -> int:
        stride = _stride(axis)
        return min(max(1, round(want / stride)) * stride, axis.length) if axis.count > 1 else axis.length

    return BlockGrid(plan.y.length, plan.x.length, (side(plan.y, cy), side(plan.x, cx)))


def _axis_tiles(axis: AxisPlan, lo: int, hi: int, blended: bool) -> list[int]:
    """The tiles along an axis whose kept output meets ``[lo, hi)``: with valid padding the tile that
    owns each position (``[start, next start)``), with blending every tile whose output covers it."""
    out = []
    for k, s in enumerate(axis.starts):
        end = min(s + axis.out, axis.length) if blended else axis.final_until(k)
        if s < hi and end > lo:
            out.append(k)
    return out


def frame_dims(height: int, width: int, g: tuple[bool, bool, bool]) -> tuple[int, int]:
    """The image's size seen through the dihedral element ``g`` (transposed when g[0])."""
    return (width, height) if g[0] else (height, width)


def frame_rect(rect: Rect, height: int, width: int, g: tuple[bool, bool, bool]) -> Rect:
    """``rect`` of the image as seen through ``g`` (``inference.dihedral_view``: transpose, then flip rows,
    then flip columns)."""
    t, fy, fx = g
    y0, y1, x0, x1 = rect
    if t:
        y0, y1, x0, x1 = x0, x1, y0, y1
    hs, ws = frame_dims(height, width, g)
    if fy:
        y0, y1 = hs - y1, hs - y0
    if fx:
        x0, x1 = ws - x1, ws - x0
    return y0, y1, x0, x1


def block_window(plan: TilePlan, rect: Rect) -> Rect:
    """Input rows and columns (image coordinates, may run past the border: mirrored there) that the
    tiles of the block ``rect`` read."""
    blended = plan.blend is not None
    kys = _axis_tiles(plan.y, rect[0], rect[1], blended)
    kxs = _axis_tiles(plan.x, rect[2], rect[3], blended)
    ty, tx = plan.tile
    return (plan.y.starts[kys[0]] - plan.y.margin, plan.y.starts[kys[-1]] - plan.y.margin + ty,
            plan.x.starts[kxs[0]] - plan.x.margin, plan.x.starts[kxs[-1]] - plan.x.margin + tx)


# ------------------------------------------------------------------------------------ a block's probs

Reader = Callable[[int, np.ndarray, np.ndarray], np.ndarray]   # (page, rows, cols) -> (h, w, C)


def predict_block(pred, read: Reader, page: int, height: int, width: int, rect: Rect,
                  check: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
    """Probabilities (K, h, w) float32 of the block ``rect`` of page ``page`` of an image of ``height``
    x ``width``, bit-identical to what ``pred.predict`` gives for the whole image on a CPU.

    ``pred`` is a :class:`~unetcli.inference.Predictor` with a fixed tile (its mean and std set for this
    image: per-image statistics are the whole image's, computed once by the caller); ``read(page, rows,
    cols)`` returns the input pixels at those (in-range) row and column numbers as (rows, cols, C).
    With ``pred.tta`` the 8 flips and rotations are averaged as the predictor averages them.
    ``check`` sees the probabilities of each frame (e.g. a finiteness guard)."""
    from unetcli.inference import DIHEDRAL, dihedral_view

    if pred.tile is None:
        raise ConfigError("block prediction needs a fixed tile size")
    frames = DIHEDRAL if pred.tta else [IDENTITY]
    k = pred.config.num_classes
    y0, y1, x0, x1 = rect
    acc = None
    for g in frames:
        hs, ws = frame_dims(height, width, g)
        plan = plan_tiles(pred.config, hs, ws, tile=pred.tile, overlap=pred.overlap, blend=pred.blend)
        fr = frame_rect(rect, height, width, g)
        probs = _frame_block(pred, read, page, plan, fr, g, hs, ws)
        if check is not None:
            check(probs)
        if len(frames) == 1:
            return probs
        if acc is None:
            acc = np.zeros((k, y1 - y0, x1 - x0), np.float32)
        target = dihedral_view(acc, g, (1, 2))        # the accumulator seen in this frame
        target += probs
    acc /= len(frames)
    return acc


def _frame_block(pred, read: Reader, page: int, plan: TilePlan, rect: Rect, g, hs: int, ws: int) -> np.ndarray:
    """One frame's block: the tiles of ``plan`` that make ``rect`` (frame coordinates), assembled the
    way ``tiling.RowAssembler`` assembles them."""
    import torch

    r0, r1, c0, c1 = rect
    py, px = plan.y, plan.x
    blended = plan.blend is not None
    kys = _axis_tiles(py, r0, r1, blended)
    kxs = _axis_tiles(px, c0, c1, blended)
    wy0, wy1, wx0, wx1 = block_window(plan, rect)
    rows = mirror_index(np.arange(wy0, wy1), hs)        # mirrored at the image border only
    cols = mirror_index(np.arange(wx0, wx1), ws)
    t, fy, fx = g
    src_r = hs - 1 - rows if fy else rows                # back to the stored image's rows and columns
    src_c = ws - 1 - cols if fx else cols
    window = read(page, src_c, src_r).swapaxes(0, 1) if t else read(page, src_r, src_c)

    ty, tx = plan.tile
    k = pred.config.num_classes
    acc = np.zeros((k, r1 - r0, c1 - c0), np.float32)
    weights = blend_window(plan)
    wsum = np.zeros((r1 - r0, c1 - c0), np.float32) if blended else None
    jobs = [(ky, kx) for ky in kys for kx in kxs]      # raster order, as the predictor adds them
    batch = pred.batch_for(plan, len(jobs))
    threads = pred.threads_for(plan, batch)
    c = window.shape[-1]
    for i in range(0, len(jobs), batch):
        chunk = jobs[i:i + batch]
        buf = np.empty((len(chunk), ty, tx, c), np.float32)
        for b, (ky, kx) in enumerate(chunk):
            oy = py.starts[ky] - py.margin - wy0
            ox = px.starts[kx] - px.margin - wx0
            pred.normalise(window[oy:oy + ty, ox:ox + tx], buf[b])
        with torch.inference_mode():
            out = pred.infer(buf, threads).cpu().numpy()
        for b, (ky, kx) in enumerate(chunk):
            sy, sx = py.starts[ky], px.starts[kx]
            ey = min(sy + py.out, py.length) if blended else py.final_until(ky)
            ex = min(sx + px.out, px.length) if blended else px.final_until(kx)
            ya, yb, xa, xb = max(sy, r0), min(ey, r1), max(sx, c0), min(ex, c1)
            part = out[b, :, ya - sy:yb - sy, xa - sx:xb - sx]
            if blended:
                w = weights[ya - sy:yb - sy, xa - sx:xb - sx]
                acc[:, ya - r0:yb - r0, xa - c0:xb - c0] += part * w
                wsum[ya - r0:yb - r0, xa - c0:xb - c0] += w
            else:
                acc[:, ya - r0:yb - r0, xa - c0:xb - c0] = part
    if blended:
        acc = acc / wsum[None]
    return acc


# ------------------------------------------------------------------------------------ reading inputs

_OPEN: "OrderedDict[tuple, tuple]" = OrderedDict()     # per process: the last few inputs opened
_OPEN_LOCK = threading.Lock()
_OPEN_KEPT = 4


@dataclass(frozen=True)
class ImageRef:
    """An image on a file system that the workers share, read a window at a time (picklable: a path
    and what was learnt from its header; each process opens it once).

    ``kind``: 'zarr' (an OME-Zarr image or Zarr array, read by :mod:`unetcli.zarrio`) or 'tiff' (read
    through tifffile's Zarr view of its first series; ``axes`` are tifffile's). ``shape``: (N, H, W, C)
    as stored; windows come out with ``channels`` picked and adapted to ``wanted`` channels
    (``normalize.adapt_channels``, the reader's one rule). ``geometry``: where the result goes
    (``zarrio.Geometry``: page axes, pixel size)."""

    path: str
    kind: str
    shape: tuple[int, int, int, int]
    dtype: str
    geometry: object
    chunks: tuple[int, int] | None = None            # the stored rows x columns per chunk
    axes: str = ""                                   # tiff: tifffile's axes of the series
    channels: tuple[int, ...] | None = None
    wanted: int | None = None

    def with_channels(self, channels: Sequence[int] | None, wanted: int) -> "ImageRef":
        return replace(self, channels=None if channels is None else tuple(int(c) for c in channels),
                       wanted=int(wanted))

    def _opened(self):
        key = (self.path, self.kind)
        with _OPEN_LOCK:
            hit = _OPEN.get(key)
            if hit is not None:
                _OPEN.move_to_end(key)
                return hit[0]
        opened, closer = _open_input(self)
        with _OPEN_LOCK:
            if not _OPEN:
                atexit.register(close_inputs)
            _OPEN[key] = (opened, closer)
            while len(_OPEN) > _OPEN_KEPT:
                _key, (_old, close) = _OPEN.popitem(last=False)
                if close is not None:
                    with contextlib.suppress(Exception):
                        close()
        return opened

    def box(self, page: int, rows: slice, cols: slice) -> np.ndarray:
        """A rectangle of ``page`` as stored, (h, w, C)."""
        opened = self._opened()
        if self.kind == "zarr":
            return opened.read(page, rows, cols)
        return _tiff_box(opened, self.axes, page, rows, cols, self.path)

    def read(self, page: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Pixels at row numbers ``rows`` and column numbers ``cols`` (in range, any order, repeats
        allowed: mirrored borders) of ``page``, as (rows, cols, C) with the channels picked and adapted.
        Only the bounding rectangle is decoded."""
        from unetcli import normalize

        rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        r0, c0 = int(rows.min()), int(cols.min())
        box = self.box(page, slice(r0, int(rows.max()) + 1), slice(c0, int(cols.max()) + 1))
        win = box[rows - r0][:, cols - c0]
        if self.wanted is not None:
            win, _note = normalize.adapt_channels(win, self.wanted, self.channels, self.path)
        return win


def close_inputs() -> None:
    """Close the inputs this process keeps open (at exit, or when done with them)."""
    with _OPEN_LOCK:
        kept = list(_OPEN.values())
        _OPEN.clear()
    for _opened, close in kept:
        if close is not None:
            with contextlib.suppress(Exception):
                close()


def _open_input(ref: ImageRef):
    """(the opened input, its closer or None), in this process."""
    if ref.kind == "zarr":
        from unetcli import zarrio

        return zarrio.open_image(ref.path), None
    import tifffile

    from unetcli.zarrio import require_zarr

    zarr = require_zarr(ref.path)
    try:
        tf = tifffile.TiffFile(ref.path)
    except Exception as exc:
        raise ImageReadError(f"{ref.path}: cannot open ({type(exc).__name__}: {exc})") from exc
    try:
        return zarr.open(tf.series[0].aszarr(), mode="r"), tf.close
    except Exception as exc:
        tf.close()
        raise ImageReadError(f"{ref.path}: cannot read as a Zarr view ({type(exc).__name__}: {exc})") from exc


def _tiff_box(arr, axes: str, page: int, rows: slice, cols: slice, name: str) -> np.ndarray:
    """A rectangle of one page of a TIFF series' Zarr view, as (h, w, C) (the TIFF reader's axes rule:
    S or C channels, every other axis a page)."""
    chan = "S" if "S" in axes else ("C" if "C" in axes else None)
    page_axes = [a for a in axes if a not in ("Y", "X") and a != chan]
    sizes = dict(zip(axes, arr.shape))
    where = dict(zip(page_axes, np.unravel_index(page, [sizes[a] for a in page_axes]))) if page_axes else {}
    index = tuple(int(where[a]) if a in where else (rows if a == "Y" else (cols if a == "X" else slice(None)))
                  for a in axes)
    try:
        box = np.asarray(arr[index])
    except Exception as exc:
        raise ImageReadError(f"{name}: cannot read rows {rows.start}-{rows.stop} "
                             f"({type(exc).__name__}: {exc})") from exc
    kept = [a for a in axes if a not in where]
    box = box.transpose([kept.index("Y"), kept.index("X")] + ([kept.index(chan)] if chan else []))
    box = box if chan else box[..., None]
    if box.dtype.kind == "f" and not np.isfinite(box).all():
        raise ImageReadError(f"{name}: contains NaN or infinite pixel values",
                             hint="replace them (e.g. with 0) before using the image")
    return box


def open_image(path: str | os.PathLike) -> ImageRef:
    """The reference of an OME-Zarr image or Zarr array (:func:`unetcli.zarrio.open_image`'s rules) or
    of a TIFF file (header only, checked as the TIFF reader checks it)."""
    from unetcli import zarrio

    name = os.path.abspath(str(path))       # the workers may run in another folder
    if zarrio.is_zarr_path(name):
        img = zarrio.open_image(name)
        ch = dict(zip(img.axes, img.chunks))
        return ImageRef(name, "zarr", tuple(img.canonical_shape), img.dtype.name, img.geometry(),
                        chunks=(int(ch.get("y", 0)), int(ch.get("x", 0))))
    if not Path(name).exists():
        raise ImageReadError(f"{name}: no such file or folder", hint="check the path")
    from unetcli.images import TIFF, format_from_name

    if format_from_name(name) != TIFF:
        raise ImageReadError(f"{name}: block-wise prediction reads OME-Zarr images and TIFF files",
                             hint="convert the image to TIFF or OME-Zarr, or predict it without --cluster")
    return _open_tiff_ref(name)


def _open_tiff_ref(name: str) -> ImageRef:
    import tifffile

    from unetcli import tiffmeta, zarrio
    from unetcli.images import check_tiff_complete, check_tiff_series

    try:
        with tifffile.TiffFile(name) as tf:
            if not tf.series:
                raise ImageReadError(f"{name}: TIFF file holds no image")
            check_tiff_series(tf, name)   # pages split into several series are never dropped
            series = tf.series[0]
            axes, shape, dtype = series.axes.upper(), tuple(int(s) for s in series.shape), np.dtype(series.dtype)
            check_tiff_complete(tf, name, os.path.getsize(name))
            first = series.pages[0]
            chunks = ((int(first.tilelength), int(first.tilewidth)) if getattr(first, "is_tiled", False)
                      else None)
    except (tifffile.TiffFileError, OSError, ValueError) as exc:
        raise ImageReadError(f"{name}: not a readable TIFF file ({exc})") from exc
    if dtype.kind not in "uif":
        raise ImageShapeError(f"{name}: {dtype} pixels are not supported", hint="use integer or float pixels")
    if "Y" not in axes or "X" not in axes:
        raise ImageShapeError(f"{name}: unsupported TIFF layout {axes!r} (needs rows and columns)")
    chan = "S" if "S" in axes else ("C" if "C" in axes else None)
    sizes = dict(zip(axes, shape))
    pages = int(np.prod([sizes[a] for a in axes if a not in ("Y", "X") and a != chan], dtype=np.int64))
    n, h, w, c = pages, sizes["Y"], sizes["X"], (sizes[chan] if chan else 1)
    geometry = zarrio.Geometry.of_pages(n, h, w, tiffmeta.pixel_size(name))
    return ImageRef(name, "tiff", (n, h, w, c), dtype.name, geometry, chunks=chunks, axes=axes)


def statistics_source(ref: ImageRef, memory_budget: int | None = None):
    """The image source single-process prediction would compute this image's statistics on (the
    pipeline's reading rule): an OME-Zarr image a band at a time (``zarrio.ZarrRows``), a large striped
    TIFF strip by strip (``sources.TiffRows``), anything else read whole; channels adapted."""
    from unetcli import normalize, zarrio
    from unetcli.images import read_image
    from unetcli.pipeline import STREAM_TIFF_BYTES
    from unetcli.sources import ArraySource, ChannelRows, TiffRows

    wanted = ref.wanted if ref.wanted is not None else ref.shape[3]
    src = zarrio.ZarrRows.open(ref.path) if ref.kind == "zarr" else TiffRows.open(ref.path,
                                                                                    min_bytes=STREAM_TIFF_BYTES)
    if src is None:
        arr = read_image(ref.path, memory_budget=memory_budget)
        arr, _note = normalize.adapt_channels(arr, wanted, ref.channels, ref.path)
        return ArraySource(arr)
    if ref.channels is not None or src.shape[-1] != wanted:
        src = ChannelRows(src, wanted, ref.channels, ref.path)
    return src


# ---------------------------------------------------------------------------------- the output store

def region(axes: str, page_axes: str, page_shape: Sequence[int], page: int, rect: Rect) -> tuple:
    """The index of one block of canonical ``page`` in an output array of ``axes`` (c: all classes)."""
    where = dict(zip(page_axes, (int(i) for i in np.unravel_index(page, tuple(page_shape))))) if page_axes else {}
    y0, y1, x0, x1 = rect
    return tuple(where[a] if a in where else (slice(y0, y1) if a == "y" else (slice(x0, x1) if a == "x"
                                                                               else slice(None)))
                 for a in axes)


class BlockOutput(ZarrOutput):
    """A ``zarrio.ZarrOutput`` chunked by blocks (each chunk is written by the one task of its block, so
    concurrent writers never share a chunk) and without a pyramid (building one would read the whole
    image back in one process). Workers write into ``root/0`` (:func:`write_region`); ``finish`` then
    writes the metadata and renames the store into place, ``abort`` removes it."""

    def __init__(self, path: str | os.PathLike, geometry, dtype, block: tuple[int, int], **options):
        super().__init__(path, geometry, dtype, pyramid=False, **options)
        by, bx = block
        self.rows_per_chunk = min(by, geometry.shape[-2])
        self.chunks = tuple(self.rows_per_chunk if a == "y" else (min(bx, geometry.shape[-1]) if a == "x" else 1)
                            for a in self.axes)


def write_region(path: str, array: str, index: tuple, data: np.ndarray) -> None:
    """Write ``data`` at ``index`` of the array ``array`` of the store being written at ``path`` (which
    must still exist: a store removed after a cancel is never written again)."""
    from unetcli.zarrio import require_zarr

    zarr = require_zarr(path)
    folder = os.path.join(path, array)
    if not os.path.isdir(folder):
        raise ImageWriteError(f"{path}: the output being written is gone (cancelled?)")
    try:
        zarr.open_array(folder, mode="r+")[index] = data
    except OSError as exc:
        raise ImageWriteError(f"{path}: cannot write ({exc.strerror})") from exc


def read_region(path: str, array: str, index: tuple) -> np.ndarray:
    from unetcli.zarrio import require_zarr

    zarr = require_zarr(path)
    return np.asarray(zarr.open_array(os.path.join(path, array), mode="r")[index])


def scratch_store(target: str | os.PathLike, arrays: dict) -> Path:
    """A temporary Zarr group beside ``target`` (``.NAME.PID.XXXXXXXX.part``, removed by a later writer
    once this process has ended) holding ``arrays``: name -> (shape, chunks, dtype)."""
    from unetcli.zarrio import labels_target, remove_stale_folders, require_zarr

    zarr = require_zarr(str(target))
    t = Path(target)
    folder, stem = (t.parent if str(t.parent) else Path(".")), t.name
    beside = labels_target(target)
    if beside is not None:            # IMAGE.zarr/labels/NAME: beside the labels group, as zarrio writes it
        folder, stem = beside[0], "labels"
    remove_stale_folders(folder, stem)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.{os.getpid()}.", suffix=".part", dir=folder))
    except OSError as exc:
        raise ImageWriteError(f"{target}: cannot write in {folder} ({exc.strerror})") from exc
    try:
        group = zarr.open_group(str(tmp), mode="w")
        for name, (shape, chunks, dtype) in arrays.items():
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise ImageWriteError(f"{target}: cannot write in {folder} ({exc.strerror})") from exc
        raise
    return tmp.resolve()
