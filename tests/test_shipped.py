"""The models and the example shipped in pretrained/: found by name, the right shapes, stable results."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_unet
from unetcli.checkpoint import list_models, load_model, resolve_model, shipped_dir
from unetcli.images import read_image

SHIPPED = {"em-membranes": 1, "nuclei": 3}          # name -> input channels
EXAMPLES = ROOT / "pretrained" / "examples"
MAX_BYTES = 25 * 10**6


def _shipped_env(tmp_path: Path) -> dict:
    return {"UNET_MODELS": str(tmp_path / "no-user-models")}   # only the shipped folder is searched


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_loads_by_name_and_has_a_card(name, tmp_path, monkeypatch):
    monkeypatch.setenv("UNET_MODELS", str(tmp_path / "no-user-models"))
    path = resolve_model(name)
    assert path.parent.resolve() == shipped_dir().resolve()
    assert path.stat().st_size <= MAX_BYTES
    mf = load_model(name)
    assert mf.config.in_channels == SHIPPED[name] and mf.config.num_classes == 2
    card = path.with_suffix(".md").read_text(encoding="utf-8")
    for heading in ("## Data", "## Command", "## Network", "## Training", "## Scores"):
        assert heading in card, f"{name}.md lacks {heading}"
    listed = {n: summary for n, _p, summary in list_models()}
    assert listed[name], f"{name} is listed without its card's summary"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_models_are_safetensors_files_other_tools_read(name):
    """`safetensors.torch.load_file` gives the float16 weights that unet loads as float32."""
    import safetensors.torch
    import torch

    path = shipped_dir() / f"{name}.unet"
    weights = safetensors.torch.load_file(path)
    mf = load_model(path)
    assert weights.keys() == mf.tensors.keys() and len(weights) > 20
    for key, value in weights.items():
        if key.endswith("num_batches_tracked"):        # batch norm's step counter stays an integer
            assert value.dtype == torch.int64 and value.item() == mf.tensors[key]
            continue
        assert value.dtype == torch.float16
        np.testing.assert_array_equal(value.float().numpy(), mf.tensors[key])


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_predicts_the_right_shape(name, tmp_path):
    from unetcli.inference import predict_image

    mf = load_model(name)
    rng = np.random.default_rng(0)
    image = (rng.random((75, 133, SHIPPED[name])) * 255).astype(np.uint8)
    probs = predict_image(mf, image, device="cpu")
    assert probs.shape == (2, 75, 133)
    assert np.allclose(probs.sum(0), 1, atol=1e-4)


def test_shipped_example_matches_its_committed_mask(tmp_path):
    """The README's first command; a change that alters em-membranes' results shows here."""
    src = EXAMPLES / "isbi-test-00.png"
    result = run_unet("predict", src, "-o", tmp_path / "mask.png", env=_shipped_env(tmp_path))
    assert result.code == 0, result
    got = read_image(tmp_path / "mask.png")
    want = read_image(EXAMPLES / "isbi-test-00-mask.png")
    assert got.shape == want.shape == (1, 512, 512, 1)
    agreement = float(np.mean(got == want))
    assert agreement >= 0.999, f"only {agreement:.5f} of the pixels agree with the committed mask"
    assert 0.1 < float(np.mean(got == 0)) < 0.5          # membranes are a minority, but there


def test_nuclei_labels_give_one_id_per_nucleus(tmp_path, nuclei_dir):
    """`--output-type labels` with the shipped nuclei model and no other flag (its tuned decoding)
    separates the nuclei of a picture it never saw (it learnt from dsb2018-train only)."""
    from unetcli.metrics import object_scores

    name = sorted((nuclei_dir / "images").glob("*.png"))[0].name
    result = run_unet("predict", nuclei_dir / "images" / name, "-o", tmp_path / "labels.tif", "-m", "nuclei",
                      "--output-type", "labels", env=_shipped_env(tmp_path))
    assert result.code == 0, result
    labels = read_image(tmp_path / "labels.tif")[0, ..., 0]
    truth = read_image(nuclei_dir / "labels" / name)[0, ..., 0]
    n_truth = len(np.unique(truth)) - 1
    assert labels.dtype in (np.uint16, np.uint32)
    scores = object_scores(labels, truth)
    assert scores["f1"] >= 0.7, scores               # most nuclei are found whole
    assert 0.7 * n_truth <= labels.max() <= 1.3 * n_truth


def test_card_scores_are_recorded_in_the_model_files():
    """Each card states its command; the model file records the same training command."""
    for name in SHIPPED:
        mf = load_model(shipped_dir() / f"{name}.unet")
        card = (shipped_dir() / f"{name}.md").read_text(encoding="utf-8")
        assert "unet train" in card
        trained = " ".join(mf.provenance.get("command", "").split()[1:3])
        assert trained.startswith("train"), mf.provenance
        digest = hashlib.sha256((shipped_dir() / f"{name}.unet").read_bytes()).hexdigest()
        assert digest[:16] in card, f"{name}.md should name the model file's SHA-256"


def test_shipped_nuclei_model_carries_its_settings():
    """The nuclei model stores its per-image normalisation and the decoding tuned on its validation
    images, and its card states them."""
    mf = load_model(shipped_dir() / "nuclei.unet")
    assert mf.normalization == {"kind": "percentile", "low": 1.0, "high": 99.8}
    assert {"threshold", "min_size", "grow"} <= set(mf.postprocess)
    card = (shipped_dir() / "nuclei.md").read_text(encoding="utf-8")
    for key in ("threshold", "min_size", "grow"):
        assert f"{key} {mf.postprocess[key]}" in card, key
