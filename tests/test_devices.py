"""Device, precision, threads and memory budget: one rule each, for training and prediction."""

from __future__ import annotations

import pytest
import torch

from unetcli import devices
from unetcli.devices import autocast_dtype, resolve_device, resolve_precision
from unetcli.errors import ConfigError

CPU = torch.device("cpu")


def test_devices_and_precisions():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ConfigError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            resolve_device("cuda:0")
    assert autocast_dtype(CPU, "fp32") is None
    with pytest.raises(ConfigError):
        autocast_dtype(CPU, "fp64")


@pytest.mark.skipif(torch.cuda.is_available() or devices._has_mps(), reason="a GPU is present")
def test_auto_is_the_cpu_without_a_gpu():
    assert resolve_device("auto") == CPU
    assert resolve_device("auto", local_rank=3) == CPU
    assert resolve_device(None) == CPU
    assert resolve_device(" CPU ") == CPU


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x", "nonsense:0", ""])
def test_bad_device_names_are_refused_in_one_line(name):
    if name == "":
        assert resolve_device(name).type in ("cpu", "cuda", "mps")     # empty means auto
        return
    with pytest.raises(ConfigError) as err:
        resolve_device(name)
    text = str(err.value)
    assert "--device" in text and "\n" not in text


def test_fp16_is_refused_on_the_cpu_even_where_onednn_has_it():
    with pytest.raises(ConfigError, match="fp16") as err:
        resolve_precision("fp16", CPU)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="fp16"):
        autocast_dtype(CPU, "fp16")


def test_bf16_is_allowed_on_the_cpu():
    assert resolve_precision("bf16", CPU) == "bf16"
    assert autocast_dtype(CPU, "bf16") is torch.bfloat16


def test_auto_precision_and_unknown_names():
    # auto: bf16 where this CPU computes it in hardware (tests/test_backends.py fakes both kinds)
    assert resolve_precision("auto", CPU) == ("bf16" if devices.cpu_native_bf16() else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32"
    for bad in ("fp64", "fp8", "half"):
        with pytest.raises(ConfigError, match="precision"):
            resolve_precision(bad, CPU)
    with pytest.raises(ConfigError):
        autocast_dtype(CPU, "auto")          # the predictor takes a resolved precision only


def test_threads_rule(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert devices.auto_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "zero")
    assert devices.auto_threads() == devices.cpu_cores() >= 1
    assert devices.threads_for_work(1e3) == 1                       # too little work to share
    assert devices.threads_for_work(1e12, auto=5) == 5
    assert devices.threads_for_work(1e3, given=7) == 7               # what the user gave wins


def test_cpu_memory_budget_is_capped():
    budget = devices.default_memory_budget(CPU)
    assert 0 < budget <= 512 * 2**20
