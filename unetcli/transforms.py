"""Data augmentation shared by ``unet augment`` and training: elastic deformation, rigid changes, gray values.

One random draw, :class:`AugmentParams`, describes one augmentation completely. It is applied in this
fixed order (the order of :data:`ORDER`):

geometry, composed into one mapping and one resampling of the image
    1. ``shift``      the window moves by up to ``max_shift`` px along each axis;
    2. ``flip``       one of the 8 flips and 90-degree turns (the dihedral group, identity included);
    3. ``rotate``     a rotation by an angle uniform in [-max_angle, max_angle] degrees (positive turns the
                      content counter-clockwise on screen), about the window centre;
    4. ``scale``      a zoom by a factor log-uniform in ``scale_range`` (> 1 enlarges), about the centre;
    5. ``elastic``    the paper's deformation: displacement vectors on a coarse ``grid`` x ``grid`` grid
                      spanning the output window, drawn from a Gaussian with ``sigma`` px standard
                      deviation, turned into per-pixel displacements by bicubic interpolation (a cubic
                      spline through the grid values, applied separably along rows and columns).
                      Displacements are measured in output pixels.
gray values, applied to the resampled image only
    6. ``brightness`` adds a value uniform in [-max_brightness, max_brightness] x (value range);
    7. ``contrast``   scales about the window's mean by a factor log-uniform in ``contrast_range``;
    8. ``gamma``      ``lo + r * ((x - lo) / r) ** gamma`` (values clipped to the range first), gamma
                      log-uniform in ``gamma_range``;
    9. ``noise``      adds Gaussian noise with a standard deviation uniform in [0, max_noise] x (range).

Concretely, output pixel ``o`` (row, column) of a window whose pixel (0, 0) lies at source position
``origin`` takes its value from source position ``origin + c + t + M (o - c + d(o))``, with ``c`` the
window centre, ``t`` the shift, ``M = D^-1 R^-1 / s`` (flip or turn D, rotation R, scale s) and ``d`` the
elastic displacement field. The image is sampled with bicubic (``order=3``: cubic convolution with
a = -0.75, the kernel of torch's ``grid_sample`` and of OpenCV) or bilinear (``order=1``) interpolation,
label maps with nearest neighbour (so no label value appears that was not there before), weight maps
bilinearly. Outside the source the image is mirrored at its edge pixels (whole-sample symmetric:
``d c b | a b c d | c b a``), as in overlap-tile prediction. Only the output pixels are computed: the
cost follows the size of the output, not of the source image.

Two implementations sit behind one interface: numpy (:func:`augment_tile`, :func:`augment_sample`,
:func:`apply_params`) for the command and for data loading on the CPU, and torch ``grid_sample``
(:func:`augment_batch_torch`, :func:`apply_params_torch`) so that training on a GPU can augment on the
GPU. Both compute the same sampling positions from the same :class:`AugmentParams` and use the same
kernels, so they agree to float32 rounding (and on labels up to exact rounding ties).

Randomness comes only from the generator passed in (``numpy.random.Generator`` or ``torch.Generator``);
the same seed gives the same result. Draws happen in the order of :data:`ORDER`, skipping switched-off
steps, then the noise field. Gray-value magnitudes are fractions of ``value_range`` (default 0 to 1).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from unetcli.errors import ConfigError, ImageShapeError, LabelError
from unetcli.netspec import refuse_unknown
from unetcli.tiling import mirror_index  # whole-sample mirroring, one rule with prediction's borders

if TYPE_CHECKING:  # torch is imported only where the torch path runs
    import torch

ORDER = ("shift", "flip", "rotate", "scale", "elastic", "brightness", "contrast", "gamma", "noise")
"""The augmentations in the order they are applied (and their switches in :class:`AugmentConfig`)."""


# ------------------------------------------------------------------------------------------ config

def _range(value: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a pair (low, high), not {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 or hi < lo:
        raise ConfigError(f"{name} must satisfy 0 < low <= high, not {lo:g},{hi:g}")
    return lo, hi


def _nonnegative(value: Any, name: str, unit: str = "") -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, not {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ConfigError(f"{name} must be 0 or more, not {v:g}{unit}")
    return v


@dataclass(frozen=True)
class AugmentConfig:
    """Every parameter of the augmentation; each step has a switch, applied in the order of :data:`ORDER`.

    ``AugmentConfig()`` holds the defaults used for training; :meth:`none` is the identity. A step
    with its switch on but zero magnitude (``sigma=0``, ``max_angle=0``, ``scale_range=(1, 1)``...) is
    the identity too. Gray-value magnitudes are fractions of the image's value range.
    """

    shift: bool = True
    max_shift: float = 20.0                           # px, each axis, uniform
    flip: bool = True                                 # one of the 8 flips and 90-degree turns
    rotate: bool = True
    max_angle: float = 180.0                          # degrees, uniform in [-max_angle, max_angle]
    scale: bool = True
    scale_range: tuple[float, float] = (0.9, 1.1)     # zoom factor, log-uniform
    elastic: bool = True
    grid: int = 3                                     # coarse grid of grid x grid displacement vectors
    sigma: float = 10.0                               # px, standard deviation of the displacements
    brightness: bool = True
    max_brightness: float = 0.1                       # added offset, fraction of the value range
    contrast: bool = True
    contrast_range: tuple[float, float] = (0.8, 1.25)  # factor about the mean, log-uniform
    gamma: bool = True
    gamma_range: tuple[float, float] = (0.8, 1.25)     # exponent, log-uniform
    noise: bool = True
    max_noise: float = 0.02                           # Gaussian noise std, fraction of the value range
    order: int = 3                                    # image interpolation: 3 cubic, 1 linear

    def __post_init__(self) -> None:
        for name in ORDER:
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ConfigError(f"augmentation switch {name} must be true or false, "
                                  f"not {getattr(self, name)!r}")
        try:
            grid = int(self.grid)
        except (TypeError, ValueError):
            raise ConfigError(f"elastic grid must be a whole number, not {self.grid!r}") from None
        if grid != self.grid or grid < 2:
            raise ConfigError(f"elastic grid must be at least 2x2, not {self.grid}x{self.grid}",
                              hint="the paper uses a 3x3 grid")
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "sigma", _nonnegative(self.sigma, "elastic sigma", " px"))
        object.__setattr__(self, "max_shift", _nonnegative(self.max_shift, "shift", " px"))
        object.__setattr__(self, "max_angle", _nonnegative(self.max_angle, "rotation angle", " degrees"))
        object.__setattr__(self, "max_brightness", _nonnegative(self.max_brightness, "brightness"))
        object.__setattr__(self, "max_noise", _nonnegative(self.max_noise, "noise"))
        object.__setattr__(self, "scale_range", _range(self.scale_range, "scale range"))
        object.__setattr__(self, "contrast_range", _range(self.contrast_range, "contrast range"))
        object.__setattr__(self, "gamma_range", _range(self.gamma_range, "gamma range"))
        if self.order not in (1, 3):
            raise ConfigError(f"image interpolation order must be 1 (linear) or 3 (cubic), not {self.order}")

    @classmethod
    def none(cls) -> "AugmentConfig":
        """The identity: every step switched off."""
        return cls(**{name: False for name in ORDER})

    @classmethod
    def only(cls, *names: str, **changes: Any) -> "AugmentConfig":
        """Only the named steps (of :data:`ORDER`) switched on, with the default magnitudes or ``changes``."""
        unknown = [n for n in names if n not in ORDER]
        if unknown:
            raise ConfigError(f"unknown augmentation {unknown[0]!r}; choose from {', '.join(ORDER)}")
        return cls(**{**{name: name in names for name in ORDER}, **changes})

    def to_dict(self) -> dict:
        """Plain JSON-able values, e.g. for a model file's provenance."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "AugmentConfig":
        refuse_unknown(data, (f.name for f in dataclasses.fields(cls)), "augmentation settings")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})


