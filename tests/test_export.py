"""`unet export` (issue 18, part 1): a model's network as ONNX, TorchScript and a bioimage.io package.

The acceptance tests: the package of a small model trained by `unet train` passes bioimage.io's own
test (`bioimageio.core.test_model`); the ONNX file run by ONNX Runtime, and the TorchScript file, fed
the tiles of `unet predict`'s own overlap-tile code, give `unet predict`'s probabilities within 1e-4 on
whole images (valid and same padding, batches of two, non-square tiles); every size of the network's
rule works; bad requests are one-line errors that leave nothing behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, Result, random_net
from unetcli import bioimageio as bio
from unetcli import export
from unetcli.checkpoint import load_model, save_model
from unetcli.images import read_image, write_image
from unetcli.inference import load_predictor
from unetcli.model import UNetConfig

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX Runtime runs the exported ONNX files (test extra)")
pytest.importorskip("onnxscript", reason="ONNX export needs onnx and onnxscript (the export extra)")

SAME = UNetConfig(in_channels=3, num_classes=3, base=4, depth=2, padding="same", batchnorm=True, dropout=0.0)
TOLERANCE = 1e-4      # the bound between an exported file and `unet predict`


# ------------------------------------------------------------------------------------------ fixtures



def _images(folder: Path, n: int = 3, size: int = 64) -> tuple[Path, Path]:
    """Grey images of bright discs and their instance labels."""
    rng = np.random.default_rng(1)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        lab = np.zeros((size, size), np.uint16)
        for k in range(1, 5):
            cy, cx = rng.integers(8, size - 8, 2)
            lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= 40] = k
        img = np.clip(np.where(lab > 0, 180, 50) + rng.normal(0, 12, lab.shape), 0, 255).astype(np.uint8)
        write_image(folder / "images" / f"im{i}.png", img, "YX")
        write_image(folder / "labels" / f"im{i}.tif", lab, "YX")
    return folder / "images", folder / "labels"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A small valid-padding model trained by `unet train` (percentile normalisation, as new models)."""
    from unetcli.cli import run as cli_run

    root = tmp_path_factory.mktemp("trained")
    images, labels = _images(root)
    threads = torch.get_num_threads()
    try:
        code = cli_run(["train", "--images", str(images), "--labels", str(labels), "--out", str(root / "run"),
                        "--iterations", "3", "--base", "4", "--depth", "2", "--padding", "valid", "--tile", "92",
                        "--foreground", "1,2,3,4", "--weights", "none", "--val-index", "2", "--optimizer", "adam",
                        "--workers", "0", "--device", "cpu", "--seed", "0", "-q"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return root / "run" / "best.unet"


@pytest.fixture(scope="module")
def same_model(tmp_path_factory) -> Path:
    """An RGB three-class same-padding model with batch norm and the training set's mean and std
    (unet 0.1's normalisation), its running statistics moved off their defaults."""
    net = random_net(SAME, seed=3)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("same") / "rgb3.unet"
    save_model(path, net.state_dict(), SAME, normalization={"mean": [120.0, 100.0, 90.0], "std": [50.0, 40.0, 45.0]},
               class_names=["background", "interior", "border"], inputs={"dtype": "uint8"})
    return path


@pytest.fixture(scope="module")
def exported(trained, same_model, tmp_path_factory) -> dict:
    """Each model exported once as a bioimage.io package (a few seconds each); its ONNX and TorchScript
    files, which ``write_onnx`` and ``write_torchscript`` wrote as for ``--format onnx|torchscript``,
    taken out of it."""
    out = tmp_path_factory.mktemp("exported")
    files: dict = {}
    for key, model in (("valid", trained), ("same", same_model)):
        notes: list = []
        package = out / f"{key}.zip"
        files[key, "result"] = export.export_model(load_model(model), "bioimageio", package,
                                                   note=lambda level, text, notes=notes: notes.append((level, text)))
        files[key, "bioimageio"], files[key, "notes"] = package, notes
        with zipfile.ZipFile(package) as zf:
            for fmt, member in (("onnx", bio.ONNX_WEIGHTS), ("torchscript", bio.TORCHSCRIPT_WEIGHTS)):
                files[key, fmt] = out / f"{key}-{member}"
                files[key, fmt].write_bytes(zf.read(member))
    return files


def _picture(h: int, w: int, c: int, seed: int = 5) -> np.ndarray:
    """A uint8 (H, W, C) picture of smooth blobs with noise: neither flat nor saturating the network."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = np.zeros((h, w), np.float32)
    for _ in range(12):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, 12)
        img = np.maximum(img, np.clip(1.5 - np.hypot(yy - cy, xx - cx) / r, 0, 1))
    img = 40 + 160 * img + rng.normal(0, 10, (h, w))
    planes = [np.roll(img, 3 * i, axis=1) for i in range(c)]
    return np.clip(np.stack(planes, -1), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------- runners fed by the predictor

def _onnx_runner(path: Path):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x})[0]


def _torchscript_runner(path: Path):
    module = torch.jit.load(str(path))

    def go(x):
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()
    return go


RUNNERS = {"onnx": _onnx_runner, "torchscript": _torchscript_runner}


def _through_predictor(model: Path, image: np.ndarray, runner, calls: list, **options) -> np.ndarray:
    """Probabilities of ``image`` by `unet predict`'s overlap-tile code (the Predictor: its tile plan,
    mirroring, normalisation, batching, blending and assembly) with each batch of normalised tiles run
    by ``runner`` (an exported file) instead of the network."""
    predictor = load_predictor(load_model(model), device="cpu", backend="torch", **options)

    def infer(buf, threads=None):                     # (B, ty, tx, C) normalised tiles -> probabilities
        calls.append(buf.shape)
        return torch.from_numpy(np.asarray(runner(np.ascontiguousarray(buf.transpose(0, 3, 1, 2)))))

    predictor.infer = infer
    return predictor.predict(image)


# ---------------------------------------------------------------------------------- the acceptance

@pytest.mark.parametrize("key", ["valid", "same"])
def test_bioimageio_package_passes_bioimageio_cores_own_test(exported, key):
    """valid: a model trained by `unet train` (percentiles -> scale_range, the output's offset); same:
    RGB, three classes, batch norm, the training set's mean and std (-> fixed_zero_mean_unit_variance),
    a halo."""
    core = pytest.importorskip("bioimageio.core", reason="bioimageio.core tests packages (test extra)")
    summary = core.test_model(str(exported[key, "bioimageio"]))
    failed = [(d.name, [e.msg for e in d.errors]) for d in summary.details if d.status == "failed"]
    assert summary.status == "passed", failed
    passed = {d.name for d in summary.details if d.status == "passed"}
    for fmt in ("onnx", "torchscript"):     # each weights format reproduces the test tensors
        assert f"Reproduce test outputs from test inputs ({fmt})" in passed, passed
        assert any(n.startswith(f"Run {fmt} inference for inputs with batch_size: 2") for n in passed), passed


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_fed_by_the_overlap_tile_code_equals_unet_predict(run, exported, trained, tmp_path, fmt):
    """A whole 90x130 image in 8 non-square tiles, batches of two, mirrored borders: the exported file
    gives the probabilities that `unet predict --output-type probs` writes, within 1e-4."""
    image = _picture(90, 130, 1)
    write_image(tmp_path / "in.png", image[..., 0], "YX")
    r = run("predict", "in.png", "-o", "probs.tif", "--output-type", "probs", "-m", trained, "--backend", "torch",
            "--device", "cpu", "--precision", "fp32", "--tile", "64x104", "--batch", "2", "-q")
    assert r.code == 0, r
    predicted = read_image(tmp_path / "probs.tif")[0].transpose(2, 0, 1)          # (K, H, W)
    calls: list = []
    got = _through_predictor(trained, image, RUNNERS[fmt](exported["valid", fmt]), calls, tile="64x104", batch=2)
    assert got.shape == predicted.shape == (2, 90, 130)
    assert calls and all(shape[:3] == (2, 64, 104) for shape in calls[:-1]), calls   # the runner did the work
    assert np.abs(got - predicted).max() <= TOLERANCE
    assert got.std() > 0.01                                                       # not a constant picture


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_same_padding_export_fed_by_the_overlap_tile_code_equals_the_network(exported, same_model, fmt):
    """RGB, three classes, batch norm, the training set's mean and std, overlapping tiles blended with
    a Gaussian window: the exported file gives torch's probabilities within 1e-4."""
    image = _picture(100, 75, 3)
    ref = load_predictor(load_model(same_model), device="cpu", backend="torch", tile="48x64", batch=2).predict(image)
    calls: list = []
    got = _through_predictor(same_model, image, RUNNERS[fmt](exported["same", fmt]), calls, tile="48x64", batch=2)
    assert len(calls) > 2 and got.shape == ref.shape == (3, 100, 75)
    assert np.abs(got - ref).max() <= TOLERANCE
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------- the exported files

@pytest.mark.parametrize("key", ["valid", "same"])
def test_exported_files_take_every_size_of_the_rule_and_say_how_to_feed_them(exported, trained, same_model, key):
    import onnx

    mf = load_model(trained if key == "valid" else same_model)
    net = mf.network()
    rule = bio.size_rule(mf.config)
    proto = onnx.load(str(exported[key, "onnx"]))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(proto.graph.input) + list(proto.graph.output)}
    assert dims["input"] == ["batch", mf.config.in_channels, f"{rule.step}*ky + {rule.min}", f"{rule.step}*kx + {rule.min}"]
    out_side = rule.min + rule.offset
    assert dims["probabilities"] == ["batch", mf.config.num_classes, f"{rule.step}*ky + {out_side}",
                                     f"{rule.step}*kx + {out_side}"]
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["unet"])
    assert meta["normalization"] == mf.normalization and meta["model_sha256"] == mf.sha256
    assert meta["size_rule"] == {"min": rule.min, "step": rule.step, "offset": rule.offset}
    extra = {"unet.json": ""}
    torch.jit.load(str(exported[key, "torchscript"]), _extra_files=extra)
    assert json.loads(extra["unet.json"]) == meta
    rng = np.random.default_rng(0)
    for batch, ky, kx in ((1, 0, 0), (2, 3, 1), (1, 5, 2)):
        x = rng.normal(0, 1, (batch, mf.config.in_channels, rule.min + ky * rule.step,
                              rule.min + kx * rule.step)).astype(np.float32)
        with torch.no_grad():
            ref = torch.softmax(net(torch.from_numpy(x)), 1).numpy()    # the network's own forward pass
        for fmt in ("onnx", "torchscript"):
            got = RUNNERS[fmt](exported[key, fmt])(x)
            assert got.shape == ref.shape == (batch, mf.config.num_classes, x.shape[2] + rule.offset,
                                              x.shape[3] + rule.offset)
            assert np.abs(got - ref).max() <= 1e-5, (fmt, batch, ky, kx)


