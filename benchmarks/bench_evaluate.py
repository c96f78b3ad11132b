"""Speed of `unet evaluate` on the ISBI 2012 training slices.

Measures, on this machine:
  1. every metric except warping (pixel, ISBI 2012, objects) on the 30 slices, for binary masks and for
     probability maps swept over the 11 default thresholds: in-process wall and CPU time, and the whole
     command line (`unet evaluate ... --json`, start-up and image reading included);
  2. the warping error (with its splits-and-mergers variant) of one 512x512 slice: for a binary mask
     and for a probability map swept over the 10 thresholds below 1 (median over slices), next to a
     plain sequential Python loop over the same simple-point lookup table (one slice, all 10 warps).

Predictions are perturbed truths: membranes thickened by one pixel (masks) and a blurred, noisy
object probability (maps). Run from the repository root, alone on the machine:

    flock /tmp/unet-bench.lock python benchmarks/bench_evaluate.py
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unetcli import metrics as M  # noqa: E402
from unetcli import warping as W  # noqa: E402
from unetcli.images import read_image, write_image  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "isbi2012"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def sequential_warp(truth: np.ndarray, proposal: np.ndarray) -> int:
    """The plain loop: visit the mismatches one by one in Python, flip simple ones, repeat."""
    h, w = truth.shape
    src = np.zeros((h + 2, w + 2), np.uint8)
    src[1:-1, 1:-1] = truth
    tgt = np.zeros_like(src)
    tgt[1:-1, 1:-1] = proposal
    wp = w + 2
    flat = src.ravel().tolist()
    tflat = tgt.ravel().tolist()
    offs = [dy * wp + dx for dy, dx in W._RING]
    lut = W.SIMPLE.tolist()
    cand = [i for i in range(len(flat)) if flat[i] != tflat[i]]
    while True:
        flipped = 0
        rest = []
        for i in cand:
            code = 0
            for b, o in enumerate(offs):
                if flat[i + o]:
                    code |= 1 << b
            if lut[code]:
                flat[i] ^= 1
                flipped += 1
            else:
                rest.append(i)
        cand = rest
        if not flipped:
            return len(cand)


def main() -> None:
    labels = read_image(DATA / "train-labels.tif")[..., 0]               # (30, 512, 512), 0 / 255
    n = labels.shape[0]
    masks = np.stack([np.where(ndimage.binary_dilation(lab == 0, structure=M._FOUR), 0, 255)
                      for lab in labels]).astype(np.uint8)
    rng = np.random.default_rng(0)
    probs = np.stack([np.clip(ndimage.gaussian_filter((lab > 0).astype(np.float32), 1.5)
                              + rng.normal(0, 0.05, lab.shape), 0, 1) for lab in labels]).astype(np.float32)

    print("# unet evaluate benchmark")
    print(f"date: {datetime.date.today().isoformat()}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}, "
          f"numpy {np.__version__}")
    print("command: flock /tmp/unet-bench.lock python benchmarks/bench_evaluate.py")
    print()

    print("## All metrics but warping (pixel, isbi, objects), 30 slices of 512x512")
    for what, preds in (("binary masks", masks), ("probability maps, 11 thresholds", probs)):
        pairs = [M.Pair(f"{i:02d}", preds[i][..., None], labels[i]) for i in range(n)]
        rep, wall, cpu = timed(lambda: M.evaluate(pairs))
        print(f"- {what}: {wall:.2f} s wall, {cpu:.2f} s CPU in-process "
              f"(mean vrand {rep['mean']['vrand']:.4f}, rand_error {rep['mean']['rand_error']:.4f})")

    with tempfile.TemporaryDirectory() as tmp:
        write_image(Path(tmp) / "masks.tif", masks, "ZYX")
        write_image(Path(tmp) / "probs.tif", probs, "ZYX")
        for name in ("masks.tif", "probs.tif"):
            cmd = [sys.executable, "-m", "unetcli", "evaluate", str(Path(tmp) / name),
                   "--truth", str(DATA / "train-labels.tif"), "--json"]
            w0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, cwd=ROOT, env={**os.environ, "NO_COLOR": "1"})
            wall = time.perf_counter() - w0
            assert proc.returncode == 0, proc.stderr.decode()
            print(f"- command line, {name}: {wall:.2f} s wall "
                  f"(`unet evaluate {name} --truth isbi2012/train-labels.tif --json`)")
    print()

    print("## Warping error of one 512x512 slice (warping_error + warping_splits_mergers)")
    slices = range(0, n, 6)
    mask_times, prob_times, cpu_mask, cpu_prob = [], [], [], []
    for i in slices:
        truth = labels[i]
        _, wall, cpu = timed(lambda: M.warping_scores(masks[i] == 0, truth))
        mask_times.append(wall)
        cpu_mask.append(cpu)
        _, wall, cpu = timed(lambda: M.warping_scores(1 - probs[i], truth))
        prob_times.append(wall)
        cpu_prob.append(cpu)
    print(f"- binary mask: median {statistics.median(mask_times):.3f} s wall, "
          f"{statistics.median(cpu_mask):.3f} s CPU (slices {list(slices)})")
    print(f"- probability map, 10 thresholds: median {statistics.median(prob_times):.2f} s wall, "
          f"{statistics.median(cpu_prob):.2f} s CPU")
    truth = labels[0] > 0
    objects = [probs[0] > t for t in M.DEFAULT_THRESHOLDS if t < 1.0]
    res, wall_vec, _ = timed(lambda: [W.warp(truth, o) for o in objects])
    left, wall_seq, _ = timed(lambda: [sequential_warp(truth, o) for o in objects])
    print(f"- slice 00 as a probability map, the 10 warps of the sweep: vectorised {wall_vec:.2f} s "
          f"({sum(len(r.kinds) for r in res)} pixels left in all), plain sequential Python loop over the "
          f"same lookup table {wall_seq:.2f} s ({sum(left)} pixels left), {wall_seq / wall_vec:.0f}x")
    ts = [t for t in M.DEFAULT_THRESHOLDS if t < 1.0]
    print("  pixels left per threshold (vectorised / sequential): "
          + ", ".join(f"{t:g}: {len(r.kinds)}/{k}" for t, r, k in zip(ts, res, left))
          + f"; the reported minimum: {min(len(r.kinds) for r in res)} / {min(left)}")

if __name__ == "__main__":
    main()
