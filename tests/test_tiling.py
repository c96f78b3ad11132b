"""Tile plans without a network: mirroring, tile choice, memory, blending windows, row assembly."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from unetcli.errors import ConfigError, ImageShapeError, TileSizeError
from unetcli.netspec import UNetConfig, conv_flops, output_size, valid_input_sizes
from unetcli.tiling import (RowAssembler, axis_take, blend_window, choose_tile, gaussian_window, mirror_index,
                            parse_tile, plan_tiles, tile_memory)

VALID = UNetConfig(base=4, depth=2, dropout=0.0)           # margin 20, inputs 44, 48, 52, ...
SAME = UNetConfig(base=4, depth=2, dropout=0.0, padding="same")


def test_tiling_and_transforms_import_without_torch():
    code = "import sys, unetcli.tiling, unetcli.transforms; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------------------------------------ mirroring

@pytest.mark.parametrize("length", [2, 3, 5, 8])
def test_mirror_index_is_reflection_repeated(length):
    pad = 3 * length + 2                       # far wider than the axis: mirror again and again
    idx = mirror_index(np.arange(-pad, length + pad), length)
    ref = np.pad(np.arange(length), pad, mode="reflect")
    assert np.array_equal(idx, ref)


def test_mirror_index_one_pixel():
    assert np.array_equal(mirror_index(np.arange(-5, 6), 1), np.zeros(11))


def test_one_mirror_rule_for_prediction_and_augmentation():
    from unetcli import transforms

    assert transforms.mirror_index is mirror_index


def test_axis_take_slices_inside_and_mirrors_outside():
    assert axis_take(2, 3, 10) == slice(2, 5)
    assert axis_take(-2, 5, 10).tolist() == [2, 1, 0, 1, 2]
    assert axis_take(8, 4, 10).tolist() == [8, 9, 8, 7]


# ---------------------------------------------------------------------------------------------- plans

def test_valid_plan_tiles_never_overlap_and_cover_the_image():
    plan = plan_tiles(VALID, 75, 58, tile=44)
    for axis in (plan.y, plan.x):
        assert axis.starts[0] == 0 and axis.margin == 20
        assert all(b - a == axis.starts[1] - axis.starts[0] for a, b in zip(axis.starts, axis.starts[1:]))
        assert (axis.starts[1] - axis.starts[0]) % 4 == 0          # aligned to 2**depth
        assert axis.starts[-1] + axis.out >= axis.length
    assert plan.blend is None and plan.count == plan.y.count * plan.x.count


def test_same_plan_last_tile_ends_at_the_border():
    plan = plan_tiles(SAME, 90, 70, tile=32, overlap=0.25)
    assert plan.y.starts == (0, 24, 48, 58) and plan.x.starts[-1] == 70 - 32 and plan.blend == "gaussian"


def test_plan_refusals():
    with pytest.raises(TileSizeError):
        plan_tiles(VALID, 50, 50, tile=45)
    with pytest.raises(ImageShapeError):
        plan_tiles(VALID, 0, 50, tile=44)
    with pytest.raises(ConfigError, match="blending"):
        plan_tiles(SAME, 50, 50, tile=32, blend="max")
    with pytest.raises(ConfigError, match="overlap"):
        plan_tiles(SAME, 50, 50, tile=32, overlap=1.0)


def test_parse_tile():
    assert parse_tile(None) is None and parse_tile(572) == (572, 572)
    assert parse_tile("572x700") == (572, 700) and parse_tile("100") == (100, 100) and parse_tile((3, 4)) == (3, 4)
    for bad in ("big", "1x2x3", "0"):
        with pytest.raises(ConfigError, match="not a size"):
            parse_tile(bad)


# --------------------------------------------------------------------------- tile choice and memory

def test_choose_tile_minimises_operations_within_the_budget():
    config = UNetConfig(base=8, depth=3, dropout=0.0)
    budget = 40 * 2**20
    ty, tx = choose_tile(config, 700, 300, budget)
    assert tile_memory(config, ty, tx) <= budget
    plan = plan_tiles(config, 700, 300, tile=(ty, tx))
    best = plan.count * conv_flops(config, ty, tx)
    for t in valid_input_sizes(config, 1, 800):     # no square tile within the budget does better
        if output_size(config, t) >= 8 and tile_memory(config, t, t) <= budget:
            other = plan_tiles(config, 700, 300, tile=t)
            assert other.count * conv_flops(config, t, t) >= best * 0.995


def test_bigger_budget_bigger_tile_and_too_small_budget():
    config = UNetConfig(base=16, depth=4, dropout=0.0)
    small = choose_tile(config, 4000, 4000, 100 * 2**20)
    large = choose_tile(config, 4000, 4000, 1000 * 2**20)
    assert large[0] * large[1] > small[0] * small[1]
    with pytest.raises(ConfigError, match="memory budget"):
        choose_tile(config, 4000, 4000, 2**20)


def test_rectangular_flops_match_the_square_count():
    config = UNetConfig()
    assert conv_flops(config, 572, 572) == conv_flops(config, 572)
    assert conv_flops(config, 572, 700) == conv_flops(config, 700, 572)


def test_tile_memory_grows_with_the_tile_not_the_image():
    config = UNetConfig(base=16)
    assert tile_memory(config, 1084, 1084) > 3 * tile_memory(config, 572, 572)
    a = plan_tiles(config, 2000, 2000, budget=200 * 2**20).tile
    b = plan_tiles(config, 16000, 16000, budget=200 * 2**20).tile
    assert tile_memory(config, *a) <= 200 * 2**20 and tile_memory(config, *b) <= 200 * 2**20


# ------------------------------------------------------------------------------------ blending & rows

def test_gaussian_window():
    g = gaussian_window(64)
    assert g.max() <= 1.0 and np.isclose(g[31], g[32]) and g[0] < 0.01
    w = blend_window(plan_tiles(SAME, 100, 100, tile=64))
    assert w.min() >= 1e-3 and np.isclose(w.max(), g.max() ** 2)


def test_valid_rows_come_out_in_order_and_complete():
    plan = plan_tiles(VALID, 30, 11, tile=44)          # output 4: many tile rows, stride 4
    rows = RowAssembler(plan, 2, None)
    got = np.zeros((2, 30, 11), np.float32)
    seen = 0
    for ky, y0 in enumerate(plan.y.starts):
        for kx, x0 in enumerate(plan.x.starts):
            yy, xx = np.mgrid[y0:y0 + plan.y.out, x0:x0 + plan.x.out]
            probs = np.stack([yy, xx]).astype(np.float32)             # each pixel knows where it is
            for b0, block in rows.add(ky, kx, probs):
                assert b0 == seen
                got[:, b0:b0 + block.shape[1]] = block
                seen += block.shape[1]
    assert seen == 30
    yy, xx = np.mgrid[0:30, 0:11]
    assert np.array_equal(got, np.stack([yy, xx]))


def test_fit_tile_rounds_for_same_padding_and_leaves_valid_tiles_to_the_exact_check():
    from unetcli.tiling import fit_tile

    same = UNetConfig(base=4, depth=4, padding="same")
    assert fit_tile(same, (572, 572)) == ((576, 576), "tile 572x572 rounded to 576x576: this same-padding "
                                          "network takes multiples of 16")
    assert fit_tile(same, (512, 3))[0] == (512, 16)
    assert fit_tile(same, (512, 512)) == ((512, 512), None)
    valid = UNetConfig(base=4, depth=4)
    assert fit_tile(valid, (570, 570)) == ((570, 570), None)


def test_choose_tile_needs_bounded_memory_on_huge_images():
    """The search over (height, width) pairs runs a band at a time: a same-padding network has a
    candidate side every 2**depth pixels, and the whole table for 6000 x 6000 would take ~200 MiB."""
    import tracemalloc

    cfg = UNetConfig(base=4, depth=2, padding="same")
    tracemalloc.start()
    try:
        ty, tx = choose_tile(cfg, 6000, 6000, 2 << 30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 << 20, peak
    assert ty % 4 == 0 and tx % 4 == 0 and ty <= 6000 and tx <= 6000
