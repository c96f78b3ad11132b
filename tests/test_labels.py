"""Label images to training targets: kinds of labels, the ISBI convention, classes, carved borders."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from unetcli.errors import ConfigError, LabelError
from unetcli.images import read_image
from unetcli.labels import (DEFAULT_BORDER_WIDTH, carve_borders, integer_labels, label_planes, num_classes,
                            parse_values, relabel, training_target)


# ------------------------------------------------------------------------------------------ option text

def test_parse_values():
    assert parse_values(None) is None
    assert parse_values("") is None
    assert parse_values("255") == [255]
    assert parse_values(" 0, 128 ,255") == [0, 128, 255]


@pytest.mark.parametrize("text,fragment", [("a", "'a' is not a whole number"), ("1.5", "'1.5'"),
                                           ("-1", "negative"), ("1,1", "given twice"), ("1,,2", "''")])
def test_parse_values_refuses(text, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        parse_values(text, option="--classes")
    assert "--classes" in info.value.message


def test_num_classes():
    assert num_classes(None) == 2
    assert num_classes([0, 5, 9]) == 3


# ------------------------------------------------------------------------------------------------ values

def test_label_planes_takes_equal_channels_and_refuses_different_ones():
    grey = np.arange(12, dtype=np.uint8).reshape(1, 3, 4, 1)
    np.testing.assert_array_equal(label_planes(np.repeat(grey, 3, axis=3)), grey[..., 0])
    colour = np.repeat(grey, 3, axis=3)
    colour[0, 1, 1, 2] += 1
    with pytest.raises(LabelError, match="lab.png: label image has 3 channels that differ"):
        label_planes(colour, "lab.png")


def test_integer_labels():
    np.testing.assert_array_equal(integer_labels(np.array([[0.0, 3.0]], np.float32)), [[0, 3]])
    assert integer_labels(np.array([[True, False]])).dtype == np.uint8
    with pytest.raises(LabelError, match=r"x.tif: labels contain fractions \(e.g. 0.5\)"):
        integer_labels(np.array([[0.0, 0.5]]), "x.tif")
    with pytest.raises(LabelError, match="negative"):
        integer_labels(np.array([[0, -2]], np.int16), "x.tif")
    with pytest.raises(LabelError, match="NaN"):
        integer_labels(np.array([[0, np.nan]]), "x.tif")


def test_relabel_keeps_order_and_handles_huge_ids():
    inst = np.array([[0, 70000, 5], [5, 0, 4_000_000_000]], np.uint32)
    np.testing.assert_array_equal(relabel(inst), [[0, 2, 1], [1, 0, 3]])
    assert relabel(inst).dtype == np.int32
    np.testing.assert_array_equal(relabel(inst[:, :1] * 0), [[0], [0]])


# -------------------------------------------------------------------------------------- kinds of labels

def test_instance_labels_keep_ids_in_order_and_carve_only_where_objects_touch():
    lab = np.zeros((12, 12), np.uint16)
    lab[1:5, 1:5] = 900        # alone
    lab[7:11, 1:5] = 30        # touches 31 along a column
    lab[7:11, 5:9] = 31
    target, inst = training_target(lab, border_width=2)
    assert target.dtype == np.uint8 and inst.dtype == np.int32
    np.testing.assert_array_equal(target, inst > 0)
    np.testing.assert_array_equal(inst[1:5, 1:5], 3)          # 30, 31, 900 -> 1, 2, 3
    assert (inst[7:11, 4] == 0).all() and (inst[7:11, 5] == 0).all()
    assert (inst[7:11, 1:4] == 1).all() and (inst[7:11, 6:9] == 2).all()


def test_binary_mask_objects_are_4_connected_components_and_not_carved():
    mask = np.zeros((7, 7), np.uint8)
    mask[0:3, 0:3] = 1
    mask[3:6, 3:6] = 1          # touches the first square only at a corner (diagonally)
    target, inst = training_target(mask)
    np.testing.assert_array_equal(target, mask)              # the mask is kept as drawn
    assert inst.max() == 2                                   # two objects: 4-connectivity
    assert inst[0, 0] != inst[5, 5]


def test_isbi_convention(isbi_dir):
    label = read_image(isbi_dir / "train" / "labels" / "00.png")[0, :, :, 0]
    assert set(np.unique(label)) == {0, 255}
    target, inst = training_target(label)
    np.testing.assert_array_equal(target, label == 255)      # 255 = cell interior = object
    assert (inst[label == 0] == 0).all()                     # 0 = membrane = background
    expected, count = ndimage.label(label == 255)            # one object per 4-connected interior
    np.testing.assert_array_equal(inst, expected)
    assert count == inst.max() > 100
    same_target, same_inst = training_target(label, foreground=[255])
    np.testing.assert_array_equal(same_target, target)
    np.testing.assert_array_equal(same_inst, inst)
    inverted, inv_inst = training_target(label, foreground=[0])  # the membrane as the object
    np.testing.assert_array_equal(inverted, label == 0)
    assert (inv_inst[label == 255] == 0).all()


def test_foreground_merges_values_into_one_binary_mask():
    lab = np.array([[0, 1, 1, 0, 2], [0, 1, 3, 0, 2]], np.uint8)
    target, inst = training_target(lab, foreground=[1, 3])
    np.testing.assert_array_equal(target, [[0, 1, 1, 0, 0], [0, 1, 1, 0, 0]])
    assert inst.max() == 1


def test_multi_class_maps():
    lab = np.array([[0, 128, 255], [255, 128, 0]], np.uint8)
    target, inst = training_target(lab, classes=[0, 255, 128])
    assert inst is None and target.dtype == np.uint8
    np.testing.assert_array_equal(target, [[0, 2, 1], [1, 2, 0]])
    with pytest.raises(LabelError, match=r"c.png: label values 128 are not in --classes 0,255"):
        training_target(lab, classes=[0, 255], name="c.png")


def test_conflicting_and_invalid_options():
    lab = np.zeros((3, 3), np.uint8)
    with pytest.raises(ConfigError, match="exclude each other"):
        training_target(lab, foreground=[1], classes=[0, 1])
    with pytest.raises(ConfigError, match="at least two"):
        training_target(lab, classes=[0])
    with pytest.raises(ConfigError, match="--border-width"):
        training_target(lab, border_width=-1)


def test_empty_and_single_object_images():
    target, inst = training_target(np.zeros((5, 4), np.uint16))
    assert not target.any() and not inst.any()
    target, inst = training_target(np.full((1, 1), 7, np.uint16))
    assert target[0, 0] == 1 and inst[0, 0] == 1


# ------------------------------------------------------------------------------------------- carving

@pytest.mark.parametrize("width", [0, 1, 2, 3, 4, 5])
def test_carving_two_touching_squares_leaves_exactly_the_width(width):
    lab = np.zeros((14, 24), np.uint16)
    lab[3:11, 3:12] = 1        # columns 3..11
    lab[3:11, 12:21] = 2       # columns 12..20: touches along columns 11 | 12
    target, inst = training_target(lab, border_width=width)
    rows = range(3, 11)
    for r in rows:
        left = np.flatnonzero(inst[r] == 1).max()
        right = np.flatnonzero(inst[r] == 2).min()
        assert right - left - 1 == width                     # the gap, in pixels
    changed = (target != (lab > 0))
    assert changed.sum() == width * len(rows)                # nothing else changes
    cols = np.flatnonzero(changed.any(axis=0))
    if width:
        # each side gives up half, the higher id the odd pixel
        assert cols.min() == 12 - width // 2 and cols.max() == 11 + (width + 1) // 2
    assert DEFAULT_BORDER_WIDTH == 2


def test_carve_borders_is_the_mask_training_target_removes():
    lab = np.zeros((6, 6), np.int32)
    lab[:, :3], lab[:, 3:] = 4, 9
    border = carve_borders(lab, 2)
    assert border.dtype == bool
    np.testing.assert_array_equal(np.flatnonzero(border.any(axis=0)), [2, 3])
    target, _ = training_target(lab, border_width=2)
    np.testing.assert_array_equal(target, ~border)


@st.composite
def touching_instances(draw):
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    lab = np.zeros((h, w), np.int32)
    for k in range(1, draw(st.integers(0, 7)) + 1):
        y, x = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        lab[y:y + draw(st.integers(1, 12)), x:x + draw(st.integers(1, 12))] = k * 7
    return lab


def _chessboard_gap(inst):
    """Smallest chessboard distance between pixels of different objects (inf if fewer than two)."""
    best = np.inf
    ys, xs = np.nonzero(inst)
    ids = inst[ys, xs]
    for i in range(len(ys)):
        other = ids != ids[i]
        if other.any():
            best = min(best, np.maximum(abs(ys[other] - ys[i]), abs(xs[other] - xs[i])).min())
    return best


@settings(max_examples=60, deadline=None)
@given(touching_instances(), st.integers(0, 4))
def test_carving_properties(lab, width):
    border = carve_borders(lab, width)
    assert not border[lab == 0].any()
    kept = np.where(border, 0, lab)
    # remaining pixels of different objects are never neighbours, and never closer than before
    before, after = _chessboard_gap(lab), _chessboard_gap(kept)
    assert after >= before
    if width >= 1:
        assert after >= 2
    # a carved pixel has another object within ceil(width/2); pixels farther than that never change
    reach = (width + 1) // 2
    ys, xs = np.nonzero(lab)
    for y, x in zip(ys, xs):
        window = lab[max(y - reach, 0):y + reach + 1, max(x - reach, 0):x + reach + 1]
        near_other = ((window != 0) & (window != lab[y, x])).any()
        if not near_other:
            assert not border[y, x]
        if border[y, x]:
            assert near_other


def test_carving_separates_the_touching_nuclei(nuclei_dir):
    label = read_image(nuclei_dir / "labels" / "432f367a4c5b.png")[0, :, :, 0]
    touching = carve_borders(label, 2).sum()
    assert touching > 100                                   # these nuclei do touch
    target, inst = training_target(label)
    # after carving, no two objects are 8-neighbours: every 8-connected component holds one id
    assert target.sum() == (label > 0).sum() - touching
    comps, count = ndimage.label(target, structure=np.ones((3, 3)))
    index = np.arange(1, count + 1)
    np.testing.assert_array_equal(ndimage.maximum(inst, comps, index), ndimage.minimum(inst, comps, index))
    assert count >= inst.max() > 300