@pytest.mark.parametrize("config", [UNetConfig(base=2, depth=1, dropout=0.0), UNetConfig(base=2, depth=3),
                                    UNetConfig(base=2, depth=4, in_channels=2, num_classes=4),
                                    UNetConfig(base=2, depth=3, padding="same", batchnorm=True)],
                         ids=["valid-1", "valid-3", "valid-4", "same-3"])
def test_constant_crops_compute_the_networks_forward_pass(config):
    net = random_net(config)
    module = export.ProbabilityNet(net)
    rule = bio.size_rule(config)
    for k in (0, 3):
        x = torch.randn(2, config.in_channels, rule.min + k * rule.step, rule.min + (k + 1) * rule.step)
        with torch.no_grad():
            assert torch.equal(module(x), torch.softmax(net(x), 1))


def test_shipped_models_size_rules_and_crops():
    em, nuclei = load_model("em-membranes"), load_model("nuclei")
    assert bio.size_rule(em.config) == bio.SizeRule(188, 16, -184)
    assert export.crop_offsets(em.config) == [4, 16, 40, 88]
    assert bio.size_rule(nuclei.config) == bio.SizeRule(16, 16, 0)
    assert export.crop_offsets(nuclei.config) == [0, 0, 0, 0]
    assert bio.tensor_side(em.config, 512) == 508 and bio.tensor_side(em.config, 100) == 188
    assert bio.tensor_side(nuclei.config, 520) == 512 and bio.tensor_side(nuclei.config, 253) == 240


