"""Real microscopy in: bit depths, channels, the model's own normalisation and post-processing, and
instances of touching objects (issue 14)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unetcli import checkpoint, inference, instances, labels, normalize
from unetcli.images import read_image, write_image
from unetcli.metrics import object_scores
from unetcli.model import UNet, UNetConfig

from conftest import assert_one_line_error


def _picture(h: int = 96, w: int = 112, seed: int = 0) -> np.ndarray:
    """A grey uint8 picture of bright blobs on a dim, noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = 20 + rng.normal(0, 4, (h, w))
    for _ in range(7):
        cy, cx, r = rng.uniform(10, h - 10), rng.uniform(10, w - 10), rng.uniform(5, 11)
        img += 150 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return np.clip(img, 0, 255).astype(np.uint8)


def _model(path, channels: int, *, norm: dict | None = None, postprocess: dict | None = None,
           inputs: dict | None = None, classes: int = 2):
    torch.manual_seed(3)
    cfg = UNetConfig(in_channels=channels, num_classes=classes, depth=2, base=4, padding="same", dropout=0.0)
    norm = norm or dict(normalize.DEFAULT)
    checkpoint.save_model(path, UNet(cfg).state_dict(), cfg, normalization=norm, postprocess=postprocess,
                          inputs=inputs)
    return checkpoint.load_model(path)


def _mask(model, image: np.ndarray) -> np.ndarray:
    return inference.predict_image(model, image, device="cpu").argmax(0)


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


# ------------------------------------------------------------------------------------ bit depths

