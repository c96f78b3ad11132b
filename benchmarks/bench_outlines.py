"""Outlines of instance labels for Fiji and QuPath (issue 18): time to trace every object and to write
the ImageJ ROI set and the GeoJSON file, on synthetic labels of many touching objects and on the worst
case (noise: every pixel its own object or nearly).

    python benchmarks/bench_outlines.py                # 2000 objects on 2048 x 2048, best of 3
    python benchmarks/bench_outlines.py --noise 1024   # and 1024 x 1024 of random labels
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def blobs(n: int, side: int, seed: int = 0) -> np.ndarray:
    """``n`` ellipses of radius 5 to 16 at random places, later ones drawn over earlier ones (so many
    touch, and some are cut into pieces or get holes)."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((side, side), np.uint16)
    yy, xx = np.mgrid[-16:17, -16:17]
    for i in range(1, n + 1):
        ry, rx = rng.uniform(5, 16), rng.uniform(4, 16)
        cy, cx = (int(v) for v in rng.integers(16, side - 16, 2))
        lab[cy - 16:cy + 17, cx - 16:cx + 17][(yy / ry) ** 2 + (xx / rx) ** 2 < 1] = i
    return lab


def best(fn, rounds: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def report(name: str, lab: np.ndarray, rounds: int) -> None:
    from unetcli import roifiles
    from unetcli.outlines import count_edges, trace

    objects = len(np.unique(lab)) - 1
    t_trace, outlines = best(lambda: trace(lab), rounds)
    t_zip, zipped = best(lambda: roifiles.encode(lab, "zip"), rounds)
    t_json, text = best(lambda: roifiles.encode(lab, "geojson"), rounds)
    print(f"| {name} | {objects} | {count_edges(lab)} | {t_trace:.2f} | {t_zip:.2f} ({len(zipped) / 2**20:.2f} MB) "
          f"| {t_json:.2f} ({len(text) / 2**20:.2f} MB) |")
    assert len(outlines) == objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--noise", type=int, default=0, help="also a SIDE x SIDE image of random labels")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("| labels | objects | border edges | trace (s) | ROI set .zip (s) | GeoJSON (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    report(f"{args.objects} ellipses on {args.side} x {args.side}", blobs(args.objects, args.side), args.rounds)
    if args.noise:
        # every pixel a random id of 70000: nearly every pixel is an object's piece of its own, the most
        # border there can be (objects in many pieces, each piece one pixel)
        noise = np.random.default_rng(1).integers(0, 70000, (args.noise, args.noise)).astype(np.uint32)
        report(f"random ids on {args.noise} x {args.noise}", noise, 1)


if __name__ == "__main__":
    main()
