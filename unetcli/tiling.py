"""Tile plans for overlap-tile prediction: where tiles go, which tile size, mirroring, blending.

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

Everything here is numpy on the network's size rules (:mod:`unetcli.netspec`): torch is not imported,
so plans, tile choice and blending are tested without it. The predictor
(:mod:`unetcli.inference`) and a chunked path can share them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from unetcli.errors import ConfigError, ImageShapeError, TileSizeError
from unetcli.netspec import (UNetConfig, activation_elements, check_tile, conv_layers, margin, output_size,
                             pixel_flops)

BLENDS = ("gaussian", "mean")
DEFAULT_OVERLAP = 0.25

# Measured peaks (ru_maxrss, glibc malloc, channels-last, several tiles) over the simulated live
# tensors: 1.15x for the paper's network at 700x876, 1.8x for base 16 at 1052x1100 (its many
# mid-sized tensors fragment the heap); 1.5 sits between, and the CPU default budget leaves room.
_SAFETY = 1.5


# ------------------------------------------------------------------------------------------- memory

def tile_memory(config: UNetConfig, ty: int, tx: int, batch: int = 1, itemsize: int = 4) -> int:
    """Bytes one batch of ``ty`` x ``tx`` tiles needs for its activations (an upper estimate)."""
    elems = float(activation_elements(config, np.array(ty), np.array(tx)))
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
    def mem(rows: slice) -> np.ndarray:
        return activation_elements(config, ys[rows, None], xs[None, :]) * batch * itemsize * _SAFETY

    smallest_tile = float(mem(slice(0, 1))[0, 0])
    if smallest_tile > budget:
        from unetcli.guards import format_bytes

        raise ConfigError(f"even the smallest tile ({int(ys[0])}x{int(xs[0])}) needs "
                          f"{format_bytes(smallest_tile)}, more than the memory budget of "
                          f"{format_bytes(float(budget))}", hint="raise --memory-budget or lower --batch")

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
    per = np.array([pixel_flops(kind, cin, cout, k) for kind, cin, cout, k, _ in conv_layers(config, int(ys[0]))],
                   dtype=np.float64)
    wx = lx * per[None, :]
    # The (ty, tx) table is computed a band of heights at a time, so the search needs a bounded amount
    # of memory however large the image (a same-padding network has a candidate every 2**depth pixels).
    step = max(1, (1 << 17) // len(xs))
    bands = [slice(i, min(i + step, len(ys))) for i in range(0, len(ys), step)]

    def cost(rows: slice) -> np.ndarray:
        flops = ly[rows] @ wx.T
        return np.where(mem(rows) <= budget, flops * ny[rows, None] * nx[None, :], np.inf)

    best = min(float(cost(rows).min()) for rows in bands)
    pick = (np.iinfo(np.int64).max, 0, 0)   # (area, iy, ix): the smallest tile near the fewest FLOPs
    for rows in bands:
        area = np.where(cost(rows) <= best * 1.005, ys[rows, None] * xs[None, :], np.iinfo(np.int64).max)
        k = int(np.argmin(area))
        iy, ix = divmod(k, len(xs))
        if int(area.flat[k]) < pick[0]:
            pick = (int(area.flat[k]), rows.start + iy, ix)
    return int(ys[pick[1]]), int(xs[pick[2]])


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
            from unetcli.devices import default_memory_budget

            budget = default_memory_budget("cpu")
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


def axis_take(start: int, size: int, length: int) -> slice | np.ndarray:
    """Positions ``start .. start + size`` of an axis of ``length``: a slice inside, mirrored indices
    where they run past an edge."""
    if start >= 0 and start + size <= length:
        return slice(start, start + size)
    return mirror_index(np.arange(start, start + size), length)



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


class RowAssembler:
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


def fit_tile(config: UNetConfig, tile: tuple[int, int]) -> tuple[tuple[int, int], str | None]:
    """A tile the network takes, and a note when it differs from ``tile``: a same-padding network takes
    any tile, rounded to its multiple of 2^depth (the nearest, up on a tie); a valid-padding tile is
    returned as given, to be checked exactly (``check_tile``)."""
    if config.padding != "same":
        return tuple(tile), None
    step = 2 ** config.depth
    fitted = tuple(max(step, int(round(side / step)) * step) for side in tile)
    if fitted == tuple(tile):
        return fitted, None
    return fitted, (f"tile {'x'.join(map(str, tile))} rounded to {'x'.join(map(str, fitted))}: "
                    f"this same-padding network takes multiples of {step}")
