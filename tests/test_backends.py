"""Inference backends (issue 17): every backend and precision gives the probabilities of torch fp32
on a small network, within stated tolerances, through the same overlap-tile engine; `auto` resolves
as documented; a backend that cannot run here is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_net
from unetcli import backends, devices
from unetcli.errors import ConfigError
from unetcli.inference import Predictor
from unetcli.model import UNetConfig

VALID = UNetConfig(base=8, depth=3, dropout=0.0)
SAME = UNetConfig(base=8, depth=3, dropout=0.0, padding="same", batchnorm=True)

# Largest absolute difference of a class probability from torch fp32 allowed per path. fp32 runtimes
# differ only in summation order; bf16 keeps 8 bits of mantissa, so a probability near 0.5 may move by
# up to a tenth on a random network (batch norm included) whose logits are all of one size; the
# predicted class must agree on 98% of the pixels.
TOLERANCE = {("torch", "bf16"): 0.1, ("openvino", "fp32"): 1e-4, ("openvino", "bf16"): 0.1}
needs_openvino = pytest.mark.skipif(not backends.openvino_installed(), reason="OpenVINO is not installed")


_net = random_net


def _image(h: int = 150, w: int = 130, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (h, w, 1)).astype(np.float32)


def _probs(config, backend, precision, tile=None):
    pred = Predictor(_net(config), config, device="cpu", backend=backend, precision=precision, tile=tile)
    assert pred.backend == backend
    return pred.predict(_image())


@pytest.mark.parametrize("config", [VALID, SAME], ids=["valid", "same"])
@pytest.mark.parametrize("backend, precision", [("torch", "bf16"),
                                                pytest.param("openvino", "fp32", marks=needs_openvino),
                                                pytest.param("openvino", "bf16", marks=needs_openvino)])
def test_every_backend_gives_torch_fp32_probabilities(config, backend, precision):
    ref = _probs(config, "torch", "fp32")
    got = _probs(config, backend, precision)
    assert got.shape == ref.shape and got.dtype == np.float32
    diff = np.abs(got - ref)
    assert diff.max() <= TOLERANCE[(backend, precision)], diff.max()
    assert (got.argmax(0) == ref.argmax(0)).mean() >= 0.98
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-5)


@needs_openvino
def test_openvino_keeps_the_tile_size_invariance_of_valid_networks():
    """The overlap-tile engine is the same whatever runs the network: a valid network's result does not
    depend on the tile, in fp32 (up to float32 summation order)."""
    a = _probs(VALID, "openvino", "fp32", tile=124)
    b = _probs(VALID, "openvino", "fp32", tile=188)
    assert np.abs(a - b).max() <= 1e-4


@needs_openvino
def test_openvino_networks_are_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("UNET_CACHE", str(tmp_path))
    _probs(VALID, "openvino", "fp32", tile=124)
    entries = [p for p in (tmp_path / "openvino").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "net.xml").is_file()
    calls = []
    import openvino

    real = openvino.convert_model
    monkeypatch.setattr(openvino, "convert_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    _probs(VALID, "openvino", "fp32", tile=124)      # same weights, same shape: read from the cache
    _probs(VALID, "openvino", "fp32", tile=188)     # another shape: the same converted network
    assert calls == []
    _probs(SAME, "openvino", "fp32")                # another network: converted
    assert calls == [1]
    assert len([p for p in (tmp_path / "openvino").iterdir() if not p.name.startswith(".")]) == 2


@needs_openvino
def test_compiled_tile_shapes_on_disk_are_bounded(tmp_path, monkeypatch):
    """OpenVINO's compiled shapes live in their network's cache entry, at most a fixed number of them,
    and the unbounded folder of earlier versions is removed."""
    monkeypatch.setenv("UNET_CACHE", str(tmp_path))
    legacy = tmp_path / "openvino" / ".compiled"
    legacy.mkdir(parents=True)
    (legacy / "old.blob").write_bytes(b"x" * 1000)
    monkeypatch.setattr(backends, "_COMPILED_KEPT", 2)
    for tile in (124, 140, 156, 172):
        _probs(VALID, "openvino", "fp32", tile=tile)
    assert not legacy.exists()
    (entry,) = [p for p in (tmp_path / "openvino").iterdir() if not p.name.startswith(".")]
    blobs = list((entry / "compiled").iterdir())
    assert 1 <= len(blobs) <= 2


@needs_openvino
def test_openvino_does_not_pin_a_process_given_fewer_threads_than_cores(tmp_path, monkeypatch):
    """Several 1-thread processes (xargs -P, Dask workers) must not all be pinned to the first core."""
    import os

    monkeypatch.setenv("UNET_CACHE", str(tmp_path))
    runner = backends.OpenVINORunner(_net(VALID), "fp32")
    compiled = runner._compile((1, 1, 124, 124), 1)
    if (os.cpu_count() or 1) > 1:
        assert compiled.get_property("ENABLE_CPU_PINNING") is False


def test_auto_resolves_as_documented(monkeypatch):
    cpu = torch.device("cpu")
    expected = "openvino" if backends.openvino_installed() else "torch"
    assert backends.resolve_backend("auto", cpu) == expected
    monkeypatch.setattr(backends, "openvino_installed", lambda: False)
    assert backends.resolve_backend("auto", cpu) == "torch"
    with pytest.raises(ConfigError, match="not installed"):
        backends.resolve_backend("openvino", cpu)
    with pytest.raises(ConfigError, match="unknown backend"):
        backends.resolve_backend("tensorrt", cpu)
    devices.cpu_native_bf16.cache_clear()
    assert devices.resolve_precision("auto", cpu) == ("bf16" if devices.cpu_native_bf16() else "fp32")


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open
    for flags, native in (("fpu avx512f avx512_bf16", True), ("fpu avx2 avx512f", False),
                          ("fp asimd bf16", True)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n" if "asimd" not in flags
                        else f"processor\t: 0\nFeatures\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k))
        devices.cpu_native_bf16.cache_clear()
        assert devices.cpu_native_bf16() is native
        assert devices.resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")
    monkeypatch.setattr(builtins, "open", real_open)
    devices.cpu_native_bf16.cache_clear()


@needs_openvino
def test_openvino_refuses_fp16():
    with pytest.raises(ConfigError, match="fp32 or bf16"):
        backends.OpenVINORunner(_net(VALID), "fp16")