@pytest.mark.parametrize("channels", [1, 3])
def test_the_same_picture_in_any_bit_depth_gives_the_same_mask(tmp_path, channels):
    grey = _picture()[..., None]
    rgb = np.concatenate([grey, (grey * 0.7).astype(np.uint8), (grey // 2)], axis=-1)
    pic = grey if channels == 1 else rgb
    model = _model(tmp_path / "m.unet", channels)
    base = _mask(model, pic)
    as16 = _mask(model, pic.astype(np.uint16) * 257)
    asfloat = _mask(model, pic.astype(np.float32) / 255.0)
    assert 0.02 < base.mean() < 0.98                       # the random network does separate something
    assert _agreement(base, as16) >= 0.999
    assert _agreement(base, asfloat) >= 0.999


def test_a_model_with_dataset_statistics_still_predicts_and_absorbs_other_types(tmp_path):
    pic = _picture()[..., None]
    old = {"mean": [float(pic.mean())], "std": [float(pic.std())]}
    model = _model(tmp_path / "old.unet", 1, norm=old, inputs={"dtype": "uint8"})
    assert normalize.kind(model.normalization) == "dataset"
    base = _mask(model, pic)
    assert 0.02 < base.mean() < 0.98
    assert _agreement(base, _mask(model, pic.astype(np.uint16) * 257)) >= 0.999
    assert _agreement(base, _mask(model, pic.astype(np.float32) / 255)) >= 0.999


def test_a_dataset_model_rescales_each_image_from_its_own_statistics(tmp_path):
    """One predictor over a uint16 file then a uint8 one (a folder run): the second image is normalised
    with the model's own statistics, not those rescaled for the first."""
    pic = _picture()[..., None]
    model = _model(tmp_path / "old.unet", 1, norm={"mean": [float(pic.mean())], "std": [float(pic.std())]},
                   inputs={"dtype": "uint8"})
    pred = inference.load_predictor(model, device="cpu")
    alone = pred.predict(pic)
    pred.predict(pic.astype(np.uint16) * 257)
    np.testing.assert_array_equal(pred.predict(pic), alone)


def test_a_dataset_model_warns_about_a_range_it_cannot_absorb(tmp_path, unet):
    pic = _picture()[..., None]
    _model(tmp_path / "old.unet", 1, norm={"mean": [float(pic.mean())], "std": [float(pic.std())]},
           inputs={"dtype": "uint8"})
    twelve_bit = (pic.astype(np.uint16) * 16)                   # 12-bit data in a 16-bit file
    write_image(tmp_path / "dim.tif", twelve_bit, "YXC")
    r = unet("predict", "dim.tif", "-o", "mask.tif", "-m", "old.unet", cwd=tmp_path)
    assert r.code == 0, r
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("unet: warning:")]
    assert len(warnings) == 1 and "dim.tif" in warnings[0] and "uint8" in warnings[0], r.stderr


def test_percentile_normalisation_maps_the_percentiles_to_0_and_1():
    pic = _picture().astype(np.float32)[..., None]
    out = normalize.apply(normalize.DEFAULT, pic)
    lo, hi = np.percentile(out, [1.0, 99.8])
    assert lo == pytest.approx(0.0, abs=1e-5) and hi == pytest.approx(1.0, abs=1e-5)
    flat = normalize.apply(normalize.DEFAULT, np.full((8, 8, 1), 7, np.uint16))
    assert np.isfinite(flat).all() and np.abs(flat).max() < 1e-3   # a blank image stays blank


def test_damaged_normalisation_is_refused():
    from unetcli.errors import ModelFileError

    for bad in ({"mean": [0.0], "std": [0.0]}, {"mean": [float("nan")], "std": [1.0]},
                {"kind": "percentile", "low": 50, "high": 10}, {"kind": "warp"}, {"mean": ["a"], "std": [1]}):
        with pytest.raises(ModelFileError):
            normalize.check(bad, 1, "m.unet")


# ------------------------------------------------------------------------------------- channels

def test_grey_into_a_colour_model_is_replicated(tmp_path, unet):
    _model(tmp_path / "rgb.unet", 3)
    grey = _picture()
    write_image(tmp_path / "grey.png", grey, "YX")
    write_image(tmp_path / "rgb.png", np.repeat(grey[..., None], 3, -1), "YXC")
    for name in ("grey", "rgb"):
        r = unet("predict", f"{name}.png", "-o", f"{name}-mask.tif", "-m", "rgb.unet", cwd=tmp_path)
        assert r.code == 0, r
    a = read_image(tmp_path / "grey-mask.tif")
    assert np.array_equal(a, read_image(tmp_path / "rgb-mask.tif")) and 0 < a.mean() < 1


def test_colour_into_a_grey_model_becomes_luminance(tmp_path, unet):
    _model(tmp_path / "grey.unet", 1)
    rng = np.random.default_rng(1)
    rgb = np.stack([_picture(seed=0), _picture(seed=1), rng.integers(0, 40, (96, 112))], -1).astype(np.uint8)
    write_image(tmp_path / "rgb.png", rgb, "YXC")
    luma = (rgb.astype(np.float32) @ normalize.LUMA)
    write_image(tmp_path / "luma.tif", luma.astype(np.float32), "YX")
    r = unet("predict", "rgb.png", "-o", "a.tif", "-m", "grey.unet", "-v", cwd=tmp_path)
    assert r.code == 0 and "luminance" in r.stderr, r
    assert unet("predict", "luma.tif", "-o", "b.tif", "-m", "grey.unet", cwd=tmp_path).code == 0
    a, b = read_image(tmp_path / "a.tif"), read_image(tmp_path / "b.tif")
    assert _agreement(a, b) >= 0.999 and 0 < a.mean() < 1


def test_channels_picks_the_stain_of_a_multichannel_tiff(tmp_path, unet):
    _model(tmp_path / "grey.unet", 1)
    stain = _picture(seed=4)
    rng = np.random.default_rng(2)
    three = np.stack([rng.integers(0, 255, stain.shape), stain, rng.integers(0, 255, stain.shape)], -1)
    write_image(tmp_path / "three.tif", three.astype(np.uint8), "YXC")
    write_image(tmp_path / "stain.tif", stain, "YX")
    assert unet("predict", "three.tif", "--channels", "2", "-o", "a.tif", "-m", "grey.unet", cwd=tmp_path).code == 0
    assert unet("predict", "stain.tif", "-o", "b.tif", "-m", "grey.unet", cwd=tmp_path).code == 0
    assert np.array_equal(read_image(tmp_path / "a.tif"), read_image(tmp_path / "b.tif"))
    r = unet("predict", "three.tif", "--channels", "4", "-o", "c.tif", "-m", "grey.unet", cwd=tmp_path)
    assert_one_line_error(r, "three.tif", "channel 4")
    assert not (tmp_path / "c.tif").exists()


def test_adapt_channels_rules():
    grey = np.ones((4, 5, 1), np.uint8)
    out, note = normalize.adapt_channels(grey, 3)
    assert out.shape == (4, 5, 3) and note
    same, note = normalize.adapt_channels(np.ones((4, 5, 3), np.uint8), 3)
    assert same.shape == (4, 5, 3) and note is None
    picked, _ = normalize.adapt_channels(np.arange(4 * 5 * 3).reshape(4, 5, 3), 2, [2, 0])
    assert np.array_equal(picked[..., 0], np.arange(4 * 5 * 3).reshape(4, 5, 3)[..., 2])
    assert normalize.parse_channels("2,1") == [1, 0]


# ------------------------------------------------------------------------------------ instances

def _touching() -> np.ndarray:
    """Two touching discs and two touching squares, as instance labels."""
    yy, xx = np.mgrid[:80, :130]
    lab = np.zeros((80, 130), np.int32)
    lab[(yy - 40) ** 2 + (xx - 30) ** 2 <= 18 ** 2] = 1
    lab[((yy - 40) ** 2 + (xx - 65) ** 2 <= 18 ** 2) & (lab == 0)] = 2
    lab[10:40, 95:125] = 3
    lab[40:70, 95:125] = 4
    return lab


def test_three_class_decoding_separates_touching_objects_at_full_size():
    lab = _touching()
    target, inst = labels.training_target(lab, target="three-class")
    assert set(np.unique(target)) == {0, 1, 2}
    prob = np.stack([(target == k).astype(np.float32) for k in range(3)])
    out = instances.decode(prob)
    assert out.max() == 4
    scores = object_scores(out, lab)
    assert scores["f1"] == 1.0 and scores["ap"] >= 0.9
    for k in range(1, 5):                           # each object gets (nearly) its whole area back
        match = np.bincount(out[lab == k]).argmax()
        assert match > 0 and (out == match).sum() >= 0.97 * (lab == k).sum()
    assert (out > 0).sum() == (lab > 0).sum()       # the border class is given back to the objects


def test_three_class_decoding_never_floods_a_separate_object():
    """Two separate discs with a border rim each: each comes back whole, in one piece, as itself. (SciPy's
    watershed reads a uint16 cost of 32768 or more as negative; the first disc's seed then took the
    second disc's rim across the background.)"""
    yy, xx = np.mgrid[:40, :60]
    prob = np.zeros((3, 40, 60), np.float32)
    prob[0] = 1
    discs = []
    for cy, cx in ((20, 15), (20, 40)):
        d = np.hypot(yy - cy, xx - cx)
        prob[:, d <= 6] = np.array([0, 1, 0], np.float32)[:, None]
        prob[:, (d > 6) & (d <= 8)] = np.array([0, 0, 1], np.float32)[:, None]
        discs.append(d <= 8)
    out = instances.decode(prob)
    assert out.max() == 2
    for disc in discs:
        (ids,) = np.unique(out[disc]).reshape(1, -1)
        assert len(ids) == 1 and ids[0] > 0
        np.testing.assert_array_equal(out == ids[0], disc)


def test_two_class_decoding_keeps_carved_objects_apart_and_grows_them_back():
    lab = _touching()
    target, _ = labels.training_target(lab)          # carved 2-pixel borders
    prob = np.stack([1.0 - target, target]).astype(np.float32)
    plain = instances.decode(prob)
    grown = instances.decode(prob, instances.DecodeParams(grow=1))
    assert plain.max() == 4 and grown.max() == 4
    assert (grown > 0).sum() > (plain > 0).sum()
    carved = (lab > 0) & (target == 0)
    assert carved.any() and (grown[carved] > 0).mean() >= 0.9 and not (plain[carved] > 0).any()


def test_tuning_finds_the_decoding_that_removes_specks():
    lab = _touching()
    target, _ = labels.training_target(lab, target="three-class")
    prob = np.stack([(target == k).astype(np.float32) for k in range(3)])
    rng = np.random.default_rng(0)
    specks = (rng.random(lab.shape) < 0.004) & (lab == 0)
    noisy = prob.copy()
    noisy[0][specks], noisy[1][specks] = 0.0, 1.0
    assert object_scores(instances.decode(noisy), lab)["f1"] < 0.8
    params, score = instances.tune([noisy], [lab], metric="f1")
    assert score == 1.0 and params.min_size > 1
    assert object_scores(instances.decode(noisy, params), lab)["f1"] == 1.0


def test_tuned_postprocessing_is_stored_used_and_overridden(tmp_path, unet):
    strict = {"threshold": 0.99, "seed": 0.5, "min_seed": 2, "min_size": 1_000_000, "grow": 0}
    model = _model(tmp_path / "tuned.unet", 1, postprocess=strict)
    assert model.postprocess == strict
    write_image(tmp_path / "pic.png", _picture(), "YX")
    assert unet("predict", "pic.png", "-o", "stored.tif", "-m", "tuned.unet", "--output-type", "labels",
                cwd=tmp_path).code == 0
    assert read_image(tmp_path / "stored.tif").max() == 0          # the stored min-size removes everything
    r = unet("predict", "pic.png", "-o", "flags.tif", "-m", "tuned.unet", "--output-type", "labels",
             "--threshold", "0.01", "--min-size", "0", cwd=tmp_path)
    assert r.code == 0, r
    assert read_image(tmp_path / "flags.tif").max() >= 1           # flags override the stored values
    listed = unet("predict", "--list-models", "--json", env={"UNET_MODELS": str(tmp_path)})
    rows = {m["name"]: m for m in json.loads(listed.stdout)}
    assert rows["tuned"]["postprocess"] == strict


# ---------------------------------------------------------------------------------- pixel size

def _calibrated(path, data: np.ndarray, kind: str, size_um: float) -> None:
    import tifffile

    if kind == "imagej":
        tifffile.imwrite(path, data, imagej=True, resolution=(1 / size_um, 1 / size_um),
                         metadata={"unit": "micron"})
    else:
        tifffile.imwrite(path, data, ome=True, metadata={"axes": "YX", "PhysicalSizeX": size_um,
                                                         "PhysicalSizeY": size_um,
                                                         "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})


@pytest.mark.parametrize("kind", ["imagej", "ome"])
@pytest.mark.parametrize("output_type", ["mask", "labels", "probs"])
def test_pixel_size_survives_prediction(tmp_path, unet, kind, output_type):
    from unetcli import tiffmeta

    _model(tmp_path / "grey.unet", 1)
    _calibrated(tmp_path / "in.tif", _picture(), kind, 0.65)
    assert tiffmeta.pixel_size(tmp_path / "in.tif")["x"] == pytest.approx(0.65)
    r = unet("predict", "in.tif", "-o", "out.tif", "-m", "grey.unet", "--output-type", output_type, cwd=tmp_path)
    assert r.code == 0, r
    size = tiffmeta.pixel_size(tmp_path / "out.tif")
    assert size is not None and size["x"] == pytest.approx(0.65, rel=1e-6) and size["y"] == pytest.approx(0.65, rel=1e-6)


def test_probabilities_are_an_imagej_hyperstack_of_slices_and_classes(tmp_path, unet):
    import tifffile

    _model(tmp_path / "grey.unet", 1)
    stack = np.stack([_picture(seed=s) for s in range(3)])
    write_image(tmp_path / "stack.tif", stack, "ZYX")
    r = unet("predict", "stack.tif", "-o", "probs.tif", "-m", "grey.unet", "--output-type", "probs", cwd=tmp_path)
    assert r.code == 0, r
    with tifffile.TiffFile(tmp_path / "probs.tif") as tf:
        assert tf.is_imagej
        meta = tf.imagej_metadata
        assert meta["slices"] == 3 and meta["channels"] == 2 and meta.get("hyperstack")
        assert tf.series[0].axes == "ZCYX" and tf.series[0].shape == (3, 2, 96, 112)
        probs = tf.series[0].asarray()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    back = read_image(tmp_path / "probs.tif")                # slices x (H, W, classes)
    assert back.shape == (3, 96, 112, 2) and np.allclose(back[1, ..., 1], probs[1, 1])
    # the hyperstack scores as probabilities against the truth, slice by slice
    truth = (stack > 100).astype(np.uint8) * 255
    write_image(tmp_path / "truth.tif", truth, "ZYX")
    r = unet("evaluate", "probs.tif", "--truth", "truth.tif", "--metrics", "iou", "--json", cwd=tmp_path)
    assert r.code == 0, r
    assert len(json.loads(r.stdout)["images"]) == 3


def test_untuned_decoding_ignores_the_stored_values(tmp_path, unet):
    _model(tmp_path / "tuned.unet", 1, postprocess={"threshold": 0.99, "min_size": 1_000_000})
    write_image(tmp_path / "pic.png", _picture(), "YX")
    r = unet("predict", "pic.png", "-o", "plain.tif", "-m", "tuned.unet", "--output-type", "labels",
             "--untuned", cwd=tmp_path)
    assert r.code == 0, r
    plain = read_image(tmp_path / "plain.tif")[0, ..., 0]
    prob = inference.predict_image(checkpoint.load_model(tmp_path / "tuned.unet"), _picture()[..., None], device="cpu",
                                  backend="auto", precision="auto")   # what the command line runs
    assert np.array_equal(plain, instances.decode(prob, instances.DecodeParams()))
