"""Overlap-tile prediction with mirrored borders: any image size, batched tiles, CPU or GPU.

The paper's strategy (Ronneberger et al. 2015, Fig. 2): the image is cut into output tiles; each input
tile carries the context that the unpadded convolutions consume (the network's *margin*, 92 pixels for
the paper's network); where that context runs past the image border it is filled by mirroring the
image (reflection without repeating the edge pixel, applied again and again for images smaller than the
margin).

Tile-size invariance. A valid-padding U-Net is translation-equivariant only for shifts by a multiple of
``2**depth`` (its max-poolings). Output tiles therefore start at multiples of a stride that is the output
size rounded down to a multiple of ``2**depth``; every tile then sees the same pooling grid, anchored at
the image origin, and the stitched result equals what one tile covering the whole image would give,
whatever the tile size (up to float rounding). The few output rows a tile computes past its stride are
discarded.

Same-padding networks zero-pad at every tile edge, so their predictions near tile edges are worse than
inside. Their tiles overlap (``overlap``, a fraction of the tile, 0.25 by default), the last tile of each
row or column is shifted to end at the image border, and overlapping predictions are blended with a
separable Gaussian window (sigma = tile / 8, floored at 1e-3): it weights every tile's centre fully and
fades its edges smoothly, so seams neither show as steps (as with plain averaging) nor as hard cuts.
``blend="mean"`` averages uniformly instead.

Memory grows with the tile, not with the image: tiles are cut from the image (of any dtype) and
normalised one batch at a time, and results come out as blocks of finished rows (:meth:`Predictor.
iter_blocks`), so a caller can turn them into a mask and write them before the next rows exist.

Everything here is a library: no printing, typed errors from :mod:`unetcli.errors`, progress through a
callback ``progress(done_tiles, total_tiles)``.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unetcli.devices import (PRECISIONS, auto_threads, autocast_dtype, default_memory_budget, resolve_device,
                             resolve_precision, threads_for_work)
from unetcli.errors import ConfigError, ImageShapeError, TileSizeError
from unetcli.model import UNet, UNetConfig, check_tile, conv_layers, margin, output_size

BLENDS = ("gaussian", "mean")
DEFAULT_OVERLAP = 0.25
MAX_AUTO_BATCH = 16
# Measured peaks (ru_maxrss, glibc malloc, channels-last, several tiles) over the simulated live
# tensors: 1.15x for the paper's network at 700x876, 1.8x for base 16 at 1052x1100 (its many
# mid-sized tensors fragment the heap); 1.5 sits between, and the CPU default budget leaves room.
_SAFETY = 1.5

Progress = Callable[[int, int], None]


# ------------------------------------------------------------------------------------- size & memory

def tile_flops(config: UNetConfig, ty: int, tx: int) -> int:
    """FLOPs (2 x multiply-adds) of every convolution in one forward pass on a ``ty`` x ``tx`` tile."""
    total = 0
    for (kind, cin, cout, k, sy), (_, _, _, _, sx) in zip(conv_layers(config, ty), conv_layers(config, tx)):
        per_pixel = cin * cout * (1 if kind == "up" else k * k)
        total += 2 * per_pixel * sy * sx
    return total


def _memory_elements(config: UNetConfig, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
    """Peak number of live activation elements of one lean forward pass (see ``_forward``), per tile.

    ``sy`` and ``sx`` are arrays of input sides; the result broadcasts over them. The simulation follows
    the order of ``_forward``: a layer's input and output are alive together, skips stay alive until
    their level of the expanding path has concatenated them.
    """
    pad = config.padding == "same"
    shrink = 0 if pad else 2
    sy = np.asarray(sy, dtype=np.float64)
    sx = np.asarray(sx, dtype=np.float64)
    cur = config.in_channels * sy * sx
    peak = cur.copy()
    skips = []
    skip_total = np.zeros_like(cur)
    widths = [config.base * 2 ** level for level in range(config.depth + 1)]
    for level in range(config.depth + 1):
        for _ in range(2):
            sy, sx = sy - shrink, sx - shrink
            out = widths[level] * sy * sx
            peak = np.maximum(peak, skip_total + cur + out)
            cur = out
        if level < config.depth:
            skips.append((cur, sy, sx))
            skip_total = skip_total + cur
            sy, sx = sy // 2, sx // 2
            pooled = widths[level] * sy * sx
            peak = np.maximum(peak, skip_total + pooled)
            cur = pooled
    for level in range(config.depth - 1, -1, -1):
        sy, sx = sy * 2, sx * 2
        skip, _, _ = skips.pop()
        cat = 2 * widths[level] * sy * sx
        peak = np.maximum(peak, skip_total + cur + cat)        # the skip copied into the concatenation
        skip_total = skip_total - skip
        up = widths[level] * sy * sx
        peak = np.maximum(peak, skip_total + cur + cat + up)   # then the up-convolution's output
        cur = cat
        for _ in range(2):
            sy, sx = sy - shrink, sx - shrink
            out = widths[level] * sy * sx
            peak = np.maximum(peak, skip_total + cur + out)
            cur = out
    head = config.num_classes * sy * sx
    peak = np.maximum(peak, cur + 2 * head)  # logits and their softmax
    return peak


def tile_memory(config: UNetConfig, ty: int, tx: int, batch: int = 1, itemsize: int = 4) -> int:
    """Bytes one batch of ``ty`` x ``tx`` tiles needs for its activations (an upper estimate)."""
    elems = float(_memory_elements(config, np.array(ty), np.array(tx)))
    return int(elems * batch * itemsize * _SAFETY)


# --------------------------------------------------------------------------------------------- plans

@dataclass(frozen=True)
class AxisPlan:
    """How one image axis is cut: input tile length, output length per tile, where tiles start.

    Tile ``k`` reads input positions ``[starts[k] - margin, starts[k] - margin + tile)`` (mirrored where
    outside the image) and writes output positions ``[starts[k], starts[k] + out)`` clipped to the image.
    For valid padding each tile keeps only ``[starts[k], starts[k+1])``, so nothing overlaps; for same
    padding overlapping outputs are blended.
    """

    length: int
    tile: int
    out: int
    margin: int
    starts: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.starts)

    def final_until(self, k: int) -> int:
        """Every output position below this is complete once tiles ``0..k`` along this axis are done."""
        return self.starts[k + 1] if k + 1 < len(self.starts) else self.length


@dataclass(frozen=True)
class TilePlan:
    """The tiling of one image: the two axes, and whether overlapping outputs are blended."""

    y: AxisPlan
    x: AxisPlan
    blend: str | None     # None (valid padding: no overlap), 'gaussian' or 'mean'

    @property
    def tile(self) -> tuple[int, int]:
        return self.y.tile, self.x.tile

    @property
    def count(self) -> int:
        return self.y.count * self.x.count


def _valid_axis(config: UNetConfig, length: int, tile: int) -> AxisPlan:
    out = check_tile(config, tile)
    align = 2 ** config.depth
    stride = (out // align) * align
    if out >= length:
        starts = (0,)
    elif stride == 0:
        raise TileSizeError(f"tile size {tile} gives an output of {out} pixels, less than the "
                            f"{align}-pixel alignment that seamless tiling needs",
                            hint=f"use a tile of at least {_smallest_tile_with_stride(config)}")
    else:
        n = math.ceil((length - out) / stride) + 1
        starts = tuple(k * stride for k in range(n))
    return AxisPlan(length, tile, out, margin(config), starts)


def _smallest_tile_with_stride(config: UNetConfig) -> int:
    align = 2 ** config.depth
    s = 1
    while True:
        o = output_size(config, s)
        if o is not None and o >= align:
            return s
        s += 1


def _same_axis(config: UNetConfig, length: int, tile: int, overlap: float) -> AxisPlan:
    check_tile(config, tile)
    if tile >= length:
        starts = (0,)
    else:
        stride = max(1, int(tile * (1.0 - overlap)))
        n = math.ceil((length - tile) / stride) + 1
        starts = tuple(min(k * stride, length - tile) for k in range(n))
    return AxisPlan(length, tile, tile, 0, starts)


def _valid_candidates(config: UNetConfig, length: int, limit: int) -> list[int]:
    """Valid input sides worth trying along an axis of ``length``: up to one tile covering it all."""
    align = 2 ** config.depth
    out = []
    s = 1
    while s <= limit:
        o = output_size(config, s)
        if o is not None and (o >= align or o >= length):
            out.append(s)
            if o >= length:
                break
        s += 1
    return out


def _same_candidates(config: UNetConfig, length: int, limit: int) -> list[int]:
    align = 2 ** config.depth
    cover = max(align, -(-length // align) * align)
    return list(range(align, min(cover, max(limit, align)) + 1, align))


def choose_tile(config: UNetConfig, height: int, width: int, budget: int, *, batch: int = 1,
                itemsize: int = 4, overlap: float = DEFAULT_OVERLAP) -> tuple[int, int]:
    """The input tile ``(ty, tx)`` that predicts a ``height`` x ``width`` image with the fewest FLOPs
    while one batch of ``batch`` tiles stays within ``budget`` bytes of activations.

    Larger tiles waste less on context, but a tile larger than the image wastes more on mirrored
    borders; the search weighs both exactly (number of tiles x FLOPs per tile) over every valid pair of
    sides, rectangles included. Among choices within 0.5% of the fewest FLOPs the smallest tile wins.
    Raises ConfigError when not even the smallest tile fits the budget.
    """
    same = config.padding == "same"
    limit = 1 << 15
    cand = _same_candidates if same else _valid_candidates
    ys = np.array(cand(config, height, limit), dtype=np.int64)
    xs = np.array(cand(config, width, limit), dtype=np.int64)
    if not len(ys) or not len(xs):
        raise ConfigError(f"no tile size fits this network for a {height}x{width} image")
    mem = _memory_elements(config, ys[:, None], xs[None, :]) * batch * itemsize * _SAFETY
    fits = mem <= budget
    if not fits.any():
        smallest = int(ys[0])
        raise ConfigError(f"even the smallest tile ({smallest}x{int(xs[0])}) needs "
                          f"{mem[0, 0] / 2**20:.0f} MiB, more than the memory budget of "
                          f"{budget / 2**20:.0f} MiB", hint="raise --memory-budget or lower --batch")

    def counts(length: int, sizes: np.ndarray) -> np.ndarray:
        n = []
        for t in sizes:
            plan = (_same_axis(config, length, int(t), overlap) if same
                    else _valid_axis(config, length, int(t)))
            n.append(plan.count)
        return np.array(n, dtype=np.float64)

    ny, nx = counts(height, ys), counts(width, xs)
    # FLOPs of a (ty, tx) tile: sum over layers of 2 * per-pixel work * side_y * side_x.
    ly = np.array([[side for *_, side in conv_layers(config, int(t))] for t in ys], dtype=np.float64)
    lx = np.array([[side for *_, side in conv_layers(config, int(t))] for t in xs], dtype=np.float64)
    per = np.array([2.0 * cin * cout * (1 if kind == "up" else k * k)
                    for kind, cin, cout, k, _ in conv_layers(config, int(ys[0]))])
    flops = (ly * per[None, :]) @ lx.T
    cost = np.where(fits, flops * ny[:, None] * nx[None, :], np.inf)
    best = cost.min()
    area = ys[:, None] * xs[None, :]
    near = cost <= best * 1.005
    iy, ix = np.unravel_index(np.argmin(np.where(near, area, np.iinfo(np.int64).max)), cost.shape)
    return int(ys[iy]), int(xs[ix])


def parse_tile(text: str | int | Sequence[int] | None) -> tuple[int, int] | None:
    """``572`` -> (572, 572); ``'572x700'`` -> (572, 700); None stays None."""
    if text is None:
        return None
    if isinstance(text, int):
        return (text, text)
    if not isinstance(text, str):
        ty, tx = text
        return int(ty), int(tx)
    parts = text.lower().replace("*", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"tile {text!r} is not a size", hint="give one side (572) or two (572x700)") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise ConfigError(f"tile {text!r} is not a size", hint="give one side (572) or two (572x700)")
    return sizes[0], sizes[1]


def plan_tiles(config: UNetConfig, height: int, width: int, *, tile: tuple[int, int] | int | None = None,
               budget: int | None = None, batch: int = 1, itemsize: int = 4,
               overlap: float = DEFAULT_OVERLAP, blend: str = "gaussian") -> TilePlan:
    """The tiling of a ``height`` x ``width`` image: the given ``tile`` or the best one within
    ``budget`` bytes (default: a CPU budget, see :func:`default_memory_budget`)."""
    if height < 1 or width < 1:
        raise ImageShapeError(f"image has no pixels ({height}x{width})")
    if blend not in BLENDS:
        raise ConfigError(f"unknown blending {blend!r}", hint="use gaussian or mean")
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"overlap must be in [0, 1), not {overlap}")
    if tile is None:
        if budget is None:
            budget = default_memory_budget(torch.device("cpu"))
        tile = choose_tile(config, height, width, budget, batch=batch, itemsize=itemsize, overlap=overlap)
    ty, tx = parse_tile(tile)
    if config.padding == "same":
        return TilePlan(_same_axis(config, height, ty, overlap), _same_axis(config, width, tx, overlap), blend)
    return TilePlan(_valid_axis(config, height, ty), _valid_axis(config, width, tx), None)


# ------------------------------------------------------------------------------------------- mirroring

def mirror_index(positions: np.ndarray, length: int) -> np.ndarray:
    """Map positions on an infinite line into ``[0, length)`` by repeated mirroring at the image edges
    (reflection without repeating the edge pixel: ... 2 1 | 0 1 2 ... L-1 | L-2 ...)."""
    positions = np.asarray(positions, dtype=np.int64)
    if length == 1:
        return np.zeros_like(positions)
    period = 2 * (length - 1)
    r = np.mod(positions, period)
    return np.where(r >= length, period - r, r)


def _axis_take(start: int, size: int, length: int) -> slice | np.ndarray:
    if start >= 0 and start + size <= length:
        return slice(start, start + size)
    return mirror_index(np.arange(start, start + size), length)


def _take(a: np.ndarray, index: slice | np.ndarray, axis: int) -> np.ndarray:
    if isinstance(index, slice):
        return a[index] if axis == 0 else a[:, index]
    return np.take(a, index, axis=axis)


# ------------------------------------------------------------------------------------- image sources

class ArraySource:
    """An image or stack in memory, (H, W, C) or (N, H, W, C), handed out row band by row band."""

    def __init__(self, array: np.ndarray):
        arr = np.asarray(array)
        self.array = arr[None] if arr.ndim == 3 else arr
        self.shape = self.array.shape
        self.dtype = self.array.dtype

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def rows(self, page: int, index: slice | np.ndarray) -> np.ndarray:
        """Rows ``index`` (a slice or row numbers) of ``page`` as (rows, W, C)."""
        return _take(self.array[page], index, 0)

    def page(self, n: int) -> np.ndarray:
        return self.array[n]

    def close(self) -> None:
        pass


class TiffRows:
    """The pages of a striped TIFF file, decoded a few strips at a time, as an image source.

    Only the strips that the current band of rows needs are decoded, and only the last two bands'
    strips are kept, so predicting a huge TIFF needs memory for a band of rows, not for the image.
    :meth:`open` returns None for layouts it does not stream (tiled TIFFs, planar RGB, channels stored
    as pages, damaged files); read those whole with ``images.read_image``, which also reports errors.
    """

    def __init__(self, tf, pages: list, shape: tuple[int, int, int, int], name: str):
        self._tf, self._pages, self.shape, self.name = tf, pages, shape, name
        self.dtype = pages[0].dtype
        self._rps = int(pages[0].rowsperstrip or shape[1])
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self._order: list[tuple[int, int]] = []
        self._limit = 0

    @classmethod
    def open(cls, path, *, min_bytes: int = 0) -> "TiffRows | None":
        """A row source for ``path`` if it is a plain striped TIFF of at least ``min_bytes`` decoded."""
        import tifffile

        name = str(path)
        try:
            size = os.path.getsize(path)
            tf = tifffile.TiffFile(path)
        except Exception:  # not a TIFF, unreadable: read_image will say what is wrong
            return None
        try:
            if len(tf.series) != 1:
                raise ValueError("several series")
            series = tf.series[0]
            axes = series.axes
            core = axes[1:] if len(axes) in (3, 4) and axes[0] not in "CS" else axes
            if core not in ("YX", "YXS"):
                raise ValueError(f"axes {axes}")
            pages = list(series.pages)
            first = pages[0]
            if any(not hasattr(p, "decode") or p.is_tiled or p.shape != first.shape or p.dtype != first.dtype
                   for p in pages):
                raise ValueError("pages")
            if first.samplesperpixel > 1 and first.planarconfig != 1:
                raise ValueError("planar")
            if first.dtype is None or first.dtype.kind not in "uif":
                raise ValueError("dtype")
            if any(o + c > size for p in pages for o, c in zip(p.dataoffsets, p.databytecounts)):
                raise ValueError("truncated")
            h, w = first.shape[:2]
            c = first.shape[2] if len(first.shape) == 3 else 1
            shape = (len(pages), h, w, c)
            if np.prod(shape, dtype=np.float64) * first.dtype.itemsize < min_bytes:
                raise ValueError("small")
            src = cls(tf, pages, shape, name)
            src._strip(0, 0)                       # the codec works on this file
            return src
        except Exception:
            tf.close()
            return None

    @property
    def nbytes(self) -> int:
        """About what the decoded strips kept at once take: two bands of a tile's height."""
        _n, h, w, c = self.shape
        return int(2 * min(h, 1600) * w * c * self.dtype.itemsize)

    def _strip(self, page: int, k: int) -> np.ndarray:
        key = (page, k)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        pg = self._pages[page]
        fh = self._tf.filehandle
        fh.seek(pg.dataoffsets[k])
        data = fh.read(pg.databytecounts[k])
        try:
            seg = pg.decode(data, k)[0]
        except Exception as exc:
            from unetcli.errors import ImageReadError

            raise ImageReadError(f"{self.name}: damaged TIFF strip {k} of page {page + 1} ({exc})") from exc
        _n, h, w, c = self.shape
        rows = min(self._rps, h - k * self._rps)
        arr = np.asarray(seg).reshape(-1, w, c)[:rows]
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            from unetcli.errors import ImageReadError

            raise ImageReadError(f"{self.name}: contains NaN or infinite pixel values",
                                 hint="replace them (e.g. with 0) before using the image")
        self._cache[key] = arr
        self._order.append(key)
        return arr

    def rows(self, page: int, index: slice | np.ndarray) -> np.ndarray:
        """Rows ``index`` (a slice or row numbers) of ``page`` as (rows, W, C), decoding as needed."""
        _n, h, w, c = self.shape
        idx = np.arange(h)[index] if isinstance(index, slice) else np.asarray(index)
        out = np.empty((len(idx), w, c), self.dtype)
        strips = idx // self._rps
        needed = set()
        for k in np.unique(strips):
            sel = strips == k
            out[sel] = self._strip(page, int(k))[idx[sel] - int(k) * self._rps]
            needed.add((page, int(k)))
        # keep this band's strips and the previous band's; forget older ones
        self._limit = max(self._limit, 2 * out.nbytes)
        held = sum(a.nbytes for a in self._cache.values())
        while held > self._limit and self._order:
            key = self._order[0]
            if key in needed:
                break
            self._order.pop(0)
            held -= self._cache.pop(key).nbytes
        return out

    def page(self, n: int) -> np.ndarray:
        return self.rows(n, slice(0, self.shape[1]))

    def close(self) -> None:
        self._cache.clear()
        self._tf.close()