def test_a_file_that_differs_from_the_network_is_refused(tmp_path):
    config = UNetConfig(base=2, depth=2, dropout=0.0)
    a, b = export.ProbabilityNet(random_net(config, 0)), export.ProbabilityNet(random_net(config, 1))
    export.write_torchscript(a, tmp_path / "a.pt", {}, "a")
    inputs = export._check_inputs(config, None)
    assert "TorchScript reproduces" in export.check_exports(a, {"torchscript": tmp_path / "a.pt"}, inputs, "a",
                                                            lambda *_: None)[0]
    with pytest.raises(export.ConfigError, match="differs from the network"):
        export.check_exports(b, {"torchscript": tmp_path / "a.pt"}, inputs, "b", lambda *_: None)


# ----------------------------------------------------------------------------------- the package

def test_package_holds_what_the_description_names(exported, trained):
    mf = load_model(trained)
    rule = bio.size_rule(mf.config)
    with zipfile.ZipFile(exported["valid", "bioimageio"]) as zf:
        names = set(zf.namelist())
        rdf = json.loads(zf.read(bio.RDF_NAME))
        blobs = {n: zf.read(n) for n in names}
    assert names == {bio.RDF_NAME, bio.TEST_INPUT, bio.TEST_OUTPUT, bio.SAMPLE_INPUT, bio.SAMPLE_OUTPUT, bio.COVER,
                     bio.DOCUMENTATION, bio.ONNX_WEIGHTS, bio.TORCHSCRIPT_WEIGHTS}
    files = [rdf["documentation"], *rdf["covers"], rdf["weights"]["onnx"], rdf["weights"]["torchscript"]]
    for tensor in rdf["inputs"] + rdf["outputs"]:
        files += [tensor["test_tensor"], tensor["sample_tensor"]]
    for f in files:      # every file named, and named with its checksum
        assert hashlib.sha256(blobs[f["source"]]).hexdigest() == f["sha256"], f
    assert rdf["format_version"].startswith("0.5.") and rdf["type"] == "model" and rdf["license"] == "MIT"
    assert bio.UNET_PAPER in rdf["cite"]
    (inp,), (out,) = rdf["inputs"], rdf["outputs"]
    assert inp["preprocessing"] == [{"id": "scale_range", "kwargs": {"axes": ["y", "x"], "min_percentile": 1.0,
                                                                    "max_percentile": 99.8}}]
    assert inp["axes"][2]["size"] == {"min": rule.min, "step": rule.step}
    assert out["axes"][2]["size"] == {"tensor_id": "raw", "axis_id": "y", "offset": rule.offset} and rule.offset == -40
    assert out["axes"][1]["channel_names"] == mf.class_names
    x = np.load(io.BytesIO(blobs[bio.TEST_INPUT]))
    y = np.load(io.BytesIO(blobs[bio.TEST_OUTPUT]))
    assert x.shape == (1, 1, 256, 256) and y.shape == (1, 2, 216, 216)    # the synthetic picture's 256 pixels
    assert x.dtype == y.dtype == np.float32 and 0 <= x.min() and x.max() <= 255   # raw values: the package normalises
    readme = blobs[bio.DOCUMENTATION].decode()
    assert "## Validation" in readme and "unet train" in readme and mf.sha256 in readme
    assert rdf["config"]["unet"]["model_sha256"] == mf.sha256
    notes = exported["valid", "notes"]
    assert any(level == "warn" and "synthetic" in text for level, text in notes)   # no example: said so
    assert len(exported["valid", "result"].checks) == 2


