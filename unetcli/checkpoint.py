"""Model files: one self-describing safetensors file per model, loaded without executing any code.

A ``.unet`` file is a `safetensors <https://huggingface.co/docs/safetensors>`_ file::

    header length      uint64, little endian
    header             UTF-8 JSON: per tensor its dtype, shape and byte range; "__metadata__", strings
    tensor data        raw little-endian arrays, back to back, in the byte ranges the header gives

unet's records are strings in ``__metadata__``: ``format`` (``"unet-model"``), ``format_version``
(``"2"``), ``weights_sha256`` (SHA-256 of the tensor data, the bytes after the header), and JSON for
``config``, ``normalization``, ``class_names``, ``provenance``, ``postprocess`` and ``inputs``. Any
safetensors reader loads the weights, e.g. ``safetensors.torch.load_file("em-membranes.unet")``.

Loading reads the header alone first and checks all of it (``tensorfile.read_header``: bounded
length, strict JSON, tensor dtypes, shapes and byte ranges against the file's size; here: the marker,
the version, the config's types and ranges, the normalisation, the class names) before a single tensor
is allocated; then a streamed pass checks the weights against their checksum, and only then are the
tensors read (``safetensors.safe_open``, which maps the file). Nothing is ever unpickled, so a model
file from a stranger cannot run code. Pickles and zip ``.pt`` files, truncated files, safetensors files
of other tools, files of a newer format and hostile headers are each refused in one line.

Format 1 files (unet 0.1 and 0.2: ``b"UNETMODEL\\n"``, uint32 version, uint64 header length, a JSON
header with a tensor index, raw tensors) are still read, with the same checks; nothing writes them.

Shipped models live in ``pretrained/`` (installed as ``unetcli.pretrained``); the user's own models can
live in ``<user data dir>/unet/models`` (platformdirs); both are found by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from unetcli import provenance as prov
from unetcli import tensorfile
from unetcli.errors import ConfigError, ModelFileError
from unetcli.tensorfile import damaged, is_int, short, truncated

FORMAT = "unet-model"
FORMAT_VERSION = 2
SUFFIX = ".unet"
LEGACY_MAGIC = b"UNETMODEL\n"                  # format 1
RECORDS = ("config", "normalization", "class_names", "provenance", "postprocess", "inputs")
_LEGACY_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
                  "int32": np.int32, "uint8": np.uint8}
_PICKLE_HINT = ("unet never unpickles model files, since unpickling can run code; "
                "convert it with a trusted tool or train with `unet train`")


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
    sha256: str | None = None                         # of the whole file

    @property
    def name(self) -> str:
        return self.path.name.removesuffix(SUFFIX) if self.path else "<memory>"

    def network(self, device: str = "cpu"):
        """A UNet in eval mode holding these weights, in float32, on ``device``.

        The tensors are checked against a network built on the ``meta`` device (names and shapes, no
        memory) first, so a config that asks for far more than the file holds allocates nothing.
        """
        import torch

        from unetcli.model import UNet

        with torch.device("meta"):
            expected = UNet(self.config).state_dict()
        missing = sorted(set(expected) - set(self.tensors))
        extra = sorted(set(self.tensors) - set(expected))
        if missing or extra:
            what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
            raise ModelFileError(f"{self.path or 'model'}: damaged model file (weights do not match "
                                 f"its config: {what})")
        for key, ref in expected.items():
            if tuple(self.tensors[key].shape) != tuple(ref.shape):
                raise ModelFileError(f"{self.path or 'model'}: damaged model file (tensor {key} has "
                                     f"shape {self.tensors[key].shape}, its config needs {tuple(ref.shape)})")
        net = UNet(self.config)
        net.load_state_dict({key: torch.from_numpy(np.ascontiguousarray(self.tensors[key])).to(ref.dtype)
                             for key, ref in expected.items()})
        return net.to(device).eval()


# ---------------------------------------------------------------------------------------------- save

def _as_array(name: str, value, half: bool) -> np.ndarray:
    """A tensor or array as a contiguous little-endian array; floats as float16 or float32."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        arr = (value.float() if value.is_floating_point() else value).numpy()   # bf16 has no numpy type
    else:
        arr = np.asarray(value)
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float16 if half else np.float32)
    return tensorfile.little_endian(name, arr)


