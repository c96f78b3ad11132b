"""Where each output pixel of an augmentation samples its source, and the sampling kernels.

The geometry of :mod:`unetcli.transforms` (shift, flip, rotation, scale, elastic deformation) as source
positions: the elastic field (a cubic spline through the coarse grid, separably), its Jacobian
determinant, the positions of every output pixel as a low-rank product (:func:`source_coordinates`,
:func:`position_factors`, shared with the torch path). Then the numpy kernels that read the source
at those positions: nearest neighbour, bilinear, and bicubic cubic convolution (a = -0.75, torch's
``grid_sample`` kernel), blocked over output rows and mirrored at the source's edges.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from unetcli.augparams import AugmentParams
from unetcli.errors import ConfigError
from unetcli.tiling import mirror_index  # whole-sample mirroring, one rule with prediction's borders


# ------------------------------------------------------------------------------- elastic deformation

@lru_cache(maxsize=64)
def upsampling(grid: int, n: int, derivative: bool = False) -> np.ndarray:
    """(n, grid) matrix: a cubic spline through ``grid`` values at evenly spaced points over n pixels."""
    if n < 2:
        return np.full((n, grid), 0.0 if derivative else 1.0 / grid)
    from scipy.interpolate import CubicSpline

    spline = CubicSpline(np.linspace(0.0, n - 1.0, grid), np.eye(grid), axis=0)
    if derivative:
        spline = spline.derivative()
    matrix = spline(np.arange(n, dtype=np.float64))
    matrix.setflags(write=False)
    return matrix


def _low_rank(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``p @ q.T`` for a small inner size, in row blocks small enough for BLAS to stay on one thread

    (on a busy machine, threads waiting for each other make a 572x572 product 100 times slower)."""
    out = np.empty((p.shape[0], q.shape[0]), np.result_type(p, q))
    qt = np.ascontiguousarray(q.T)
    step = max(1, 150_000 // max(q.shape[0] * max(p.shape[1], 1), 1))
    for i in range(0, p.shape[0], step):
        np.matmul(p[i:i + step], qt, out=out[i:i + step])
    return out


def _check_displacements(displacements: np.ndarray) -> np.ndarray:
    d = np.asarray(displacements, dtype=np.float64)
    if d.ndim != 3 or d.shape[0] != 2 or d.shape[1] != d.shape[2] or d.shape[1] < 2:
        raise ConfigError(f"displacements must have shape (2, g, g) with g >= 2, not {d.shape}")
    return d


def elastic_field(displacements: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel displacements (rows, columns), each ``shape``, from the coarse ``(2, g, g)`` grid.

    Bicubic interpolation, separable: a cubic spline through the grid values along columns, then rows.
    """
    d = _check_displacements(displacements)
    uy, ux = upsampling(d.shape[1], shape[0]), upsampling(d.shape[1], shape[1])
    return _low_rank(uy @ d[0], ux), _low_rank(uy @ d[1], ux)


def jacobian_determinant(displacements: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """det(I + grad d) of the elastic map ``x -> x + d(x)`` at every pixel, from exact spline derivatives.

    Positive everywhere means the deformation does not fold.
    """
    d = _check_displacements(displacements)
    g = d.shape[1]
    uy, ux = upsampling(g, shape[0]), upsampling(g, shape[1])
    duy, dux = upsampling(g, shape[0], True), upsampling(g, shape[1], True)
    dyy, dyx = _low_rank(duy @ d[0], ux), _low_rank(uy @ d[0], dux)  # d(row displacement)/d(row), /d(col)
    dxy, dxx = _low_rank(duy @ d[1], ux), _low_rank(uy @ d[1], dux)
    return (1.0 + dyy) * (1.0 + dxx) - dyx * dxy


def position_factors(params: AugmentParams, out_shape: tuple[int, int], origin: tuple[float, float]
             ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """For rows and for columns of the source positions: ``(r, c, p, q)`` with position
    ``r[i] + c[j] + (p @ q.T)[i, j]`` for output pixel (i, j). The affine part is separable, the
    elastic part has rank g, so the dense positions cost a few passes over the output."""
    h, w = out_shape
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    v = np.arange(h, dtype=np.float64) - cy
    u = np.arange(w, dtype=np.float64) - cx
    m = params.linear_map()
    centre = (origin[0] + cy + params.shift[0], origin[1] + cx + params.shift[1])
    if params.displacements is not None:
        d = _check_displacements(params.displacements)
        uy, ux = upsampling(d.shape[1], h), upsampling(d.shape[1], w)
    result = []
    for axis in range(2):
        r = centre[axis] + m[axis, 0] * v
        c = m[axis, 1] * u
        if params.displacements is not None:
            # M (o + d): the row coordinate gains m[axis, 0] d_row + m[axis, 1] d_col, of rank g
            p, q = uy @ (m[axis, 0] * d[0] + m[axis, 1] * d[1]), ux
        else:
            p, q = np.zeros((h, 0)), np.zeros((w, 0))
        result.append((r, c, p, q))
    return result


def source_coordinates(params: AugmentParams, out_shape: tuple[int, int],
                       origin: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """Source rows and columns (float32, each ``out_shape``) of every output pixel, per the module docs."""
    coords = []
    for r, c, p, q in position_factors(params, out_shape, origin):
        # r[i] + c[j] + (p @ q.T)[i, j] as one product of rank 2 + g; whole numbers stay exact
        left = np.column_stack([r, np.ones_like(r), p]).astype(np.float32)
        right = np.column_stack([np.ones_like(c), c, q]).astype(np.float32)
        coords.append(_low_rank(left, right))
    return coords[0], coords[1]

# ------------------------------------------------------------------------------------- numpy sampling

_BLOCK_PIXELS = 49152  # output pixels (times channels) sampled at a time

KEYS_A = -0.75
"""The cubic convolution kernel's parameter, as in torch's ``grid_sample(mode='bicubic')`` and OpenCV."""


def _window(array: np.ndarray, ys: np.ndarray, xs: np.ndarray, before: int, after: int
            ) -> tuple[np.ndarray, int, float, float]:
    """The source pixels that positions (ys, xs) reach, flattened: ``(flat, row length, y0, x0)``.

    Covers floor(position) - before .. floor(position) + after; mirrored copies fill in outside the
    array, so that sampling from ``flat`` needs no bounds checks. Inside, the array itself serves.
    """
    h, w = array.shape[:2]
    y0, y1 = int(math.floor(float(ys.min()))) - before, int(math.floor(float(ys.max()))) + after
    x0, x1 = int(math.floor(float(xs.min()))) - before, int(math.floor(float(xs.max()))) + after
    if y0 >= 0 and x0 >= 0 and y1 < h and x1 < w:
        if array.flags.c_contiguous:   # index the array itself: no copy
            region, y0, x0 = array, 0, 0
        else:
            region = np.ascontiguousarray(array[y0:y1 + 1, x0:x1 + 1])
    else:
        rows = mirror_index(np.arange(y0, y1 + 1), h)
        cols = mirror_index(np.arange(x0, x1 + 1), w)
        region = array[rows[:, None], cols[None, :]]
    return region.reshape(region.shape[0] * region.shape[1], *array.shape[2:]), region.shape[1], y0, x0


def _integral(ys: np.ndarray, xs: np.ndarray) -> bool:
    """True if every position is a whole number (a crop, flip or turn: copying is exact)."""
    return bool(np.array_equal(np.floor(ys), ys) and np.array_equal(np.floor(xs), xs))


def _blocked(kernel: Callable[..., np.ndarray], array: np.ndarray, ys: np.ndarray, xs: np.ndarray,
             dtype: Any) -> np.ndarray:
    """Run a sampling kernel over blocks of output rows: the temporaries stay in the CPU's cache, and
    each block reads only the part of the source it reaches (twice to three times faster than one go)."""
    h, w = ys.shape
    channels = array.shape[2:]
    out = np.empty((h, w, *channels), dtype)
    step = max(1, _BLOCK_PIXELS // max(w * int(np.prod(channels, dtype=np.int64)), 1))
    for i in range(0, h, step):
        out[i:i + step] = kernel(array, ys[i:i + step], xs[i:i + step])
    return out


def sample_nearest(array: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Nearest-neighbour values of ``array`` (2-D, or 3-D channels last) at the positions; dtype kept.

    Halfway positions round to even, like torch's ``grid_sample(mode='nearest')``.
    """
    return _blocked(_nearest_block, array, ys, xs, array.dtype)


def _nearest_block(array: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    flat, rw, y0, x0 = _window(array, ys, xs, 1, 1)
    index = np.rint(ys - np.float32(y0))
    index *= rw
    index += np.rint(xs - np.float32(x0))
    return np.take(flat, index.astype(np.intp), axis=0)


def sample_linear(array: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of ``array`` (2-D, or 3-D channels last) at the positions, as float32."""
    if _integral(ys, xs):
        return sample_nearest(array, ys, xs).astype(np.float32)
    return _blocked(_linear_block, np.asarray(array, np.float32), ys, xs, np.float32)


def _taps(array: np.ndarray, ys: np.ndarray, xs: np.ndarray, before: int, after: int
          ) -> tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray]:
    """What an interpolating kernel needs: ``(flat float32 window, row length, flat index of each
    position's first tap (``before`` rows and columns up and left of its floor), fractional rows,
    fractional columns)``; the taps reach ``after`` pixels down and right of the floor."""
    flat, rw, y0, x0 = _window(array, ys, xs, before, after)
    flat = flat.astype(np.float32, copy=False)
    fy, fx = np.floor(ys), np.floor(xs)
    ty, tx = ys - fy, xs - fx
    fy -= y0 + before
    fy *= rw
    fy += fx - (x0 + before)
    return flat, rw, fy.astype(np.intp), ty, tx


def _linear_block(array: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    flat, rw, base, ty, tx = _taps(array, ys, xs, 0, 1)
    if array.ndim == 3:
        ty, tx = ty[..., None], tx[..., None]
    taps = [np.take(flat[k:], base, axis=0) for k in (0, 1, rw, rw + 1)]
    taps[1] -= taps[0]
    taps[1] *= tx
    taps[0] += taps[1]                # upper row
    taps[3] -= taps[2]
    taps[3] *= tx
    taps[2] += taps[3]                # lower row
    taps[2] -= taps[0]
    taps[2] *= ty
    taps[0] += taps[2]
    return taps[0]


def _keys_weights(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four cubic-convolution weights of taps at -1, 0, 1, 2 for fractional positions t in [0, 1)."""
    a = np.float32(KEYS_A)
    s = 1.0 - t
    w0 = a * t * s * s                                  # a (x-1)(x-2)^2 at x = 1 + t
    w3 = a * t * t * s                                  # the same at x = 2 - t
    w1 = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0      # (a+2)x^3 - (a+3)x^2 + 1 at x = t
    w2 = ((a + 2.0) * s - (a + 3.0)) * s * s + 1.0      # the same at x = 1 - t
    return w0, w1, w2, w3


def sample_cubic(array: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bicubic interpolation (cubic convolution, a = -0.75) of ``array`` (2-D, or 3-D channels last).

    The kernel of torch's ``grid_sample(mode='bicubic')``, so that both paths agree; it interpolates
    (passes through the pixel values) and needs no prefilter, so the cost follows the output size
    only. Returns float32.
    """
    if _integral(ys, xs):
        return sample_nearest(array, ys, xs).astype(np.float32)
    return _blocked(_cubic_block, np.asarray(array, np.float32), ys, xs, np.float32)


def _cubic_block(array: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    flat, rw, base, ty, tx = _taps(array, ys, xs, 1, 2)   # base: the first of the 4x4 taps
    wy, wx = _keys_weights(ty), _keys_weights(tx)
    if array.ndim == 3:
        wy, wx = [w[..., None] for w in wy], [w[..., None] for w in wx]
    out = None
    for i in range(4):
        row = np.take(flat[i * rw:], base, axis=0)
        row *= wx[0]
        for j in range(1, 4):
            tap = np.take(flat[i * rw + j:], base, axis=0)
            tap *= wx[j]
            row += tap
        row *= wy[i]
        if out is None:
            out = row
        else:
            out += row
    return out
