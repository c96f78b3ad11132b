"""The U-Net's specification and what follows from it without torch: sizes, margin, layers, FLOPs, memory.

:class:`UNetConfig` is the frozen record every model file carries; the functions here answer, from it
alone, which input sides the network takes, what output they give, how much context a tile consumes,
which convolutions one forward pass runs, how many FLOPs they cost and how many activations are alive
at the peak. They need numpy only, so tile plans (:mod:`unetcli.tiling`) and augmentation
(:mod:`unetcli.transforms`) use them without importing torch; :mod:`unetcli.model` builds the network
and re-exports them, its public home.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from unetcli.errors import ConfigError, TileSizeError

PADDINGS = ("valid", "same")


def refuse_unknown(data: Iterable[str], known: Iterable[str], what: str) -> None:
    """The strict reading of a settings record: any key outside ``known`` is a ConfigError naming them all.

    Shared by the configs read back from files and options (network, augmentation, training run), so
    that a typo or a setting from a newer version is never dropped silently.
    """
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"unknown {what}: {', '.join(sorted(unknown))}")


@dataclass(frozen=True)
class UNetConfig:
    """Everything that defines the network; saved in every model file."""

    in_channels: int = 1
    num_classes: int = 2
    depth: int = 4          # number of 2x2 max-poolings (the paper: 4)
    base: int = 64          # channels of the first level, doubled at every level down
    padding: str = "valid"  # 'valid' (the paper's unpadded convolutions) or 'same'
    batchnorm: bool = False
    dropout: float = 0.5    # at the end of the contracting path; 0 switches it off

    def __post_init__(self) -> None:
        if self.padding not in PADDINGS:
            raise ConfigError(f"padding must be one of {', '.join(PADDINGS)}, not {self.padding!r}")
        for field in ("in_channels", "num_classes", "base"):
            if int(getattr(self, field)) < 1:
                raise ConfigError(f"{field} must be at least 1, not {getattr(self, field)}")
        if self.num_classes < 2:
            raise ConfigError("a U-Net needs at least 2 classes (softmax over classes)")
        if not 1 <= self.depth <= 8:
            raise ConfigError(f"depth must be between 1 and 8, not {self.depth}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), not {self.dropout}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "UNetConfig":
        refuse_unknown(data, (f.name for f in dataclasses.fields(cls)), "network settings")
        return cls(**data)


# ---------------------------------------------------------------------------------------- size rules

def output_size(config: UNetConfig, size: int) -> int | None:
    """Side length of the output for an input side ``size``, or None if the network cannot take it."""
    if size < 1:
        return None
    if config.padding == "same":
        return size if size % (2 ** config.depth) == 0 else None
    s = size
    for _ in range(config.depth):
        s -= 4                      # two unpadded 3x3 convolutions
        if s < 2 or s % 2:          # the 2x2 pooling needs an even size
            return None
        s //= 2
    s -= 4                          # bottom of the U
    if s < 1:
        return None
    for _ in range(config.depth):
        s = 2 * s - 4               # 2x2 up-convolution, then two 3x3 convolutions
        if s < 1:
            return None
    return s


def margin(config: UNetConfig) -> int:
    """Context each side of an output tile that a valid-padding network consumes (92 for the paper's)."""
    if config.padding == "same":
        return 0
    size = smallest_input(config)
    return (size - output_size(config, size)) // 2


def smallest_input(config: UNetConfig) -> int:
    """The smallest input side the network takes."""
    s = 1
    while output_size(config, s) is None:
        s += 1
    return s


def valid_input_sizes(config: UNetConfig, lo: int = 1, hi: int = 4096) -> list[int]:
    """Every input side between ``lo`` and ``hi`` that the network takes."""
    return [s for s in range(max(lo, 1), hi + 1) if output_size(config, s) is not None]


def nearest_valid(config: UNetConfig, size: int) -> tuple[int | None, int | None]:
    """The largest valid input side below ``size`` and the smallest above it."""
    below = next((s for s in range(size - 1, 0, -1) if output_size(config, s) is not None), None)
    start = max(size + 1, smallest_input(config))
    above = next((s for s in range(start, start + 2 ** (config.depth + 1) + 1)
                  if output_size(config, s) is not None), None)
    return below, above


def check_tile(config: UNetConfig, tile: int) -> int:
    """Return the output side of input tile ``tile``, or raise TileSizeError naming the nearest sizes."""
    out = output_size(config, tile)
    if out is None:
        below, above = nearest_valid(config, tile)
        near = " or ".join(str(s) for s in (below, above) if s is not None)
        first = smallest_input(config)
        step = 2 ** config.depth
        rule = (f"multiples of {step}" if config.padding == "same"
                else f"{first}, {first + step}, {first + 2 * step}, ... in steps of {step}")
        raise TileSizeError(f"tile size {tile} does not fit this network (input sides are {rule})",
                            hint=f"use {near}")
    return out


def conv_layers(config: UNetConfig, size: int) -> list[tuple[str, int, int, int, int]]:
    """Every convolution of one forward pass on a ``size`` x ``size`` input.

    Entries are ``(kind, in_channels, out_channels, kernel, output_side)`` with kind 'conv', 'up' or
    'head'; the benchmarks count FLOPs from them (2 * k * k * cin * cout per output pixel).
    """
    if output_size(config, size) is None:
        check_tile(config, size)
    pad = config.padding == "same"
    shrink = 0 if pad else 2
    layers, s, c_in, widths = [], size, config.in_channels, []
    for level in range(config.depth + 1):
        width = config.base * 2 ** level
        for _ in range(2):
            s -= shrink
            layers.append(("conv", c_in, width, 3, s))
            c_in = width
        widths.append(width)
        if level < config.depth:
            s //= 2
    for level in range(config.depth - 1, -1, -1):
        width = widths[level]
        s *= 2
        layers.append(("up", c_in, width, 2, s))
        c_in = 2 * width
        for _ in range(2):
            s -= shrink
            layers.append(("conv", c_in, width, 3, s))
            c_in = width
    layers.append(("head", c_in, config.num_classes, 1, s))
    return layers


def pixel_flops(kind: str, cin: int, cout: int, k: int) -> int:
    """FLOPs (2 x multiply-adds) per output pixel of one layer of :func:`conv_layers`.

    A k x k convolution sees k * k taps of every input channel; the 2x2 stride-2 up-convolution one tap.
    """
    return 2 * cin * cout * (1 if kind == "up" else k * k)


def conv_flops(config: UNetConfig, ty: int, tx: int | None = None) -> int:
    """FLOPs (2 x multiply-adds) of every convolution in one forward pass on a ``ty`` x ``tx`` tile
    (square when ``tx`` is left out)."""
    tx = ty if tx is None else tx
    total = 0
    for (kind, cin, cout, k, sy), (*_, sx) in zip(conv_layers(config, ty), conv_layers(config, tx)):
        total += pixel_flops(kind, cin, cout, k) * sy * sx
    return total


def activation_elements(config: UNetConfig, sy, sx):
    """Peak number of live activation elements of one ``model.lean_forward`` pass, per tile.

    ``sy`` and ``sx`` are numpy arrays of input sides; the result broadcasts over them. The simulation
    follows the order of ``model.UNet.forward_lean`` (change them together): a layer's input and output
    are alive together, skips stay alive until their level of the expanding path has concatenated them.
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