def save_model(path: str | os.PathLike, state: dict, config, *, normalization: dict | None = None,
               class_names: list[str] | None = None, provenance: dict | None = None,
               postprocess: dict | None = None, inputs: dict | None = None,
               half: bool = False, command: Sequence[str] | str | None = None) -> Path:
    """Write a model file atomically. ``state`` maps names to torch tensors or numpy arrays.

    ``half`` stores floating-point weights as float16 (half the size); they load back as float32.
    ``provenance`` gets unet's version, the time and ``command`` (the command line as ``cli.run`` got
    it; a ``"command"`` in ``provenance`` itself wins).
    """
    arrays = {name: _as_array(name, value, half) for name, value in state.items()}
    n_ch = config.in_channels
    names = list(class_names) if class_names else [f"class{i}" for i in range(config.num_classes)]
    if len(names) != config.num_classes:
        raise ConfigError(f"{len(names)} class names for a network of {config.num_classes} classes")
    stamp = prov.stamp(command)
    stamp.update(provenance or {})
    records = {"config": config.to_dict(),
               "normalization": normalization or {"mean": [0.0] * n_ch, "std": [1.0] * n_ch},
               "class_names": names, "provenance": stamp, "postprocess": postprocess or {},
               "inputs": inputs or {}}
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    metadata.update({key: json.dumps(value, sort_keys=True) for key, value in records.items()})
    tensorfile.write(path, arrays, metadata, checksum_key="weights_sha256")
    return Path(path)


# ----------------------------------------------------------------------------------------------- load

def _newer(path, version) -> ModelFileError:
    return ModelFileError(f"{path}: written by a newer unet (model format {version}; this version reads up "
                          f"to {FORMAT_VERSION})", hint="upgrade unet: pip install -U unet")


def _foreign(path, head: bytes, kind: str | None = None) -> ModelFileError:
    if kind is None:
        kind = ("a zip archive (a PyTorch .pt/.pth checkpoint?)" if head[:2] == b"PK" else
                "a Python pickle (a PyTorch checkpoint?)" if head[:1] == b"\x80" else
                "an HDF5 file (a Keras model?)" if head[:8] == b"\x89HDF\r\n\x1a\n" else
                "unknown content")
    return ModelFileError(f"{path}: not a unet model file: {kind}", hint=_PICKLE_HINT)


def _check_metadata(path, head: bytes):
    """The unet marker and format version of a safetensors file's metadata, checked."""
    def check(meta: dict) -> None:
        if meta.get("format") != FORMAT:
            raise _foreign(path, head, "a safetensors file without unet's records (weights saved by "
                                       "another tool?); unet needs the network's configuration with them")
        version = meta.get("format_version", "")
        if not (version.isascii() and version.isdigit() and len(version) <= 6):
            raise damaged(path, f"format version {short(version)}")
        if int(version) > FORMAT_VERSION:
            raise _newer(path, int(version))
        if int(version) < 2:
            raise damaged(path, f"format version {version} in a safetensors file")
    return check


def _safetensors_header(fh, head: bytes, path, size: int) -> tuple[tensorfile.Layout, dict, object]:
    if size >= 9 and head[8:9] != b"{":         # safetensors headers are JSON objects
        raise _foreign(path, head)
    layout, meta = tensorfile.read_header(fh, path, size, _check_metadata(path, head))
    records = {key: tensorfile.strict_json(meta[key], path, key) for key in RECORDS if key in meta}
    return layout, records, meta.get("weights_sha256")


