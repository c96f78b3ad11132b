"""The weight map: equal to a naive per-object reference, hand-computed values, edge cases, the command."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

from conftest import assert_one_line_error
from unetcli.images import read_image, write_image
from unetcli.labels import DEFAULT_BORDER_WIDTH, training_target
from unetcli.weightmap import (DEFAULT_SIGMA, DEFAULT_W0, balance_weights, border_term, class_counts,
                               class_weights_for, cutoff_distance, preview, two_nearest, weight_map)


# ------------------------------------------------------------------------------- the naive reference

def naive_border_term(instances, w0, sigma):
    """The paper's border term the slow way: one distance transform per object over the whole image."""
    ids = [k for k in np.unique(instances) if k != 0]
    term = np.zeros(instances.shape)
    if len(ids) < 2:
        return term
    dist = np.stack([ndimage.distance_transform_edt(instances != k) for k in ids])
    dist.sort(axis=0)
    term = w0 * np.exp(-(dist[0] + dist[1]) ** 2 / (2 * sigma ** 2))
    term[instances != 0] = 0
    return term


def naive_weight_map(target, instances, w0=10.0, sigma=5.0, class_weights=None):
    cw = np.ones(int(target.max()) + 1) if class_weights is None else np.asarray(class_weights)
    base = cw[target].astype(np.float64)
    if instances is not None:
        base = base + naive_border_term(instances, w0, sigma)
    return base.astype(np.float32)


def assert_matches_naive(target, instances, w0=10.0, sigma=5.0, balance="image"):
    cw = class_weights_for(balance, target, 2)
    fast = weight_map(target, instances, w0=w0, sigma=sigma, class_weights=cw)
    slow = naive_weight_map(target, instances, w0, sigma, cw)
    assert fast.dtype == np.float32 and fast.shape == target.shape
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-5)
    return fast, slow


# ------------------------------------------------------------------------------- random instance maps

