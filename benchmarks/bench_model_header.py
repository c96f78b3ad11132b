"""Loading a model file reads only its header before it is validated: bytes read and memory per case.

Run from the repository root:

    nice -n 10 python benchmarks/bench_model_header.py --repeat 5

Starts from the shipped ``pretrained/em-membranes.unet`` (15.5 MB of float16 weights) and writes
variants of it that keep its 15.5 MB of weights but carry a hostile or damaged header: a negative
config value, a header length of 2^63, a tensor with a negative dimension, JSON nested 100,000 deep, a
newer format version, no unet records (a foreign safetensors file), the last MiB cut off, one flipped
weight byte; and the same model in the format 1 container of unet 0.1/0.2 with a negative config value.

For each, one call of ``unetcli.checkpoint.load_model`` reports the bytes read through the loader's
file object (counted by wrapping ``open`` in ``checkpoint``), the bytes the process read from the kernel
(``rchar`` of /proc/self/io, all reads included) and the peak of Python allocations during the call
(tracemalloc, numpy's arrays included); ``--repeat`` more calls without the counting give the median
time. Prints a
Markdown table for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import builtins
import datetime
import hashlib
import json
import os
import platform
import statistics
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "pretrained" / "em-membranes.unet"


def split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict | bytes, data: bytes) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def variants(raw: bytes) -> dict[str, bytes]:
    header, data = split(raw)
    meta = header["__metadata__"]
    config = json.loads(meta["config"])
    first = next(k for k in header if k != "__metadata__")
    out = {"valid file (loads)": raw}
    out["config base = -1"] = join(dict(header, __metadata__=dict(meta, config=json.dumps(dict(config, base=-1)))), data)
    out["header length 2^63"] = struct.pack("<Q", 2**63) + raw[8:]
    shape = [-1] + header[first]["shape"][1:]
    out["tensor with a negative dimension"] = join(dict(header, **{first: dict(header[first], shape=shape)}), data)
    deep = json.dumps(header)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    out["JSON nested 100,000 deep"] = join(deep.encode(), data)
    out["format version 3 (newer)"] = join(dict(header, __metadata__=dict(meta, format_version="3")), data)
    out["no unet records (foreign safetensors)"] = join(dict(header, __metadata__={}), data)
    out["last MiB cut off"] = raw[: len(raw) - 2**20]
    flipped = bytearray(raw)
    flipped[-1000] ^= 0x01
    out["one weight byte flipped"] = bytes(flipped)
    out["format 1 container, config base = -1"] = legacy(header, data, dict(config, base=-1))
    return out


def legacy(header: dict, data: bytes, config: dict) -> bytes:
    """The same tensors and records in the format 1 container (magic, version, JSON index, raw data)."""
    meta = header["__metadata__"]
    index = [{"name": k, "dtype": {"F16": "float16", "F32": "float32"}[v["dtype"]], "shape": v["shape"],
              "offset": v["data_offsets"][0], "nbytes": v["data_offsets"][1] - v["data_offsets"][0]}
             for k, v in header.items() if k != "__metadata__"]
    head = {key: json.loads(meta[key]) for key in ("normalization", "class_names", "provenance")}
    head.update(config=config, tensors=index, payload_sha256=hashlib.sha256(data).hexdigest())
    text = json.dumps(head).encode()
    return b"UNETMODEL\n" + struct.pack("<IQ", 1, len(text)) + text + data


def rchar() -> int:
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


class Counting:
    """A file object that counts the bytes read through it."""

    total = 0

    def __init__(self, fh):
        self._fh = fh

    def read(self, n=-1):
        data = self._fh.read(n)
        Counting.total += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def measure(path: Path, repeat: int) -> dict:
    from unetcli import checkpoint
    from unetcli.errors import ModelFileError

    def call() -> str:
        try:
            mf = checkpoint.load_model(path)
            return f"loaded, {sum(a.nbytes for a in mf.tensors.values()) / 1e6:.1f} MB of float32 tensors"
        except ModelFileError as exc:
            return "refused: " + exc.message.split(": ", 1)[1]

    checkpoint.open = lambda p, mode="r": Counting(builtins.open(p, mode))
    try:                                  # one call counted and traced ...
        Counting.total = 0
        before = rchar()
        tracemalloc.start()
        outcome = call()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        kernel = rchar() - before
    finally:
        del checkpoint.open
    times = []
    for _ in range(repeat):               # ... and ``repeat`` timed without either
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"read": Counting.total, "kernel": kernel, "peak": peak, "time": statistics.median(times),
            "outcome": outcome}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import numpy as np

    import unetcli.model  # noqa: F401  (torch is imported before the counting starts)

    raw = SOURCE.read_bytes()
    header_bytes = len(raw) - len(split(raw)[1])
    print(f"# bench_model_header: {SOURCE.name}, {len(raw):,} bytes ({header_bytes:,} of them header), "
          f"{args.repeat} calls per case")
    print(f"date {datetime.date.today().isoformat()}; {os.cpu_count()} CPUs; Python {platform.python_version()}, "
          f"numpy {np.__version__}")
    print()
    print("| file | bytes read by the loader | bytes read by the process (rchar) | peak allocations | "
          "median time | outcome |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in variants(raw).items():
            path = Path(tmp) / "model.unet"
            path.write_bytes(content)
            r = measure(path, args.repeat)
            print(f"| {name} | {r['read']:,} | {r['kernel']:,} | {r['peak'] / 2**20:.2f} MiB | "
                  f"{r['time'] * 1e3:.1f} ms | {r['outcome'][:110]} |", flush=True)


if __name__ == "__main__":
    main()
