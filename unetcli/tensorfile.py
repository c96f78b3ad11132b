"""The safetensors container of model files and training states: a checked header, then the tensors.

A safetensors file (https://huggingface.co/docs/safetensors) is::

    header length      uint64, little endian
    header             UTF-8 JSON: per tensor {"dtype", "shape", "data_offsets": [begin, end]}, and
                       "__metadata__", a map of strings to strings
    tensor data        raw little-endian arrays, back to back, in the byte ranges the header gives

This module reads the length and the header only (at most ``MAX_HEADER`` bytes) and checks all of it
before anything else is read or allocated: strict JSON (no duplicate keys, no NaN, nesting at most
``MAX_DEPTH``), known dtypes, shapes of at most ``MAX_DIMS`` non-negative dimensions whose size matches
their byte range, and byte ranges that tile the rest of the file exactly. What the metadata means is the
caller's business (``checkpoint.py``). Failures are ``ModelFileError`` in one line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Callable

import numpy as np

from unetcli.errors import ConfigError, ImageWriteError, ModelFileError

MAX_HEADER = 16 * 2**20          # bytes of header JSON read before any check
MAX_DEPTH = 32                   # nesting of JSON values in a header
MAX_DIMS = 8                     # dimensions of one tensor
CHUNK = 1 << 22                  # bytes per read when hashing
DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
          "I32": np.int32, "I64": np.int64, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32,
          "U64": np.uint64, "BOOL": np.bool_}
CODES = {np.dtype(t).name: code for code, t in DTYPES.items()}


@dataclass
class Layout:
    """A checked header: where the data starts and how long it is, and each tensor's place in it."""

    data_start: int
    data_length: int
    tensors: list[tuple[str, np.dtype, tuple[int, ...], int, int]]   # name, dtype, shape, begin, end


# --------------------------------------------------------------------------------------------- errors

def damaged(path, detail: str) -> ModelFileError:
    return ModelFileError(f"{path}: damaged model file ({detail})",
                          hint="download or copy the file again, or train it again")


def truncated(path, detail: str) -> ModelFileError:
    return ModelFileError(f"{path}: truncated model file ({detail})", hint="download or copy the file again")


def short(value, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------------------------- JSON

def _depth(value) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar: 0)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


def strict_json(text: bytes | str, path, what: str):
    """Parse JSON strictly: UTF-8, no duplicate keys, no NaN/Infinity, nesting at most MAX_DEPTH."""
    def unique(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"duplicate key {short(key)}")
            out[key] = value
        return out

    def no_constant(name):
        raise ValueError(f"{name} is not a JSON number")

    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text, object_pairs_hook=unique, parse_constant=no_constant)
    except RecursionError:
        raise damaged(path, f"{what} nested too deeply") from None
    except ValueError as exc:   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise damaged(path, f"{what} is not valid JSON: {str(exc)[:80]}") from None
    if _depth(value) > MAX_DEPTH:
        raise damaged(path, f"{what} nested deeper than {MAX_DEPTH} levels")
    return value


# -------------------------------------------------------------------------------------------- tensors

def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_tensor(path, name, dtype, shape, begin, end) -> tuple:
    """One tensor entry, checked: known dtype, 0..MAX_DIMS non-negative dims, a byte range that fits."""
    if not isinstance(name, str) or not name:
        raise damaged(path, f"tensor name {short(name)}")
    if dtype is None:
        raise damaged(path, f"tensor {short(name)} has a type unet does not read")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or \
            not all(is_int(d) and 0 <= d < 2**63 for d in shape):
        raise damaged(path, f"tensor {short(name)} has shape {short(shape)}")
    if not (is_int(begin) and is_int(end) and 0 <= begin <= end < 2**64):
        raise damaged(path, f"tensor {short(name)} has byte range {short([begin, end])}")
    need = math.prod(shape) * np.dtype(dtype).itemsize
    if need != end - begin:
        raise damaged(path, f"tensor {short(name)} of shape {shape} needs {need} bytes, "
                            f"its byte range holds {end - begin}")
    return name, np.dtype(dtype).newbyteorder("<"), tuple(shape), begin, end