@st.composite
def instance_maps(draw, max_side=48):
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    inst = np.zeros((h, w), np.int32)
    ids = draw(st.lists(st.integers(1, 70000), max_size=10, unique=True))
    yy, xx = np.mgrid[:h, :w]
    for k in ids:
        y, x = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        ry, rx = draw(st.integers(0, max(h // 3, 1))), draw(st.integers(0, max(w // 3, 1)))
        if draw(st.booleans()):
            inst[max(y - ry, 0):y + ry + 1, max(x - rx, 0):x + rx + 1] = k
        else:
            inst[((yy - y) / (ry + 0.5)) ** 2 + ((xx - x) / (rx + 0.5)) ** 2 <= 1] = k
    return inst


@settings(max_examples=80, deadline=None)
@given(instance_maps(), st.floats(0.3, 12.0), st.floats(0.0, 60.0))
def test_equals_naive_on_random_instance_maps(inst, sigma, w0):
    # the objects as drawn (touching allowed; the term lives on background pixels only)
    assert_matches_naive((inst > 0).astype(np.uint8), inst, w0=w0, sigma=sigma)


@settings(max_examples=40, deadline=None)
@given(instance_maps(max_side=64), st.floats(0.3, 4.0), st.integers(0, 3))
def test_equals_naive_after_carving_with_cutoffs_inside_the_image(inst, sigma, width):
    # small sigma: the cutoff radius is shorter than the image, so windows really are cut
    target, instances = training_target(inst, border_width=width)
    assert_matches_naive(target, instances, sigma=sigma)


def test_equals_naive_where_the_term_is_just_above_and_below_the_cutoff():
    sigma, w0 = 2.0, 10.0
    radius = cutoff_distance(w0, sigma)
    assert w0 * math.exp(-radius ** 2 / (2 * sigma ** 2)) == pytest.approx(1e-6)
    for gap in range(int(radius) - 3, int(radius) + 4):
        inst = np.zeros((5, 2 * gap + 6), np.int32)
        inst[:, :3], inst[:, 3 + gap:3 + gap + 1] = 1, 2
        inst[:, -2:] = 3
        assert_matches_naive((inst > 0).astype(np.uint8), inst, w0=w0, sigma=sigma)


def test_two_nearest_is_exact_within_the_cutoff():
    rng = np.random.default_rng(4)
    inst = np.zeros((60, 70), np.int32)
    for k in range(1, 15):
        y, x = rng.integers(0, 55), rng.integers(0, 65)
        inst[y:y + 5, x:x + 5] = k
    ids = [k for k in np.unique(inst) if k]
    dist = np.sort(np.stack([ndimage.distance_transform_edt(inst != k) for k in ids]), axis=0)
    d1, d2 = two_nearest(inst, 12.0)
    near = dist[0] + dist[1] <= 12.0
    np.testing.assert_array_equal(d1[near], dist[0][near])
    np.testing.assert_array_equal(d2[near], dist[1][near])
    assert (d1 >= dist[0]).all() and (d2 >= dist[1]).all()


@pytest.mark.parametrize("name", ["0999dab07b11", "0a849e0eb15f", "699f2992cd71"])
def test_equals_naive_on_nuclei(nuclei_dir, name):
    label = read_image(nuclei_dir / "labels" / f"{name}.png")[0, :, :, 0]
    target, inst = training_target(label)
    assert inst.max() > 40
    fast, slow = assert_matches_naive(target, inst)
    assert fast.max() > 8        # touching nuclei: high weights in the carved gaps


@pytest.mark.slow
def test_equals_naive_on_the_whole_nuclei_sample(nuclei_dir):
    for path in sorted((nuclei_dir / "labels").glob("*.png")):
        label = read_image(path)[0, :, :, 0]
        target, inst = training_target(label)
        assert_matches_naive(target, inst)


def test_equals_naive_on_isbi_labels(isbi_dir):
    label = read_image(isbi_dir / "train" / "labels" / "03.png")[0, :, :, 0]
    target, inst = training_target(label)
    fast, _ = assert_matches_naive(target, inst)
    membrane = target == 0
    assert fast[membrane].mean() > 3 * fast[~membrane].mean()  # the weight sits on the membranes


# --------------------------------------------------------------------------------- hand-computed values

def test_two_squares_by_hand():
    # row 0 background; rows 1-3: squares at columns 0-2 (object 1) and 5-7 (object 2), gap 3-4
    inst = np.zeros((4, 8), np.int32)
    inst[1:, 0:3], inst[1:, 5:8] = 1, 2
    target = (inst > 0).astype(np.uint8)
    cw = class_weights_for("image", target, 2)
    # 14 background and 18 object pixels of 32: w_c = 32 / (2 * n_c)
    np.testing.assert_allclose(cw, [32 / 28, 32 / 36])
    w = weight_map(target, inst, w0=10, sigma=5, class_weights=cw)

    def term(d1, d2):
        return 10 * math.exp(-(d1 + d2) ** 2 / 50)

    assert w[2, 3] == pytest.approx(8 / 7 + term(1, 2), abs=1e-6)           # in the gap
    assert w[2, 4] == pytest.approx(8 / 7 + term(1, 2), abs=1e-6)
    assert w[0, 0] == pytest.approx(8 / 7 + term(1, math.sqrt(26)), abs=1e-6)
    assert w[0, 3] == pytest.approx(8 / 7 + term(math.sqrt(2), math.sqrt(5)), abs=1e-6)
    assert w[2, 1] == pytest.approx(8 / 9, abs=1e-7)                        # objects: w_c only
    assert w[2, 3] == pytest.approx(9.496, abs=1e-3)


def test_objects_touching_the_image_border():
    inst = np.zeros((9, 12), np.int32)
    inst[:, :2] = 1            # along the left edge
    inst[:, -2:] = 2           # along the right edge
    inst[0, 4:8] = 3           # along the top edge
    target = (inst > 0).astype(np.uint8)
    w, _ = assert_matches_naive(target, inst, balance="none")
    assert w[8, 2] == pytest.approx(1 + 10 * math.exp(-(1 + 8) ** 2 / 50), abs=1e-6)      # d2: right edge
    assert w[5, 2] == pytest.approx(1 + 10 * math.exp(-(1 + math.sqrt(29)) ** 2 / 50), abs=1e-6)  # top
    assert w[1, 4] == pytest.approx(1 + 10 * math.exp(-(1 + 3) ** 2 / 50), abs=1e-6)      # top, left


def test_single_object_no_object_and_tiny_images():
    inst = np.zeros((10, 10), np.int32)
    inst[2:5, 3:8] = 1
    target = (inst > 0).astype(np.uint8)
    cw = class_weights_for("image", target, 2)
    np.testing.assert_array_equal(weight_map(target, inst, class_weights=cw), cw[target].astype(np.float32))
    empty = np.zeros((7, 5), np.uint8)
    w = weight_map(empty, empty.astype(np.int32), class_weights=class_weights_for("image", empty, 2))
    np.testing.assert_array_equal(w, np.ones((7, 5), np.float32))
    for shape in [(1, 1), (1, 6), (6, 1)]:
        t, i = training_target(np.arange(np.prod(shape)).reshape(shape) % 3)
        assert_matches_naive(t, i)
    zero = weight_map(np.zeros((0, 4), np.uint8), np.zeros((0, 4), np.int32))
    assert zero.shape == (0, 4) and zero.dtype == np.float32


def test_w0_zero_and_no_instances_leave_class_weights():
    inst = np.zeros((6, 9), np.int32)
    inst[:, :3], inst[:, 5:] = 1, 2
    target = (inst > 0).astype(np.uint8)
    cw = np.array([2.0, 0.5])
    np.testing.assert_array_equal(weight_map(target, inst, w0=0, class_weights=cw), cw[target].astype(np.float32))
    np.testing.assert_array_equal(weight_map(target, None, class_weights=cw), cw[target].astype(np.float32))
    assert border_term(inst, w0=10, sigma=5)[:, 3:5].min() > 0
    with pytest.raises(ValueError, match="sigma"):
        weight_map(target, inst, sigma=0)


# --------------------------------------------------------------------------------------- class balance

def test_balance_formula():
    counts = class_counts([np.array([[0, 0, 0, 1]], np.uint8), np.array([[2, 0]], np.uint8)], 4)
    np.testing.assert_array_equal(counts, [4, 1, 1, 0])
    # N = 6 pixels, K' = 3 present classes: w_c = 6 / (3 n_c); absent classes weigh 1
    np.testing.assert_allclose(balance_weights(counts), [0.5, 2.0, 2.0, 1.0])
    assert (balance_weights(counts)[:3] * counts[:3]).sum() == pytest.approx(counts.sum())
    np.testing.assert_array_equal(balance_weights([0, 0]), [1.0, 1.0])
    target = np.array([[0, 1, 1, 1]], np.uint8)
    np.testing.assert_allclose(class_weights_for("image", target, 2), [2.0, 2 / 3])
    np.testing.assert_allclose(class_weights_for("dataset", target, 2, counts[:2]), [5 / 8, 5 / 2])
    np.testing.assert_array_equal(class_weights_for("none", target, 2), [1.0, 1.0])


def test_multi_class_weights_are_class_balance_only():
    lab = np.array([[0, 0, 0, 0], [0, 128, 128, 255]], np.uint8)
    target, inst = training_target(lab, classes=[0, 128, 255])
    assert inst is None
    cw = class_weights_for("image", target, 3)
    w = weight_map(target, inst, class_weights=cw)
    # N = 8, K' = 3: background 5 px, class 1 2 px, class 2 1 px
    np.testing.assert_allclose(w, np.array([8 / 15, 8 / 6, 8 / 3], np.float32)[target], rtol=1e-6)


# --------------------------------------------------------------------------------------------- preview

def test_preview_picture_shape_and_ramp():
    target = np.zeros((6, 5), np.uint8)
    target[:, :2] = 1
    weights = np.linspace(0, 1, 30, dtype=np.float32).reshape(6, 5)
    pic = preview(weights, target)
    assert pic.shape == (6, 14, 3) and pic.dtype == np.uint8
    right = pic[:, 9:].astype(int).sum(axis=2)
    assert right[-1, -1] > right[0, 0] + 300               # high weight is bright, low is dark
    pic = preview(weights, target, np.zeros((6, 5, 3), np.uint8))
    assert pic.shape == (6, 14, 3)


# --------------------------------------------------------------------------------------- the command

def test_command_defaults_are_the_library_defaults():
    from unetcli.commands import weights as cmd

    assert (cmd._W0, cmd._SIGMA, cmd._BORDER_WIDTH) == (DEFAULT_W0, DEFAULT_SIGMA, DEFAULT_BORDER_WIDTH)


def _touching_nuclei_labels():
    lab = np.zeros((40, 50), np.uint16)
    lab[5:20, 5:20], lab[5:20, 20:35] = 3, 8   # touching along a column
    lab[25:35, 10:40] = 300
    return lab


def test_command_writes_weights_mask_and_preview(tmp_path, unet):
    lab = _touching_nuclei_labels()
    write_image(tmp_path / "lab.png", lab)
    write_image(tmp_path / "raw.png", (np.arange(2000) % 251).astype(np.uint8).reshape(40, 50))
    r = unet("weights", tmp_path / "lab.png", "-o", tmp_path / "w.tif", "--mask-out", tmp_path / "m.png",
             "--preview", tmp_path / "p.png", "--image", tmp_path / "raw.png")
    assert r.code == 0, r
    assert r.stdout == f"{tmp_path / 'w.tif'}\n"               # stdout: the path written
    w = tifffile.imread(tmp_path / "w.tif")
    target, inst = training_target(lab)
    assert w.dtype == np.float32 and w.shape == (40, 50)
    np.testing.assert_array_equal(w, weight_map(target, inst, class_weights=class_weights_for("image", target, 2)))
    mask = read_image(tmp_path / "m.png")[0, :, :, 0]
    np.testing.assert_array_equal(mask, target * 255)
    assert (mask[5:20, 19:21] == 0).all()                       # the carved border, 2 pixels
    with Image.open(tmp_path / "p.png") as pic:
        assert pic.size == (104, 40) and pic.mode == "RGB"


def test_command_options_change_the_map(tmp_path, unet):
    lab = _touching_nuclei_labels()
    write_image(tmp_path / "lab.tif", lab)
    r = unet("weights", tmp_path / "lab.tif", "-o", tmp_path / "w.tif", "--w0", "4", "--sigma", "2",
             "--border-width", "3", "--balance", "none")
    assert r.code == 0, r
    target, inst = training_target(lab, border_width=3)
    expected = weight_map(target, inst, w0=4, sigma=2)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "w.tif"), expected)


def test_command_isbi_convention_and_foreground(isbi_dir, tmp_path, unet):
    src = isbi_dir / "train" / "labels" / "00.png"
    r = unet("weights", src, "-o", tmp_path / "a.tif", "--mask-out", tmp_path / "m.png", "-q")
    assert r.code == 0, r
    r = unet("weights", src, "-o", tmp_path / "b.tif", "--foreground", "255", "-q")
    assert r.code == 0, r
    r = unet("weights", src, "-o", tmp_path / "c.tif", "--foreground", "0", "-q")
    assert r.code == 0, r
    label = read_image(src)[0, :, :, 0]
    np.testing.assert_array_equal(read_image(tmp_path / "m.png")[0, :, :, 0], label)  # not carved
    a, b, c = (tifffile.imread(tmp_path / f"{n}.tif") for n in "abc")
    np.testing.assert_array_equal(a, b)
    assert a[label == 0].mean() > 3 * a[label == 255].mean()      # weight on the membranes
    n, n_interior = label.size, (label == 255).sum()
    np.testing.assert_allclose(a[label == 255], n / (2 * n_interior), rtol=1e-6)   # objects: w_c only
    # inverted, the membrane is the object class: it gets the object's w_c and no border term
    np.testing.assert_allclose(c[label == 0], n / (2 * (n - n_interior)), rtol=1e-6)
    assert not np.array_equal(a, c)


def test_command_stack_is_done_page_by_page(tmp_path, unet):
    rng = np.random.default_rng(2)
    stack = np.zeros((3, 30, 40), np.uint16)
    for page in stack:
        for k in range(1, 6):
            y, x = rng.integers(0, 24), rng.integers(0, 34)
            page[y:y + 7, x:x + 7] = k
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    r = unet("weights", tmp_path / "stack.tif", "-o", tmp_path / "w.tif", "--mask-out", tmp_path / "m.tif")
    assert r.code == 0, r
    w = tifffile.imread(tmp_path / "w.tif")
    assert w.shape == (3, 30, 40) and w.dtype == np.float32
    for page, out in zip(stack, w):
        t, i = training_target(page)
        np.testing.assert_array_equal(out, weight_map(t, i, class_weights=class_weights_for("image", t, 2)))
    assert tifffile.imread(tmp_path / "m.tif").shape == (3, 30, 40)


def test_command_one_input_into_a_new_folder_named_with_a_slash(tmp_path, unet):
    """`-o w/` names a folder (created) even for one input, as in predict: the slash is kept."""
    write_image(tmp_path / "a.png", np.eye(12, dtype=np.uint8))
    r = unet("weights", tmp_path / "a.png", "-o", f"{tmp_path / 'w'}/", "--mask-out", f"{tmp_path / 'm'}/")
    assert r.code == 0, r
    assert r.stdout.split() == [str(tmp_path / "w" / "a.tif")]
    assert tifffile.imread(tmp_path / "w" / "a.tif").shape == (12, 12)
    assert (tmp_path / "m" / "a.png").is_file()


def test_command_many_inputs_to_a_folder_with_dataset_balance(tmp_path, unet):
    a = np.zeros((10, 10), np.uint8)
    a[:5] = 1                                   # 50 object pixels of 100
    b = np.zeros((10, 10), np.uint8)
    b[:1, :10] = 1                              # 10 of 100
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "a.png", a)
    write_image(tmp_path / "in" / "b.png", b)
    r = unet("weights", tmp_path / "in" / "a.png", tmp_path / "in" / "b.png", "-o", tmp_path / "out",
             "--balance", "dataset", "--w0", "0")
    assert r.code == 0, r
    assert r.stdout.split() == [str(tmp_path / "out" / "a.tif"), str(tmp_path / "out" / "b.tif")]
    # pooled: 140 background, 60 object pixels of 200 -> w_c = 200 / (2 n_c)
    wa = tifffile.imread(tmp_path / "out" / "a.tif")
    np.testing.assert_allclose(wa[0, 0], 200 / 120, rtol=1e-6)
    np.testing.assert_allclose(wa[9, 9], 200 / 280, rtol=1e-6)
    r = unet("weights", tmp_path / "in", "-o", tmp_path / "out2", "--w0", "0")   # a folder as input
    assert r.code == 0, r
    wb = tifffile.imread(tmp_path / "out2" / "b.tif")
    np.testing.assert_allclose(wb[0, 0], 100 / 20, rtol=1e-6)      # image balance: 10 object pixels


