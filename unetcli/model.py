"""The U-Net of Ronneberger, Fischer and Brox (2015), built from a frozen config, and its size rules.

With the defaults (depth 4, base width 64, valid padding) it is the network of the paper's Figure 1:
23 convolutional layers, about 31.0 million parameters for 1 input channel and 2 classes, and a
572x572 input tile gives a 388x388 output tile.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
import torch.nn.functional as F

from unetcli.errors import ConfigError, TileSizeError

PADDINGS = ("valid", "same")


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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown network settings: {', '.join(sorted(unknown))}")
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
    above = next((s for s in range(size + 1, size + 2 ** (config.depth + 1) + 1)
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


def conv_flops(config: UNetConfig, size: int) -> int:
    """Multiply-adds x 2 of every convolution in one forward pass on a ``size``-sided tile."""
    total = 0
    for kind, cin, cout, k, side in conv_layers(config, size):
        per_pixel = cin * cout * (1 if kind == "up" else k * k)  # a 2x2 stride-2 up-conv: 1 tap each
        total += 2 * per_pixel * side * side
    return total


# ------------------------------------------------------------------------------------------- network

class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by (batch norm and) ReLU: one level of the U."""

    def __init__(self, cin: int, cout: int, padding: int, batchnorm: bool):
        layers: list[nn.Module] = []
        for c in (cin, cout):
            layers.append(nn.Conv2d(c, cout, 3, padding=padding, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class Up(nn.Module):
    """2x2 up-convolution halving the channels, crop-and-concatenate the skip, two 3x3 convolutions."""

    def __init__(self, cin: int, cout: int, padding: int, batchnorm: bool):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)
        self.conv = DoubleConv(2 * cout, cout, padding, batchnorm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)                                   # (B, cout, 2h, 2w)
        dy = (skip.shape[-2] - x.shape[-2]) // 2
        dx = (skip.shape[-1] - x.shape[-1]) // 2
        skip = skip[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]  # centre crop to (2h, 2w)
        return self.conv(torch.cat([skip, x], dim=1))    # (B, 2*cout, 2h, 2w) -> (B, cout, ...)


class UNet(nn.Module):
    """The U-Net: a contracting path, a bottom, an expanding path and a 1x1 head."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        pad = 1 if config.padding == "same" else 0
        widths = [config.base * 2 ** i for i in range(config.depth + 1)]
        self.down = nn.ModuleList()
        cin = config.in_channels
        for w in widths[:-1]:
            self.down.append(DoubleConv(cin, w, pad, config.batchnorm))
            cin = w
        self.bottom = DoubleConv(widths[-2] if config.depth else cin, widths[-1], pad, config.batchnorm)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.up = nn.ModuleList(Up(widths[i + 1], widths[i], pad, config.batchnorm)
                                for i in reversed(range(config.depth)))
        self.head = nn.Conv2d(widths[0], config.num_classes, kernel_size=1)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, S, S) -> (B, num_classes, output_size(S), output_size(S)) logits."""
        skips = []
        for block in self.down:
            x = block(x)                    # (B, w, s-4, s-4) for valid padding
            skips.append(x)
            x = F.max_pool2d(x, 2)          # (B, w, (s-4)/2, (s-4)/2)
        x = self.dropout(self.bottom(x))    # end of the contracting path
        for block, skip in zip(self.up, reversed(skips)):
            x = block(x, skip)
        return self.head(x)

    def conv_modules(self) -> Iterator[nn.Module]:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                yield m


def he_init(net: nn.Module) -> None:
    """He et al. initialisation as in the paper: normal with std sqrt(2 / N), N the incoming nodes.

    For a k x k convolution N = k * k * in_channels; for the 2x2 stride-2 up-convolution every output
    pixel sees one kernel tap of each input channel, so N = in_channels. Biases start at zero.
    """
    for m in net.modules():
        if isinstance(m, nn.ConvTranspose2d):
            fan_in = m.in_channels
        elif isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        else:
            continue
        nn.init.normal_(m.weight, 0.0, (2.0 / fan_in) ** 0.5)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
