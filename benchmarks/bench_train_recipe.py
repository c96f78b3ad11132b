"""Training speed of the ISBI recipe end to end, before and after issue 17, side by side.

Runs `unet train` on the 30 ISBI 2012 training slices as `pretrained/train.sh em-membranes` does
(the paper's valid-padding network, base 32, 572x572 tiles, batch 1, Adam, flips and elastic
deformation), plus a validation on 3 held-out slices every 25 steps, for a fixed number of steps, with
the settings of unet 0.3 (`--precision fp32 --no-channels-last`) and with today's defaults (`auto`:
bf16 where the CPU computes it natively, channels-last). Every second counts: process start, reading
the data, augmentation, validation, checkpoints. The rounds are interleaved; the best round of each
is reported with steps per second = steps / wall-clock seconds.

    python benchmarks/bench_train_recipe.py                 # 2 rounds of 60 steps each
    python benchmarks/bench_train_recipe.py --steps 100 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "isbi2012" / "train"

RECIPE = ["--base", "32", "--depth", "4", "--padding", "valid", "--no-batchnorm", "--tile", "572",
          "--batch", "1", "--optimizer", "adam", "--lr", "0.001", "--schedule", "cosine",
          "--augmentations", "flip,elastic", "--weights", "none", "--workers", "0", "--seed", "0",
          "--val-split", "0.1", "--val-every", "25", "--checkpoint-every", "50", "--quiet"]
VARIANTS = {"unet 0.3 (fp32, NCHW)": ["--precision", "fp32", "--no-channels-last"],
            "today's defaults": []}


def one_run(extra: list[str], steps: int, folder: Path) -> float:
    cmd = [sys.executable, "-m", "unetcli", "train", "--images", str(DATA / "images"),
           "--labels", str(DATA / "labels"), *RECIPE, "--iterations", str(steps), *extra,
           "--out", str(folder)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from unetcli.devices import cpu_native_bf16, resolve_precision
    import torch

    print(f"{os.cpu_count()} cores; native bf16: {cpu_native_bf16()}; auto precision: "
          f"{resolve_precision('auto', torch.device('cpu'))}; {args.steps} steps per run")
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                sec = one_run(VARIANTS[name], args.steps, Path(tmp) / f"{r}-{len(times[name])}-{name[:4]}")
                times[name].append(sec)
                print(f"  round {r + 1}: {name}: {sec:.1f} s ({args.steps / sec:.3f} steps/s)", flush=True)
    base = args.steps / min(times[next(iter(VARIANTS))])
    print("\n| settings | best wall time (s) | steps/s end to end | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for name, ts in times.items():
        sps = args.steps / min(ts)
        print(f"| {name} | {min(ts):.1f} | {sps:.3f} | {sps / base:.2f}x |")


if __name__ == "__main__":
    main()