def test_command_bad_inputs_give_one_line_errors(tmp_path, unet):
    frac = np.zeros((8, 8), np.float32)
    frac[2:4, 2:4] = 0.5
    tifffile.imwrite(tmp_path / "prob.tif", frac)
    r = unet("weights", tmp_path / "prob.tif", "-o", tmp_path / "w.tif")
    assert_one_line_error(r, "prob.tif", "fractions")
    assert not (tmp_path / "w.tif").exists()

    write_image(tmp_path / "lab.png", _touching_nuclei_labels())
    write_image(tmp_path / "small.png", np.zeros((20, 20), np.uint8))
    r = unet("weights", tmp_path / "lab.png", "-o", tmp_path / "w.tif", "--preview", tmp_path / "p.png",
             "--image", tmp_path / "small.png")
    assert_one_line_error(r, "lab.png", "40x50", "small.png", "20x20")
    assert not (tmp_path / "w.tif").exists() and not (tmp_path / "p.png").exists()

    r = unet("weights", tmp_path / "lab.png", "-o", tmp_path / "w.tif", "--classes", "0,3,8")
    assert_one_line_error(r, "lab.png", "300", "not in --classes")
    r = unet("weights", tmp_path / "lab.png", "-o", tmp_path / "w.tif", "--classes", "0,1", "--foreground", "1")
    assert_one_line_error(r, "exclude each other")
    r = unet("weights", tmp_path / "lab.png", "-o", tmp_path / "w.png")
    assert_one_line_error(r, "w.png", "TIFF")
    r = unet("weights", tmp_path / "lab.png", tmp_path / "small.png", "-o", tmp_path / "w.tif")
    assert_one_line_error(r, "w.tif", "output folder")
    r = unet("weights", tmp_path / "missing.png", "-o", tmp_path / "w.tif")
    assert_one_line_error(r, "missing.png", "no such file")
    r = unet("weights", tmp_path / "lab.png", "-o", tmp_path / "w.tif", "--sigma", "0")
    assert_one_line_error(r, "--sigma")
    assert not (tmp_path / "w.tif").exists()
    r = unet("weights", tmp_path / "lab.png", "-o", tmp_path / "w.tif", "--balance", "median")
    assert r.code == 2 and r.out == b""                          # a usage error


def test_command_reads_stdin_and_writes_stdout(tmp_path, unet):
    lab = _touching_nuclei_labels()
    write_image(tmp_path / "lab.png", lab)
    r = unet("weights", "-", "-o", "-", stdin=(tmp_path / "lab.png").read_bytes())
    assert r.code == 0, r
    import io

    w = tifffile.imread(io.BytesIO(r.out))
    t, i = training_target(lab)
    np.testing.assert_array_equal(w, weight_map(t, i, class_weights=class_weights_for("image", t, 2)))
