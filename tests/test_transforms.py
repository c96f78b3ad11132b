"""The augmentation library: identity, label safety, registration, folding, seeds, numpy vs torch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from unetcli import transforms as T
from unetcli.errors import ConfigError, LabelError
from unetcli.images import read_image

ZERO = T.AugmentConfig(sigma=0.0, max_angle=0.0, scale_range=(1.0, 1.0), max_shift=0.0, flip=False,
                       max_brightness=0.0, contrast_range=(1.0, 1.0), gamma_range=(1.0, 1.0),
                       max_noise=0.0)


def _checkerboard(h: int, w: int, square: int = 16) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy // square + xx // square) % 2).astype(np.uint8)


@pytest.fixture(scope="module")
def isbi():
    from conftest import SHARED_DATA

    folder = SHARED_DATA / "isbi2012" / "train"
    if not folder.is_dir():
        pytest.skip("real data not present")
    image = read_image(folder / "images" / "00.png")[0].astype(np.float32) / 255.0
    labels = np.array(read_image(folder / "labels" / "00.png")[0, :, :, 0])
    return image, labels


# ------------------------------------------------------------------------------------------ identity

@pytest.mark.parametrize("cfg", [T.AugmentConfig.none(), ZERO], ids=["switched-off", "zero-magnitude"])
def test_zero_magnitude_is_the_identity(isbi, cfg):
    image, labels = isbi
    weights = np.linspace(0, 3, labels.size, dtype=np.float32).reshape(labels.shape)
    rng = np.random.default_rng(1)
    out, lab, wts = T.augment_sample(rng, cfg, image, labels, weights)
    assert np.array_equal(out, image) and np.array_equal(lab, labels) and np.array_equal(wts, weights)
    # a training tile is then a plain crop, mirrored where it leaves the image
    tile, tlab, twts = T.augment_tile(rng, cfg, image, labels, weights, 572, 388, center=(10, 500))
    padded = np.pad(image, ((300, 300), (300, 300), (0, 0)), mode="reflect")
    assert np.array_equal(tile, padded[300 + 10 - 286:300 + 10 + 286, 300 + 500 - 286:300 + 500 + 286])
    plab = np.pad(labels, 300, mode="reflect")
    assert np.array_equal(tlab, plab[300 + 10 - 194:300 + 10 + 194, 300 + 500 - 194:300 + 500 + 194])
    # and the torch path too
    ti, tt, tw = T.augment_batch_torch(torch.from_numpy(image).permute(2, 0, 1)[None],
                                       torch.from_numpy(labels)[None], torch.from_numpy(weights)[None],
                                       cfg, torch.Generator().manual_seed(0), 512)
    assert torch.allclose(ti[0, 0], torch.from_numpy(image[..., 0]), atol=1e-5)
    assert torch.equal(tt[0], torch.from_numpy(labels)) and tt.dtype == torch.uint8
    assert torch.allclose(tw[0], torch.from_numpy(weights), atol=1e-5)


def test_mirroring_is_whole_sample_like_numpy_reflect():
    n = 7
    idx = np.arange(-30, 40)
    expected = np.pad(np.arange(n), 40, mode="reflect")[idx + 40]
    assert np.array_equal(T.mirror_index(idx, n), expected)
    assert np.array_equal(T.mirror_index(idx, 1), np.zeros_like(idx))


# --------------------------------------------------------------------------------------- labels stay

def test_label_values_stay_within_the_original_set(nuclei_dir):
    image = read_image(sorted((nuclei_dir / "images").glob("*.png"))[0])[0].astype(np.float32) / 255.0
    labels = read_image(sorted((nuclei_dir / "labels").glob("*.png"))[0])[0, :, :, 0]
    weights = (1.0 + (labels > 0)).astype(np.float32)
    original = set(np.unique(labels).tolist())
    assert len(original) > 10 and labels.dtype == np.uint16
    rng = np.random.default_rng(7)
    cfg = T.AugmentConfig(sigma=25.0)  # stronger than the default: more interpolation between values
    for _ in range(4):
        out, lab, wts = T.augment_sample(rng, cfg, image, labels, weights)
        assert lab.dtype == labels.dtype
        assert set(np.unique(lab).tolist()) <= original
        assert wts.min() >= 1.0 - 1e-6 and wts.max() <= 2.0 + 1e-6   # linear: within the weights' range
        assert out.shape == image.shape
    tile, tlab, _ = T.augment_tile(rng, cfg, image, labels, None, 188, 4)
    assert set(np.unique(tlab).tolist()) <= original


# ------------------------------------------------------------------------------------- registration

@pytest.mark.parametrize("order", [1, 3])
def test_image_labels_and_weights_stay_in_register(order):
    """A checkerboard deformed together with itself as labels and as weights stays in register."""
    board = _checkerboard(200, 240, 24)
    image = board[..., None].astype(np.float32)
    cfg = dataclasses.replace(T.AugmentConfig(sigma=15.0), order=order, brightness=False,
                              contrast=False, gamma=False, noise=False)
    rng = np.random.default_rng(3)
    for _ in range(3):
        out, lab, wts = T.augment_sample(rng, cfg, image, board, board.astype(np.float32))
        # pixels more than two pixels from a square's edge in the labels must agree exactly
        inner = ~_near_edge(lab)
        assert np.array_equal(out[..., 0][inner] > 0.5, lab[inner] == 1)
        assert np.array_equal(wts[inner] > 0.5, lab[inner] == 1)
        assert inner.mean() > 0.5
        # and the check can tell: labels from another draw are out of register
        _, other, _ = T.augment_sample(rng, cfg, image, board)
        assert np.mean((out[..., 0] > 0.5) != (other == 1)) > 0.25


def _near_edge(labels: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    edges = T.label_contours(labels)
    edges[:, 1:] |= edges[:, :-1]
    edges[1:, :] |= edges[:-1, :]
    return ndimage.binary_dilation(edges)


def test_tile_labels_are_the_centred_crop_of_the_deformed_tile():
    board = _checkerboard(300, 300, 12)
    image = board[..., None].astype(np.float32)
    cfg = dataclasses.replace(T.AugmentConfig(), order=1, brightness=False, contrast=False, gamma=False,
                              noise=False)
    rng = np.random.default_rng(5)
    for _ in range(3):
        tile, lab, wts = T.augment_tile(rng, cfg, image, board, board.astype(np.float32), 188, 36)
        k = (188 - lab.shape[0]) // 2
        inner = ~_near_edge(lab)
        assert np.array_equal(tile[k:k + lab.shape[0], k:k + lab.shape[1], 0][inner] > 0.5, lab[inner] == 1)
        assert np.array_equal(wts[inner] > 0.5, lab[inner] == 1)


def test_random_tile_keeps_the_output_crop_inside_the_image():
    image = np.arange(100 * 80, dtype=np.float32).reshape(100, 80, 1)
    rng = np.random.default_rng(0)
    for _ in range(50):
        tile, lab, _ = T.augment_tile(rng, T.AugmentConfig.none(), image, np.arange(8000).reshape(100, 80),
                                      None, 92, 40)
        top, left = divmod(int(lab[0, 0]), 80)
        assert 0 <= top <= 60 and 0 <= left <= 40
        assert np.array_equal(lab, np.arange(8000).reshape(100, 80)[top:top + 40, left:left + 40])
        assert tile[26, 26, 0] == lab[0, 0]


# ------------------------------------------------------------------------------- geometry conventions

def test_rotation_flip_shift_and_scale_conventions():
    image = np.zeros((41, 41, 1), np.float32)
    image[20, 30] = 1.0  # a dot right of the centre
    def where(params):
        out, _, _ = T.apply_params(None, params, image, order=1)
        return tuple(int(v) for v in np.unravel_index(np.argmax(out[..., 0]), (41, 41)))

    assert where(T.AugmentParams(angle=90.0)) == (10, 20)       # counter-clockwise on screen: up
    assert where(T.AugmentParams(dihedral=1)) == (10, 20)       # a quarter turn, the same way
    assert where(T.AugmentParams(dihedral=4)) == (20, 10)       # mirrored left-right
    assert where(T.AugmentParams(shift=(0.0, 5.0))) == (20, 25)  # the window moves right
    assert where(T.AugmentParams(scale=2.0)) == (20, 40)        # zoom in: away from the centre
    # the 8 flips and turns are 8 different exact permutations
    board = np.arange(36, dtype=np.float32).reshape(6, 6, 1)
    results = {T.apply_params(None, T.AugmentParams(dihedral=k), board)[0].tobytes() for k in range(8)}
    assert len(results) == 8


def test_cubic_interpolation_passes_through_the_pixels_and_matches_grid_sample():
    rng = np.random.default_rng(2)
    image = rng.random((30, 40), dtype=np.float32)
    ys, xs = np.meshgrid(np.arange(30, dtype=np.float32), np.arange(40, dtype=np.float32), indexing="ij")
    assert np.array_equal(T.sample_cubic(image, ys, xs), image)
    ys = (rng.random((50, 60)) * 50 - 10).astype(np.float32)   # beyond the edges too: mirrored
    xs = (rng.random((50, 60)) * 60 - 10).astype(np.float32)
    grid = torch.stack([torch.from_numpy(2 * xs / 39 - 1), torch.from_numpy(2 * ys / 29 - 1)], -1)[None]
    for mode, ours in (("bicubic", T.sample_cubic), ("bilinear", T.sample_linear)):
        ref = torch.nn.functional.grid_sample(torch.from_numpy(image)[None, None], grid, mode=mode,
                                              padding_mode="reflection", align_corners=True)[0, 0]
        assert np.abs(ours(image, ys, xs) - ref.numpy()).max() < 1e-4, mode
    const = np.full((30, 40), 0.25, np.float32)
    assert np.allclose(T.sample_cubic(const, ys, xs), 0.25, atol=1e-6)
    # any layout and pixel type of the source gives the same result
    ints = (image * 255).astype(np.uint8)
    colour = np.stack([ints, 255 - ints, ints // 2], axis=-1)
    for sample in (T.sample_cubic, T.sample_linear, T.sample_nearest):
        ref = sample(colour, ys, xs)
        assert np.array_equal(sample(np.asfortranarray(colour), ys, xs), ref)
        assert np.array_equal(sample(colour[..., 1], ys, xs), ref[..., 1])


# -------------------------------------------------------------------------------------- gray values

def test_gray_value_steps():
    rng = np.random.default_rng(0)
    image = rng.random((64, 64, 1), dtype=np.float32) * 200 + 20
    vr = (0.0, 255.0)
    out = T.gray_values(image, T.AugmentParams(brightness=0.1), None, vr)
    assert np.allclose(out - image, 25.5, atol=1e-3)
    out = T.gray_values(image, T.AugmentParams(contrast=1.2), None, vr)
    assert abs(out.mean() - image.mean()) < 1e-2 and abs(out.std() / image.std() - 1.2) < 1e-4
    ramp = np.linspace(0, 255, 256, dtype=np.float32).reshape(16, 16, 1)
    out = T.gray_values(ramp, T.AugmentParams(gamma=2.0), None, vr)
    assert out.min() == 0 and abs(out.max() - 255) < 1e-3
    assert np.allclose(out, 255 * (ramp / 255) ** 2, atol=1e-3)
    out = T.gray_values(image, T.AugmentParams(noise=0.02), rng, vr)
    assert abs((out - image).std() - 0.02 * 255) < 0.2
    assert T.gray_values(image, T.AugmentParams(), None, vr) is not image


# ----------------------------------------------------------------------------------------- folding

def test_default_deformation_does_not_fold():
    cfg = T.AugmentConfig()
    rng = np.random.default_rng(11)
    worst = np.inf
    for _ in range(300):
        params = T.sample_params(rng, cfg)
        for shape in ((572, 572), (512, 512)):   # a training tile and a whole ISBI slice
            worst = min(worst, float(T.jacobian_determinant(params.displacements, shape).min()))
    assert worst > 0.3, worst
    # the check can fail: ten times the paper's strength on a small image folds
    folds = [T.jacobian_determinant(T.sample_params(rng, T.AugmentConfig(sigma=100.0)).displacements,
                                    (128, 128)).min() for _ in range(20)]
    assert min(folds) < 0


def test_jacobian_matches_finite_differences_of_the_field():
    d = np.random.default_rng(4).normal(0, 10, (2, 3, 3))
    dy, dx = T.elastic_field(d, (100, 120))
    gyy, gyx = np.gradient(dy)
    gxy, gxx = np.gradient(dx)
    numeric = (1 + gyy) * (1 + gxx) - gyx * gxy
    assert np.abs(T.jacobian_determinant(d, (100, 120)) - numeric)[2:-2, 2:-2].max() < 1e-3
    # the field passes through the grid's vectors at the grid points, corners included
    assert np.allclose(dy[[0, 0, 99, 99], [0, 119, 0, 119]], d[0][[0, 0, 2, 2], [0, 2, 0, 2]])


# --------------------------------------------------------------------------------------------- seeds

def test_fixed_seed_gives_identical_results(isbi):
    image, labels = isbi
    runs = [T.augment_tile(np.random.default_rng(42), T.AugmentConfig(), image, labels, None, 252, 68)
            for _ in range(2)]
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])
    other = T.augment_tile(np.random.default_rng(43), T.AugmentConfig(), image, labels, None, 252, 68)
    assert not np.array_equal(runs[0][0], other[0])
    batch = torch.from_numpy(image[:252, :252]).permute(2, 0, 1)[None].repeat(2, 1, 1, 1)
    a = T.augment_batch_torch(batch, None, None, T.AugmentConfig(), torch.Generator().manual_seed(9), 68)
    b = T.augment_batch_torch(batch, None, None, T.AugmentConfig(), torch.Generator().manual_seed(9), 68)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0][0], a[0][1])


# ----------------------------------------------------------------------------------- numpy vs torch

@pytest.mark.parametrize("order", [3, 1])
def test_numpy_and_torch_paths_agree_for_the_same_parameters(isbi, order):
    image, labels = isbi
    size, out = 252, 68
    cfg = dataclasses.replace(T.AugmentConfig(sigma=12.0), order=order, noise=False)
    rng = np.random.default_rng(8)
    params = [T.sample_params(rng, cfg) for _ in range(4)]
    tiles = np.stack([image[i * 80:i * 80 + size, 100:100 + size] for i in range(4)])
    labs = np.stack([labels[i * 80:i * 80 + size, 100:100 + size] for i in range(4)])
    wts = labs.astype(np.float32) / 255 + 0.5
    ti, tl, tw = T.apply_params_torch(params, torch.from_numpy(tiles).permute(0, 3, 1, 2),
                                      torch.from_numpy(labs), torch.from_numpy(wts), out_size=out,
                                      order=order, value_range=(0.0, 1.0))
    assert ti.shape == (4, 1, size, size) and tl.shape == (4, out, out) and tw.shape == (4, out, out)
    mismatched = 0
    for i, p in enumerate(params):
        ni, nl, nw = T.apply_params(None, p, tiles[i], labs[i], wts[i], label_crop=(size - out) // 2,
                                    order=order)
        assert np.abs(ni[..., 0] - ti[i, 0].numpy()).max() < 5e-4
        assert np.abs(nw - tw[i].numpy()).max() < 5e-4
        mismatched += int(np.sum(nl != tl[i].numpy()))
    assert mismatched <= 2   # nearest neighbour may differ only at exact rounding ties


def test_torch_parameter_draws_follow_the_config():
    g = torch.Generator().manual_seed(0)
    cfg = T.AugmentConfig(max_angle=30.0, scale_range=(0.8, 0.9), grid=4)
    draws = [T.sample_params(g, cfg) for _ in range(200)]
    assert all(-30 <= p.angle <= 30 and 0.8 <= p.scale <= 0.9 for p in draws)
    assert all(p.displacements.shape == (2, 4, 4) for p in draws)
    assert abs(np.std([p.displacements for p in draws]) - 10.0) < 0.5
    assert {p.dihedral for p in draws} == set(range(8))


def test_torch_batch_with_smaller_targets_than_tiles():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 92, 92, generator=g)
    targets = torch.randint(0, 5, (2, 60, 60), generator=g)
    ti, tt, tw = T.augment_batch_torch(images, targets, None, T.AugmentConfig(), g, 40)
    assert ti.shape == (2, 3, 92, 92) and tt.shape == (2, 40, 40) and tw is None
    assert set(tt.unique().tolist()) <= set(targets.unique().tolist())


# ---------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("changes, fragment", [
    ({"sigma": -1.0}, "sigma must be 0 or more"),
    ({"grid": 1}, "at least 2x2"),
    ({"scale_range": (1.1, 0.9)}, "scale range"),
    ({"gamma_range": (0.0, 1.0)}, "gamma range"),
    ({"order": 2}, "order"),
    ({"max_angle": float("nan")}, "rotation angle"),
])
def test_bad_configuration_is_refused(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        T.AugmentConfig(**changes)


def test_bad_shapes_are_refused():
    rng = np.random.default_rng(0)
    image = np.zeros((20, 30, 1), np.float32)
    with pytest.raises(LabelError, match="labels are 20x31, the image is 20x30"):
        T.augment_sample(rng, T.AugmentConfig(), image, np.zeros((20, 31), np.uint8))
    with pytest.raises(ConfigError, match="tile sizes"):
        T.augment_tile(rng, T.AugmentConfig(), image, None, None, 100, 41)


def test_config_round_trips_and_helpers():
    cfg = T.AugmentConfig(sigma=5.0, contrast_range=(0.9, 1.1))
    assert T.AugmentConfig.from_dict(cfg.to_dict()) == cfg
    assert not any(getattr(T.AugmentConfig.none(), n) for n in T.ORDER)
    only = T.AugmentConfig.only("elastic", sigma=3.0)
    assert only.elastic and only.sigma == 3.0 and not only.rotate
    with pytest.raises(ConfigError, match="unknown augmentation"):
        T.AugmentConfig.only("twist")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sigma = 1.0  # type: ignore[misc]