def _legacy_header(fh, path, size: int) -> tuple[tensorfile.Layout, dict, object]:
    """Format 1: magic, uint32 version, uint64 header length, JSON header with a tensor index."""
    start = len(LEGACY_MAGIC) + 12
    if size < start:
        raise truncated(path, "header cut short")
    fh.seek(len(LEGACY_MAGIC))
    version, length = struct.unpack("<IQ", fh.read(12))
    if version > 1:
        raise _newer(path, version)
    if version < 1 or length > tensorfile.MAX_HEADER:
        raise damaged(path, "bad header")
    if start + length > size:
        raise truncated(path, "header cut short")
    header = tensorfile.strict_json(fh.read(length), path, "header")
    index = header.get("tensors") if isinstance(header, dict) else None
    if not isinstance(index, list) or not all(isinstance(t, dict) for t in index):
        raise damaged(path, "no tensor index")
    tensors = []
    for t in index:
        dtype = _LEGACY_DTYPES.get(t.get("dtype")) if isinstance(t.get("dtype"), str) else None
        begin, nbytes = t.get("offset"), t.get("nbytes")
        end = begin + nbytes if is_int(begin) and is_int(nbytes) else None
        tensors.append(tensorfile.check_tensor(path, t.get("name"), dtype, t.get("shape"), begin, end))
    total = sum(t[4] - t[3] for t in tensors)
    if any(t[4] > total for t in tensors):
        raise damaged(path, "tensor byte ranges run past the weights")
    if size - start - length < total:
        raise truncated(path, f"{size - start - length} of {total} bytes of weights")
    records = {key: header[key] for key in RECORDS if key in header}
    return tensorfile.Layout(start + length, total, tensors), records, header.get("payload_sha256")