def test_cover_shows_input_and_prediction_side_by_side(exported):
    import imagecodecs

    with zipfile.ZipFile(exported["valid", "bioimageio"]) as zf:
        cover = imagecodecs.png_decode(zf.read(bio.COVER))
        y = np.load(io.BytesIO(zf.read(bio.TEST_OUTPUT)))
    assert cover.shape == (216, 432, 3) and cover.dtype == np.uint8
    np.testing.assert_array_equal(cover[:, 216:, 0], np.rint(y[0, 1] * 255).astype(np.uint8))


def test_preprocessing_spells_each_normalisation_the_specs_way():
    assert bio.preprocessing({"kind": "percentile", "low": 2.0, "high": 99.0}) == [
        {"id": "scale_range", "kwargs": {"axes": ["y", "x"], "min_percentile": 2.0, "max_percentile": 99.0}}]
    assert bio.preprocessing({"kind": "zscore"}) == [{"id": "zero_mean_unit_variance", "kwargs": {"axes": ["y", "x"]}}]
    assert bio.preprocessing({"mean": [10.0, 20.0], "std": [2.0, 4.0]}) == [
        {"id": "fixed_zero_mean_unit_variance", "kwargs": {"axis": "channel", "mean": [10.0, 20.0], "std": [2.0, 4.0]}}]
    with pytest.raises(export.ConfigError, match="upper percentile above 1"):
        bio.preprocessing({"kind": "percentile", "low": 0.0, "high": 0.5})


