"""`unet augment` end to end: files, names, seeds, preview, stacks and one-line errors."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from conftest import assert_one_line_error
from unetcli.images import read_image, write_image


@pytest.fixture
def triple(tmp_path):
    """A small grey image with instance labels and a float weight map, written to files."""
    rng = np.random.default_rng(0)
    image = (rng.random((60, 70)) * 200 + 20).astype(np.uint8)
    labels = np.zeros((60, 70), np.uint16)
    labels[5:25, 5:30], labels[30:55, 20:60], labels[10:28, 40:66] = 3, 7, 12
    weights = (1.0 + (labels > 0) * 0.5).astype(np.float32)
    paths = tmp_path / "img.png", tmp_path / "lab.png", tmp_path / "w.tif"
    for path, data in zip(paths, (image, labels, weights)):
        write_image(path, data)
    return paths, (image, labels, weights)


def test_writes_n_triples_with_predictable_names(unet, triple, tmp_path):
    (img, lab, w), (image, labels, weights) = triple
    out = tmp_path / "out"
    r = unet("augment", img, "--labels", lab, "--weights", w, "-n", "3", "-o", out, "--seed", "0")
    assert r.code == 0, r
    names = [f"img_{k:03d}{suffix}" for k in range(3) for suffix in (".png", "_labels.png", "_weights.tif")]
    assert r.stdout.splitlines() == [str(out / n) for n in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for k in range(3):
        a = read_image(out / f"img_{k:03d}.png")
        b = read_image(out / f"img_{k:03d}_labels.png")
        c = read_image(out / f"img_{k:03d}_weights.tif")
        assert a.shape == (1, 60, 70, 1) and a.dtype == np.uint8
        assert b.shape == (1, 60, 70, 1) and b.dtype == np.uint16
        assert c.dtype == np.float32 and 1.0 - 1e-6 <= c.min() and c.max() <= 1.5 + 1e-6
        assert set(np.unique(b).tolist()) <= {0, 3, 7, 12}
        assert not np.array_equal(a[0, :, :, 0], image)


def test_fixed_seed_gives_identical_files(unet, triple, tmp_path):
    (img, lab, w), _ = triple
    runs = []
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        r = unet("augment", img, "-l", lab, "-w", w, "-n", "2", "-o", tmp_path / name, "--seed", seed,
                 "--preview", tmp_path / f"{name}.png")
        assert r.code == 0, r
        runs.append({p.name: p.read_bytes() for p in (tmp_path / name).iterdir()}
                    | {"preview": (tmp_path / f"{name}.png").read_bytes()})
    assert runs[0] == runs[1]
    assert all(runs[0][k] != runs[2][k] for k in runs[0])


def test_switched_off_augmentation_copies_the_pixels(unet, triple, tmp_path):
    (img, lab, w), (image, labels, weights) = triple
    for switch in (["--only", "none"],
                   ["--only", "elastic,rotate,scale,shift,brightness,contrast,gamma,noise", "--sigma", "0",
                    "--rotate", "0", "--scale", "1,1", "--shift", "0", "--brightness", "0",
                    "--contrast", "1,1", "--gamma", "1,1", "--noise", "0"]):
        out = tmp_path / switch[1].split(",")[0]
        r = unet("augment", img, "-l", lab, "-w", w, "-n", "1", "-o", out, *switch)
        assert r.code == 0, r
        assert np.array_equal(read_image(out / "img_000.png")[0, :, :, 0], image)
        assert np.array_equal(read_image(out / "img_000_labels.png")[0, :, :, 0], labels)
        assert np.array_equal(read_image(out / "img_000_weights.tif")[0, :, :, 0], weights)


def test_preview_of_an_isbi_slice(unet, isbi_dir, tmp_path):
    sheet = tmp_path / "sheet.png"
    r = unet("augment", isbi_dir / "train/images/00.png", "--labels", isbi_dir / "train/labels/00.png",
             "-n", "3", "--preview", sheet, "--seed", "1", "--preview-size", "128")
    assert r.code == 0, r
    assert r.stdout == f"{sheet}\n"
    pic = read_image(sheet)[0]
    assert pic.shape == (2 * 128 + 3 * 4, 2 * 128 + 3 * 4, 3)     # original + 3 samples, 2x2
    red = (pic[..., 0] == 255) & (pic[..., 1] == 40) & (pic[..., 2] == 0)
    assert 0.02 < red[4:132, 4:132].mean() < 0.5                  # contours drawn on the original
    assert 0.02 < red[136:264, 136:264].mean() < 0.5               # and on a sample


def test_preview_to_stdout(unet, triple):
    (img, lab, _), _ = triple
    r = unet("augment", img, "-l", lab, "-n", "1", "--preview", "-", "--seed", "0")
    assert r.code == 0, r
    assert r.out[:8] == b"\x89PNG\r\n\x1a\n"


def test_pages_of_a_stack_are_augmented_each(unet, tmp_path):
    stack = np.stack([np.full((20, 24), v, np.uint16) for v in (100, 2000, 30000)])
    labels = np.stack([np.eye(20, 24, dtype=np.uint8) * v for v in (1, 2, 3)])
    write_image(tmp_path / "s.tif", stack, "ZYX")
    write_image(tmp_path / "l.tif", labels, "ZYX")
    r = unet("augment", tmp_path / "s.tif", "-l", tmp_path / "l.tif", "-n", "2", "-o", tmp_path / "o",
             "--seed", "0", "--only", "elastic,flip")
    assert r.code == 0, r
    assert len(r.stdout.splitlines()) == 12
    for page, value in enumerate((100, 2000, 30000)):
        a = read_image(tmp_path / "o" / f"s_p{page:03d}_001.tif")
        b = read_image(tmp_path / "o" / f"s_p{page:03d}_001_labels.tif")
        assert a.dtype == np.uint16 and np.all(a == value)
        assert set(np.unique(b).tolist()) <= {0, page + 1}


def test_folding_is_warned_about(unet, triple, tmp_path):
    (img, _, _), _ = triple
    r = unet("augment", img, "-n", "2", "--sigma", "40", "--only", "elastic", "-o", tmp_path / "f",
             "--seed", "0")
    assert r.code == 0, r
    assert "folds over in 2 of 2 samples" in r.stderr


def test_cli_defaults_are_the_training_defaults():
    from unetcli.commands import augment
    from unetcli.transforms import ORDER, AugmentConfig

    d = {k: p.default for k, p in inspect.signature(augment.command).parameters.items()}
    cfg = AugmentConfig()
    assert augment.STEPS == ORDER
    assert (d["grid"], d["sigma"], d["order"], d["flip"]) == (cfg.grid, cfg.sigma, cfg.order, cfg.flip)
    assert (d["rotate"], d["shift"], d["brightness"], d["noise"]) == (
        cfg.max_angle, cfg.max_shift, cfg.max_brightness, cfg.max_noise)
    for opt, field in (("scale", "scale_range"), ("contrast", "contrast_range"), ("gamma", "gamma_range")):
        assert tuple(float(v) for v in d[opt].split(",")) == getattr(cfg, field)


# ---------------------------------------------------------------------------------------- bad input

def test_labels_of_another_size_fail_in_one_line(unet, triple, tmp_path):
    (img, _, _), _ = triple
    write_image(tmp_path / "small.png", np.zeros((60, 69), np.uint8))
    r = unet("augment", img, "--labels", tmp_path / "small.png", "-o", tmp_path / "out")
    assert_one_line_error(r, "small.png", "60x69", "60x70")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, fragments", [
    (["--sigma", "-1"], ["sigma must be 0 or more", "-1 px"]),
    (["--grid", "1"], ["grid must be at least 2x2", "1x1"]),
    (["--scale", "abc"], ["--scale takes LO,HI"]),
    (["--gamma", "2,1"], ["gamma range"]),
    (["--order", "2"], ["order must be 1 (linear) or 3 (cubic)"]),
    (["--only", "twirl"], ["unknown step 'twirl'"]),
    (["-n", "0"], ["-n/--count must be at least 1"]),
    (["--preview", "sheet.jpg"], ["preview is a PNG"]),
])
def test_bad_options_fail_in_one_line(unet, triple, tmp_path, args, fragments):
    (img, lab, _), _ = triple
    r = unet("augment", img, "-l", lab, "-o", tmp_path / "out", *args)
    assert_one_line_error(r, *fragments)
    assert not (tmp_path / "out").exists()


def test_bad_inputs_fail_in_one_line(unet, triple, tmp_path):
    (img, lab, _), _ = triple
    assert_one_line_error(unet("augment", img, "-l", lab), "nothing to write")
    write_image(tmp_path / "frac.tif", np.full((60, 70), 0.5, np.float32))
    assert_one_line_error(unet("augment", img, "-l", tmp_path / "frac.tif", "-o", tmp_path / "o"),
                          "frac.tif", "fractional")
    write_image(tmp_path / "neg.tif", np.full((60, 70), -1.0, np.float32))
    assert_one_line_error(unet("augment", img, "-w", tmp_path / "neg.tif", "-o", tmp_path / "o"),
                          "neg.tif", "negative")
    assert_one_line_error(unet("augment", tmp_path / "missing.png", "-o", tmp_path / "o"),
                          "missing.png", "no such file")
    assert not (tmp_path / "o").exists()
