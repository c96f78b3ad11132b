"""`unet predict` end to end: inputs and outputs, output types, TTA, post-processing, errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import Result, assert_one_line_error
from unetcli.checkpoint import load_model, save_model
from unetcli.images import read_image, write_image
from unetcli.inference import predict_image
from unetcli.model import UNet, UNetConfig
from unetcli import postprocess

AS_CLI = {"backend": "auto", "precision": "auto"}   # the library call that matches the command's defaults
GREY = UNetConfig(base=4, depth=3, dropout=0.0)            # 572 is one of its tile sizes
RGB3 = UNetConfig(in_channels=3, num_classes=3, base=4, depth=2, dropout=0.0)


def _save(path: Path, config: UNetConfig, seed: int = 0, mean=127.0, std=60.0) -> Path:
    torch.manual_seed(seed)
    net = UNet(config)
    with torch.no_grad():
        for m in net.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0, 0.1)
    c = config.in_channels
    save_model(path, net.state_dict(), config, normalization={"mean": [mean] * c, "std": [std] * c},
               class_names=[f"class{i}" for i in range(config.num_classes)])
    return path


@pytest.fixture
def models(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    grey = _save(folder / "grey.unet", GREY)
    rgb = _save(folder / "rgb.unet", RGB3, seed=1)
    return {"grey": grey, "rgb": rgb, "folder": folder}


@pytest.fixture
def run(capfdbinary, monkeypatch, tmp_path):
    """The command line in this process (torch is imported once): returns Result(code, out, err)."""
    from unetcli.cli import run as cli_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UNET_MODELS", str(tmp_path / "no-user-models"))
    monkeypatch.setenv("NO_COLOR", "1")

    def go(*args: str) -> Result:
        code = cli_run([str(a) for a in args])
        out, err = capfdbinary.readouterr()
        return Result(code, out, err)

    return go


def _grey_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((h, w)) * 255).astype(np.uint8)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".part" in p.name)


# --------------------------------------------------------------------------------- the basic command


def _class_pages(path) -> np.ndarray:
    """A probabilities file (an ImageJ hyperstack, read as slices x (H, W, classes)) as the pages of
    the flat layout: (slices x classes, H, W, 1), slice-major."""
    probs = read_image(path)
    n, h, w, k = probs.shape
    return np.ascontiguousarray(np.moveaxis(probs, -1, 1)).reshape(n * k, h, w, 1)

def test_exact_command_with_the_default_model(tmp_path, models, unet):
    """`unet predict in.tif -o mask.tif --tile 572`, as written, with em-membranes found by name."""
    users = tmp_path / "users"
    users.mkdir()
    _save(users / "em-membranes.unet", GREY)
    write_image(tmp_path / "in.tif", _grey_image(300, 257))
    result = unet("predict", "in.tif", "-o", "mask.tif", "--tile", "572", cwd=tmp_path,
                  env={"UNET_MODELS": str(users)})
    assert result.code == 0, result
    assert result.out == b"mask.tif\n"             # the path written, as data on stdout
    mask = read_image(tmp_path / "mask.tif")
    assert mask.shape == (1, 300, 257, 1) and mask.dtype == np.uint8
    probs = predict_image(load_model(users / "em-membranes.unet"), read_image(tmp_path / "in.tif")[0],
                          device="cpu", **AS_CLI)
    assert np.array_equal(mask[0, ..., 0], np.argmax(probs, 0))
    assert 0 < mask.mean() < 1                      # both classes occur


def test_no_model_given_and_none_shipped(run, tmp_path, monkeypatch):
    from unetcli import checkpoint

    (tmp_path / "shipped").mkdir()
    monkeypatch.setattr(checkpoint, "shipped_dir", lambda: tmp_path / "shipped")   # as if none shipped
    write_image(tmp_path / "in.tif", _grey_image(20, 20))
    result = run("predict", "in.tif", "-o", "mask.tif")
    assert_one_line_error(result, "no model given")
    assert not (tmp_path / "mask.tif").exists()


def test_list_models(run, tmp_path, monkeypatch, models):
    (models["folder"] / "grey.md").write_text("# grey\n\nA tiny random network for tests.\n")
    monkeypatch.setenv("UNET_MODELS", str(models["folder"]))
    result = run("predict", "--list-models")
    assert result.code == 0
    lines = result.stdout.splitlines()
    assert "grey\tA tiny random network for tests." in lines
    assert any(line.split("\t")[0] == "rgb" for line in lines)


# ------------------------------------------------------------------------------------ inputs & outputs

def test_rgb_input_to_rgb_model(run, tmp_path, models, nuclei_dir):
    src = sorted((nuclei_dir / "images").glob("*.png"))[0]
    result = run("predict", src, "-o", "mask.png", "-m", models["rgb"])
    assert result.code == 0, result
    image = read_image(src)
    mask = read_image(tmp_path / "mask.png")
    assert mask.shape == image.shape[:3] + (1,) and mask.max() <= 2
    probs = predict_image(load_model(models["rgb"]), image[0], device="cpu", **AS_CLI)
    assert np.array_equal(mask[0, ..., 0], np.argmax(probs, 0))


def test_stack_in_stack_out(run, tmp_path, models):
    stack = np.stack([_grey_image(64, 50, seed=s) for s in range(3)])
    write_image(tmp_path / "stack.tif", stack, "ZYX")
    result = run("predict", "stack.tif", "-o", "masks.tif", "-m", models["grey"], "--batch", "2")
    assert result.code == 0, result
    masks = read_image(tmp_path / "masks.tif")
    assert masks.shape == (3, 64, 50, 1)
    mf = load_model(models["grey"])
    for n in range(3):
        probs = predict_image(mf, stack[n][..., None], device="cpu", **AS_CLI)
        assert np.array_equal(masks[n, ..., 0], np.argmax(probs, 0))
    probs_run = run("predict", "stack.tif", "-o", "probs.tif", "-m", models["grey"], "--output-type", "probs")
    assert probs_run.code == 0
    probs = _class_pages(tmp_path / "probs.tif")
    assert probs.shape == (6, 64, 50, 1) and probs.dtype == np.float32   # slice-major: slice, class
    assert np.allclose(probs[0] + probs[1], 1, atol=1e-5)


def test_large_tiff_is_read_strip_by_strip(run, tmp_path, models, monkeypatch):
    import tifffile

    from unetcli import pipeline

    stack = np.stack([_grey_image(150, 70, seed=s) for s in range(2)])
    tifffile.imwrite(tmp_path / "big.tif", stack, rowsperstrip=16, compression="zlib", metadata=None)
    assert run("predict", "big.tif", "-o", "whole.tif", "-m", models["grey"]).code == 0
    monkeypatch.setattr(pipeline, "STREAM_TIFF_BYTES", 0)          # as if it were huge
    assert run("predict", "big.tif", "-o", "rows.tif", "-m", models["grey"]).code == 0
    assert run("predict", "big.tif", "-o", "rows-p.tif", "-m", models["grey"], "--output-type", "probs").code == 0
    whole = read_image(tmp_path / "whole.tif")
    assert whole.shape == (2, 150, 70, 1)
    assert np.array_equal(read_image(tmp_path / "rows.tif"), whole)
    assert np.array_equal(np.argmax(_class_pages(tmp_path / "rows-p.tif")[..., 0].reshape(2, 2, 150, 70), 1),
                          whole[..., 0])


def test_stdin_to_stdout(unet, tmp_path, models, isbi_dir):
    src = isbi_dir / "train" / "images" / "00.png"
    result = unet("predict", "-", "-o", "-", "--format", "png", "-m", models["grey"], "-q",
                  stdin=src.read_bytes(), cwd=tmp_path)
    assert result.code == 0, result
    assert result.out[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "out.png").write_bytes(result.out)
    mask = read_image(tmp_path / "out.png")
    probs = predict_image(load_model(models["grey"]), read_image(src)[0], device="cpu", **AS_CLI)
    assert np.array_equal(mask[0, ..., 0], np.argmax(probs, 0))


def test_many_inputs_to_a_folder_and_skip_existing(run, tmp_path, models):
    for name in ("a", "b", "c"):
        write_image(tmp_path / f"{name}.png", _grey_image(40 + ord(name) % 7, 33))
    result = run("predict", "a.png", "b.png", "-o", "out", "-m", models["grey"])
    assert result.code == 0, result
    assert result.stdout.splitlines() == [str(Path("out") / "a.tif"), str(Path("out") / "b.tif")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.tif", "b.tif"]
    before = (tmp_path / "out" / "a.tif").stat().st_mtime_ns
    again = run("predict", "a.png", "b.png", "c.png", "-o", "out/", "-m", models["grey"], "--skip-existing")
    assert again.code == 0
    assert (tmp_path / "out" / "a.tif").stat().st_mtime_ns == before
    assert (tmp_path / "out" / "c.tif").is_file()


def test_folder_input_skips_hidden_files(run, tmp_path, models):
    (tmp_path / "imgs").mkdir()
    write_image(tmp_path / "imgs" / "b.png", _grey_image(30, 30, seed=1))
    write_image(tmp_path / "imgs" / "a.png", _grey_image(30, 30, seed=2))
    write_image(tmp_path / "imgs" / "._a.png", _grey_image(30, 30, seed=3))    # a macOS resource fork
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    result = run("predict", "imgs", "-o", "out", "-m", models["grey"])
    assert result.code == 0, result
    assert result.stdout.splitlines() == [str(Path("out") / "a.tif"), str(Path("out") / "b.tif")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.tif", "b.tif"]


# ---------------------------------------------------------------------------------------- output types

def test_each_output_type(run, tmp_path, models):
    write_image(tmp_path / "in.png", _grey_image(90, 77, seed=4))
    m = models["grey"]
    assert run("predict", "in.png", "-o", "probs.tif", "-m", m, "--output-type", "probs").code == 0
    assert run("predict", "in.png", "-o", "mask.png", "-m", m, "--output-type", "mask").code == 0
    assert run("predict", "in.png", "-o", "labels.tif", "-m", m, "--output-type", "labels").code == 0
    probs = _class_pages(tmp_path / "probs.tif")[..., 0]
    mask = read_image(tmp_path / "mask.png")[0, ..., 0]
    labels = read_image(tmp_path / "labels.tif")[0, ..., 0]
    assert probs.shape == (2, 90, 77) and probs.dtype == np.float32
    assert np.allclose(probs.sum(0), 1, atol=1e-5)
    assert mask.dtype == np.uint8 and np.array_equal(mask, np.argmax(probs, 0))
    assert labels.dtype == np.uint16
    assert np.array_equal(labels, postprocess.label_instances(mask)) and labels.max() > 1


def test_threshold(run, tmp_path, models):
    write_image(tmp_path / "in.png", _grey_image(60, 60, seed=5))
    assert run("predict", "in.png", "-o", "probs.tif", "-m", models["grey"], "--output-type", "probs").code == 0
    assert run("predict", "in.png", "-o", "t.tif", "-m", models["grey"], "--threshold", "0.3").code == 0
    p1 = _class_pages(tmp_path / "probs.tif")[1, ..., 0]
    mask = read_image(tmp_path / "t.tif")[0, ..., 0]
    assert np.array_equal(mask, (p1 > 0.3).astype(np.uint8))
    assert (mask != (p1 > 0.5)).any()               # the threshold did matter
    result = run("predict", "in.png", "-o", "x.tif", "-m", models["rgb"], "--threshold", "0.3")
    assert_one_line_error(result, "two-class")


def test_postprocessing_options(run, tmp_path, models):
    write_image(tmp_path / "in.png", _grey_image(120, 100, seed=6))
    m = models["grey"]
    assert run("predict", "in.png", "-o", "raw.tif", "-m", m).code == 0
    assert run("predict", "in.png", "-o", "small.tif", "-m", m, "--min-size", "20").code == 0
    assert run("predict", "in.png", "-o", "one.tif", "-m", m, "--largest-component").code == 0
    assert run("predict", "in.png", "-o", "fill.tif", "-m", m, "--fill-holes", "--output-type", "labels").code == 0
    raw = read_image(tmp_path / "raw.tif")[0, ..., 0]
    assert np.array_equal(read_image(tmp_path / "small.tif")[0, ..., 0], postprocess.remove_small(raw, 20))
    one = read_image(tmp_path / "one.tif")[0, ..., 0]
    assert np.array_equal(one, postprocess.largest_component(raw))
    assert postprocess.label_instances(one).max() <= 1 < postprocess.label_instances(raw).max()
    fill = read_image(tmp_path / "fill.tif")[0, ..., 0]
    assert np.array_equal(fill, postprocess.label_instances(postprocess.fill_holes(raw)))


def test_tta_option(run, tmp_path, models):
    image = _grey_image(50, 41, seed=7)
    write_image(tmp_path / "in.png", image)
    result = run("predict", "in.png", "-o", "p.tif", "-m", models["grey"], "--output-type", "probs", "--tta")
    assert result.code == 0, result
    got = _class_pages(tmp_path / "p.tif")[..., 0]
    ref = predict_image(load_model(models["grey"]), image[..., None], device="cpu", tta=True, **AS_CLI)
    assert np.abs(got - ref).max() <= 1e-5


def test_same_padding_model_and_options(run, tmp_path):
    config = UNetConfig(base=4, depth=2, dropout=0.0, padding="same")
    model = _save(tmp_path / "same.unet", config)
    write_image(tmp_path / "in.png", _grey_image(70, 45, seed=8))
    for blend in ("gaussian", "mean"):
        result = run("predict", "in.png", "-o", f"{blend}.tif", "-m", model, "--tile", "32", "--overlap", "0.5",
                     "--blend", blend, "--output-type", "probs")
        assert result.code == 0, result
    g = _class_pages(tmp_path / "gaussian.tif")
    m = _class_pages(tmp_path / "mean.tif")
    assert g.shape == (2, 70, 45, 1) and np.abs(g - m).max() > 1e-4


# ---------------------------------------------------------------------------------------------- errors

def test_error_wrong_channel_count(run, tmp_path, models):
    # five channels have no rule that maps them onto a grey model (RGB does: luminance)
    write_image(tmp_path / "five.tif", np.zeros((20, 20, 5), np.uint8), "YXC")
    result = run("predict", "five.tif", "-o", "mask.tif", "-m", models["grey"])
    assert_one_line_error(result, "five.tif", "5 channels")
    assert not (tmp_path / "mask.tif").exists() and not _leftovers(tmp_path)


def test_error_empty_file(run, tmp_path, models):
    (tmp_path / "empty.tif").write_bytes(b"")
    result = run("predict", "empty.tif", "-o", "mask.tif", "-m", models["grey"])
    assert_one_line_error(result, "empty.tif", "empty file")
    assert not (tmp_path / "mask.tif").exists()


def test_error_inconsistent_stack(run, tmp_path, models):
    import tifffile

    with tifffile.TiffWriter(tmp_path / "bad.tif") as tw:
        tw.write(np.zeros((20, 30), np.uint8), metadata=None)
        tw.write(np.zeros((20, 30), np.uint8), metadata=None)
        tw.write(np.zeros((25, 30), np.uint8), metadata=None)
    result = run("predict", "bad.tif", "-o", "mask.tif", "-m", models["grey"])
    assert_one_line_error(result, "bad.tif", "inconsistent pages")
    assert not (tmp_path / "mask.tif").exists() and not _leftovers(tmp_path)


def test_error_output_folder_cannot_be_written(run, tmp_path, models):
    write_image(tmp_path / "in.png", _grey_image(20, 20))
    (tmp_path / "afile").write_text("not a folder")
    result = run("predict", "in.png", "in.png", "-o", "afile", "-m", models["grey"])
    assert_one_line_error(result, "afile", "not an output folder")
    result = run("predict", "in.png", "-o", "afile/sub/mask.tif", "-m", models["grey"])
    assert_one_line_error(result, "does not exist")
    result = run("predict", "in.png", "-o", "nowhere/mask.tif", "-m", models["grey"])
    assert_one_line_error(result, "nowhere", "does not exist")


def test_error_output_would_overwrite_input(run, tmp_path, models):
    write_image(tmp_path / "in.tif", _grey_image(20, 20))
    before = (tmp_path / "in.tif").read_bytes()
    result = run("predict", "in.tif", "-o", ".", "-m", models["grey"])
    assert_one_line_error(result, "overwrite")
    assert (tmp_path / "in.tif").read_bytes() == before


def test_error_output_equal_to_the_input_leaves_it_unchanged(run, tmp_path, models):
    write_image(tmp_path / "in.tif", _grey_image(20, 20))
    before = (tmp_path / "in.tif").read_bytes()
    assert_one_line_error(run("predict", "in.tif", "-o", "in.tif", "-m", models["grey"]), "in.tif", "overwrite")
    os.link(tmp_path / "in.tif", tmp_path / "alias.tif")                # the same file under another name
    assert_one_line_error(run("predict", "in.tif", "-o", "alias.tif", "-m", models["grey"]), "overwrite")
    (tmp_path / "imgs").mkdir()
    write_image(tmp_path / "imgs" / "a.png", _grey_image(20, 20))
    assert_one_line_error(run("predict", "imgs", "-o", "imgs", "-m", models["grey"]), "input folder")
    assert (tmp_path / "in.tif").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["a.png"]


def test_error_too_many_threads(run, tmp_path, models):
    write_image(tmp_path / "in.png", _grey_image(20, 20))
    assert_one_line_error(run("predict", "in.png", "-o", "m.tif", "-m", models["grey"], "--threads", "100000"),
                          "--threads 100000", "threads per core")
    assert_one_line_error(run("predict", "in.png", "-o", "m.tif", "-m", models["grey"], "--threads", "0"),
                          "--threads 0")
    assert not (tmp_path / "m.tif").exists()


@pytest.mark.parametrize("output_type, name", [("mask", "m.tif"), ("mask", "m.png"), ("probs", "p.tif"),
                                               ("labels", "l.tif")])
def test_error_non_finite_probabilities_are_not_written(run, tmp_path, models, monkeypatch, output_type, name):
    from unetcli import inference

    monkeypatch.setattr(inference, "lean_forward", lambda net, x: net(x) * float("nan"))
    write_image(tmp_path / "in.png", _grey_image(20, 20))
    result = run("predict", "in.png", "-o", name, "-m", models["grey"], "--output-type", output_type,
                 "--backend", "torch")                  # the torch forward is what the test breaks
    assert_one_line_error(result, name, "infinite or NaN")
    assert not (tmp_path / name).exists() and not _leftovers(tmp_path)


def test_error_bad_tile_and_options(run, tmp_path, models):
    write_image(tmp_path / "in.png", _grey_image(20, 20))
    assert_one_line_error(run("predict", "in.png", "-o", "m.tif", "-m", models["grey"], "--tile", "573"),
                          "tile size 573")
    assert_one_line_error(run("predict", "in.png", "-o", "m.tif", "-m", models["grey"], "--output-type", "x"),
                          "output type")
    assert_one_line_error(run("predict", "in.png", "-o", "p.png", "-m", models["grey"], "--output-type", "probs"),
                          "TIFF")
    assert_one_line_error(run("predict", "in.png", "-o", "m.tif", "-m", models["grey"], "--precision", "fp64"),
                          "precision")
    assert_one_line_error(run("predict", "in.png", "-o", "m.tif", "-m", models["grey"], "--memory-budget", "1K"),
                          "memory budget")
    assert not _leftovers(tmp_path) and not (tmp_path / "m.tif").exists()


def test_error_missing_input_writes_nothing(run, tmp_path, models):
    result = run("predict", "missing.png", "-o", "m.tif", "-m", models["grey"])
    assert_one_line_error(result, "missing.png")
    assert not (tmp_path / "m.tif").exists()


# ------------------------------------------------------------------------------------------ provenance

def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_provenance_sidecar_has_every_field(run, tmp_path, models):
    import json

    from unetcli import __version__

    write_image(tmp_path / "a.png", _grey_image(61, 47, seed=3))
    write_image(tmp_path / "b.tif", np.stack([_grey_image(30, 20, seed=s) for s in (4, 5)]), "ZYX")
    result = run("predict", "a.png", "b.tif", "-o", "out", "-m", models["grey"], "--provenance",
                 "--output-type", "labels", "--min-size", "3", "--tile", "100")
    assert result.code == 0, result
    for stem, src in (("a", "a.png"), ("b", "b.tif")):
        out = tmp_path / "out" / f"{stem}.tif"
        rec = json.loads((tmp_path / "out" / f"{stem}.tif.json").read_text())
        assert set(rec) >= {"input", "output", "model", "parameters", "environment", "command", "created",
                            "seconds"}
        assert rec["input"]["path"] == str(tmp_path / src) and rec["input"]["sha256"] == _sha(tmp_path / src)
        assert rec["input"]["bytes"] == (tmp_path / src).stat().st_size
        assert rec["output"]["path"] == str(out) and rec["output"]["sha256"] == _sha(out)
        assert rec["output"]["type"] == "labels"
        assert rec["model"]["name"] == "grey" and rec["model"]["sha256"] == _sha(models["grey"])
        assert rec["model"]["config"]["base"] == GREY.base
        params = rec["parameters"]
        for key in ("output_type", "threshold", "min_size", "fill_holes", "largest_component", "tta", "tile",
                    "batch", "memory_budget", "overlap", "blend", "device", "precision", "threads", "format",
                    "tile_used", "device_used", "batch_used", "threads_used"):
            assert key in params, key
        assert params["min_size"] == 3 and params["tile"] == "100" and params["tile_used"] == [100, 100]
        assert params["device_used"] == "cpu"
        assert rec["environment"]["unet"] == __version__ and rec["environment"]["torch"] == torch.__version__
        assert "--provenance" in rec["command"]
    assert json.loads((tmp_path / "out" / "b.tif.json").read_text())["input"]["shape"] == [2, 30, 20, 1]


def test_provenance_streamed_mask_and_stdin(unet, tmp_path, models):
    import json

    write_image(tmp_path / "in.png", _grey_image(40, 40, seed=6))
    raw = (tmp_path / "in.png").read_bytes()
    result = unet("predict", "-", "-o", "m.tif", "-m", str(models["grey"]), "--provenance", cwd=tmp_path,
                  stdin=raw)
    assert result.code == 0, result
    rec = json.loads((tmp_path / "m.tif.json").read_text())
    assert rec["input"]["path"] == "<stdin>" and rec["input"]["sha256"] == _sha(tmp_path / "in.png")
    assert rec["output"]["sha256"] == _sha(tmp_path / "m.tif")


def test_provenance_refuses_stdout(run, tmp_path, models):
    write_image(tmp_path / "in.png", _grey_image(20, 20))
    result = run("predict", "in.png", "-o", "-", "-m", models["grey"], "--provenance")
    assert_one_line_error(result, "stdout is not a file")


def test_any_tile_fits_a_same_padding_model(run, tmp_path):
    """`unet predict in.tif -o mask.tif --tile 572` works with every model: a same-padding network
    rounds the tile to its multiple (said on -v); a valid-padding one still refuses a misfit."""
    same = _save(tmp_path / "same.unet", UNetConfig(base=4, depth=2, dropout=0.0, padding="same"))
    write_image(tmp_path / "in.tif", _grey_image(70, 45, seed=9))
    r = run("predict", "in.tif", "-o", "a.tif", "-m", same, "--tile", "30", "-v")
    assert r.code == 0, r
    assert "rounded to 32x32" in r.stderr
    assert run("predict", "in.tif", "-o", "b.tif", "-m", same, "--tile", "32").code == 0
    assert np.array_equal(read_image(tmp_path / "a.tif"), read_image(tmp_path / "b.tif"))
    valid = _save(tmp_path / "valid.unet", UNetConfig(base=4, depth=2, dropout=0.0))
    assert_one_line_error(run("predict", "in.tif", "-o", "c.tif", "-m", valid, "--tile", "30"), "tile size 30")


def test_output_is_a_file_for_one_input_and_a_folder_only_when_named_so(run, tmp_path, models):
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name, _grey_image(30, 30, seed=1))
    r = run("predict", "a.png", "b.png", "-o", "single.tif", "-m", models["grey"])
    assert_one_line_error(r, "one file", "single.tif")
    assert not (tmp_path / "single.tif").exists()
    r = run("predict", "a.png", "-o", "out.d/", "-m", models["grey"])     # a trailing slash: a folder
    assert r.code == 0, r
    assert (tmp_path / "out.d" / "a.tif").is_file()
    r = run("predict", "a.png", "b.png", "-o", "masks", "-m", models["grey"])   # no extension: a folder
    assert r.code == 0 and sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["a.tif", "b.tif"], r
    r = run("predict", "a.png", "-o", "one.tif", "-m", models["grey"], "-v")
    assert r.code == 0 and (tmp_path / "one.tif").is_file()
    assert "1 tile," in r.stderr and "1 tiles" not in r.stderr


def test_preview_draws_the_result_over_the_input(run, tmp_path, models):
    write_image(tmp_path / "in.png", _grey_image(60, 50, seed=2))
    r = run("predict", "in.png", "-o", "labels.tif", "--output-type", "labels", "--preview", "over.png",
            "-m", models["grey"])
    assert r.code == 0, r
    assert r.stdout.split() == ["labels.tif", "over.png"]
    over = read_image(tmp_path / "over.png")[0]
    labels = read_image(tmp_path / "labels.tif")[0, ..., 0]
    assert over.shape == (60, 50, 3) and over.dtype == np.uint8
    red = (over[..., 0] == 255) & (over[..., 1] == 40) & (over[..., 2] == 0)
    edges = np.zeros(labels.shape, bool)
    edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edges[:-1] |= labels[:-1] != labels[1:]
    assert edges.any() and np.array_equal(red, edges)
    r = run("predict", "in.png", "-o", "m.tif", "--preview", "in.png", "-m", models["grey"])
    assert r.code != 0 and read_image(tmp_path / "in.png").shape == (1, 60, 50, 1)   # never over an input


def test_a_small_file_declaring_a_huge_image_is_refused_before_decoding(run, tmp_path, models):
    """A 300-byte JPEG that declares 65000x65000 pixels: refused from its header, in one line, with no
    output and no temporary file (issue 16)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = (65000).to_bytes(2, "big") + (65000).to_bytes(2, "big")
    (tmp_path / "bomb.jpg").write_bytes(bytes(data))
    for kind in ("probs", "labels"):
        r = run("predict", "bomb.jpg", "-o", "out.tif", "-m", models["grey"], "--output-type", kind)
        assert_one_line_error(r, "bomb.jpg", "65000x65000")
        assert not (tmp_path / "out.tif").exists() and not _leftovers(tmp_path)