def test_shipped_descriptions_cite_their_data_and_state_their_sizes():
    em = load_model("em-membranes")
    digests = {n: "0" * 64 for n in (bio.TEST_INPUT, bio.TEST_OUTPUT, bio.SAMPLE_INPUT, bio.SAMPLE_OUTPUT, bio.COVER,
                                     bio.DOCUMENTATION, bio.ONNX_WEIGHTS, bio.TORCHSCRIPT_WEIGHTS)}
    rdf = bio.describe(em, name="em-membranes", description="EM", digests=digests, authors=["x"], opset=18,
                       torch_version="2.13.0", records={}, timestamp="2026-01-01T00:00:00+00:00",
                       shipped="em-membranes")
    dois = [c["doi"] for c in rdf["cite"]]
    assert dois == ["10.1007/978-3-319-24574-4_28", "10.3389/fnana.2015.00142", "10.1371/journal.pbio.1000502"]
    assert rdf["inputs"][0]["axes"][3]["size"] == {"min": 188, "step": 16}
    assert rdf["outputs"][0]["axes"][3]["size"]["offset"] == -184 and "halo" not in rdf["outputs"][0]["axes"][3]
    nuclei = bio.describe(load_model("nuclei"), name="nuclei", description="n", digests=digests, authors=["x"],
                          opset=18, torch_version="2.13.0", records={}, timestamp="t", shipped="nuclei")
    assert nuclei["outputs"][0]["axes"][2]["halo"] == bio.SAME_HALO and "10.1038/s41592-019-0612-7" in str(nuclei["cite"])
    assert nuclei["inputs"][0]["axes"][2]["size"] == {"min": 48, "step": 16}    # a pixel left inside the halo
    assert nuclei["inputs"][0]["axes"][1]["channel_names"] == ["red", "green", "blue"]
    assert "electron-microscopy" in rdf["tags"] and "nuclei" in nuclei["tags"]


