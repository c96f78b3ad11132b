"""`unet predict` end to end on a 2048x2048 image, before and after issue 17, on a quiet machine and on
a machine kept busy by a training run.

Before: `--backend torch --precision fp32` (what unet 0.3 ran by default). After: the defaults
(`--backend auto --precision auto`). Each run is the whole command as a user types it (process start,
reading, tiling, writing the mask) with the shipped `em-membranes` model; the image is a mosaic of
ISBI 2012 slices. Rounds alternate the two; the best and the median wall time of each are reported.
The busy phase starts `unet train` (the ISBI recipe, both cores) in the background first and stops it
at the end. The OpenVINO network is converted before the first timed round (as after a first run).

    python benchmarks/bench_predict_busy.py              # 3 rounds quiet, 3 rounds busy
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "isbi2012" / "train"
VARIANTS = {"before (torch fp32)": ["--backend", "torch", "--precision", "fp32"], "after (defaults)": []}


def mosaic(path: Path) -> None:
    from imageio.v3 import imread
    from PIL import Image

    tiles = [np.asarray(imread(DATA / "images" / f"{i:02d}.png")) for i in range(16)]
    rows = [np.concatenate(tiles[r * 4:(r + 1) * 4], axis=1) for r in range(4)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def one(extra: list[str], image: Path, out: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "unetcli", "predict", str(image), "-o", str(out), "-q", *extra],
                   check=True, cwd=ROOT)
    return time.perf_counter() - start


def phase(name: str, rounds: int, image: Path, out: Path) -> None:
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for r in range(rounds):
        for k in (VARIANTS if r % 2 == 0 else reversed(list(VARIANTS))):
            times[k].append(one(VARIANTS[k], image, out))
            print(f"  {name} round {r + 1}: {k}: {times[k][-1]:.1f} s", flush=True)
    print(f"\n| {name} | best (s) | median (s) |\n| --- | ---: | ---: |")
    for k, ts in times.items():
        print(f"| {k} | {min(ts):.1f} | {statistics.median(ts):.1f} |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("UNET_CACHE", str(Path(tmp) / "cache"))
        image, out = Path(tmp) / "mosaic.png", Path(tmp) / "mask.tif"
        mosaic(image)
        one([], image, out)                      # the first run converts the network (cached after)
        phase("quiet machine, 2048x2048", args.rounds, image, out)
        train = subprocess.Popen(
            [sys.executable, "-m", "unetcli", "train", "--images", str(DATA / "images"),
             "--labels", str(DATA / "labels"), "--base", "32", "--padding", "valid", "--tile", "572",
             "--iterations", "100000", "--augmentations", "flip,elastic", "--weights", "none",
             "--workers", "0", "--quiet", "--out", str(Path(tmp) / "busy-run")],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(20)                       # let the training reach its steady state
            phase("busy machine (a training run on both cores), 2048x2048", args.rounds, image, out)
        finally:
            train.send_signal(signal.SIGTERM)
            train.wait(timeout=120)


if __name__ == "__main__":
    main()