_CONFIG_TYPES = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def _records(path, records: dict) -> dict:
    """The header's records, each checked: ModelFile's fields except the tensors."""
    from unetcli import normalize
    from unetcli.model import UNetConfig

    config = records.get("config")
    if not isinstance(config, dict):
        raise damaged(path, "no network configuration")
    for f in dataclasses.fields(UNetConfig):
        value = config.get(f.name, f.default)
        allowed = _CONFIG_TYPES[type(f.default)]
        if not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool)) or \
                (isinstance(value, float) and not math.isfinite(value)):
            raise damaged(path, f"config {f.name} = {short(value)}")
    try:
        cfg = UNetConfig.from_dict(config)
    except ConfigError as exc:
        raise damaged(path, f"config: {exc.message}") from None
    norm = normalize.check(records.get("normalization"), cfg.in_channels, str(path))
    names = records.get("class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or \
            len(names) != cfg.num_classes:
        raise damaged(path, f"class names {short(names)} for {cfg.num_classes} classes")
    out = {"config": cfg, "normalization": norm, "class_names": names}
    for key in ("provenance", "postprocess", "inputs"):
        value = records.get(key)
        value = {} if value is None else value
        if not isinstance(value, dict):
            raise damaged(path, f"{key} is not a record")
        out[key] = value
    return out


def _checked_header(fh, path) -> tuple[tensorfile.Layout, dict, str, bool]:
    """Everything a model file's header says, checked, having read the header alone.

    Returns the layout, the records (ModelFile's fields), the weights' checksum and whether the file is
    of format 1."""
    size = os.fstat(fh.fileno()).st_size
    head = fh.read(16)
    legacy = head.startswith(LEGACY_MAGIC)
    layout, raw, checksum = (_legacy_header(fh, path, size) if legacy else
                             _safetensors_header(fh, head, path, size))
    if not (isinstance(checksum, str) and len(checksum) == 64 and all(c in "0123456789abcdef" for c in checksum)):
        raise damaged(path, "no weight checksum")
    return layout, _records(path, raw), checksum, legacy


def _read_legacy(fh, layout: tensorfile.Layout) -> dict[str, np.ndarray]:
    tensors = {}
    for name, dtype, shape, begin, end in layout.tensors:
        fh.seek(layout.data_start + begin)
        tensors[name] = np.frombuffer(fh.read(end - begin), dtype).reshape(shape)
    return tensors


def _native(arr: np.ndarray) -> np.ndarray:
    """Floats as float32, everything else in the machine's byte order."""
    return arr.astype(np.float32 if arr.dtype.kind == "f" else arr.dtype.newbyteorder("="))


def load_model(name_or_path: str | os.PathLike) -> ModelFile:
    """Load a model by path or by name (shipped or in the user's model folder). Runs no code.

    The header is read and checked first; then one streamed pass checks the weights' checksum; only
    then are tensors allocated.
    """
    path = resolve_model(name_or_path)
    try:
        with open(path, "rb") as fh:
            layout, records, checksum, legacy = _checked_header(fh, path)
            file_sha, weights_sha = tensorfile.digests(fh, layout.data_start, layout.data_length)
            if weights_sha != checksum:
                raise damaged(path, "weights do not match their checksum")
            tensors = _read_legacy(fh, layout) if legacy else tensorfile.read_tensors(path, layout)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read ({exc.strerror})") from exc
    tensors = {name: _native(arr) for name, arr in tensors.items()}
    return ModelFile(tensors=tensors, path=path, sha256=file_sha, **records)


# ------------------------------------------------------------------------------- the training state

STATE_FILE = "train-state.bin"
STATE_FORMAT = 1


def save_state(path: str | os.PathLike, net, optimizer, config, normalization: dict, info: dict,
               scaler=None) -> None:
    """A resumable training state in a model file, atomically: the weights (``model/NAME``), the
    optimiser's tensors (``opt/PARAM/NAME``) and, in the provenance's ``train_state`` record, the
    optimiser's other values, its parameter groups, the loss scaler and ``info`` (step, clock, best)."""
    import torch

    tensors = {f"model/{k}": v for k, v in net.state_dict().items()}
    opt = optimizer.state_dict()
    layout = {}
    for idx, st in opt["state"].items():
        keys = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt/{idx}/{k}"] = v
                keys[k] = "tensor"
            else:
                keys[k] = v
        layout[str(idx)] = keys
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
    meta = dict(info)
    meta.update({"format": STATE_FORMAT, "optimizer_state": layout, "param_groups": groups,
                 "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None})
    save_model(path, tensors, config, normalization=normalization, provenance={"train_state": meta})


def load_state(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """``(model state dict, optimiser state dict, info)`` of a state written by :func:`save_state`.

    Read with every check of :func:`load_model` (no code runs); a file that is no training state, or
    whose optimiser record is malformed, is a one-line RunFolderError.
    """
    import torch

    from unetcli.errors import RunFolderError

    try:
        mf = load_model(path)
    except ModelFileError as exc:
        raise RunFolderError(f"{path}: cannot resume from it ({exc.message})",
                             hint="the run folder's state is damaged; start a new run") from exc
    meta = mf.provenance.get("train_state")
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise RunFolderError(f"{path}: not a unet training state")
    layout, groups = meta.get("optimizer_state"), meta.get("param_groups")
    if not (isinstance(layout, dict) and all(isinstance(v, dict) for v in layout.values())
            and all(k.isdigit() for k in layout) and isinstance(groups, list)
            and all(isinstance(g, dict) for g in groups)
            and all(f"opt/{i}/{k}" in mf.tensors for i, keys in layout.items() for k, v in keys.items()
                    if v == "tensor")):
        raise RunFolderError(f"{path}: damaged training state (optimiser record)",
                             hint="the run folder's state is damaged; start a new run")

    def tensor(name: str):
        return torch.from_numpy(np.require(mf.tensors[name], requirements="C"))   # 0-d stays 0-d

    model = {k.removeprefix("model/"): tensor(k) for k in mf.tensors if k.startswith("model/")}
    state = {int(i): {k: tensor(f"opt/{i}/{k}") if v == "tensor" else v for k, v in keys.items()}
             for i, keys in layout.items()}
    groups = [{k: (tuple(v) if k == "betas" and isinstance(v, list) else v) for k, v in g.items()}
              for g in groups]
    return model, {"state": state, "param_groups": groups}, meta


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
    looks_like_path = os.sep in text or text.endswith(SUFFIX)
    if p.is_dir():
        for candidate in (p / "best.unet", p / "last.unet"):
            if candidate.is_file():
                return candidate
    if not looks_like_path:   # a bare name: a folder of that name holding no model does not hide the model
        for folder in model_dirs():
            candidate = folder / f"{text}{SUFFIX}"
            if candidate.is_file():
                return candidate
    if p.is_dir():
        raise ModelFileError(f"{text}: folder holds no best.unet or last.unet")
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
