"""An augmentation's parameters: the configuration (:class:`AugmentConfig`) and one random draw from it.

:class:`AugmentParams` describes one augmentation completely; :func:`sample_params` draws it from a
numpy or a torch generator, in the order of :data:`ORDER`, skipping switched-off steps. What the
parameters mean, and the order they are applied in, is written in :mod:`unetcli.transforms`. No torch
is imported here unless a torch generator is passed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from unetcli.errors import ConfigError
from unetcli.netspec import refuse_unknown

if TYPE_CHECKING:  # torch is imported only where a torch generator is used
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


def check_range(value_range: tuple[float, float]) -> tuple[float, float]:
    """``value_range`` as (low, high) floats, refused unless finite with low < high."""
    lo, hi = float(value_range[0]), float(value_range[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise ConfigError(f"value range must have low < high, not {lo:g},{hi:g}")
    return lo, hi