@dataclass(frozen=True, eq=False)
class AugmentParams:
    """One random draw: everything needed to apply an augmentation (the noise field excepted).

    ``displacements`` is ``(2, g, g)``, the row and column components in px at the coarse grid points,
    or None for no elastic deformation.
    """

    shift: tuple[float, float] = (0.0, 0.0)   # px (rows, columns)
    dihedral: int = 0                         # 0..3: turns by 90 degrees; 4..7: mirrored, then turned
    angle: float = 0.0                        # degrees, counter-clockwise on screen
    scale: float = 1.0
    displacements: np.ndarray | None = None
    brightness: float = 0.0                   # fraction of the value range
    contrast: float = 1.0
    gamma: float = 1.0
    noise: float = 0.0                        # std, fraction of the value range

    def linear_map(self) -> np.ndarray:
        """The 2x2 matrix taking output offsets (row, column) from the centre to source offsets."""
        turns, mirrored = self.dihedral % 4, self.dihedral >= 4
        # a counter-clockwise turn by 90 degrees on screen, acting on (row, column) vectors
        turn = np.linalg.matrix_power(np.array([[0.0, -1.0], [1.0, 0.0]]), turns)
        mirror = np.diag([1.0, -1.0]) if mirrored else np.eye(2)
        a = math.radians(self.angle)
        inverse_rotation = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
        return mirror @ turn.T @ inverse_rotation / self.scale