def check_spans(path, tensors: list, data_length: int) -> None:
    """Byte ranges must tile the data exactly: no overlap, no gap, nothing after the last tensor."""
    pos = 0
    for name, _dtype, _shape, begin, end in sorted(tensors, key=lambda t: (t[3], t[4])):
        if begin != pos:
            raise damaged(path, f"tensor {short(name)} starts at byte {begin}, expected {pos} "
                                "(byte ranges overlap or leave a gap)")
        pos = end
    if pos > data_length:
        raise truncated(path, f"{data_length} of {pos} bytes of weights")
    if pos < data_length:
        raise damaged(path, f"{data_length - pos} stray bytes after the last tensor")


# ----------------------------------------------------------------------------------------------- read

def read_header(fh, path, size: int, check_metadata: Callable[[dict], None]) -> tuple[Layout, dict]:
    """Read and check the header of the safetensors file open as ``fh`` (``size`` bytes long).

    ``check_metadata`` sees the metadata (checked to map strings to strings) before the tensor entries
    are checked, so that it can refuse a foreign or newer file with the right message.
    Returns the layout and the metadata; reads nothing beyond the header.
    """
    fh.seek(0)
    prefix = fh.read(9)
    if len(prefix) < 9:
        raise truncated(path, "shorter than a header")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER:
        raise damaged(path, f"header of {length} bytes, more than the {MAX_HEADER >> 20} MiB allowed")
    if 8 + length > size:
        raise truncated(path, "header cut short")
    fh.seek(8)
    header = strict_json(fh.read(length), path, "header")
    if not isinstance(header, dict):
        raise damaged(path, "header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise damaged(path, "metadata must map strings to strings")
    check_metadata(meta)
    tensors = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"} or \
                not isinstance(entry["data_offsets"], list) or len(entry["data_offsets"]) != 2:
            raise damaged(path, f"tensor {short(name)} is not a tensor entry")
        dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        tensors.append(check_tensor(path, name, dtype, entry["shape"], *entry["data_offsets"]))
    data_length = size - 8 - length
    check_spans(path, tensors, data_length)
    return Layout(8 + length, data_length, tensors), meta


def digests(fh, data_start: int, data_length: int) -> tuple[str, str]:
    """SHA-256 of the whole file and of its data (``data_length`` bytes from ``data_start``), streamed."""
    whole, data = hashlib.sha256(), hashlib.sha256()
    stop = data_start + data_length
    fh.seek(0)
    pos = 0
    while chunk := fh.read(CHUNK):
        view = memoryview(chunk)
        whole.update(view)
        data.update(view[max(0, data_start - pos):max(0, stop - pos)])
        pos += len(chunk)
    return whole.hexdigest(), data.hexdigest()


def read_tensors(path, layout: Layout) -> dict[str, np.ndarray]:
    """The tensors of a checked file, through ``safetensors.safe_open`` (the file is mapped, not read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {name: f.get_tensor(name) for name, *_ in layout.tensors}
    except SafetensorError as exc:       # the file changed under us since its header was checked
        raise damaged(path, " ".join(str(exc).split())[:120]) from None


# ---------------------------------------------------------------------------------------------- write

def little_endian(name: str, arr: np.ndarray) -> np.ndarray:
    """``arr`` contiguous and little-endian; ConfigError for a type safetensors has no code for."""
    if arr.dtype.name not in CODES or name == "__metadata__":
        raise ConfigError(f"cannot store tensor {name!r} of type {arr.dtype}")
    return np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")   # keeps 0-d arrays 0-d


def write(path: str | os.PathLike, arrays: dict[str, np.ndarray], metadata: dict[str, str],
          checksum_key: str) -> None:
    """Write a safetensors file atomically, streaming the tensors (no copy of the whole file in memory).

    The SHA-256 of the tensor data goes into the metadata under ``checksum_key``. The layout is the
    safetensors library's own (widest dtypes first, then by name; the header padded with spaces to a
    multiple of 8 bytes), so every tensor lies aligned to its type. ``arrays`` come from
    :func:`little_endian`.
    """
    from unetcli.atomic import atomic_output

    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    entries, offset, digest = {}, 0, hashlib.sha256()
    for key in order:
        arr = arrays[key]
        entries[key] = {"dtype": CODES[arr.dtype.name], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        digest.update(arr.reshape(-1).view(np.uint8))
        offset += arr.nbytes
    metadata = dict(metadata, **{checksum_key: digest.hexdigest()})
    head = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    try:
        with atomic_output(path) as tmp, open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(head)) + head)
            for key in order:
                fh.write(arrays[key].reshape(-1).view(np.uint8))
    except OSError as exc:
        raise ImageWriteError(f"{path}: cannot write ({exc.strerror})") from exc
