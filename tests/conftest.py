"""Shared test helpers: the real data beside the checkout, and ways to run the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """Converted networks (the OpenVINO backend's cache) go to a folder of this test session, not to
    the user's cache; subprocesses inherit it."""
    old = os.environ.get("UNET_CACHE")
    os.environ["UNET_CACHE"] = str(tmp_path_factory.mktemp("unet-cache"))
    yield
    if old is None:
        os.environ.pop("UNET_CACHE", None)
    else:
        os.environ["UNET_CACHE"] = old


def _shared(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.is_dir():
        pytest.skip(f"real data not present: {path} (it lives in ../shared/data beside a project checkout)")
    return path


@pytest.fixture
def isbi_dir() -> Path:
    """../shared/data/isbi2012 (skips where absent)."""
    return _shared("isbi2012")


@pytest.fixture
def nuclei_dir() -> Path:
    """../shared/data/dsb2018-sample (skips where absent)."""
    return _shared("dsb2018-sample")


class Result:
    def __init__(self, code: int, out: bytes, err: bytes):
        self.code, self.out, self.err = code, out, err

    @property
    def stderr(self) -> str:
        return self.err.decode("utf-8", "replace")

    @property
    def stdout(self) -> str:
        return self.out.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"Result(code={self.code}, out={self.out[:200]!r}, err={self.err[:400]!r})"


def run_unet(*args: str, stdin: bytes | None = None, cwd: Path | None = None,
             env: dict | None = None, timeout: float = 300) -> Result:
    """Run `python -m unetcli ARGS` in a subprocess, the way a shell runs it."""
    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "120", **(env or {})}
    full_env.pop("UNET_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "unetcli", *map(str, args)], input=stdin,
                          capture_output=True, cwd=cwd, env=full_env, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def unet():
    """Callable running the command line in a subprocess; returns Result(code, out, err)."""
    return run_unet


@pytest.fixture
def run(capfdbinary, monkeypatch, tmp_path):
    """Callable running the command line in this process (faster than a subprocess: no imports paid
    again), in ``tmp_path`` with no user models; returns Result(code, out, err)."""
    import gc
    import warnings

    from unetcli.cli import run as cli_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UNET_MODELS", str(tmp_path / "no-user-models"))
    monkeypatch.setenv("NO_COLOR", "1")

    def go(*args) -> Result:
        with warnings.catch_warnings():          # sockets an earlier command's Dask client left behind
            warnings.simplefilter("ignore")      # in this process (each real command is a fresh process)
            gc.collect()
        code = cli_run([str(a) for a in args])
        out, err = capfdbinary.readouterr()
        return Result(code, out, err)

    return go


def assert_one_line_error(result: Result, *fragments: str) -> None:
    """The error convention: non-zero exit, nothing on stdout, one line on stderr naming the problem."""
    assert result.code != 0, result
    assert result.out == b"", result
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result
    assert lines[0].startswith("unet: error: "), result
    for frag in fragments:
        assert frag in lines[0], (frag, result)


def random_net(config, seed: int = 0):
    """A UNet of ``config`` in eval mode with He-initialised weights and random biases too, so that no
    class dominates and the probability maps are far from constant."""
    import torch

    from unetcli.model import UNet

    torch.manual_seed(seed)
    net = UNet(config).eval()
    with torch.no_grad():
        for m in net.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0, 0.1)
    return net


def bomb_jpeg(path: Path, side: int = 65000) -> Path:
    """A JPEG of a few hundred bytes whose header declares side x side pixels."""
    import io
    import struct

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="JPEG", quality=50)
    raw = bytearray(buf.getvalue())
    sof = raw.find(b"\xff\xc0")
    struct.pack_into(">HH", raw, sof + 5, side, side)
    path.write_bytes(bytes(raw))
    return path


def split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    """A safetensors file's bytes as (header, data)."""
    import json
    import struct

    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_safetensors(header, data: bytes) -> bytes:
    """(header as a dict, or its raw JSON bytes, data) back to a safetensors file's bytes."""
    import json
    import struct

    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data
