"""Model files: one self-describing file per model, loaded without executing any code.

A ``.unet`` file is::

    b"UNETMODEL\\n"           10 bytes, the magic
    format version           uint32, little endian
    header length            uint64, little endian
    header                   UTF-8 JSON: config, normalisation, class names, provenance, tensor index
    tensor data              raw little-endian arrays, at the offsets the index gives

Nothing in it is pickled: loading parses JSON and copies bytes into tensors, so a file from a stranger
cannot run code. Truncation, a foreign format and a newer format version are each reported in one line.
Shipped models live in ``pretrained/`` (installed as ``unetcli.pretrained``); the user's own models can
live in ``<user data dir>/unet/models`` (platformdirs); both are found by name.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unetcli import __version__
from unetcli.errors import ConfigError, ModelFileError

MAGIC = b"UNETMODEL\n"
FORMAT_VERSION = 1
SUFFIX = ".unet"
_PREFIX = struct.Struct("<IQ")
_MAX_HEADER = 64 * 2**20
_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": None, "int64": np.int64,
           "float64": np.float64, "int32": np.int32, "uint8": np.uint8}


@dataclass
class ModelFile:
    """A loaded model file: weights as numpy arrays plus everything needed to use them."""

    config: "object"                      # UNetConfig (imported lazily: torch)
    tensors: dict[str, np.ndarray]
    normalization: dict = field(default_factory=lambda: {"mean": [0.0], "std": [1.0]})
    class_names: list[str] = field(default_factory=lambda: ["background", "foreground"])
    provenance: dict = field(default_factory=dict)
    postprocess: dict = field(default_factory=dict)   # tuned decoding of instances (instances.DecodeParams)
    inputs: dict = field(default_factory=dict)        # what the model expects: dtype, pixel_size, channels
    path: Path | None = None
    sha256: str | None = None

    @property
    def name(self) -> str:
        return self.path.name.removesuffix(SUFFIX) if self.path else "<memory>"

    def network(self, device: str = "cpu"):
        """A UNet in eval mode holding these weights, in float32, on ``device``."""
        import torch

        from unetcli.model import UNet

        net = UNet(self.config)
        expected = net.state_dict()
        missing = sorted(set(expected) - set(self.tensors))
        extra = sorted(set(self.tensors) - set(expected))
        if missing or extra:
            what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
            raise ModelFileError(f"{self.path or 'model'}: weights do not match its config ({what})")
        state = {}
        for key, ref in expected.items():
            arr = self.tensors[key]
            if tuple(arr.shape) != tuple(ref.shape):
                raise ModelFileError(f"{self.path or 'model'}: tensor {key} has shape {arr.shape}, "
                                     f"its config needs {tuple(ref.shape)}")
            state[key] = torch.from_numpy(np.ascontiguousarray(arr)).to(ref.dtype)
        net.load_state_dict(state)
        return net.to(device).eval()


# ---------------------------------------------------------------------------------------------- save

def save_model(path: str | os.PathLike, state: dict, config, *, normalization: dict | None = None,
               class_names: list[str] | None = None, provenance: dict | None = None,
               postprocess: dict | None = None, inputs: dict | None = None,
               half: bool = False) -> Path:
    """Write a model file atomically. ``state`` maps names to torch tensors or numpy arrays.

    ``half`` stores floating-point weights as float16 (half the size); they load back as float32.
    """
    from unetcli.images import write_bytes_atomic

    index, blobs, offset = [], [], 0
    for name, value in state.items():
        arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float16 if half else np.float32)
        dtype = arr.dtype.name
        if dtype not in _DTYPES:
            raise ConfigError(f"cannot store tensor {name} of type {dtype}")
        data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        index.append({"name": name, "dtype": dtype, "shape": list(arr.shape), "offset": offset,
                      "nbytes": len(data)})
        blobs.append(data)
        offset += len(data)
    payload = b"".join(blobs)
    prov = {"unet_version": __version__, "created": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    prov.update(provenance or {})
    n_ch = config.in_channels
    header = {
        "config": config.to_dict(),
        "normalization": normalization or {"mean": [0.0] * n_ch, "std": [1.0] * n_ch},
        "class_names": class_names or [f"class{i}" for i in range(config.num_classes)],
        "provenance": prov,
        "postprocess": postprocess or {},
        "inputs": inputs or {},
        "tensors": index,
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    head = json.dumps(header, sort_keys=True).encode("utf-8")
    write_bytes_atomic(path, MAGIC + _PREFIX.pack(FORMAT_VERSION, len(head)) + head + payload)
    return Path(path)


# ---------------------------------------------------------------------------------------------- load

def _describe_foreign(head: bytes) -> str:
    if head[:2] == b"PK":
        return "a zip archive (a PyTorch .pt/.pth checkpoint?)"
    if head[:1] == b"\x80":
        return "a Python pickle (a PyTorch checkpoint?)"
    if head[:8] == b"\x89HDF\r\n\x1a\n":
        return "an HDF5 file (a Keras model?)"
    return "not a unet model file"


def load_model(name_or_path: str | os.PathLike) -> ModelFile:
    """Load a model by path or by name (shipped or in the user's model folder). Runs no code."""
    from unetcli.model import UNetConfig

    path = resolve_model(name_or_path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read ({exc.strerror})") from exc
    if raw[:len(MAGIC)] != MAGIC:
        kind = _describe_foreign(raw[:16])
        hint = ("unet never unpickles model files, since unpickling can run code; "
                "convert it with a trusted tool or train with `unet train`")
        raise ModelFileError(f"{path}: {kind}, not a unet model file", hint=hint)
    start = len(MAGIC) + _PREFIX.size
    if len(raw) < start:
        raise ModelFileError(f"{path}: truncated model file (header cut short)")
    version, head_len = _PREFIX.unpack_from(raw, len(MAGIC))
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{path}: written by a newer unet (model format {version}; this version "
                             f"reads up to {FORMAT_VERSION})", hint="upgrade unet: pip install -U unet")
    if version < 1 or head_len > _MAX_HEADER:
        raise ModelFileError(f"{path}: damaged model file (bad header)")
    if len(raw) < start + head_len:
        raise ModelFileError(f"{path}: truncated model file (header cut short)")
    try:
        header = json.loads(raw[start:start + head_len].decode("utf-8"))
        config = UNetConfig.from_dict(header["config"])
        index = header["tensors"]
        payload = memoryview(raw)[start + head_len:]
        size = sum(int(t["nbytes"]) for t in index)
    except (ValueError, KeyError, TypeError, ConfigError) as exc:
        raise ModelFileError(f"{path}: damaged model file header ({exc})") from exc
    if len(payload) < size:
        raise ModelFileError(f"{path}: truncated model file ({len(payload)} of {size} bytes of weights)",
                             hint="download or copy the file again")
    if hashlib.sha256(payload[:size]).hexdigest() != header.get("payload_sha256"):
        raise ModelFileError(f"{path}: damaged model file (weights do not match their checksum)")
    tensors = {}
    for t in index:
        dtype = _DTYPES.get(t.get("dtype"))
        shape = tuple(int(s) for s in t["shape"])
        off, nbytes = int(t["offset"]), int(t["nbytes"])
        if dtype is None or off < 0 or off + nbytes > size or \
                np.prod(shape, dtype=np.int64) * np.dtype(dtype).itemsize != nbytes:
            raise ModelFileError(f"{path}: damaged model file (tensor {t.get('name')!r})")
        arr = np.frombuffer(payload[off:off + nbytes], dtype=np.dtype(dtype).newbyteorder("<"))
        arr = arr.reshape(shape).astype(np.float32 if arr.dtype.kind == "f" else arr.dtype.newbyteorder("="))
        tensors[t["name"]] = arr
    from unetcli import normalize

    norm = normalize.check(header.get("normalization"), config.in_channels, str(path))
    extras = {}
    for key in ("postprocess", "inputs"):
        value = header.get(key) or {}
        if not isinstance(value, dict):
            raise ModelFileError(f"{path}: damaged model file ({key} is not a record)")
        extras[key] = value
    return ModelFile(config=config, tensors=tensors, normalization=norm,
                     class_names=list(header.get("class_names") or []),
                     provenance=dict(header.get("provenance") or {}), path=path,
                     sha256=hashlib.sha256(raw).hexdigest(), **extras)


# ------------------------------------------------------------------------------------- finding models

def shipped_dir() -> Path:
    """The folder of the shipped models: installed package data, or ``pretrained/`` in a checkout."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("unetcli.pretrained")
        if spec is not None and spec.submodule_search_locations:
            return Path(list(spec.submodule_search_locations)[0])
    except (ImportError, ValueError):
        pass
    return Path(__file__).resolve().parent.parent / "pretrained"


def user_dir() -> Path:
    """``<user data dir>/models``: where a user keeps models to call by name."""
    from platformdirs import user_data_dir

    return Path(os.environ.get("UNET_MODELS") or Path(user_data_dir("unet")) / "models")


def model_dirs() -> list[Path]:
    return [user_dir(), shipped_dir()]


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A model's file: an existing path as given, else ``NAME.unet`` in the user's or shipped folder."""
    text = str(name_or_path)
    p = Path(text)
    if p.is_file():
        return p
    if p.is_dir():
        for candidate in (p / "best.unet", p / "last.unet"):
            if candidate.is_file():
                return candidate
        raise ModelFileError(f"{text}: folder holds no best.unet or last.unet")
    looks_like_path = os.sep in text or text.endswith(SUFFIX)
    if not looks_like_path:
        for folder in model_dirs():
            candidate = folder / f"{text}{SUFFIX}"
            if candidate.is_file():
                return candidate
    names = ", ".join(m[0] for m in list_models()) or "none installed"
    raise ModelFileError(f"{text}: no such model file or model name", hint=f"known models: {names}")


def card_summary(model_path: Path) -> str:
    """The one-line summary of a model: the first paragraph line of its card (``NAME.md``)."""
    card = model_path.with_suffix(".md")
    if card.is_file():
        for line in card.read_text(encoding="utf-8").splitlines():
            s = line.strip()
            if s and not s.startswith(("#", "|", "<", "!", "-")):
                return s
    return ""


def list_models() -> list[tuple[str, Path, str]]:
    """(name, path, summary) of every model findable by name; user models shadow shipped ones."""
    seen: dict[str, tuple[str, Path, str]] = {}
    for folder in reversed(model_dirs()):
        if folder.is_dir():
            for f in sorted(folder.glob(f"*{SUFFIX}")):
                name = f.name.removesuffix(SUFFIX)
                seen[name] = (name, f, card_summary(f))
    return sorted(seen.values())
