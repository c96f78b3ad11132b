"""Model files: round trip, refusal of code-carrying pickles, damaged and future files, lookup by name."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from unetcli import checkpoint
from unetcli.errors import ModelFileError
from unetcli.model import UNet, UNetConfig

CFG = UNetConfig(depth=2, base=4, in_channels=3, num_classes=3)


def _save(path, half=False):
    torch.manual_seed(1)
    net = UNet(CFG)
    checkpoint.save_model(path, net.state_dict(), CFG, normalization={"mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0]},
                          class_names=["bg", "cell", "edge"], provenance={"data": "synthetic"}, half=half)
    return net


def test_round_trip_restores_everything(tmp_path):
    net = _save(tmp_path / "m.unet")
    mf = checkpoint.load_model(tmp_path / "m.unet")
    assert mf.config == CFG and mf.class_names == ["bg", "cell", "edge"]
    assert mf.normalization == {"mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0]}
    assert mf.provenance["data"] == "synthetic" and "unet_version" in mf.provenance and "created" in mf.provenance
    loaded = mf.network()
    x = torch.randn(1, 3, 44, 44)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))


def test_half_precision_storage_halves_the_file(tmp_path):
    _save(tmp_path / "full.unet")
    net = _save(tmp_path / "half.unet", half=True)
    full, half = (tmp_path / "full.unet").stat().st_size, (tmp_path / "half.unet").stat().st_size
    assert half < 0.6 * full
    w = checkpoint.load_model(tmp_path / "half.unet").tensors["head.weight"]
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, net.state_dict()["head.weight"].numpy(), rtol=1e-3, atol=1e-4)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "model.unet"
    path.write_bytes(pickle.dumps({"state_dict": evil}))
    with pytest.raises(ModelFileError, match="pickle"):
        checkpoint.load_model(path)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "model.pt")
    with pytest.raises(ModelFileError, match="zip|PyTorch"):
        checkpoint.load_model(tmp_path / "model.pt")
    assert not marker.exists()


def test_truncated_foreign_and_future_files_give_one_line(tmp_path):
    _save(tmp_path / "ok.unet")
    raw = (tmp_path / "ok.unet").read_bytes()
    (tmp_path / "cut.unet").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ModelFileError, match="truncated"):
        checkpoint.load_model(tmp_path / "cut.unet")
    (tmp_path / "head.unet").write_bytes(raw[:30])
    with pytest.raises(ModelFileError, match="truncated"):
        checkpoint.load_model(tmp_path / "head.unet")
    future = bytearray(raw)
    struct.pack_into("<I", future, len(checkpoint.MAGIC), checkpoint.FORMAT_VERSION + 1)
    (tmp_path / "future.unet").write_bytes(bytes(future))
    with pytest.raises(ModelFileError, match="newer"):
        checkpoint.load_model(tmp_path / "future.unet")
    (tmp_path / "text.unet").write_text("just text")
    with pytest.raises(ModelFileError, match="not a unet model"):
        checkpoint.load_model(tmp_path / "text.unet")
    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF
    (tmp_path / "flip.unet").write_bytes(bytes(flipped))
    with pytest.raises(ModelFileError, match="checksum"):
        checkpoint.load_model(tmp_path / "flip.unet")


def test_models_are_found_by_name_in_the_user_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("UNET_MODELS", str(tmp_path))
    _save(tmp_path / "mine.unet")
    (tmp_path / "mine.md").write_text("# mine\n\nA tiny test model for three classes.\n")
    assert checkpoint.resolve_model("mine") == tmp_path / "mine.unet"
    assert ("mine", tmp_path / "mine.unet", "A tiny test model for three classes.") in checkpoint.list_models()
    with pytest.raises(ModelFileError, match="no such model"):
        checkpoint.resolve_model("nonexistent-model")


def test_model_folder_resolves_to_best(tmp_path):
    _save(tmp_path / "best.unet")
    assert checkpoint.resolve_model(tmp_path) == tmp_path / "best.unet"