def test_the_example_gives_the_test_tensors(run, trained, tmp_path):
    """--example: the test input is the image's centre, the largest valid square; a small image is
    mirrored up to the smallest valid side."""
    picture = _picture(70, 100, 1)
    write_image(tmp_path / "ex.png", picture[..., 0], "YX")
    r = run("export", trained, "-o", "pkg.zip", "--example", "ex.png", "--name", "disc", "--author", "A. Person")
    assert r.code == 0, r
    assert r.stdout.strip() == "pkg.zip"
    with zipfile.ZipFile(tmp_path / "pkg.zip") as zf:
        x = np.load(io.BytesIO(zf.read(bio.TEST_INPUT)))
        rdf = json.loads(zf.read(bio.RDF_NAME))
    assert x.shape == (1, 1, 68, 68)
    np.testing.assert_array_equal(x[0, 0], picture[1:69, 16:84, 0])
    assert rdf["name"] == "U-Net disc" and rdf["authors"] == [{"name": "A. Person"}]    # 5 characters at least
    assert rdf["config"]["unet"]["example"] == "ex.png"


# ----------------------------------------------------------------------------------- the command

def test_plain_exports_write_a_checked_file_and_print_its_path(run, trained, tmp_path):
    (tmp_path / "old.pt").write_bytes(b"an older file")
    r = run("export", trained, "-o", "old.pt", "-v")
    assert r.code == 0, r
    assert r.stdout == "old.pt\n"
    assert "checked: TorchScript reproduces the network" in r.stderr
    torch.jit.load(str(tmp_path / "old.pt"))                      # replaced, like predict's outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pt"]   # no temporary left


def test_onnx_to_stdout(run, trained, exported):
    import onnx

    r = run("export", trained, "--format", "onnx", "-o", "-")
    assert r.code == 0, r
    proto = onnx.load_from_string(r.out)                 # stdout holds the file and nothing else
    packaged = onnx.load(str(exported["valid", "onnx"]))
    assert proto.graph.output[0].name == "probabilities" and proto.opset_import == packaged.opset_import
    assert [p.key for p in proto.metadata_props] == ["unet"]
    x = np.random.default_rng(0).normal(0, 1, (2, 1, 48, 52)).astype(np.float32)
    session = onnxruntime.InferenceSession(r.out, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x})[0], _onnx_runner(exported["valid", "onnx"])(x),
                               atol=1e-6)


def _one_line(r: Result, *fragments: str) -> None:
    assert r.code == 1, r
    assert r.out == b"", r
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("unet: error: "), r
    for f in fragments:
        assert f in lines[0], (f, r)


@pytest.mark.parametrize("args, fragments", [
    (["-o", "m.zip", "--format", "tiff"], ["--format 'tiff': unknown export format", "bioimageio, onnx"]),
    (["-o", "m.onnx", "--format", "bioimageio"], ["m.onnx: a .onnx name for a bioimageio export", "m.zip"]),
    (["-o", "m.bin"], ["m.bin: cannot tell the export format", "--format"]),
    ([], ["no output given"]),
    (["-o", "nowhere/m.onnx"], ["folder nowhere does not exist"]),
    (["-o", ".", "--format", "onnx"], [".: is a folder"]),
    (["-o", "m.onnx", "--example", "ex.png"], ["--example, --name and --author describe a bioimage.io package"]),
    (["-o", "m.zip", "--example", "missing.png", "--author", "A"], ["missing.png: no such file"]),
])
def test_bad_requests_are_one_line_errors(run, trained, tmp_path, args, fragments):
    _one_line(run("export", trained, *args), *fragments)
    assert not any(p.suffix in (".zip", ".onnx", ".bin", ".part") for p in tmp_path.iterdir())


def test_no_output_over_the_model_and_no_unknown_models(run, trained, tmp_path):
    model = tmp_path / "m.unet"
    model.write_bytes(trained.read_bytes())
    _one_line(run("export", "m.unet", "--format", "onnx", "-o", "m.unet"), "would overwrite the input m.unet")
    assert model.read_bytes() == trained.read_bytes()
    _one_line(run("export", "no-such-model", "-o", "x.onnx"), "no-such-model: no such model file or model name")
    _one_line(run("export", trained.parent / "train-state.bin", "-o", "x.onnx"), "a training state, not a model")


