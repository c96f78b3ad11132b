"""The network of the paper: layer count, parameters, sizes, initialisation, options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unetcli.errors import ConfigError, TileSizeError
from unetcli.model import (UNet, UNetConfig, check_tile, conv_flops, conv_layers, count_parameters,
                           margin, nearest_valid, output_size, valid_input_sizes)

PAPER = UNetConfig()


def test_paper_network_has_23_convolutions_and_31_million_parameters():
    net = UNet(PAPER)
    assert sum(1 for _ in net.conv_modules()) == 23
    assert len(conv_layers(PAPER, 572)) == 23
    assert count_parameters(net) == pytest.approx(31.03e6, rel=2e-3)


def test_paper_tile_572_gives_388():
    assert output_size(PAPER, 572) == 388
    assert margin(PAPER) == 92
    net = UNet(UNetConfig(base=2)).eval()  # same size rules, cheap to run
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 572, 572)).shape == (1, 2, 388, 388)


def test_valid_sizes_are_16k_plus_60():
    sizes = valid_input_sizes(PAPER, 1, 700)
    assert sizes[0] == 188 and sizes[-1] == 700 - (700 - 60) % 16
    assert all((s - 60) % 16 == 0 for s in sizes)
    assert all(output_size(PAPER, s) == s - 184 for s in sizes)


@pytest.mark.parametrize("cfg", [UNetConfig(depth=2, base=4), UNetConfig(depth=3, base=4, padding="same"),
                                 UNetConfig(depth=1, base=4, in_channels=3, num_classes=5, batchnorm=True)])
def test_output_size_matches_the_network(cfg):
    net = UNet(cfg).eval()
    for size in valid_input_sizes(cfg, 1, 120)[:3]:
        with torch.no_grad():
            out = net(torch.zeros(1, cfg.in_channels, size, size))
        assert out.shape == (1, cfg.num_classes, output_size(cfg, size), output_size(cfg, size))


def test_invalid_tile_is_refused_with_the_nearest_valid_sizes():
    with pytest.raises(TileSizeError) as info:
        check_tile(PAPER, 570)
    assert "570" in str(info.value) and "556" in info.value.hint and "572" in info.value.hint
    assert nearest_valid(PAPER, 570) == (556, 572)
    with pytest.raises(TileSizeError, match="multiples of 8"):
        check_tile(UNetConfig(depth=3, padding="same"), 100)
    assert check_tile(PAPER, 572) == 388
    # below the smallest input the hint names the smallest, not nothing
    assert nearest_valid(PAPER, 32) == (None, 188)
    with pytest.raises(TileSizeError) as info:
        check_tile(PAPER, 32)
    assert info.value.hint == "use 188"


def test_he_initialisation_has_the_stated_standard_deviation():
    torch.manual_seed(0)
    net = UNet(PAPER)
    for m in net.conv_modules():
        w = m.weight.detach()
        if isinstance(m, torch.nn.ConvTranspose2d):
            n = m.in_channels
        else:
            n = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        if w.numel() < 10_000:
            continue  # too few samples for a tight estimate (the head)
        assert w.std().item() == pytest.approx(np.sqrt(2.0 / n), rel=0.03)
        assert abs(w.mean().item()) < 0.05 * np.sqrt(2.0 / n) * 10
        assert torch.count_nonzero(m.bias) == 0
    first = net.down[0][0].weight
    assert first.std().item() == pytest.approx(np.sqrt(2.0 / 9), rel=0.2)  # N = 9 x 1 input channel


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    net = UNet(UNetConfig(depth=2, base=4, dropout=0.5))
    x = torch.randn(1, 1, 44, 44)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
    net.train()
    with torch.no_grad():
        assert not torch.equal(net(x), net(x))


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError):
        UNetConfig(padding="reflect")
    with pytest.raises(ConfigError):
        UNetConfig(num_classes=1)
    with pytest.raises(ConfigError):
        UNetConfig.from_dict({"depth": 4, "kernel": 5})


def test_flop_count_of_the_paper_network():
    # 572 -> 388: about 301 GFLOPs per tile (multiply and add counted separately).
    assert conv_flops(PAPER, 572) == pytest.approx(300.9e9, rel=1e-3)


def test_flop_count_matches_a_hand_count_of_a_tiny_network():
    tiny = UNetConfig(in_channels=1, num_classes=2, depth=1, base=2, dropout=0.0)
    assert output_size(tiny, 20) == 4
    # 2 x multiply-adds per output pixel x output pixels, layer by layer for a 20x20 input:
    hand = (2 * 1 * 2 * 9 * 18 * 18      # conv 1->2, 3x3, 18x18 out
            + 2 * 2 * 2 * 9 * 16 * 16    # conv 2->2, 16x16; pool to 8x8
            + 2 * 2 * 4 * 9 * 6 * 6      # bottom conv 2->4, 6x6
            + 2 * 4 * 4 * 9 * 4 * 4      # bottom conv 4->4, 4x4
            + 2 * 4 * 2 * 1 * 8 * 8      # 2x2 stride-2 up-convolution 4->2: one tap per input, 8x8 out
            + 2 * 4 * 2 * 9 * 6 * 6      # conv on the concatenation 4->2, 6x6
            + 2 * 2 * 2 * 9 * 4 * 4      # conv 2->2, 4x4
            + 2 * 2 * 2 * 1 * 4 * 4)     # 1x1 head 2->2
    assert conv_flops(tiny, 20) == hand
    # rectangles: every layer's pixels are rows x columns
    assert conv_flops(tiny, 20, 24) == conv_flops(tiny, 24, 20)
    assert conv_flops(tiny, 20, 20) == hand


def test_lean_forward_equals_forward():
    from unetcli.model import lean_forward

    config = UNetConfig(base=4, depth=2, dropout=0.0)
    torch.manual_seed(0)
    net = UNet(config).eval()
    x = torch.randn(2, 1, 60, 60)
    with torch.no_grad():
        ref = net(x)
        assert torch.allclose(lean_forward(net, x), ref, atol=1e-5)
        net.to(memory_format=torch.channels_last)        # the CPU's strided pooling path
        xl = x.contiguous(memory_format=torch.channels_last)
        assert torch.allclose(lean_forward(net, xl), ref, atol=1e-5)
        assert torch.allclose(lean_forward(torch.nn.DataParallel(net), x), ref, atol=1e-5)