# -------------------------------------------------------------------------------------- random draws

def _draw(cfg: AugmentConfig, uniform: Callable[[float, float], float],
          normal: Callable[[tuple[int, ...]], np.ndarray], integer: Callable[[int], int]) -> AugmentParams:
    """Draw one AugmentParams in the order of ORDER, skipping switched-off steps."""

    def log_uniform(lo: float, hi: float) -> float:
        return lo if lo == hi else math.exp(uniform(math.log(lo), math.log(hi)))

    p: dict[str, Any] = {}
    if cfg.shift and cfg.max_shift > 0:
        p["shift"] = (uniform(-cfg.max_shift, cfg.max_shift), uniform(-cfg.max_shift, cfg.max_shift))
    if cfg.flip:
        p["dihedral"] = integer(8)
    if cfg.rotate and cfg.max_angle > 0:
        p["angle"] = uniform(-cfg.max_angle, cfg.max_angle)
    if cfg.scale:
        p["scale"] = log_uniform(*cfg.scale_range)
    if cfg.elastic and cfg.sigma > 0:
        p["displacements"] = cfg.sigma * normal((2, cfg.grid, cfg.grid))
    if cfg.brightness and cfg.max_brightness > 0:
        p["brightness"] = uniform(-cfg.max_brightness, cfg.max_brightness)
    if cfg.contrast:
        p["contrast"] = log_uniform(*cfg.contrast_range)
    if cfg.gamma:
        p["gamma"] = log_uniform(*cfg.gamma_range)
    if cfg.noise and cfg.max_noise > 0:
        p["noise"] = uniform(0.0, cfg.max_noise)
    return AugmentParams(**p)


def sample_params(rng: "np.random.Generator | torch.Generator", cfg: AugmentConfig) -> AugmentParams:
    """Draw the parameters of one augmentation from ``rng`` (a numpy or a torch generator)."""
    if isinstance(rng, np.random.Generator):
        return _draw(cfg, lambda lo, hi: float(rng.uniform(lo, hi)),
                     lambda shape: rng.standard_normal(shape), lambda n: int(rng.integers(n)))
    import torch

    if not isinstance(rng, torch.Generator):
        raise TypeError(f"rng must be a numpy or torch generator, not {type(rng).__name__}")
    dev = rng.device

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=rng, device=dev, dtype=torch.float64))

    def normal(shape: tuple[int, ...]) -> np.ndarray:
        return torch.randn(shape, generator=rng, device=dev, dtype=torch.float64).cpu().numpy()

    return _draw(cfg, uniform, normal,
                 lambda n: int(torch.randint(n, (), generator=rng, device=dev)))


