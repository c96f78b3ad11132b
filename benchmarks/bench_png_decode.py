"""Decoding a 4000x4000 16-bit RGB PNG: the hand-written codec unet carried until 0.2 against imagecodecs.

Run from the repository root:

    nice -n 10 python benchmarks/bench_png_decode.py --rounds 3

The image is synthetic but shaped like a microscope picture: smooth intensity (a sum of broad
Gaussian blobs per channel, as stained tissue or cells) plus Poisson-like noise, 16 bits per sample.
It is encoded by libpng through ``imagecodecs.png_encode`` twice: with libpng's default adaptive
row filters, and with the Paeth filter on every row (the script prints how many rows use each filter:
the old codec decoded Average and Paeth rows byte by byte in Python, so those rows set its time).

Three decoders, called in interleaved rounds (old, imagecodecs, read_image, old, ...) so that load from
other jobs hits all alike: ``old_decode_png`` (a verbatim copy of ``unetcli.images.decode_png`` as it
was before it left the package), ``imagecodecs.png_decode`` alone, and ``unetcli.images.read_image``
(what unet now does: the header check, the memory guard, the file read, imagecodecs). Every result is
compared with the encoded array. Prints a Markdown table for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import struct
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np


# ----------------------------------------------------------------- the reference: unet 0.2's hand codec

class ImageReadError(Exception):
    pass


def old_decode_png(raw: bytes, name: str) -> np.ndarray:
    """Decode a non-interlaced grey, grey+alpha, RGB or RGBA PNG of 8 or 16 bits to (H, W, C), exactly.

    Copied unchanged (apart from this error class) from unetcli/images.py of unet 0.2.
    """
    pos, idat, hdr = 8, [], None
    while pos + 8 <= len(raw):
        length, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        body = raw[pos + 8:pos + 8 + length]
        if len(body) < length:
            raise ImageReadError(f"{name}: truncated PNG file")
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body[:13])
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if hdr is None or not idat:
        raise ImageReadError(f"{name}: truncated PNG file (no image data)")
    w, h, depth, ctype = hdr[:4]
    if depth not in (8, 16) or ctype not in (0, 2, 4, 6) or hdr[6] != 0:
        raise ImageReadError(f"{name}: unsupported PNG variant (depth {depth}, colour type {ctype})")
    c = {0: 1, 2: 3, 4: 2, 6: 4}[ctype]
    bpp = c * depth // 8
    stride = bpp * w
    try:
        data = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        raise ImageReadError(f"{name}: damaged PNG image data ({exc})") from exc
    if len(data) < h * (stride + 1):
        raise ImageReadError(f"{name}: truncated PNG file (image data ends early)")
    rows = np.frombuffer(data, np.uint8, h * (stride + 1)).reshape(h, stride + 1)
    out = np.zeros((h, stride), np.uint8)
    prev = np.zeros(stride, np.int64)
    for y in range(h):
        ftype, line = rows[y, 0], rows[y, 1:].astype(np.int64)
        if ftype == 0:
            cur = line
        elif ftype == 1:    # Sub: a running sum along the row, per byte of a pixel
            cur = np.cumsum(line.reshape(w, bpp), axis=0).reshape(-1) & 0xFF
        elif ftype == 2:    # Up
            cur = (line + prev) & 0xFF
        elif ftype in (3, 4):  # Average, Paeth: each byte needs its decoded left neighbour
            cur = line.copy()
            for x in range(stride):
                a = cur[x - bpp] if x >= bpp else 0
                b = prev[x]
                if ftype == 3:
                    pred = (a + b) >> 1
                else:
                    cc = prev[x - bpp] if x >= bpp else 0
                    p = a + b - cc
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - cc)
                    pred = a if (pa <= pb and pa <= pc) else (b if pb <= pc else cc)
                cur[x] = (cur[x] + pred) & 0xFF
        else:
            raise ImageReadError(f"{name}: damaged PNG file (filter type {ftype})")
        out[y] = cur
        prev = cur
    if depth == 8:
        return out.reshape(h, w, c)
    return out.view(">u2").reshape(h, w, c).astype(np.uint16)


# ------------------------------------------------------------------------------------------ the input

def synthetic_image(size: int, seed: int = 0) -> np.ndarray:
    """(size, size, 3) uint16: broad Gaussian blobs per channel plus noise."""
    rng = np.random.default_rng(seed)
    axis = np.linspace(0.0, 1.0, size, dtype=np.float32)
    out = np.empty((size, size, 3), np.uint16)
    for c in range(3):
        plane = np.zeros((size, size), np.float32)
        for _ in range(12):
            cy, cx, s = rng.random(3)
            gy = np.exp(-((axis - cy) ** 2) / (2 * (0.05 + 0.2 * s) ** 2))
            gx = np.exp(-((axis - cx) ** 2) / (2 * (0.05 + 0.2 * s) ** 2))
            plane += np.outer(gy, gx) * rng.uniform(0.2, 1.0)
        plane = plane / plane.max() * 50000 + 2000
        plane += rng.normal(0, 1, plane.shape).astype(np.float32) * np.sqrt(plane)
        out[..., c] = np.clip(plane, 0, 65535).astype(np.uint16)
    return out


def filter_counts(raw: bytes, rows: int, stride: int) -> dict[str, int]:
    """How many rows of a non-interlaced PNG use each row filter."""
    pos, idat = 8, []
    while pos + 8 <= len(raw):
        length, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        if kind == b"IDAT":
            idat.append(raw[pos + 8:pos + 8 + length])
        pos += 12 + length
    data = zlib.decompress(b"".join(idat))
    kinds = np.frombuffer(data, np.uint8)[:: stride + 1][:rows]
    names = ("None", "Sub", "Up", "Average", "Paeth")
    return {names[k]: int((kinds == k).sum()) for k in range(5)}


# ------------------------------------------------------------------------------------------------ main

def run(image: np.ndarray, raw: bytes, rounds: int, label: str) -> None:
    """Time the three decoders on one encoded file in interleaved rounds; print a table."""
    import imagecodecs

    from unetcli.images import read_image

    size = image.shape[0]
    counts = filter_counts(raw, size, size * 6)
    print(f"\n## {label}: {len(raw) / 2**20:.1f} MiB; rows per filter: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    times: dict[str, list[float]] = {"old": [], "imagecodecs": [], "read_image": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.png"
        path.write_bytes(raw)
        calls = {"old": lambda: old_decode_png(path.read_bytes(), "big.png"),
                 "imagecodecs": lambda: imagecodecs.png_decode(path.read_bytes()),
                 "read_image": lambda: read_image(path)[0]}
        for r in range(rounds):
            for name, call in calls.items():
                t0 = time.perf_counter()
                out = call()
                times[name].append(time.perf_counter() - t0)
                assert np.array_equal(out, image), f"{name} decoded a different image"
                del out
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
    print()
    print("| decoder | median s | min s | speed-up: median of the rounds' ratios | speed-up: min / min |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, text in (("old", "unet 0.2 hand codec (numpy rows, Python bytes for Average/Paeth)"),
                       ("imagecodecs", "`imagecodecs.png_decode`"),
                       ("read_image", "`unetcli.images.read_image` (imagecodecs + checks)")):
        ratio = statistics.median(o / t for o, t in zip(times["old"], times[name]))
        print(f"| {text} | {statistics.median(times[name]):.3f} | {min(times[name]):.3f} | {ratio:.1f}x | "
              f"{min(times['old']) / min(times[name]):.1f}x |")
    print("\nevery decoder returned the encoded array exactly")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4000, help="side of the square image (4000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--filters", default="adaptive,paeth",
                        help="encodings to time: adaptive (libpng's default choice per row), paeth "
                             "(every row Paeth, the old codec's slowest case)")
    args = parser.parse_args()

    import imagecodecs

    image = synthetic_image(args.size)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"# bench_png_decode: {args.size}x{args.size} 16-bit RGB PNG, {args.rounds} interleaved rounds")
    print(f"date {datetime.date.today().isoformat()}; {os.cpu_count()} CPUs ({cpu}); Python "
          f"{platform.python_version()}, numpy {np.__version__}, imagecodecs {imagecodecs.__version__} "
          f"({imagecodecs.png_version()})")
    for name in args.filters.split(","):
        if name == "adaptive":
            raw = imagecodecs.png_encode(image)
        elif name == "paeth":
            raw = imagecodecs.png_encode(image, filter=imagecodecs.PNG.FILTER.PAETH)
        else:
            parser.error(f"unknown encoding {name!r}")
        run(image, raw, args.rounds, f"{name} row filters")


if __name__ == "__main__":
    main()
