"""The metrics of `unet evaluate`: hand-computed cases, scikit-image as an independent reference, and
topological properties of the thinning and the warping."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from unetcli import metrics as M
from unetcli import warping as W
from unetcli.errors import ConfigError, LabelError

FOUR = ndimage.generate_binary_structure(2, 1)
EIGHT = np.ones((3, 3), bool)


# ------------------------------------------------------------------------- small hand-made images

def two_cells(h: int = 5, w: int = 9) -> np.ndarray:
    """ISBI-style labels: 255 = cell interior, 0 = membrane; one membrane column in the middle."""
    t = np.full((h, w), 255, np.uint8)
    t[:, w // 2] = 0
    return t


def f(a: float, b: float) -> float:
    return 2 * a * b / (a + b)


# ------------------------------------------------------------------------------------ thresholds

def test_parse_thresholds():
    assert M.parse_thresholds("0:1:0.1") == M.DEFAULT_THRESHOLDS
    assert len(M.DEFAULT_THRESHOLDS) == 11 and M.DEFAULT_THRESHOLDS[3] == 0.3
    assert M.parse_thresholds("0.5,0.3") == (0.3, 0.5)
    assert M.parse_thresholds("0.25") == (0.25,)
    for bad in ("0:2:0.1", "a:b:c", "1:0:0.1", "0:1:0", ""):
        with pytest.raises(ConfigError):
            M.parse_thresholds(bad)


# ------------------------------------------------------------------------------------ pixel scores

def test_pixel_scores_hand_computed():
    truth = np.array([[0, 0, 1], [1, 1, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 2]])
    s = M.pixel_scores(pred, truth, 3)
    # class 0: tp 1 fn 1; class 1: tp 2 fp 1 fn 1; class 2: tp 1 fp 1
    assert s["iou_0"] == pytest.approx(1 / 2) and s["dice_0"] == pytest.approx(2 / 3)
    assert s["iou_1"] == pytest.approx(2 / 4) and s["dice_1"] == pytest.approx(4 / 6)
    assert s["iou_2"] == pytest.approx(1 / 2) and s["dice_2"] == pytest.approx(2 / 3)
    assert s["iou"] == pytest.approx(0.5) and s["dice"] == pytest.approx(2 / 3)
    assert s["accuracy"] == pytest.approx(4 / 6) and s["pixel_error"] == pytest.approx(2 / 6)
    assert all(isinstance(v, float) for v in s.values())


def test_pixel_scores_absent_class_and_names():
    truth = np.array([[0, 1], [1, 1]])
    s = M.pixel_scores(truth, truth, 3, class_names=["0", "255", "x"])
    assert s["iou_0"] == 1.0 and s["iou_255"] == 1.0 and math.isnan(s["iou_x"])
    assert s["iou"] == 1.0 and s["pixel_error"] == 0.0
    with pytest.raises(LabelError):
        M.pixel_scores(np.array([[3]]), np.array([[0]]), 3)


# ------------------------------------------------------------------------------------ Rand / info

def test_segmentation_scores_split_merge_all_background_by_hand():
    truth = np.array([[1, 1, 1, 1, 2, 2, 2, 2]])
    perfect = M.segmentation_scores(truth, truth)
    assert all(perfect[k] == pytest.approx(1.0) for k in perfect)
    # A split in two halves: sum n_ij^2 = 4 + 4 + 16 = 24, sum t^2 = 32, sum s^2 = 24
    split = M.segmentation_scores(truth, np.array([[1, 1, 3, 3, 2, 2, 2, 2]]))
    assert split["vrand_split"] == pytest.approx(24 / 32) and split["vrand_merge"] == pytest.approx(1)
    assert split["vrand"] == pytest.approx(f(0.75, 1))
    # H(T) = log 2, H(S) = 1.5 log 2, I = H(T): split = 2/3, merge = 1
    assert split["vinfo_split"] == pytest.approx(2 / 3) and split["vinfo_merge"] == pytest.approx(1)
    assert split["vinfo"] == pytest.approx(0.8)
    # A merge: sum s^2 = 64
    merge = M.segmentation_scores(truth, np.ones((1, 8), int))
    assert merge["vrand_split"] == pytest.approx(1) and merge["vrand_merge"] == pytest.approx(0.5)
    assert merge["vrand"] == pytest.approx(2 / 3)
    assert merge["vinfo_merge"] == pytest.approx(0) and merge["vinfo_split"] == pytest.approx(1)
    assert merge["vinfo"] == 0
    # All background in the proposal: 8 singletons
    allbg = M.segmentation_scores(truth, np.zeros((1, 8), int))
    assert allbg["vrand_split"] == pytest.approx(8 / 32) and allbg["vrand_merge"] == pytest.approx(1)
    assert allbg["vinfo_split"] == pytest.approx(math.log(2) / math.log(8))
    # Truth background is excluded: what the proposal does there changes nothing
    truth0 = np.array([[1, 1, 0, 2, 2]])
    assert M.segmentation_scores(truth0, np.array([[1, 1, 1, 2, 2]]))["vrand"] == pytest.approx(1)
    assert M.segmentation_scores(truth0, np.array([[5, 5, 7, 6, 6]]))["vrand"] == pytest.approx(1)
    assert all(math.isnan(v) for v in M.segmentation_scores(np.zeros((2, 2), int), np.ones((2, 2), int)).values())


# ------------------------------------------------------------------------------------ thinning

def test_thinning_odd_and_even_gaps():
    odd = np.zeros((3, 7), int)
    odd[:, 0], odd[:, 6] = 1, 2
    out = M.thin_boundaries(odd)
    assert (out[:, :3] == 1).all() and (out[:, 3] == 0).all() and (out[:, 4:] == 2).all()
    even = np.zeros((4, 6), int)
    even[:, 0], even[:, 5] = 1, 2
    out = M.thin_boundaries(even)
    assert ((out == 0).sum(axis=1) == 1).all()          # one line pixel per row
    assert _four_adjacent_different(out) == 0
    assert (M.thin_boundaries(np.zeros((4, 4), int)) == 0).all()  # no seeds: nothing to grow


def _four_adjacent_different(lab: np.ndarray) -> int:
    a, b = lab[:, :-1], lab[:, 1:]
    c, d = lab[:-1, :], lab[1:, :]
    return int((((a != b) & (a > 0) & (b > 0)).sum() + ((c != d) & (c > 0) & (d > 0)).sum()))


@settings(max_examples=40, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(3, 24), st.integers(3, 24)), elements=st.booleans()))
def test_thinning_keeps_segments_and_separates_them(mask):
    segs = M.label_components(mask)
    out = M.thin_boundaries(segs)
    assert (out[segs > 0] == segs[segs > 0]).all()      # seeds never change
    assert _four_adjacent_different(out) == 0           # different segments never touch (4-adjacency)
    assert set(np.unique(out)) <= set(np.unique(segs))  # no new segment


# ------------------------------------------------------------------------------------ ISBI scores

def test_isbi_perfect_prediction():
    truth = two_cells()
    s = M.isbi_scores(truth == 0, truth)
    for k in ("vrand", "vrand_split", "vrand_merge", "vinfo", "vinfo_split", "vinfo_merge"):
        assert s[k] == pytest.approx(1.0), k
    assert s["rand_error"] == pytest.approx(0) and s["isbi_pixel_error"] == 0 and s["pixel_error"] == 0
    # the same as a probability map: best thresholds are those that recover the mask
    p = M.isbi_scores((truth == 0).astype(np.float32), truth)
    assert p["vrand"] == pytest.approx(1.0) and 0 < p["thresholds"]["vrand"] <= 1


def test_isbi_all_membrane_by_hand():
    truth = two_cells()          # 40 interior pixels in two cells of 20
    s = M.isbi_scores(np.ones(truth.shape, bool), truth)
    split = 40 / 800             # all 40 are singletons: sum n_ij^2 = 40, sum t^2 = 2 * 20^2
    assert s["vrand_split"] == pytest.approx(split) and s["vrand_merge"] == pytest.approx(1)
    assert s["vrand"] == pytest.approx(f(split, 1))
    assert s["vinfo_split"] == pytest.approx(math.log(2) / math.log(40))
    assert s["rand_error"] == pytest.approx(1 - f(split, 1))
    assert s["isbi_pixel_error"] == pytest.approx(1.0)
    assert s["pixel_error"] == pytest.approx(40 / 45)


def test_isbi_split_by_hand():
    truth = two_cells()
    mem = truth == 0
    mem[2, :4] = True            # a membrane across the left cell: 8 + 8 pixels and 4 singletons
    s = M.isbi_scores(mem, truth)
    split = (64 + 64 + 4 + 400) / 800
    assert s["vrand_split"] == pytest.approx(split) and s["vrand_merge"] == pytest.approx(1)
    assert s["vrand"] == pytest.approx(f(split, 1)) and s["rand_error"] == pytest.approx(1 - f(split, 1))
    p = np.array([8, 8, 20] + [1] * 4) / 40
    h_s = -(p * np.log(p)).sum()
    assert s["vinfo_split"] == pytest.approx(math.log(2) / h_s) and s["vinfo_merge"] == pytest.approx(1)
    assert s["isbi_pixel_error"] == pytest.approx(1 - 2 * 36 / (2 * 36 + 4))


def test_isbi_merge_by_hand():
    truth = two_cells()
    s = M.isbi_scores(np.zeros(truth.shape, bool), truth)     # no membrane: the two cells merge
    assert s["vrand_split"] == pytest.approx(1) and s["vrand_merge"] == pytest.approx(800 / 1600)
    assert s["vrand"] == pytest.approx(2 / 3) and s["rand_error"] == pytest.approx(1 / 3)
    assert s["vinfo_merge"] == pytest.approx(0) and s["vinfo"] == 0


def test_thinning_forgives_thick_membranes_but_rand_error_does_not():
    truth = two_cells()
    mem = np.zeros(truth.shape, bool)
    mem[:, 3:6] = True           # a three-pixel membrane where the truth has one
    s = M.isbi_scores(mem, truth)
    assert s["vrand"] == pytest.approx(1) and s["vinfo"] == pytest.approx(1)
    split = (225 + 225 + 10) / 800
    assert s["rand_error"] == pytest.approx(1 - f(split, 1))
    assert s["isbi_pixel_error"] == pytest.approx(1 - 60 / 70)


def test_isbi_truth_ids_and_errors():
    truth = two_cells()
    ids = M.label_components(truth > 0)
    assert M.isbi_scores(truth == 0, ids)["vrand"] == pytest.approx(1)   # instance ids = components
    assert M.isbi_scores(truth == 0, (truth > 0).astype(np.uint8))["vrand"] == pytest.approx(1)
    with pytest.raises(LabelError):
        M.isbi_scores(np.zeros((3, 3), np.float32), truth)
    with pytest.raises(LabelError):
        M.isbi_scores(np.full(truth.shape, 2.0, np.float32), truth)


def test_isbi_threshold_polarity():
    """The membrane probability is swept: interior where it is below t."""
    truth = two_cells()
    prob = np.where(truth == 0, 0.8, 0.3).astype(np.float32)
    s = M.isbi_scores(prob, truth, thresholds=(0.2, 0.5, 0.9))
    assert s["vrand"] == pytest.approx(1) and s["thresholds"]["vrand"] == 0.5
    assert s["thresholds"]["rand_error"] == 0.5


# ------------------------------------------------------------------------------------ scikit-image

@pytest.fixture
def isbi_slice(isbi_dir):
    from unetcli.images import read_image

    return read_image(isbi_dir / "train" / "labels" / "03.png")[0, :, :, 0]


def _singletons_unique(prop: np.ndarray, truth_seg: np.ndarray) -> np.ndarray:
    out = prop.astype(np.int64).copy()
    z = out == 0
    out[z] = out.max() + 1 + np.arange(int(z.sum()))
    return out


def test_rand_against_scikit_image(isbi_slice):
    from skimage.metrics import adapted_rand_error

    seg = M.segments_of(isbi_slice)
    prop = M.label_components(ndimage.binary_erosion(isbi_slice > 0, FOUR, iterations=2))
    prop = np.where(np.arange(prop.size).reshape(prop.shape) % 7 == 0, 0, prop)  # sprinkle background
    # scikit-image with each of our singletons given its own id, and its n(n-1) pair counting
    are, p_sk, r_sk = adapted_rand_error(seg, _singletons_unique(prop, seg), ignore_labels=(0,))
    r = M.rand_terms(seg, prop)
    n = r["n"]
    ours = sorted([(r["sum_joint2"] - n) / (r["sum_truth2"] - n), (r["sum_joint2"] - n) / (r["sum_prop2"] - n)])
    assert sorted([p_sk, r_sk]) == pytest.approx(ours, rel=1e-9)
    assert 1 - are == pytest.approx(2 * (r["sum_joint2"] - n) / (r["sum_truth2"] + r["sum_prop2"] - 2 * n), rel=1e-9)
    # Known differences: scikit-image counts pairs of distinct pixels (n_ij(n_ij-1)), the challenge
    # counts n_ij^2; and it treats the proposal's 0 as one segment, the challenge as singletons.
    ours_f = M.segmentation_scores(seg, prop)["vrand"]
    assert ours_f == pytest.approx(1 - are, abs=0.01)
    are_zero_one_segment = adapted_rand_error(seg, prop, ignore_labels=(0,))[0]
    assert abs((1 - are_zero_one_segment) - ours_f) > 0.01


def test_information_against_scikit_image(isbi_slice):
    from skimage.metrics import variation_of_information

    seg = M.segments_of(isbi_slice)
    prop = M.label_components(ndimage.binary_erosion(isbi_slice > 0, FOUR, iterations=1))
    h_split, h_merge = variation_of_information(seg, _singletons_unique(prop, seg), ignore_labels=(0,))
    info = M.information_terms(seg, prop)
    assert info["h_prop_given_truth"] / math.log(2) == pytest.approx(h_split, rel=1e-9)
    assert info["h_truth_given_prop"] / math.log(2) == pytest.approx(h_merge, abs=1e-12)
    s = M.segmentation_scores(seg, prop)
    assert s["vinfo_split"] == pytest.approx(info["mutual"] / info["h_prop"])
    assert s["vinfo_merge"] == pytest.approx(info["mutual"] / info["h_truth"])
    # With the proposal's 0 as one segment (scikit-image's reading) the entropies differ.
    h_split0, _ = variation_of_information(seg, prop, ignore_labels=(0,))
    assert abs(h_split0 - h_split) > 0.01


def test_real_slice_perturbations_rank_sensibly(isbi_slice):
    truth = isbi_slice
    mem = truth == 0
    perfect = M.isbi_scores(mem, truth)
    eroded = M.isbi_scores(~ndimage.binary_erosion(~mem, FOUR, iterations=2), truth)
    merged = mem.copy()
    merged[:, 200:203] = False                            # open every membrane that crosses 3 columns
    merged_s = M.isbi_scores(merged, truth)
    assert perfect["vrand"] == pytest.approx(1) and perfect["rand_error"] == pytest.approx(0)
    # thicker membranes: thinning keeps V_rand high; the unthinned Rand error suffers
    assert eroded["vrand"] > 0.98 and eroded["rand_error"] > 0.05
    assert merged_s["vrand_merge"] < 0.95 and merged_s["vrand_split"] > 0.99


# ------------------------------------------------------------------------------------ warping

def test_simple_point_table():
    assert W.SIMPLE.dtype == bool and W.SIMPLE.shape == (256,)
    assert not W.SIMPLE[0]            # an isolated pixel: deleting it deletes an object
    assert not W.SIMPLE[255]          # a one-pixel hole: filling it deletes a hole
    assert W.SIMPLE[1]                # the end of a line
    assert not W.SIMPLE[1 | 16]       # north and south only: a bridge
    assert not W.SIMPLE[1 | 4]        # north and east without the corner: two 4-components


def test_simple_points_match_a_global_topology_check():
    """Flipping the centre preserves the numbers of 4-connected objects and 8-connected background
    components of the image exactly when the table says it is simple."""
    for code in range(256):
        for centre in (False, True):
            img = np.zeros((5, 5), bool)
            for k, (dy, dx) in enumerate(W._RING):
                img[2 + dy, 2 + dx] = bool(code >> k & 1)
            img[2, 2] = centre
            flipped = img.copy()
            flipped[2, 2] = not centre
            counts = [(ndimage.label(a, FOUR)[1], ndimage.label(~a, EIGHT)[1]) for a in (img, flipped)]
            assert (counts[0] == counts[1]) == bool(W.SIMPLE[code]), (code, centre)


def test_warping_shifted_boundary_is_no_error():
    truth = two_cells(7, 11) > 0
    shifted = np.ones_like(truth)
    shifted[:, 6] = False                              # the membrane moved one pixel right
    r = W.warp(truth, shifted)
    assert r.warping_error == 0 and r.splits_mergers_error == 0
    assert (r.warped == shifted).all()
    assert M.warping_scores(~shifted, two_cells(7, 11))["warping_error"] == 0


def test_warping_split_merge_all_membrane_by_hand():
    truth_labels = two_cells(7, 11)
    truth = truth_labels > 0
    n = truth.size
    perfect = W.warp(truth, truth)
    assert perfect.warping_error == 0 and len(perfect.kinds) == 0
    split = truth.copy()
    split[3, :5] = False                               # a membrane across the left cell
    r = W.warp(truth, split)
    assert r.splits == 1 and r.mergers == 0 and r.warping_error == pytest.approx(1 / n)
    assert r.splits_mergers_error == pytest.approx(1 / n)
    merged = np.ones_like(truth)                       # the membrane between the cells is gone
    r = W.warp(truth, merged)
    assert r.mergers == 7 and r.splits == 0 and r.warping_error == pytest.approx(7 / n)
    allmem = np.zeros_like(truth)                      # each cell shrinks to one pixel it cannot lose
    r = W.warp(truth, allmem)
    assert r.counts()["object_deletion"] == 2 and r.warping_error == pytest.approx(2 / n)
    assert r.splits_mergers_error == 0


def test_warping_sweep_leaves_out_the_empty_threshold():
    truth = two_cells(7, 11)
    prob = np.where(truth == 0, 0.9, 0.1).astype(np.float32)
    prob[3, :5] = 0.6                                  # a faint membrane across the left cell
    s = M.warping_scores(prob, truth)
    assert s["warping_error"] == 0 and s["thresholds"]["warping_error"] == pytest.approx(0.7)
    ts, sweep = M.warping_sweep(prob, truth > 0, membrane=True)
    assert min(ts) > 0.0 and len(ts) == 10            # membrane map: at 0 nothing would be object
    ts_obj, _ = M.warping_sweep(1 - prob, truth > 0)
    assert max(ts_obj) < 1.0 and len(ts_obj) == 10     # object map: at 1 nothing would be object
    assert sweep["warping_splits_mergers"][ts.index(0.5)] == pytest.approx(1 / truth.size)


def _topology(mask: np.ndarray) -> tuple[int, int]:
    padded = np.pad(mask, 1)                           # outside counts as background
    return ndimage.label(padded, FOUR)[1], ndimage.label(~padded, EIGHT)[1]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_warping_preserves_topology_and_only_keeps_mismatches(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(6, 30, size=2)
    truth = ndimage.binary_opening(rng.random((h, w)) < 0.6)
    prop = ndimage.binary_closing(rng.random((h, w)) < 0.55)
    r = W.warp(truth, prop)
    assert _topology(r.warped) == _topology(truth)
    diff = np.argwhere(r.warped != prop)
    assert sorted(map(tuple, diff)) == sorted(map(tuple, r.mismatches))


def test_warping_on_a_real_slice(isbi_slice):
    truth = isbi_slice > 0
    shifted = np.zeros_like(truth)
    shifted[:, 1:] = truth[:, :-1]
    shifted[:, 0] = truth[:, 0]
    r = W.warp(truth, shifted)
    assert r.warping_error < 1e-4                      # a one-pixel shift is (nearly) free
    cut = truth.copy()
    cut[250, :] = False                                # a membrane straight through the slice
    r2 = W.warp(truth, cut)
    assert r2.splits > 0 and r2.splits_mergers_error > r.splits_mergers_error


# ------------------------------------------------------------------------------------ objects

def test_object_scores_hand_computed():
    truth = np.zeros((8, 8), int)
    truth[0:2, 0:4] = 1
    truth[4:6, 0:4] = 2
    truth[4:8, 6:8] = 3                 # missed: a false negative
    pred = np.zeros((8, 8), int)
    pred[0:2, 0:4] = 7                  # exact: IoU 1
    pred[4:6, 1:5] = 8                  # IoU 6 / 10 = 0.6
    pred[0:2, 6:8] = 9                  # nothing there: a false positive
    s = M.object_scores(pred, truth)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 1, 1)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    # IoU 1 and 0.6: TP 2 at thresholds 0.5, 0.55 (2/4); TP 1 at 0.6..0.95 (1/5)
    assert s["ap"] == pytest.approx((2 * 0.5 + 8 * 0.2) / 10)
    assert s["seg"] == pytest.approx((1 + 0.6 + 0) / 3)


def test_object_scores_edge_cases():
    truth = np.zeros((4, 4), int)
    truth[1:3, 1:3] = 5
    perfect = M.object_scores(truth, truth)
    assert perfect["f1"] == 1 and perfect["ap"] == 1 and perfect["seg"] == 1
    nothing = M.object_scores(np.zeros_like(truth), truth)
    assert nothing["precision"] == 0 and nothing["recall"] == 0 and nothing["ap"] == 0 and nothing["seg"] == 0
    empty = M.object_scores(np.zeros_like(truth), np.zeros_like(truth))
    assert empty["f1"] == 1 and empty["ap"] == 1 and math.isnan(empty["seg"])
    half = np.zeros_like(truth)
    half[1:3, 1:2] = 1                  # covers exactly half: not more than half, so SEG counts 0
    assert M.object_scores(half, truth)["seg"] == 0


def test_nuclei_instances_perfect_and_merged(nuclei_dir):
    from unetcli.images import read_image

    path = sorted((nuclei_dir / "labels").iterdir())[0]
    truth = read_image(path)[0, :, :, 0].astype(np.int64)
    s = M.object_scores(truth, truth)
    assert s["f1"] == 1 and s["ap"] == 1 and s["seg"] == 1
    merged = np.where(truth > 0, 1, 0)                 # all nuclei as one object
    m = M.object_scores(merged, truth)
    assert m["n_pred"] == 1 and m["recall"] <= 1 / m["n_truth"] + 1e-12


# ------------------------------------------------------------------------------------ a whole set

def test_evaluate_chooses_one_threshold_for_the_set():
    truth = two_cells(7, 11)
    a = np.where(truth == 0, 0.1, 0.9).astype(np.float32)[..., None]   # object probability
    b = np.where(truth == 0, 0.35, 0.9).astype(np.float32)[..., None]
    pairs = [M.Pair("a", a, truth), M.Pair("b", b, truth)]
    rep = M.evaluate(pairs, metrics="vrand,rand_error,iou")
    assert [img["name"] for img in rep["images"]] == ["a", "b"]
    assert set(rep["mean"]) == {"iou", "vrand", "rand_error"}
    t = rep["thresholds"]["vrand"]
    assert 0.35 <= t < 0.9 and rep["mean"]["vrand"] == pytest.approx(1)
    # the same maps as membrane probabilities give the same scores
    pairs_m = [M.Pair("a", 1 - a, truth), M.Pair("b", 1 - b, truth)]
    rep_m = M.evaluate(pairs_m, metrics="vrand,iou", probability="membrane")
    assert rep_m["mean"]["vrand"] == pytest.approx(1) and rep_m["mean"]["iou"] == pytest.approx(1)


def test_evaluate_kinds_and_errors():
    truth = two_cells()
    rep = M.evaluate([M.Pair("x", (truth > 0).astype(np.uint8)[..., None], truth)])   # class map 0/1
    assert rep["mean"]["iou_foreground"] == 1 and rep["mean"]["vrand"] == pytest.approx(1)
    assert rep["thresholds"] == {}
    assert "warping_error" not in rep["mean"]
    inst = M.label_components(truth > 0)
    rep = M.evaluate([M.Pair("i", inst[..., None].astype(np.uint16), inst)])
    assert set(rep["mean"]) >= {"iou_background", "iou_foreground", "ap", "seg"} and "vrand" not in rep["mean"]
    cls = np.array([[0, 1, 2], [2, 1, 0]])
    rep = M.evaluate([M.Pair("c", cls[..., None], cls * 10)], classes=[0, 10, 20])
    assert rep["mean"]["iou"] == 1 and "iou_20" in rep["mean"]
    with pytest.raises(LabelError):
        M.evaluate([M.Pair("c", cls[..., None], cls * 10)], classes=[0, 10])
    with pytest.raises(LabelError):
        M.evaluate([M.Pair("p", np.full((5, 9, 1), 3.0, np.float32), truth)])
    with pytest.raises(LabelError):
        M.evaluate([M.Pair("s", np.zeros((4, 9, 1), np.uint8), truth)])
    with pytest.raises(ConfigError):
        M.evaluate([M.Pair("x", truth[..., None], truth)], metrics="nonsense")


def test_evaluate_class_probability_pages():
    truth = two_cells(7, 11)
    p_obj = np.where(truth > 0, 0.7, 0.2)
    probs = np.stack([1 - p_obj, p_obj], axis=-1).astype(np.float32)      # class 0 = membrane first
    rep = M.evaluate([M.Pair("c", probs, truth)], metrics="vrand,iou,warping_error")
    assert rep["mean"]["vrand"] == pytest.approx(1) and rep["mean"]["iou"] == 1
    assert 0.2 <= rep["thresholds"]["vrand"] < 0.7                      # on the object scale
    one_page = M.Pair("o", p_obj[..., None].astype(np.float32), truth)
    with pytest.raises(LabelError):                                       # two scales in one sweep
        M.evaluate([M.Pair("c", probs, truth), one_page], metrics="vrand", probability="membrane")
    both = M.evaluate([M.Pair("c", probs, truth), one_page], metrics="vrand")
    assert both["mean"]["vrand"] == pytest.approx(1)
