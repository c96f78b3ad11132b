"""Who runs the network on a batch of tiles: PyTorch itself, or OpenVINO on a CPU.

The overlap-tile engine of :mod:`unetcli.inference` cuts, normalises, blends and stitches the tiles
whatever runs them; a backend only turns one batch of normalised tiles (B, C, H, W) into logits.

- ``torch``: any device, fp32, bf16 (autocast) or fp16 on GPUs.
- ``openvino``: CPUs, fp32 or bf16 (OpenVINO's inference precision). The network is converted from
  the torch module once, for any batch and tile size (a few seconds), and kept, as OpenVINO's own
  model files, in the user cache folder (``UNET_CACHE``, default platformdirs' ``user_cache_dir("unet")``;
  at most 16 networks, the oldest removed first); each tile shape is then compiled for this CPU (a
  fraction of a second, itself cached by OpenVINO in the network's entry, at most 24 shapes). On this project's benchmark CPU (AMX) it runs
  the shipped EM model in bf16 about 6x faster than torch in fp32 and 1.7x faster than torch in bf16,
  and loses far less when other jobs share the cores (``benchmarks/README.md``). It is
  an optional dependency: the ``fast`` extra (``pip install '.[fast]'``), or ``pip install openvino``.
- ``auto``: OpenVINO on a CPU when it is installed, else torch.

A library module: it never prints, and refuses with a one-line :class:`~unetcli.errors.ConfigError`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

from unetcli.errors import ConfigError

BACKENDS = ("auto", "torch", "openvino")
_SHAPES_KEPT = 4   # compiled networks kept per runner (one per tile shape; a run rarely has more than 2)
_CACHED_NETWORKS = 16   # converted networks kept on disk
_COMPILED_KEPT = 24     # compiled tile shapes kept on disk per network (about 30 MB each for em-membranes)


def cache_folder() -> Path:
    """Where converted networks are kept: ``UNET_CACHE`` or the user cache folder."""
    if os.environ.get("UNET_CACHE"):
        return Path(os.environ["UNET_CACHE"])
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("unet"))


def network_key(net, version: str) -> str:
    """A digest of the network's weights, its structure and the runtime's version."""
    digest = hashlib.sha256(f"{version}|{net.config}".encode())
    for name, tensor in net.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


@functools.lru_cache(maxsize=1)
def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_backend(name: str, device) -> str:
    """``auto``, ``torch`` or ``openvino`` checked for ``device`` (a torch device); ``auto`` resolved."""
    name = (name or "auto").strip().lower()
    if name not in BACKENDS:
        raise ConfigError(f"--backend {name!r}: unknown backend", hint="use auto, torch or openvino")
    if name == "auto":
        return "openvino" if device.type == "cpu" and openvino_installed() else "torch"
    if name == "openvino":
        if device.type != "cpu":
            raise ConfigError(f"--backend openvino runs on the CPU, not on {device}",
                              hint="use --device cpu, or --backend torch on a GPU")
        if not openvino_installed():
            raise ConfigError("--backend openvino: OpenVINO is not installed",
                              hint="pip install openvino (the fast extra: pip install '.[fast]'), or use --backend torch")
    return name


def import_openvino():
    """OpenVINO, with its usage telemetry kept off. Its converter would otherwise post usage events
    (openvino_telemetry sends unless the user opted out) from a helper process: unet works offline and
    reports nothing. Hiding the telemetry package makes OpenVINO use its own do-nothing stand-in."""
    import sys

    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None    # an import of it now raises ImportError
    import openvino

    return openvino


def _keep_newest(folder: Path, count: int) -> None:
    """Remove all but the ``count`` most recently used files of ``folder``. OpenVINO reads a compiled
    shape again without writing it, so its last use is the access time where the file system keeps one
    (Linux's default ``relatime`` updates it at least daily), else the time it was written."""
    def used(p: Path) -> float:
        st = p.stat()
        return max(st.st_atime, st.st_mtime)

    try:
        files = sorted((p for p in folder.iterdir() if p.is_file()), key=used)
    except OSError:
        return
    for old in files[:-count] if count else files:
        with contextlib.suppress(OSError):
            old.unlink()


class OpenVINORunner:
    """The torch network ``net`` compiled by OpenVINO for the CPU, in ``precision`` (fp32 or bf16)."""

    def __init__(self, net, precision: str = "fp32"):
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"--backend openvino computes in fp32 or bf16, not {precision}",
                              hint="use --precision bf16 or fp32, or --backend torch")
        openvino = import_openvino()
        self._ov = openvino
        self.net, self.precision = net, precision
        self.core = openvino.Core()
        self._compiled: OrderedDict = OrderedDict()
        self._model = None
        self._folder: Path | None = None   # this network's cache entry, once converted
        # unet 0.6 kept every compiled shape of every network in one folder that was never pruned
        shutil.rmtree(cache_folder() / "openvino" / ".compiled", ignore_errors=True)

    def _compile(self, shape: tuple[int, ...], threads: int | None):
        key = (shape, threads)
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        model = self._converted(shape).clone()
        model.reshape(list(shape))              # static shapes compile to the fastest kernels
        config = {"INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
                  "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
            if threads < (os.cpu_count() or 1):
                # OpenVINO pins its threads to the first cores: several processes given fewer threads
                # than the cores (xargs -P, Dask workers) were all pinned to the same core, each running
                # at half speed (measured: two 1-thread processes, 1.21 s a tile each instead of 0.67 s)
                config["ENABLE_CPU_PINNING"] = False
        blobs = self._folder / "compiled" if self._folder is not None else None
        if blobs is not None:   # OpenVINO's own cache of compiled shapes, kept with the network (and removed with it)
            config["CACHE_DIR"] = str(blobs)
        compiled = self.core.compile_model(model, "CPU", config)
        if blobs is not None:
            _keep_newest(blobs, _COMPILED_KEPT)
        self._compiled[key] = compiled
        while len(self._compiled) > _SHAPES_KEPT:
            self._compiled.popitem(last=False)
        return compiled

    def _converted(self, shape: tuple[int, ...]):
        """The network as an OpenVINO model with any batch, height and width (``shape`` is an example
        input): kept in memory, else read from the cache, else converted now and stored there (in a
        folder renamed into place whole, so no reader sees half a model)."""
        if self._model is not None:
            return self._model
        import torch

        root = cache_folder() / "openvino"
        folder = root / network_key(self.net, self._ov.__version__)
        if (folder / "net.xml").is_file():
            try:
                os.utime(folder)
                self._folder = folder
                self._model = self.core.read_model(str(folder / "net.xml"))
                return self._model
            except Exception:   # a damaged cache entry: convert again
                shutil.rmtree(folder, ignore_errors=True)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")    # the tracer's deprecation notes are not the user's business
            model = self._ov.convert_model(self.net.float().eval(), example_input=torch.zeros(shape),
                                           input=[self._ov.PartialShape([-1, shape[1], -1, -1])])
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
            try:
                self._ov.save_model(model, str(tmp / "net.xml"), compress_to_fp16=False)
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            entries = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                             key=lambda p: p.stat().st_mtime)
            for old in entries[:-_CACHED_NETWORKS]:
                shutil.rmtree(old, ignore_errors=True)
            self._folder = folder
        except OSError:
            pass   # no cache (read-only home, full disk): this run still has its model
        self._model = model
        return model

    def __call__(self, batch: np.ndarray, threads: int | None = None) -> np.ndarray:
        """Logits (B, K, oh, ow) float32 of a normalised batch (B, C, H, W) float32."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        compiled = self._compile(tuple(int(s) for s in batch.shape), threads)
        return np.asarray(compiled(batch)[0], dtype=np.float32)