# ------------------------------------------------------------------------------- elastic deformation

@lru_cache(maxsize=64)
def _upsampling(grid: int, n: int, derivative: bool = False) -> np.ndarray:
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
    uy, ux = _upsampling(d.shape[1], shape[0]), _upsampling(d.shape[1], shape[1])
    return _low_rank(uy @ d[0], ux), _low_rank(uy @ d[1], ux)


def jacobian_determinant(displacements: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """det(I + grad d) of the elastic map ``x -> x + d(x)`` at every pixel, from exact spline derivatives.

    Positive everywhere means the deformation does not fold.
    """
    d = _check_displacements(displacements)
    g = d.shape[1]
    uy, ux = _upsampling(g, shape[0]), _upsampling(g, shape[1])
    duy, dux = _upsampling(g, shape[0], True), _upsampling(g, shape[1], True)
    dyy, dyx = _low_rank(duy @ d[0], ux), _low_rank(uy @ d[0], dux)  # d(row displacement)/d(row), /d(col)
    dxy, dxx = _low_rank(duy @ d[1], ux), _low_rank(uy @ d[1], dux)
    return (1.0 + dyy) * (1.0 + dxx) - dyx * dxy


def _factors(params: AugmentParams, out_shape: tuple[int, int], origin: tuple[float, float]
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
        uy, ux = _upsampling(d.shape[1], h), _upsampling(d.shape[1], w)
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
    for r, c, p, q in _factors(params, out_shape, origin):
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


def _linear_block(array: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    flat, rw, y0, x0 = _window(array, ys, xs, 0, 1)
    flat = flat.astype(np.float32, copy=False)
    fy, fx = np.floor(ys), np.floor(xs)
    ty, tx = ys - fy, xs - fx
    fy -= y0
    fy *= rw
    fy += fx - x0
    base = fy.astype(np.intp)
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
    flat, rw, y0, x0 = _window(array, ys, xs, 1, 2)
    flat = flat.astype(np.float32, copy=False)
    fy, fx = np.floor(ys), np.floor(xs)
    wy, wx = _keys_weights(ys - fy), _keys_weights(xs - fx)
    fy -= y0 + 1
    fy *= rw
    fy += fx - (x0 + 1)
    base = fy.astype(np.intp)           # flat index of the first of the 4x4 taps
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


# ----------------------------------------------------------------------------------------- gray values

def _check_range(value_range: tuple[float, float]) -> tuple[float, float]:
    lo, hi = float(value_range[0]), float(value_range[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise ConfigError(f"value range must have low < high, not {lo:g},{hi:g}")
    return lo, hi


def gray_values(image: np.ndarray, params: AugmentParams, rng: np.random.Generator | None,
                value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Brightness, contrast, gamma and noise (steps 6 to 9) on a float32 image; the identity skips all.

    ``rng`` draws the noise field; it may be None when ``params.noise`` is 0.
    """
    lo, hi = _check_range(value_range)
    r = hi - lo
    x = image.astype(np.float32, copy=True)
    if params.brightness != 0.0:
        x += np.float32(params.brightness * r)
    if params.contrast != 1.0:
        mean = np.float32(x.mean(dtype=np.float64))
        x = mean + np.float32(params.contrast) * (x - mean)
    if params.gamma != 1.0:
        x = lo + r * np.clip((x - lo) / r, 0.0, 1.0) ** np.float32(params.gamma)
    if params.noise != 0.0:
        if rng is None:
            raise ConfigError("noise needs a random generator")
        x += np.float32(params.noise * r) * rng.standard_normal(x.shape, dtype=np.float32)
    return x.astype(np.float32, copy=False)


# -------------------------------------------------------------------------------------- numpy interface

def _check_inputs(image: np.ndarray, target: np.ndarray | None, weights: np.ndarray | None) -> None:
    if image.ndim != 3:
        raise ImageShapeError(f"image must be (H, W, C), not of shape {image.shape}")
    h, w = image.shape[:2]
    if target is not None and target.shape != (h, w):
        raise LabelError(f"labels are {'x'.join(map(str, target.shape))}, the image is {h}x{w}",
                         hint="give labels of the image's height and width, one channel")
    if weights is not None and weights.shape != (h, w):
        raise LabelError(f"weights are {'x'.join(map(str, weights.shape))}, the image is {h}x{w}",
                         hint="give a weight map of the image's height and width, one channel")


def apply_params(rng: np.random.Generator | None, params: AugmentParams, image: np.ndarray,
                 target: np.ndarray | None = None, weights: np.ndarray | None = None, *,
                 out_shape: tuple[int, int] | None = None, origin: tuple[float, float] = (0.0, 0.0),
                 label_crop: int = 0, order: int = 3, value_range: tuple[float, float] = (0.0, 1.0),
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Apply one augmentation with the numpy path.

    ``image`` is ``(H, W, C)``; ``target`` and ``weights`` ``(H, W)`` on the same pixels. The output
    window is ``out_shape`` (default: the image's) with pixel (0, 0) at source position ``origin``.
    Labels and weights come back for the window less ``label_crop`` pixels on every side. ``rng`` draws
    the noise field (None when ``params.noise`` is 0).
    """
    _check_inputs(image, target, weights)
    out_shape = tuple(out_shape or image.shape[:2])
    ys, xs = source_coordinates(params, out_shape, origin)
    sample = sample_cubic if order == 3 else sample_linear
    out = gray_values(sample(image, ys, xs), params, rng, value_range)
    k = label_crop
    if k:
        ys, xs = ys[k:out_shape[0] - k, k:out_shape[1] - k], xs[k:out_shape[0] - k, k:out_shape[1] - k]
    tgt = sample_nearest(target, ys, xs) if target is not None else None
    wts = sample_linear(weights, ys, xs) if weights is not None else None
    return out, tgt, wts


def augment_sample(rng: np.random.Generator, cfg: AugmentConfig, image: np.ndarray,
                   target: np.ndarray | None = None, weights: np.ndarray | None = None, *,
                   value_range: tuple[float, float] = (0.0, 1.0),
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One augmented copy of a whole image (``(H, W, C)``) with its labels and weights, same size.

    The transforms act about the image centre; where they reach outside, the image is mirrored.
    Returns ``(image float32 (H, W, C), target (H, W) of target's dtype or None, weights float32 or None)``.
    """
    params = sample_params(rng, cfg)
    return apply_params(rng, params, image, target, weights, order=cfg.order, value_range=value_range)


def augment_tile(rng: np.random.Generator, cfg: AugmentConfig, image: np.ndarray,
                 target: np.ndarray | None, weights: np.ndarray | None, in_size: int, out_size: int,
                 center: tuple[int, int] | None = None, *, value_range: tuple[float, float] = (0.0, 1.0),
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One augmented training tile: the network's input and the centred labels and weights it predicts.

    ``image`` is ``(H, W, C)`` float32, ``target`` ``(H, W)`` integer labels, ``weights`` ``(H, W)``
    float32 (either may be None). The tile is ``in_size`` square with its pixel ``(in_size // 2,
    in_size // 2)`` at source pixel ``center`` (rows, columns) before augmentation; when ``center`` is
    None it is drawn so that the ``out_size`` crop lies inside the image where it fits (centred where it
    does not). Then one random augmentation of ``cfg`` is drawn and applied, sampling only the tile's
    pixels (the image is never deformed as a whole); outside the image it is mirrored. Returns the
    input tile ``(in_size, in_size, C)`` float32 and the centred ``(out_size, out_size)`` crops of the
    deformed target (nearest neighbour, its dtype) and weights (linear, float32), as the valid-padding
    U-Net maps in_size to out_size. ``value_range`` is the range gray-value magnitudes refer to.

    Draws, in this order: the centre (if None), the AugmentParams, the noise field.
    """
    in_size, out_size = int(in_size), int(out_size)
    if out_size < 1 or in_size < out_size or (in_size - out_size) % 2:
        raise ConfigError(f"tile sizes must satisfy in_size >= out_size >= 1 with an even difference, "
                          f"not {in_size} and {out_size}")
    _check_inputs(image, target, weights)
    h, w = image.shape[:2]
    crop = (in_size - out_size) // 2
    if center is None:
        center = tuple(random_center(rng, n, in_size, out_size) for n in (h, w))
    origin = (float(center[0] - in_size // 2), float(center[1] - in_size // 2))
    params = sample_params(rng, cfg)
    return apply_params(rng, params, image, target, weights, out_shape=(in_size, in_size),
                        origin=origin, label_crop=crop, order=cfg.order, value_range=value_range)


def random_center(rng: np.random.Generator, n: int, in_size: int, out_size: int) -> int:
    """A tile centre along an axis of length n for which the output crop lies inside, where it fits.

    The centre is the source pixel under the tile's pixel ``in_size // 2``, as ``augment_tile`` takes
    it; uniform over the allowed positions, or the middle when the axis is shorter than ``out_size``.
    """
    offset = in_size // 2 - (in_size - out_size) // 2    # centre minus the output crop's first pixel
    if n < out_size:
        return (n - out_size) // 2 + offset
    return int(rng.integers(offset, n - out_size + offset + 1))


_random_center = random_center  # the name the training code first used


# -------------------------------------------------------------------------------------- torch interface

def apply_params_torch(params: list[AugmentParams], images: "torch.Tensor",
                       targets: "torch.Tensor | None" = None, weights: "torch.Tensor | None" = None, *,
                       out_size: int | None = None, order: int = 3,
                       value_range: tuple[float, float] = (0.0, 1.0),
                       generator: "torch.Generator | None" = None,
                       ) -> tuple["torch.Tensor", "torch.Tensor | None", "torch.Tensor | None"]:
    """Apply one AugmentParams per sample with ``grid_sample``, on the tensors' device.

    ``images`` ``(B, C, H, W)`` are the windows themselves (origin 0, mirrored at their own edges).
    ``targets`` and ``weights`` ``(B, h, w)`` are centred on them (``h = H`` is exact; a smaller map is
    mirrored at its own edge where the deformation reaches past it). They come back as the centred
    ``(out_size, out_size)`` crop (default: ``h, w``). Images: bicubic (Keys, a = -0.75) for ``order=3``,
    bilinear for 1; targets nearest (dtype kept), weights bilinear. ``generator`` draws the noise.
    """
    import torch
    import torch.nn.functional as F

    if images.ndim != 4:
        raise ImageShapeError(f"images must be (B, C, H, W), not of shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    if len(params) != b:
        raise ConfigError(f"{len(params)} parameter sets for a batch of {b}")
    dev, f32 = images.device, torch.float32
    lo, hi = _check_range(value_range)
    r = hi - lo

    # The sampling grid (B, H, W, 2) that grid_sample wants: (x, y) in [-1, 1], -1 and 1 at the edge
    # pixels' centres (align_corners). Built from the same factors as source_coordinates, normalised
    # factor by factor: positions r[i] + c[j] + (p @ u.T)[i, j] per axis, u the shared spline matrix.
    factors = [_factors(p, (h, w), (0.0, 0.0)) for p in params]
    norm = np.array([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])          # x, y
    rows = np.stack([np.stack([f[1][0], f[0][0]], -1) for f in factors]) * norm - 1.0   # (B, H, 2)
    cols = np.stack([np.stack([f[1][1], f[0][1]], -1) for f in factors]) * norm         # (B, W, 2)
    grid = (torch.tensor(rows, device=dev, dtype=f32)[:, :, None, :]
            + torch.tensor(cols, device=dev, dtype=f32)[:, None, :, :])
    ranks = {f[0][2].shape[1] for f in factors} - {0}
    if len(ranks) > 1:
        raise ConfigError("all samples of a batch need the same elastic grid")
    if ranks:
        g = ranks.pop()
        elastic = np.stack([np.stack([f[1][2], f[0][2]], -1) if f[0][2].shape[1] else np.zeros((h, g, 2))
                            for f in factors]) * norm                              # (B, H, g, 2)
        ux = torch.tensor(_upsampling(g, w), device=dev, dtype=f32)               # (W, g)
        grid = grid + torch.einsum("bhgc,wg->bhwc", torch.tensor(elastic, device=dev, dtype=f32), ux)

    mode = "bicubic" if order == 3 else "bilinear"
    out = F.grid_sample(images.to(f32), grid, mode=mode, padding_mode="reflection", align_corners=True)

    # gray values, per sample; a neutral parameter leaves its sample untouched
    def column(name: str) -> "torch.Tensor":
        return torch.as_tensor([getattr(p, name) for p in params], device=dev, dtype=f32).view(b, 1, 1, 1)

    bright, contrast, gamma, noise = column("brightness"), column("contrast"), column("gamma"), column("noise")
    if torch.any(bright != 0):
        out = out + bright * r
    if torch.any(contrast != 1):
        mean = out.mean(dim=(1, 2, 3), keepdim=True, dtype=torch.float64).to(f32)
        out = torch.where(contrast != 1, mean + contrast * (out - mean), out)
    if torch.any(gamma != 1):
        curved = lo + r * ((out - lo) / r).clamp(0.0, 1.0) ** gamma
        out = torch.where(gamma != 1, curved, out)
    if torch.any(noise != 0):
        gen_dev = generator.device if generator is not None else torch.device("cpu")
        field = torch.randn(out.shape, generator=generator, device=gen_dev, dtype=f32).to(dev)
        out = out + noise * r * field

    def crop_for(maps: "torch.Tensor", what: str) -> tuple["torch.Tensor", int, int]:
        if maps.ndim != 3 or maps.shape[0] != b:
            raise LabelError(f"{what} must be (B, h, w) with B = {b}, not of shape {tuple(maps.shape)}")
        mh, mw = maps.shape[1:]
        oh, ow = (out_size, out_size) if out_size is not None else (mh, mw)
        if oh > h or ow > w or (h - oh) % 2 or (w - ow) % 2:
            raise ConfigError(f"output size {oh}x{ow} does not fit centred in {h}x{w} tiles")
        return maps, oh, ow

    def sample_maps(maps: "torch.Tensor", oh: int, ow: int, how: str) -> "torch.Tensor":
        mh, mw = maps.shape[1:]
        ky, kx = (h - oh) // 2, (w - ow) // 2
        sub = grid[:, ky:ky + oh, kx:kx + ow]
        if (mh, mw) != (h, w):   # re-normalise to the smaller map, centred on the tile
            pix = (sub + 1.0) / torch.tensor(norm, device=dev, dtype=f32)
            pix = pix - torch.tensor([(w - mw) / 2.0, (h - mh) / 2.0], device=dev, dtype=f32)
            sub = pix * torch.tensor([2.0 / max(mw - 1, 1), 2.0 / max(mh - 1, 1)], device=dev, dtype=f32) - 1.0
        return F.grid_sample(maps.to(f32)[:, None], sub, mode=how, padding_mode="reflection",
                             align_corners=True)[:, 0]

    tgt = wts = None
    if targets is not None:
        maps, oh, ow = crop_for(targets, "targets")
        if maps.dtype in (torch.int32, torch.int64) and maps.numel() and (
                int(maps.max()) >= 2 ** 24 or int(maps.min()) <= -2 ** 24):
            raise LabelError("target values must lie within +-2**24 for the torch path")
        tgt = sample_maps(maps, oh, ow, "nearest").round().to(targets.dtype)
    if weights is not None:
        maps, oh, ow = crop_for(weights, "weights")
        wts = sample_maps(maps, oh, ow, "bilinear")
    return out, tgt, wts


def augment_batch_torch(images: "torch.Tensor", targets: "torch.Tensor | None",
                        weights: "torch.Tensor | None", cfg: AugmentConfig, generator: "torch.Generator",
                        out_size: int, *, value_range: tuple[float, float] = (0.0, 1.0),
                        ) -> tuple["torch.Tensor", "torch.Tensor | None", "torch.Tensor | None"]:
    """Augment a batch of tiles on their device with ``grid_sample``: the torch twin of augment_tile.

    ``images`` ``(B, C, S, S)`` are input tiles; ``targets`` (integer) and ``weights`` (float) ``(B, s,
    s)`` are centred on them, best ``s = S``. One AugmentParams per sample is drawn from ``generator``
    (then the noise field), applied about each tile's centre with mirroring at the tile's edges, and
    the returned targets and weights are the centred ``(out_size, out_size)`` crops. Returns
    ``(images (B, C, S, S) float32, targets (B, out_size, out_size) or None, weights ... or None)``.
    """
    params = [sample_params(generator, cfg) for _ in range(images.shape[0])]
    return apply_params_torch(params, images, targets, weights, out_size=out_size, order=cfg.order,
                              value_range=value_range, generator=generator)


# ------------------------------------------------------------------------------------------- previews

def label_contours(labels: np.ndarray) -> np.ndarray:
    """Boolean map of the pixels whose label differs from the right or lower neighbour."""
    edge = np.zeros(labels.shape, bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def preview_panel(image: np.ndarray, labels: np.ndarray | None = None,
                  value_range: tuple[float, float] = (0.0, 1.0), size: int = 256,
                  color: tuple[int, int, int] = (255, 40, 0)) -> np.ndarray:
    """An RGB uint8 picture of an ``(H, W, C)`` image, shrunk to at most ``size`` px, label contours drawn.

    The image is shrunk by an integer factor with block means; labels by picking every factor-th pixel,
    so that their contours stay one pixel wide and exactly on the labels' boundaries.
    """
    lo, hi = _check_range(value_range)
    h, w = image.shape[:2]
    f = max(1, math.ceil(max(h, w) / max(int(size), 1)))
    hh, ww = max(h // f, 1), max(w // f, 1)
    img = image[:hh * f, :ww * f].astype(np.float32)
    img = img.reshape(hh, f, ww, f, -1).mean(axis=(1, 3)) if f > 1 else img
    if img.shape[2] >= 3:
        img = img[..., :3]
    else:
        img = np.repeat(img[..., :1], 3, axis=2)
    rgb = np.clip(np.rint((img - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
    if labels is not None:
        rgb[label_contours(labels[:hh * f:f, :ww * f:f])] = color
    return rgb


def contact_sheet(panels: list[np.ndarray], columns: int | None = None, gap: int = 4,
                  background: int = 255) -> np.ndarray:
    """The RGB panels laid out row by row on one sheet, ``gap`` px apart.

    Without ``columns``, the layout closest to 16:9 panels across to down, with few empty places.
    """
    if not panels:
        raise ConfigError("a contact sheet needs at least one panel")
    n = len(panels)
    if columns is None:
        def badness(c: int) -> float:
            r = math.ceil(n / c)
            return 2.0 * (r * c - n) / n + abs(math.log(c / r / (16 / 9)))

        columns = min(range(1, n + 1), key=badness)
    rows = math.ceil(n / columns)
    ph = max(p.shape[0] for p in panels)
    pw = max(p.shape[1] for p in panels)
    sheet = np.full((rows * ph + (rows + 1) * gap, columns * pw + (columns + 1) * gap, 3), background, np.uint8)
    for i, p in enumerate(panels):
        r, c = divmod(i, columns)
        y, x = gap + r * (ph + gap), gap + c * (pw + gap)
        sheet[y:y + p.shape[0], x:x + p.shape[1]] = p
    return sheet
