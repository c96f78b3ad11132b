"""`unet evaluate` from the shell: pairing, output formats, polarity, and one-line errors."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest

from conftest import assert_one_line_error
from unetcli.images import read_image, write_image

STABLE_BINARY = ["iou", "dice", "accuracy", "pixel_error", "iou_background", "iou_foreground",
                 "dice_background", "dice_foreground",
                 "vrand", "vrand_split", "vrand_merge", "vinfo", "vinfo_split", "vinfo_merge",
                 "rand_error", "isbi_pixel_error", "precision", "recall", "f1", "ap", "seg"]


@pytest.fixture
def isbi_three(tmp_path, isbi_dir):
    """Three ISBI truth slices copied as (perfect) predictions."""
    pred = tmp_path / "pred"
    pred.mkdir()
    for i in range(3):
        shutil.copy(isbi_dir / "train" / "labels" / f"{i:02d}.png", pred / f"{i:02d}.png")
    return pred


def test_folder_pairing_table_json_csv(unet, isbi_three, isbi_dir):
    truth = isbi_dir / "train" / "labels"
    r = unet("evaluate", isbi_three, "--truth", truth)
    assert r.code == 0, r
    lines = r.stdout.splitlines()
    assert any(ln.startswith("mean") for ln in lines) and sum(ln.startswith("0") for ln in lines) >= 3
    assert "vrand" in r.stdout and "iou_foreground" in r.stdout   # one naming for any two-class truth

    r = unet("evaluate", isbi_three, "--truth", truth, "--json")
    assert r.code == 0, r
    rep = json.loads(r.stdout)
    assert set(rep) == {"images", "mean", "thresholds"}
    assert [img["name"] for img in rep["images"]] == ["00.png", "01.png", "02.png"]
    assert list(rep["mean"]) == STABLE_BINARY
    for img in rep["images"]:
        assert list(img["metrics"]) == STABLE_BINARY
    for key in ("iou", "dice", "vrand", "vinfo", "f1", "ap", "seg"):
        assert rep["mean"][key] == pytest.approx(1.0), key
    for key in ("pixel_error", "rand_error", "isbi_pixel_error"):
        assert rep["mean"][key] == pytest.approx(0.0), key
    assert rep["thresholds"] == {}                      # masks: nothing to sweep

    r = unet("evaluate", isbi_three, "--truth", truth, "--csv", "--metrics", "iou,vrand,ap")
    assert r.code == 0, r
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == ["name", "iou", "vrand", "ap"]
    assert [row[0] for row in rows[1:]] == ["00.png", "01.png", "02.png"]   # data rows only, no 'mean' row
    assert all(float(v) == pytest.approx(1.0) for row in rows[1:] for v in row[1:])


def test_probability_stack_sweep_and_polarity(unet, tmp_path, isbi_dir):
    labels = read_image(isbi_dir / "train-labels.tif")[:2, :, :, 0]
    write_image(tmp_path / "truth.tif", labels, "ZYX")
    rng = np.random.default_rng(0)
    obj = np.where(labels > 0, 0.8, 0.25) + rng.normal(0, 0.05, labels.shape)
    obj = np.clip(obj, 0, 1).astype(np.float32)
    write_image(tmp_path / "obj.tif", obj, "ZYX")
    write_image(tmp_path / "mem.tif", (1 - obj).astype(np.float32), "ZYX")
    r = unet("evaluate", tmp_path / "obj.tif", "--truth", tmp_path / "truth.tif", "--json",
             "--metrics", "isbi,iou")
    assert r.code == 0, r
    rep = json.loads(r.stdout)
    assert [img["name"] for img in rep["images"]] == ["obj.tif[0]", "obj.tif[1]"]
    t = rep["thresholds"]["vrand"]
    assert 0.25 < t < 0.8                                 # between the two levels of the map
    assert rep["mean"]["vrand"] > 0.9
    r2 = unet("evaluate", tmp_path / "mem.tif", "--truth", tmp_path / "truth.tif", "--json",
              "--metrics", "isbi,iou", "--probability", "membrane")
    assert r2.code == 0, r2
    rep2 = json.loads(r2.stdout)
    for key in rep["mean"]:
        assert rep2["mean"][key] == pytest.approx(rep["mean"][key], abs=1e-3), key
    assert 0.2 < rep2["thresholds"]["vrand"] < 0.75       # on the membrane map's own scale
    # read as an object map by mistake, the membrane map scores badly
    r3 = unet("evaluate", tmp_path / "mem.tif", "--truth", tmp_path / "truth.tif", "--json", "--metrics", "vrand")
    assert json.loads(r3.stdout)["mean"]["vrand"] < 0.5


def test_warping_shift_and_split(unet, tmp_path, isbi_dir):
    # a membrane frame around the slice, so that the shift moves nothing out of the image
    truth = np.pad(read_image(isbi_dir / "train" / "labels" / "04.png")[0, :, :, 0], 1)
    shifted = np.zeros_like(truth)
    shifted[:, 1:] = truth[:, :-1]
    cut = truth.copy()
    cut[256, :] = 0
    (tmp_path / "p").mkdir()
    (tmp_path / "t").mkdir()
    write_image(tmp_path / "p" / "shift.png", shifted, "YX")
    write_image(tmp_path / "p" / "cut.png", cut, "YX")
    write_image(tmp_path / "t" / "shift.png", truth, "YX")
    write_image(tmp_path / "t" / "cut.png", truth, "YX")
    r = unet("evaluate", tmp_path / "p", "--truth", tmp_path / "t", "--metrics", "warping", "--json")
    assert r.code == 0, r
    m = {img["name"]: img["metrics"] for img in json.loads(r.stdout)["images"]}
    assert m["shift.png"]["warping_error"] == 0 and m["shift.png"]["warping_splits_mergers"] == 0
    assert m["cut.png"]["warping_splits_mergers"] * truth.size >= 5   # the cut splits several cells


def test_instance_labels_and_output_file(unet, tmp_path, nuclei_dir):
    labels = sorted((nuclei_dir / "labels").iterdir())[:2]
    pred = tmp_path / "pred"
    pred.mkdir()
    for p in labels:
        shutil.copy(p, pred / p.name)
    out = tmp_path / "scores.json"
    r = unet("evaluate", pred, "--truth", nuclei_dir / "labels", "-o", out)
    assert r.code == 0, r
    assert r.stdout.strip() == str(out)
    rep = json.loads(out.read_text())
    assert "vrand" not in rep["mean"] and "iou_foreground" in rep["mean"]
    for key in ("f1", "ap", "seg", "iou"):
        assert rep["mean"][key] == pytest.approx(1.0), key


def test_stdin_prediction(unet, isbi_dir):
    path = isbi_dir / "train" / "labels" / "05.png"
    r = unet("evaluate", "-", "--truth", path, "--csv", "--metrics", "vrand,pixel_error", stdin=path.read_bytes())
    assert r.code == 0, r
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == ["name", "pixel_error", "vrand"]         # keys in their stable order
    assert rows[1][0] == "<stdin>" and float(rows[1][1]) == 0 and float(rows[1][2]) == pytest.approx(1.0)


def test_errors_are_one_line(unet, tmp_path, isbi_dir, isbi_three):
    truth = isbi_dir / "train" / "labels" / "00.png"
    small = tmp_path / "small.png"
    write_image(small, np.zeros((10, 12), np.uint8), "YX")
    assert_one_line_error(unet("evaluate", small, "--truth", truth), "small.png", "12x10", "512x512")
    assert_one_line_error(unet("evaluate", small, "--truth", isbi_dir / "train" / "labels"),
                          "small.png", "no truth file")
    frac = tmp_path / "frac.tif"
    write_image(frac, np.full((512, 512), 0.5, np.float32), "YX")
    assert_one_line_error(unet("evaluate", truth, "--truth", frac), "frac.tif", "fractions")
    assert_one_line_error(unet("evaluate", isbi_three, "--truth", truth), "3 predictions")
    assert_one_line_error(unet("evaluate", truth, "--truth", truth, "--json", "--csv"), "--json")
    bad_prob = tmp_path / "bad.tif"
    write_image(bad_prob, np.full((512, 512), 3.0, np.float32), "YX")
    assert_one_line_error(unet("evaluate", bad_prob, "--truth", truth), "bad.tif", "[0, 1]")


def test_probability_membrane_is_refused_for_class_probabilities(unet, tmp_path):
    truth = np.zeros((20, 20), np.uint8)
    truth[5:15, 5:15] = 255
    write_image(tmp_path / "truth.png", truth, "YX")
    probs = np.stack([truth == 0, truth > 0]).astype(np.float32)         # two class pages
    write_image(tmp_path / "probs.tif", probs, "ZYX")
    r = unet("evaluate", tmp_path / "probs.tif", "--truth", tmp_path / "truth.png", "--probability", "membrane")
    assert_one_line_error(r, "probs.tif", "2 class probabilities")
    assert unet("evaluate", tmp_path / "probs.tif", "--truth", tmp_path / "truth.png").code == 0