def test_missing_export_extra_is_named(run, trained, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("onnx", "onnxscript") else real(name, *a))
    _one_line(run("export", trained, "-o", "m.zip"), "needs onnx and onnxscript", "pip install 'unet[export]'")
    assert run("export", trained, "-o", "m.pt").code == 0          # TorchScript needs torch alone


def test_a_failed_export_leaves_nothing(run, trained, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise export.ConfigError("m: cannot export to ONNX (simulated)")

    monkeypatch.setattr(export, "write_onnx", fail)
    write_image(tmp_path / "ex.png", _picture(50, 50, 1)[..., 0], "YX")
    _one_line(run("export", trained, "-o", "m.zip", "--example", "ex.png", "--author", "A"), "simulated")
    assert [p.name for p in tmp_path.iterdir()] == ["ex.png"]


def test_man_page_has_every_option_and_help_needs_no_torch():
    import typer

    from unetcli.cli import app

    command = typer.main.get_command(app).commands["export"]
    page = (ROOT / "man" / "unet-export.1").read_text(encoding="utf-8").replace("\\-", "-")
    page = page.replace("\\fB", "").replace("\\fR", "")
    for param in command.params:
        for opt in list(param.opts) + list(param.secondary_opts):
            if opt.startswith("--") and opt != "--help":
                assert opt in page, opt
    assert "unet-export" in (ROOT / "man" / "unet.1").read_text(encoding="utf-8")
    code = ("import sys; from unetcli.cli import run; rc = run(['export', '--help']); "
            "sys.stderr.write('TORCH=%s' % ('torch' in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "TORCH=False" in proc.stderr and "unet export em-membranes --format bioimageio -o em.zip" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", ["em-membranes", "nuclei"])
def test_shipped_models_export_and_pass_bioimageio_test(name, tmp_path):
    core = pytest.importorskip("bioimageio.core", reason="bioimageio.core tests packages (test extra)")
    path = tmp_path / f"{name}.zip"
    export.export_model(load_model(name), "bioimageio", path)
    summary = core.test_model(str(path))
    assert summary.status == "passed", [(d.name, [e.msg for e in d.errors]) for d in summary.details]


def test_without_onnx_runtime_the_onnx_file_is_not_run_and_that_is_said(monkeypatch, tmp_path):
    module = export.ProbabilityNet(random_net(UNetConfig(base=2, depth=1, dropout=0.0)))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)          # an import of it now fails
    notes = []
    checks = export.check_exports(module, {"onnx": tmp_path / "never-opened.onnx"},
                                  export._check_inputs(module.net.config, None), "m", lambda *n: notes.append(n))
    assert checks == [] and notes == [("detail", "ONNX file not run (ONNX Runtime is not installed: "
                                                 "pip install onnxruntime)")]


def test_a_dataset_model_gets_test_tensors_in_its_training_type(same_model):
    """The training set's mean and std are in uint8 units: a 16-bit example is brought to that range,
    as `unet predict` does, since the package's preprocessing takes the values as they are."""
    mf = load_model(same_model)
    module = export.ProbabilityNet(mf.network())
    picture = _picture(30, 30, 3)
    x8, n8, y8 = export.make_test_tensors(mf, picture, module)
    x16, n16, y16 = export.make_test_tensors(mf, picture.astype(np.uint16) * 257, module)
    assert x8.shape == (1, 3, 36, 36)        # mirrored up to 36, the smallest side leaving a pixel inside the halo
    np.testing.assert_array_equal(x8[0, :, 3:33, 3:33], picture.transpose(2, 0, 1))
    np.testing.assert_allclose(x16, x8, rtol=1e-6)
    np.testing.assert_allclose(n8[0, 0], (x8[0, 0] - 120.0) / 50.0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y16, y8, atol=1e-6)
