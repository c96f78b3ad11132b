"""The U-Net of Ronneberger, Fischer and Brox (2015), built from a frozen config, and its size rules.

The config and the size rules (output sizes, margin, layers, FLOPs, activation memory) are computed in
:mod:`unetcli.netspec`, without torch, and imported here; this module adds the network itself and its
lean forward pass for prediction.

With the defaults (depth 4, base width 64, valid padding) it is the network of the paper's Figure 1:
23 convolutional layers, about 31.0 million parameters for 1 input channel and 2 classes, and a
572x572 input tile gives a 388x388 output tile.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
import torch.nn.functional as F

# The specification and its size rules live in netspec (no torch); they are part of this module's API.
from unetcli.netspec import (PADDINGS, UNetConfig, activation_elements, check_tile, conv_flops,  # noqa: F401
                             conv_layers, margin, nearest_valid, output_size, pixel_flops, smallest_input,
                             valid_input_sizes)


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

    def forward_lean(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(x)`` computed the same way but holding fewer activations at once (for prediction).

        Each layer's input is released as soon as its output exists, and every skip connection is
        released right after its concatenation; ``netspec.activation_elements`` counts this order's
        peak (change them together).
        """
        skips = []
        for block in self.down:
            x = _run_seq(block, x)
            skips.append(x)
            x = _pool2(x)
        x = self.dropout(_run_seq(self.bottom, x))
        for block in self.up:
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
        return self.head(x)

    def conv_modules(self) -> Iterator[nn.Module]:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                yield m


def unwrap(net: nn.Module) -> nn.Module:
    """The UNet inside DataParallel, DistributedDataParallel or torch.compile; else ``net`` itself."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(net, attr, None)
        if isinstance(inner, UNet):
            return inner
    return net


def lean_forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``net(x)``; for a UNet (wrapped or not) through :meth:`UNet.forward_lean`, other modules called."""
    core = unwrap(net)
    return core.forward_lean(x) if isinstance(core, UNet) else net(x)


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
