"""Model files: safetensors round trip, refusal of code-carrying pickles, damaged, foreign, future and
hostile files (refused from the header alone), format 1 files still read, lookup by name."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
import struct
import sys

import numpy as np
import pytest
import torch

from conftest import join_safetensors, split_safetensors
from unetcli import checkpoint, tensorfile
from unetcli.errors import ModelFileError
from unetcli.model import UNet, UNetConfig

CFG = UNetConfig(depth=2, base=4, in_channels=3, num_classes=3)


def _save(path, half=False, **kwargs):
    torch.manual_seed(1)
    net = UNet(CFG)
    checkpoint.save_model(path, net.state_dict(), CFG, normalization={"mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0]},
                          class_names=["bg", "cell", "edge"], provenance={"data": "synthetic"}, half=half, **kwargs)
    return net


def _legacy_bytes(net: torch.nn.Module, config: UNetConfig, **records) -> bytes:
    """A format 1 file as unet 0.1 and 0.2 wrote it: magic, version, header length, JSON, raw tensors."""
    index, blobs, offset = [], [], 0
    for name, value in net.state_dict().items():
        arr = value.numpy().astype(np.float16 if value.is_floating_point() else value.numpy().dtype)
        data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        index.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape), "offset": offset,
                      "nbytes": len(data)})
        blobs.append(data)
        offset += len(data)
    payload = b"".join(blobs)
    header = {"config": config.to_dict(), "tensors": index, "payload_sha256": hashlib.sha256(payload).hexdigest(),
              **records}
    head = json.dumps(header).encode()
    return checkpoint.LEGACY_MAGIC + struct.pack("<IQ", 1, len(head)) + head + payload


def test_round_trip_restores_everything(tmp_path):
    net = _save(tmp_path / "m.unet")
    mf = checkpoint.load_model(tmp_path / "m.unet")
    assert mf.config == CFG and mf.class_names == ["bg", "cell", "edge"]
    assert mf.normalization == {"mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0]}
    assert mf.provenance["data"] == "synthetic" and "unet_version" in mf.provenance and "created" in mf.provenance
    assert mf.sha256 == hashlib.sha256((tmp_path / "m.unet").read_bytes()).hexdigest()
    loaded = mf.network()
    x = torch.randn(1, 3, 44, 44)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))


def test_model_files_are_safetensors_that_other_tools_read(tmp_path):
    import safetensors.numpy
    import safetensors.torch
    from safetensors import safe_open

    net = _save(tmp_path / "m.unet", postprocess={"min_size": 15}, inputs={"dtype": "uint8"})
    weights = safetensors.torch.load_file(tmp_path / "m.unet")
    assert weights.keys() == net.state_dict().keys()
    for key, value in net.state_dict().items():
        assert torch.equal(weights[key], value)
    assert safetensors.numpy.load_file(tmp_path / "m.unet").keys() == weights.keys()
    with safe_open(str(tmp_path / "m.unet"), framework="numpy") as f:
        meta = f.metadata()
    assert meta["format"] == "unet-model" and meta["format_version"] == str(checkpoint.FORMAT_VERSION)
    assert json.loads(meta["config"]) == CFG.to_dict()
    assert json.loads(meta["class_names"]) == ["bg", "cell", "edge"]
    assert json.loads(meta["postprocess"]) == {"min_size": 15} and json.loads(meta["inputs"]) == {"dtype": "uint8"}
    raw = (tmp_path / "m.unet").read_bytes()
    _header, data = split_safetensors(raw)
    assert meta["weights_sha256"] == hashlib.sha256(data).hexdigest()
    assert (len(raw) - len(data)) % 8 == 0          # the data starts aligned, as safetensors writes it
    mf = checkpoint.load_model(tmp_path / "m.unet")
    assert mf.postprocess == {"min_size": 15} and mf.inputs == {"dtype": "uint8"}


def test_half_precision_storage_halves_the_file(tmp_path):
    _save(tmp_path / "full.unet")
    net = _save(tmp_path / "half.unet", half=True)
    full, half = (tmp_path / "full.unet").stat().st_size, (tmp_path / "half.unet").stat().st_size
    assert half < 0.6 * full
    w = checkpoint.load_model(tmp_path / "half.unet").tensors["head.weight"]
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, net.state_dict()["head.weight"].numpy(), rtol=1e-3, atol=1e-4)


def test_command_line_is_passed_down_never_read_from_sys_argv(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/somewhere/pytest", "--secret-flag"])
    _save(tmp_path / "a.unet", command=["unet", "train", "--images", "my images/"])
    prov = checkpoint.load_model(tmp_path / "a.unet").provenance
    assert prov["command"] == "unet train --images 'my images/'"
    _save(tmp_path / "b.unet")
    assert "command" not in checkpoint.load_model(tmp_path / "b.unet").provenance


def test_state_with_optimiser_tensors_round_trips_exactly(tmp_path):
    state = {"model/w": torch.randn(4, 3), "opt/0/step": torch.tensor(7.0), "opt/0/count": torch.tensor(5),
             "opt/0/bf": torch.randn(3, dtype=torch.bfloat16), "empty": torch.zeros(0, 4)}
    checkpoint.save_model(tmp_path / "s.bin", state, CFG)
    tensors = checkpoint.load_model(tmp_path / "s.bin").tensors
    assert tensors.keys() == state.keys()
    np.testing.assert_array_equal(tensors["model/w"], state["model/w"].numpy())
    assert tensors["opt/0/step"].shape == () and tensors["opt/0/step"] == 7.0
    assert tensors["opt/0/count"].dtype == np.int64 and tensors["opt/0/count"] == 5
    np.testing.assert_array_equal(tensors["opt/0/bf"], state["opt/0/bf"].float().numpy())
    assert tensors["empty"].shape == (0, 4)


def test_training_state_round_trips_weights_and_optimiser(tmp_path):
    torch.manual_seed(0)
    net = UNet(CFG)
    opt = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.8, 0.95))
    net(torch.randn(1, 3, 44, 44)).sum().backward()
    opt.step()
    checkpoint.save_state(tmp_path / "train-state.bin", net, opt, CFG, {"mean": [0.0] * 3, "std": [1.0] * 3},
                          {"step": 1, "elapsed": 2.5})
    model, opt_state, info = checkpoint.load_state(tmp_path / "train-state.bin")
    assert info["step"] == 1 and info["elapsed"] == 2.5
    for key, value in net.state_dict().items():
        assert torch.equal(model[key], value), key
    again = torch.optim.Adam(UNet(CFG).parameters(), lr=0.5)
    again.load_state_dict(opt_state)
    assert again.param_groups[0]["betas"] == (0.8, 0.95) and again.param_groups[0]["lr"] == 0.01
    for idx, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            assert torch.equal(again.state_dict()["state"][idx][key], value), (idx, key)


def test_damaged_or_foreign_training_states_are_one_line_run_folder_errors(tmp_path):
    from unetcli.errors import RunFolderError

    _save(tmp_path / "model.unet")
    with pytest.raises(RunFolderError, match="not a unet training state"):
        checkpoint.load_state(tmp_path / "model.unet")
    # an optimiser record of the wrong type: refused by name, not an internal error
    checkpoint.save_model(tmp_path / "bad.bin", {"model/x": torch.zeros(1)}, CFG,
                          provenance={"train_state": {"format": checkpoint.STATE_FORMAT, "optimizer_state": [1],
                                                      "param_groups": []}})
    with pytest.raises(RunFolderError, match="damaged training state") as err:
        checkpoint.load_state(tmp_path / "bad.bin")
    assert "\n" not in err.value.one_line()


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
    import safetensors.numpy

    _save(tmp_path / "ok.unet")
    raw = (tmp_path / "ok.unet").read_bytes()
    header, data = split_safetensors(raw)
    cases = {"cut": (raw[: len(raw) - 100], "truncated"), "head": (raw[:30], "truncated"),
             "tiny": (raw[:5], "truncated"), "text": (b"just text", "not a unet model")}
    future = dict(header, __metadata__=dict(header["__metadata__"], format_version="3"))
    cases["future"] = (join_safetensors(future, data), "newer unet")
    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF
    cases["flip"] = (bytes(flipped), "checksum")
    for name, (content, fragment) in cases.items():
        (tmp_path / f"{name}.unet").write_bytes(content)
        with pytest.raises(ModelFileError, match=fragment) as info:
            checkpoint.load_model(tmp_path / f"{name}.unet")
        assert "\n" not in info.value.one_line()
    safetensors.numpy.save_file({"w": np.zeros((2, 2), np.float32)}, tmp_path / "other.safetensors")
    with pytest.raises(ModelFileError, match="safetensors file without unet's records"):
        checkpoint.load_model(tmp_path / "other.safetensors")


def _hostile_cases(raw: bytes) -> dict[str, tuple[bytes, str]]:
    """Headers an attacker or a broken tool could write, each with the words its refusal must carry."""
    header, data = split_safetensors(raw)
    meta = header["__metadata__"]
    first = next(k for k in header if k != "__metadata__")
    entry = header[first]

    def with_meta(**changes):
        return join_safetensors(dict(header, __metadata__=dict(meta, **changes)), data)

    def with_entry(**changes):
        return join_safetensors(dict(header, **{first: dict(entry, **changes)}), data)

    config = json.loads(meta["config"])
    deep = "[" * 5000 + "]" * 5000
    return {
        "huge length": (struct.pack("<Q", 2**63 + 5) + raw[8:], "damaged model file \\(header of"),
        "length past end": (struct.pack("<Q", len(raw)) + raw[8:], "truncated"),
        "deep JSON": (join_safetensors(dict(header, deep=json.loads("[" * 40 + "]" * 40)), data), "nested deeper"),
        "deeper JSON": (join_safetensors(json.dumps(header)[:-1].encode() + b', "x": ' + deep.encode() + b"}", data),
                        "nested too deeply"),
        "deep record": (with_meta(provenance="[" * 100 + "]" * 100), "provenance nested deeper"),
        "negative dim": (with_entry(shape=[-1] + entry["shape"][1:]), "has shape"),
        "float dim": (with_entry(shape=[1.5]), "has shape"),
        "many dims": (with_entry(shape=[1] * 20), "has shape"),
        "unknown dtype": (with_entry(dtype="F8_E4M3"), "type unet does not read"),
        "size mismatch": (with_entry(dtype="F64"), "needs"),
        "offset past end": (with_entry(data_offsets=[len(data) * 4, len(data) * 4 + 100]), "damaged"),
        "huge tensor": (with_entry(shape=[2**40, 2**20], data_offsets=[0, 2**62]), "damaged"),
        "gap": (join_safetensors(dict(header, **{first: dict(entry, data_offsets=[o + 8 for o in entry["data_offsets"]])}), data),
                "damaged"),
        "not a tensor": (join_safetensors(dict(header, extra={"dtype": "F32"}), data), "not a tensor entry"),
        "metadata not strings": (with_meta(config=config), "strings"),
        "duplicate keys": (join_safetensors(json.dumps(header)[:-1].encode() + b', "__metadata__": {}}', data), "duplicate key"),
        "NaN": (with_meta(normalization='{"mean": [NaN, 0, 0], "std": [1, 1, 1]}'), "not a JSON number"),
        "bad UTF-8": (join_safetensors(json.dumps(header).encode()[:-1] + b', "\xff": 1}', data), "not valid JSON"),
        "depth as text": (with_meta(config=json.dumps(dict(config, depth="4"))), "config depth"),
        "channels as bool": (with_meta(config=json.dumps(dict(config, in_channels=True))), "config in_channels"),
        "depth out of range": (with_meta(config=json.dumps(dict(config, depth=99))), "config: depth"),
        "unknown setting": (with_meta(config=json.dumps(dict(config, attention=True))), "unknown network"),
        "class names": (with_meta(class_names='["a"]'), "class names"),
        "bad version": (with_meta(format_version="two"), "format version"),
        "no checksum": (with_meta(weights_sha256="0"), "checksum"),
        "normalisation": (with_meta(normalization='{"mean": [0, 0, 0], "std": [0, 1, 1]}'), "normalisation"),
        "provenance list": (with_meta(provenance="[]"), "provenance is not a record"),
    }


def test_hostile_headers_are_refused_in_one_line_before_any_tensor_is_read(tmp_path, monkeypatch):
    _save(tmp_path / "ok.unet")
    raw = (tmp_path / "ok.unet").read_bytes()

    def never(*args, **kwargs):
        raise AssertionError("read tensors or hashed weights of a file whose header is refused")

    monkeypatch.setattr(tensorfile, "read_tensors", never)
    monkeypatch.setattr(tensorfile, "digests", never)
    for name, (content, fragment) in _hostile_cases(raw).items():
        path = tmp_path / f"{name.replace(' ', '-')}.unet"
        path.write_bytes(content)
        with pytest.raises(ModelFileError, match=fragment) as info:
            checkpoint.load_model(path)
        line = info.value.one_line()
        assert "\n" not in line and len(line) < 400, (name, line)
        assert str(path) in line, (name, line)


class _CountingFile:
    """A file object that counts the bytes read through it."""

    def __init__(self, fh, counter):
        self._fh, self._counter = fh, counter

    def read(self, n=-1):
        data = self._fh.read(n)
        self._counter.append(len(data))
        return data

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def test_loading_reads_only_the_header_before_refusing(tmp_path, monkeypatch):
    """A file with 4 MB of weights and a bad config: refused after reading the header and no more."""
    cfg = UNetConfig(depth=2, base=64, in_channels=1, num_classes=2)
    checkpoint.save_model(tmp_path / "big.unet", UNet(cfg).state_dict(), cfg)
    raw = (tmp_path / "big.unet").read_bytes()
    header, data = split_safetensors(raw)
    assert len(data) > 4 * 10**6
    meta = dict(header["__metadata__"], config=json.dumps(dict(cfg.to_dict(), base=-3)))
    hostile = join_safetensors(dict(header, __metadata__=meta), data)
    (tmp_path / "hostile.unet").write_bytes(hostile)
    counts: list[int] = []
    real_open = open
    monkeypatch.setattr(checkpoint, "open", lambda p, mode="r": _CountingFile(real_open(p, mode), counts),
                        raising=False)
    with pytest.raises(ModelFileError, match="base"):
        checkpoint.load_model(tmp_path / "hostile.unet")
    header_bytes = len(hostile) - len(data)
    assert header_bytes <= sum(counts) <= header_bytes + 32     # the prefix is read twice
    counts.clear()
    checkpoint.load_model(tmp_path / "big.unet")
    assert sum(counts) >= len(raw)          # a good file: hashed in full


def test_config_far_larger_than_the_weights_allocates_nothing(tmp_path):
    _save(tmp_path / "ok.unet")
    header, data = split_safetensors((tmp_path / "ok.unet").read_bytes())
    meta = dict(header["__metadata__"], config=json.dumps(dict(CFG.to_dict(), base=10**6)))
    (tmp_path / "wide.unet").write_bytes(join_safetensors(dict(header, __metadata__=meta), data))
    mf = checkpoint.load_model(tmp_path / "wide.unet")      # a valid config: a wide network
    with pytest.raises(ModelFileError, match="shape"):
        mf.network()                                         # ~10^13 weights: checked on 'meta' first


def test_format_1_files_still_load(tmp_path):
    torch.manual_seed(2)
    cfg = UNetConfig(depth=2, base=4, in_channels=1, num_classes=2)
    net = UNet(cfg)
    raw = _legacy_bytes(net, cfg, normalization={"mean": [126.0], "std": [44.0]},
                        class_names=["background", "foreground"], provenance={"command": "unet train x"})
    (tmp_path / "old.unet").write_bytes(raw)
    mf = checkpoint.load_model(tmp_path / "old.unet")
    assert mf.config == cfg and mf.normalization == {"mean": [126.0], "std": [44.0]}
    assert mf.provenance["command"] == "unet train x" and mf.postprocess == {} and mf.inputs == {}
    for key, value in net.state_dict().items():
        np.testing.assert_allclose(mf.tensors[key], value.numpy(), rtol=1e-3, atol=1e-3)
        assert mf.tensors[key].dtype == np.float32
    future = bytearray(raw)
    struct.pack_into("<I", future, len(checkpoint.LEGACY_MAGIC), 2)
    cases = {"cut": (raw[:-50], "truncated"), "future": (bytes(future), "newer"),
             "flip": (raw[:-3] + bytes([raw[-3] ^ 1]) + raw[-2:], "checksum"),
             "short": (raw[:15], "truncated")}
    for name, (content, fragment) in cases.items():
        (tmp_path / f"{name}.unet").write_bytes(content)
        with pytest.raises(ModelFileError, match=fragment):
            checkpoint.load_model(tmp_path / f"{name}.unet")


def test_models_are_found_by_name_in_the_user_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("UNET_MODELS", str(tmp_path))
    _save(tmp_path / "mine.unet")
    (tmp_path / "mine.md").write_text("# mine\n\nA tiny test model for three classes.\n")
    assert checkpoint.resolve_model("mine") == tmp_path / "mine.unet"
    assert ("mine", tmp_path / "mine.unet", "A tiny test model for three classes.") in checkpoint.list_models()
    with pytest.raises(ModelFileError, match="no such model"):
        checkpoint.resolve_model("nonexistent-model")


def test_a_data_folder_named_like_a_model_does_not_hide_it(tmp_path, monkeypatch):
    """`-m nuclei` beside a folder `nuclei/` of images: the name still finds the model, while a folder
    that holds a model wins, and a path-like name stays a path."""
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("UNET_MODELS", str(models))
    _save(models / "mine.unet")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine" / "labels").mkdir(parents=True)
    assert checkpoint.resolve_model("mine") == models / "mine.unet"
    with pytest.raises(ModelFileError, match="holds no best.unet"):
        checkpoint.resolve_model("./mine")
    _save(tmp_path / "mine" / "best.unet")
    assert checkpoint.resolve_model("mine") == Path("mine") / "best.unet"


def test_model_folder_resolves_to_best(tmp_path):
    _save(tmp_path / "best.unet")
    assert checkpoint.resolve_model(tmp_path) == tmp_path / "best.unet"