def as_source(image) -> "ArraySource | TiffRows":
    """An image source from an array ((H, W, C) or (N, H, W, C)) or a source (returned as it is)."""
    return image if hasattr(image, "rows") and hasattr(image, "shape") else ArraySource(image)


# ---------------------------------------------------------------------------------------- the network

def _core(net: nn.Module) -> nn.Module:
    inner = getattr(net, "module", None)          # DataParallel / DistributedDataParallel
    if isinstance(inner, UNet):
        return inner
    inner = getattr(net, "_orig_mod", None)       # torch.compile
    if isinstance(inner, UNet):
        return inner
    return net


def _run_seq(seq: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for layer in seq:
        x = layer(x)      # rebinding drops the layer's input as soon as its output exists
    return x


def _pool2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pooling, stride 2. On a CPU, for channels-last maps of even size, as three elementwise
    maxima of strided views: about five times faster than ``max_pool2d``, which also computes indices."""
    b, c, h, w = x.shape
    if x.device.type != "cpu" or h % 2 or w % 2 or not x.is_contiguous(memory_format=torch.channels_last):
        return F.max_pool2d(x, 2)
    v = x.permute(0, 2, 3, 1).reshape(b, h // 2, 2, w // 2, 2, c)     # NHWC memory, pooling windows apart
    out = torch.maximum(v[:, :, 0, :, 0], v[:, :, 0, :, 1])
    torch.maximum(out, torch.maximum(v[:, :, 1, :, 0], v[:, :, 1, :, 1]), out=out)
    return out.permute(0, 3, 1, 2)                                    # (B, C, h/2, w/2), channels-last


def _forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``net(x)`` for a UNet, computed the same way but holding fewer activations at once.

    Each layer's input is released as soon as its output exists, and every skip connection is released
    right after its concatenation; other modules are simply called.
    """
    core = _core(net)
    if not isinstance(core, UNet):
        return net(x)
    skips = []
    for block in core.down:
        x = _run_seq(block, x)
        skips.append(x)
        x = _pool2(x)
    x = core.dropout(_run_seq(core.bottom, x))
    for block in core.up:
        # crop-and-concatenate, ordered to hold less at once than torch.cat(skip, up(x)): the skip is
        # copied into the concatenation and released before the up-convolution's output exists
        skip = skips.pop()
        b, w = x.shape[0], block.up.out_channels
        h2, w2 = 2 * x.shape[-2], 2 * x.shape[-1]                   # the 2x2 stride-2 up-convolution
        fmt = (torch.channels_last if skip.is_contiguous(memory_format=torch.channels_last)
               else torch.contiguous_format)
        cat = torch.empty((b, 2 * w, h2, w2), dtype=skip.dtype, device=skip.device, memory_format=fmt)
        dy, dx = (skip.shape[-2] - h2) // 2, (skip.shape[-1] - w2) // 2
        cat[:, :w].copy_(skip[..., dy:dy + h2, dx:dx + w2])        # (B, w, 2h, 2w) centre crop
        del skip
        y = block.up(x)                                              # (B, w, 2h, 2w)
        del x
        cat[:, w:].copy_(y)
        del y
        x = _run_seq(block.conv, cat)                                # (B, 2w, ...) -> (B, w, ...)
        del cat
    return core.head(x)


# -------------------------------------------------------------------------------------- the assembler

def gaussian_window(size: int, sigma_scale: float = 0.125) -> np.ndarray:
    """A 1-D Gaussian over ``size`` pixels centred between its middle pixels, sigma = size/8, max 1."""
    pos = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    sigma = max(size * sigma_scale, 1e-6)
    return np.exp(-(pos ** 2) / (2.0 * sigma ** 2))


def blend_window(plan: TilePlan) -> np.ndarray | None:
    """The 2-D weight of a tile's output pixels when tiles overlap (None for valid padding)."""
    if plan.blend is None:
        return None
    if plan.blend == "mean":
        return np.ones((plan.y.out, plan.x.out), np.float32)
    w = gaussian_window(plan.y.out)[:, None] * gaussian_window(plan.x.out)[None, :]
    return np.maximum(w, max(float(w.min()), 1e-3)).astype(np.float32)


class _Rows:
    """Collects the outputs of one page's tiles and hands out finished rows, top to bottom.

    With ``reduce`` (probabilities (K, h, w) -> values (h, w), e.g. the class map) and no blending,
    each tile is reduced as it arrives, so only reduced rows are held (one byte a pixel for a mask).
    """

    def __init__(self, plan: TilePlan, classes: int, window: np.ndarray | None,
                 reduce: Callable[[np.ndarray], np.ndarray] | None = None, dtype=np.uint8):
        self.plan, self.window = plan, window
        width = plan.x.length
        cap = min(plan.y.out, plan.y.length)
        self.reduce = reduce
        self.early = reduce is not None and window is None
        shape = (cap, width) if self.early else (classes, cap, width)
        self.acc = np.zeros(shape, dtype if self.early else np.float32)
        self.wsum = np.zeros((cap, width), np.float32) if window is not None else None
        self.base = 0                  # image row of acc[:, 0]
        self.row = 0                   # tile row being filled
        self.done_in_row = 0

    def add(self, ky: int, kx: int, probs: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Add tile (ky, kx)'s output ``probs`` (K, out_y, out_x); yield (y0, rows) that are final."""
        py, px = self.plan.y, self.plan.x
        y0, x0 = py.starts[ky], px.starts[kx]
        if self.window is None:        # valid padding: keep [start, next start) of each tile
            y1, x1 = py.final_until(ky), px.final_until(kx)
            part = probs[:, :y1 - y0, :x1 - x0]
            self.acc[..., y0 - self.base:y1 - self.base, x0:x1] = self.reduce(part) if self.early else part
        else:
            y1, x1 = min(y0 + py.out, py.length), min(x0 + px.out, px.length)
            w = self.window[:y1 - y0, :x1 - x0]
            self.acc[:, y0 - self.base:y1 - self.base, x0:x1] += probs[:, :y1 - y0, :x1 - x0] * w
            self.wsum[y0 - self.base:y1 - self.base, x0:x1] += w
        self.done_in_row += 1
        if self.done_in_row == px.count:
            yield from self._finish_row(ky)

    def _finish_row(self, ky: int) -> Iterator[tuple[int, np.ndarray]]:
        final = self.plan.y.final_until(ky)
        n = final - self.base
        if n > 0:
            block = self.acc[..., :n, :]
            if self.wsum is not None:
                block = block / self.wsum[None, :n]
            if self.reduce is not None and not self.early:
                block = self.reduce(block)
            yield self.base, block
            keep = self.acc.shape[-2] - n
            if keep > 0:               # carry the partial sums of the overlap to the next tile row
                self.acc[..., :keep, :] = self.acc[..., n:, :].copy()
                if self.wsum is not None:
                    self.wsum[:keep] = self.wsum[n:].copy()
            self.acc[..., keep:, :] = 0
            if self.wsum is not None:
                self.wsum[keep:] = 0
            self.base = final
        self.done_in_row = 0


# ----------------------------------------------------------------------------------- the predictor

_D4 = [(t, fy, fx) for t in (False, True) for fy in (False, True) for fx in (False, True)]


def _transform(a: np.ndarray, g: tuple[bool, bool, bool], axes: tuple[int, int]) -> np.ndarray:
    """Apply the dihedral element ``g`` = (transpose, flip rows, flip cols) to two axes (a view)."""
    t, fy, fx = g
    ay, ax = axes
    if t:
        a = np.swapaxes(a, ay, ax)
    if fy:
        a = np.flip(a, ay)
    if fx:
        a = np.flip(a, ax)
    return a


class Predictor:
    """A network ready to predict images of any size with the overlap-tile strategy.

    ``net`` is moved to ``device`` (in eval mode, channels-last) for the predictor's lifetime; use
    :func:`predict_proba` to borrow a network that is being trained. ``mean``/``std`` (one value per
    input channel) normalise raw pixels as ``(x - mean) / std`` tile by tile; leave them None for
    images that are already normalised.

    Options: ``tile`` (an input side, or (ty, tx); default: the tile that predicts each image with the
    fewest FLOPs within ``memory_budget`` bytes), ``batch`` (tiles per forward pass; default 1 on CPU,
    as many as fit the budget (at most 16) on a GPU), ``precision`` ('fp32', 'bf16', 'fp16'), ``tta``
    (average over the 8 flips and 90-degree rotations), ``overlap`` and ``blend`` (same padding only),
    ``threads`` (CPU threads for the network; default: :meth:`threads_for`).
    """

    def __init__(self, net: nn.Module, config: UNetConfig, *, device: str | torch.device = "cpu",
                 precision: str = "fp32", tile: int | tuple[int, int] | str | None = None,
                 batch: int | None = None, memory_budget: int | None = None, tta: bool = False,
                 overlap: float = DEFAULT_OVERLAP, blend: str = "gaussian",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 threads: int | None = None, channels_last: bool | None = None,
                 progress: Progress | None = None, normalization: dict | None = None):
        self.config = config
        self.device = resolve_device(device)
        self.precision = precision
        self.amp_dtype = autocast_dtype(self.device, precision)
        self.tile = parse_tile(tile)
        if self.tile is not None:
            for side in self.tile:
                check_tile(config, side)
        if batch is not None and batch < 1:
            raise ConfigError(f"batch must be at least 1, not {batch}")
        self.batch = batch
        self.budget = int(memory_budget) if memory_budget is not None else default_memory_budget(self.device)
        if self.budget <= 0:
            raise ConfigError(f"memory budget must be positive, not {memory_budget}")
        self.tta = bool(tta)
        if blend not in BLENDS:
            raise ConfigError(f"unknown blending {blend!r}", hint="use gaussian or mean")
        if not 0.0 <= overlap < 1.0:
            raise ConfigError(f"overlap must be in [0, 1), not {overlap}")
        self.overlap, self.blend = float(overlap), blend
        c = config.in_channels
        self.mean = None if mean is None else np.asarray(mean, np.float32).reshape(c)
        self.std = None if std is None else np.asarray(std, np.float32).reshape(c)
        self.normalization = normalization     # a per-image rule (normalize): mean/std set per image
        self.trained_dtype: str | None = None  # dataset rule: the pixel type its statistics are in
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be at least 1, not {threads}")
        self.threads = None if threads is None else int(threads)
        self._auto_threads = auto_threads()
        self.channels_last = (self.device.type in ("cpu", "cuda")) if channels_last is None else channels_last
        self.progress = progress
        self.net = net
        self._prepare()

    # -- set-up -------------------------------------------------------------------------------------

    def _prepare(self) -> None:
        self.net.eval()
        self.net.to(self.device)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True   # tiles of one shape: let cuDNN pick its fastest kernel

    @property
    def itemsize(self) -> int:
        return 4 if self.amp_dtype is None else 2

    def plan(self, height: int, width: int, held: int = 0) -> TilePlan:
        """The tiling this predictor uses for a ``height`` x ``width`` image.

        Without a fixed tile, the tile is the one needing the fewest FLOPs whose activations (one batch)
        fit what the memory budget leaves after ``held`` bytes (the image and the result kept in host
        memory; on a CUDA device the budget is device memory and nothing is subtracted), but never
        less than a quarter of the budget.
        """
        budget = self.budget
        if self.tile is None and self.device.type != "cuda":
            budget = max(self.budget - int(held), self.budget // 4)
        return plan_tiles(self.config, height, width, tile=self.tile, budget=budget,
                          batch=self.batch or 1, itemsize=self.itemsize, overlap=self.overlap,
                          blend=self.blend)

    def held_bytes(self, stack, result_bytes_per_pixel: float) -> int:
        """Host memory a prediction of ``stack`` (an array or a source) keeps besides its tiles: the
        input, the result (the caller says how many bytes a pixel), and the TTA accumulator."""
        src = as_source(stack)
        n, h, w = src.shape[:3]
        tta = (self.config.num_classes * 4 + src.dtype.itemsize * src.shape[3]) * h * w if self.tta else 0
        return int(src.nbytes + n * h * w * result_bytes_per_pixel + tta)

    def batch_for(self, plan: TilePlan, tiles: int) -> int:
        """Tiles per forward pass: the given batch, else 1 on CPU, else as many as the budget allows."""
        if self.batch is not None:
            return self.batch
        if self.device.type == "cpu":
            return 1
        one = tile_memory(self.config, *plan.tile, itemsize=self.itemsize)
        return int(max(1, min(MAX_AUTO_BATCH, tiles, self.budget // max(one, 1))))

    # -- the loop -----------------------------------------------------------------------------------

    def _check(self, stack) -> "ArraySource | TiffRows":
        if not hasattr(stack, "rows"):
            stack = np.asarray(stack)
            if stack.ndim not in (3, 4):
                raise ImageShapeError(f"expected an (H, W, C) image or (N, H, W, C) stack, got shape {stack.shape}")
        src = as_source(stack)
        if src.shape[-1] != self.config.in_channels:
            raise ImageShapeError(f"image has {src.shape[-1]} channel(s), the network takes "
                                  f"{self.config.in_channels}")
        if src.shape[1] < 1 or src.shape[2] < 1:
            raise ImageShapeError(f"image has no pixels ({src.shape[1]}x{src.shape[2]})")
        return src

    def _image_statistics(self, src) -> None:
        """With a per-image normalisation (percentile, z-score), set mean/std from this image: the whole
        stack's statistics, from at most 512 rows spread over its pages for a source read on demand."""
        from unetcli import normalize

        if self.normalization is None:
            return
        if normalize.kind(self.normalization) == "dataset":
            if self.trained_dtype and src.dtype != np.dtype(self.trained_dtype):
                sample = src.array if isinstance(src, ArraySource) else np.zeros((1, 1, 1, src.shape[-1]), src.dtype)
                self.mean, self.std = normalize.image_stats(self.normalization, sample, self.trained_dtype)
            return
        if isinstance(src, ArraySource):
            sample = src.array
        else:
            n, h = src.shape[0], src.shape[1]
            per_page = max(1, 512 // n)
            rows = np.unique(np.linspace(0, h - 1, min(h, per_page)).astype(np.int64))
            sample = np.stack([src.rows(p, rows) for p in range(n)])
        self.mean, self.std = normalize.image_stats(self.normalization, sample)

    def _normalise(self, tile: np.ndarray, out: np.ndarray) -> None:
        np.copyto(out, tile, casting="unsafe")
        if self.mean is not None:
            out -= self.mean
        if self.std is not None:
            out /= self.std

    def _batches(self, src, plan: TilePlan, batch: int):
        """Yield (jobs, array (B, ty, tx, C) float32) in page, tile-row, tile-column order."""
        ty, tx = plan.tile
        c = src.shape[-1]
        jobs = [(n, ky, kx) for n in range(src.shape[0])
                for ky in range(plan.y.count) for kx in range(plan.x.count)]
        takes_y = [_axis_take(s - plan.y.margin, ty, plan.y.length) for s in plan.y.starts]
        takes_x = [_axis_take(s - plan.x.margin, tx, plan.x.length) for s in plan.x.starts]
        band_key, band = None, None
        for i in range(0, len(jobs), batch):
            chunk = jobs[i:i + batch]
            buf = np.empty((len(chunk), ty, tx, c), np.float32)
            for b, (n, ky, kx) in enumerate(chunk):
                if band_key != (n, ky):             # the input rows of this tile row, mirrored
                    band_key, band = (n, ky), src.rows(n, takes_y[ky])
                self._normalise(_take(band, takes_x[kx], 1), buf[b])
            yield chunk, buf

    def threads_for(self, plan: TilePlan, batch: int) -> int | None:
        """CPU threads for this plan: the given number; else 1 when each layer is too little work to
        share (the threads' hand-overs would cost more than they save); else :func:`auto_threads`."""
        if self.device.type != "cpu":
            return None
        work = tile_flops(self.config, *plan.tile) * batch / len(conv_layers(self.config, plan.tile[0]))
        return threads_for_work(work, self.threads, self._auto_threads)

    def _infer(self, buf: np.ndarray, threads: int | None = None) -> torch.Tensor:
        """Softmax probabilities (B, K, oy, ox) float32 on the device for a batch (B, ty, tx, C)."""
        if threads is not None and threads != torch.get_num_threads():
            saved = torch.get_num_threads()
            torch.set_num_threads(threads)     # only for this call: the caller's setting is restored
            try:
                return self._infer(buf)
            finally:
                torch.set_num_threads(saved)
        x = torch.from_numpy(buf)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            x = x.to(self.device)
        x = x.permute(0, 3, 1, 2)                        # NHWC memory seen as NCHW: channels-last
        if not self.channels_last:
            x = x.contiguous()
        amp = (torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
               if self.amp_dtype is not None else contextlib.nullcontext())
        with amp:
            logits = _forward(self.net, x)
        return torch.softmax(logits.float(), dim=1)

    def _stream(self, stack, reduce=None, dtype=np.uint8,
                held: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (page, y0, probs (K, h, W) or reduce(probs)) blocks of finished rows, in order."""
        n, h, w, _ = stack.shape
        plan = self.plan(h, w, held)
        total = plan.count * n
        batch = self.batch_for(plan, total)
        threads = self.threads_for(plan, batch)
        window = blend_window(plan)
        k = self.config.num_classes
        rows: _Rows | None = None
        page = -1
        done = 0
        source = self._batches(stack, plan, batch)
        if self.device.type == "cuda":
            source = _prefetch(source, depth=2)

        def assemble(chunk, probs: np.ndarray):
            nonlocal rows, page
            for b, (pn, ky, kx) in enumerate(chunk):
                if pn != page:
                    rows, page = _Rows(plan, k, window, reduce, dtype), pn
                for y0, block in rows.add(ky, kx, probs[b]):
                    yield pn, y0, block

        pending = None
        for chunk, buf in source:
            # inference mode only around the network: this generator yields to its caller in between
            with torch.inference_mode():
                probs = self._infer(buf, threads)
                if self.device.type == "cuda":
                    probs = probs.contiguous()      # one plain copy to pinned host memory, async
                    host = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
                    host.copy_(probs, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                else:
                    host = probs.cpu()
            if self.device.type == "cuda":
                if pending is not None:         # the previous batch is assembled while this one runs
                    yield from assemble(pending[0], _host(pending))
                    done += len(pending[0])
                    self._report(done, total)
                pending = (chunk, host, event)
            else:
                yield from assemble(chunk, host.numpy())
                done += len(chunk)
                self._report(done, total)
        if pending is not None:
            yield from assemble(pending[0], _host(pending))
            done += len(pending[0])
            self._report(done, total)

    def _report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)

    # -- public -------------------------------------------------------------------------------------

    def iter_blocks(self, stack: np.ndarray, reduce: Callable[[np.ndarray], np.ndarray] | None = None,
                    dtype=np.uint8, held: int | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(page, y0, probs)`` with ``probs`` (K, h, W) float32: rows ``y0..y0+h`` of that page.

        ``stack`` is (H, W, C) or (N, H, W, C), raw when the predictor has mean/std, else normalised.
        Without TTA the blocks stream out as tile rows finish (memory grows with the tile only); with
        TTA each page comes as one block, averaged over the 8 flips and rotations. A block is a view that
        may be reused after the next one is requested: copy what you keep.

        ``reduce`` (e.g. ``probs_to_mask``) turns probabilities (K, h, w) into per-pixel values (h, w)
        of ``dtype``; blocks are then (h, W) and, with valid padding, only reduced rows are ever held.
        ``held``: host bytes the caller keeps besides the tiles (see :meth:`plan`); default: the input
        and a full result (probabilities, or ``dtype`` values with ``reduce``).
        """
        src = self._check(stack)
        self._image_statistics(src)
        if held is None:
            per_pixel = self.config.num_classes * 4 if reduce is None else np.dtype(dtype).itemsize
            held = self.held_bytes(src, per_pixel)
        if not self.tta:
            yield from self._stream(src, reduce, dtype, held)
            return
        k = self.config.num_classes
        for n in range(src.shape[0]):
            probs = self._tta_page(src.page(n), k, held)
            yield n, 0, (reduce(probs) if reduce is not None else probs)

    def _tta_page(self, page: np.ndarray, k: int, held: int = 0) -> np.ndarray:
        h, w = page.shape[:2]
        acc = np.zeros((k, h, w), np.float32)
        for g in _D4:
            view = _transform(page, g, (0, 1))           # the transformed image (a view)
            target = _transform(acc, g, (1, 2))          # the accumulator seen in the same frame
            for _n, y0, block in self._stream(ArraySource(view), held=held):
                target[:, y0:y0 + block.shape[1]] += block
        acc /= len(_D4)
        return acc

    def predict(self, stack, held: int | None = None) -> np.ndarray:
        """Probabilities of an (H, W, C) image as (K, H, W), or of an (N, H, W, C) stack or an image
        source as (N, K, H, W)."""
        single = not hasattr(stack, "rows") and np.ndim(stack) == 3
        arr = self._check(stack)
        n, h, w, _ = arr.shape
        out = np.empty((n, self.config.num_classes, h, w), np.float32)
        for page, y0, block in self.iter_blocks(arr, held=held):
            out[page, :, y0:y0 + block.shape[1]] = block
        return out[0] if single else out

    def predict_mask(self, stack, threshold: float | None = None) -> np.ndarray:
        """The class map (uint8) of an (H, W, C) image as (H, W), or of a stack or source as (N, H, W)."""
        single = not hasattr(stack, "rows") and np.ndim(stack) == 3
        arr = self._check(stack)
        n, h, w, _ = arr.shape
        out = np.empty((n, h, w), np.uint8)
        for page, y0, block in self.iter_blocks(arr, lambda p: probs_to_mask(p, threshold)):
            out[page, y0:y0 + block.shape[0]] = block
        return out[0] if single else out


def _host(pending) -> np.ndarray:
    _chunk, host, event = pending
    event.synchronize()
    return host.numpy()


def _prefetch(source, depth: int = 2):
    """Run a generator one or two items ahead in a background thread (tile cutting overlaps compute)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in source:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer
            put(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()


def probs_to_mask(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Class map (uint8) from probabilities (K, ...): argmax, or for two classes ``p1 > threshold``."""
    if threshold is not None:
        if probs.shape[0] != 2:
            raise ConfigError(f"a threshold applies to two-class models; this one has {probs.shape[0]} classes",
                              hint="leave --threshold out: the class of highest probability is taken")
        return (probs[1] > threshold).astype(np.uint8)
    if probs.shape[0] == 2:
        return (probs[1] > probs[0]).astype(np.uint8)
    return np.argmax(probs, axis=0).astype(np.uint8)


# ------------------------------------------------------------------------------------- entry points

def predict_proba(net: nn.Module, image: np.ndarray, *, config: UNetConfig, tile: int | None = None,
                  batch: int = 1, device: str | torch.device = "cpu", precision: str = "fp32",
                  tta: bool = False) -> np.ndarray:
    """Softmax probabilities (K, H, W) float32 of one image with the overlap-tile strategy.

    ``image`` is (H, W, C) float32, already normalised the way the network was trained. ``tile`` is
    the input tile side (None: the tile that needs the fewest FLOPs within the default memory budget);
    ``batch`` tiles go through the network at once. The border is mirrored; with valid padding the
    result does not depend on ``tile``. ``tta`` averages over the 8 flips and 90-degree rotations.

    The network is borrowed: it is put in eval mode (dropout off) and on ``device`` for the call, then
    returned to its former mode and device, so a training loop can validate with it. Its weights'
    memory layout may become channels-last, which changes no result. ``precision`` also takes 'auto'
    (bf16 on a CUDA GPU that has it, else fp32); a reduced precision the device does not compute
    natively falls back to fp32 here (the command line refuses it instead).
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ImageShapeError(f"expected an (H, W, C) image, got shape {image.shape}")
    dev = resolve_device(device)
    try:
        precision = resolve_precision(precision, dev)
    except ConfigError:
        if precision not in PRECISIONS:
            raise
        precision = "fp32"
    params = list(net.parameters())
    home = params[0].device if params else dev
    was_training = net.training
    cudnn_benchmark = torch.backends.cudnn.benchmark
    try:
        pred = Predictor(net, config, device=dev, precision=precision, tile=tile, batch=batch, tta=tta)
        return pred.predict(image.astype(np.float32, copy=False))
    finally:
        net.train(was_training)
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if home != dev:
            net.to(home)


def load_predictor(model, *, device: str | torch.device = "auto", **options) -> Predictor:
    """A :class:`Predictor` for a loaded model file (``checkpoint.ModelFile``), with its normalisation.

    ``options`` are those of :class:`Predictor` (tile, batch, precision, tta, memory_budget, overlap,
    blend, threads, progress).
    """
    dev = resolve_device(device)
    net = model.network("cpu")
    from unetcli import normalize

    norm = model.normalization or {}
    if normalize.kind(norm) != "dataset":
        return Predictor(net, model.config, device=dev, normalization=norm, **options)
    pred = Predictor(net, model.config, device=dev, mean=norm.get("mean"), std=norm.get("std"),
                     normalization=norm, **options)
    pred.trained_dtype = (model.inputs or {}).get("dtype")
    return pred


def predict_image(model, image: np.ndarray, *, device: str | torch.device = "auto", **options) -> np.ndarray:
    """Probabilities of a raw image with a model file: (H, W, C) -> (K, H, W), (N, H, W, C) ->
    (N, K, H, W). The model's normalisation is applied tile by tile."""
    return load_predictor(model, device=device, **options).predict(image)

