"""Weight maps: the fast windowed method against the naive one-distance-transform-per-object method.

Run from the repository root (the ISBI 2012 data lie in ../shared/data beside the checkout):

    flock /tmp/unet-bench.lock python benchmarks/bench_weights.py

The instance map is the ISBI 2012 training label 00.png tiled 2x2 (1024x1024; its objects are the
4-connected cell interiors, about 480). Each method runs in a fresh subprocess, so that its peak memory
(VmHWM, the high-water mark of resident memory, minus the resident memory just before the computation)
is its own; the fast method also reports Python's tracemalloc peak (numpy allocations included). Both
maps are compared pixel by pixel. Prints a Markdown table for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "isbi2012"


def tiled_instances() -> tuple[np.ndarray, np.ndarray]:
    """(target, instances) of the ISBI label 00.png tiled 2x2."""
    from unetcli.images import read_image
    from unetcli.labels import training_target

    label = read_image(DATA / "train" / "labels" / "00.png")[0, :, :, 0]
    return training_target(np.tile(label, (2, 2)), name="isbi 00.png tiled 2x2")


def naive_weight_map(target: np.ndarray, instances: np.ndarray, class_weights: np.ndarray,
                     w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """The naive method (as in tests/test_weights.py): one full-image EDT per object, all kept at once."""
    from scipy import ndimage

    ids = [k for k in np.unique(instances) if k != 0]
    dist = np.empty((len(ids),) + instances.shape)  # objects x H x W
    for i, k in enumerate(ids):
        dist[i] = ndimage.distance_transform_edt(instances != k)
    dist.partition(1, axis=0)  # in place: the two smallest distances come first
    term = w0 * np.exp(-(dist[0] + dist[1]) ** 2 / (2 * sigma ** 2))
    term[instances != 0] = 0
    return (class_weights[target] + term).astype(np.float32)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(method: str, out: str, repeats: int) -> None:
    """Run one method in this (fresh) process; print its measurements as JSON; save its map."""
    from unetcli.weightmap import class_weights_for, weight_map

    target, instances = tiled_instances()
    cw = class_weights_for("image", target, 2)
    if method == "fast":
        weight_map(target[:64, :64], instances[:64, :64], class_weights=cw)  # import scipy, warm up
    else:
        from scipy import ndimage  # noqa: F401  (import outside the timing, as for the fast one)
    rss_before = _status_kib("VmRSS")
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        if method == "fast":
            result = weight_map(target, instances, class_weights=cw)
        else:
            result = naive_weight_map(target, instances, cw)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak_rss = _status_kib("VmHWM") - rss_before
    traced = None
    if method == "fast":
        import tracemalloc

        tracemalloc.start()
        weight_map(target, instances, class_weights=cw)
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    np.save(out, result)
    print(json.dumps({"method": method, "times": times, "cpu": cpu, "peak_rss_mib": peak_rss / 1024,
                      "traced_mib": None if traced is None else traced / 2**20,
                      "objects": int(instances.max()), "shape": list(instances.shape)}))


def run_child(method: str, out: str, repeats: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", method, "--out", out,
                           "--repeats", str(repeats)], capture_output=True, text=True, check=True,
                          cwd=ROOT)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["fast", "naive"])
    parser.add_argument("--out")
    parser.add_argument("--repeats", type=int, default=5, help="runs of the fast method (best is kept)")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.out, args.repeats)
        return

    with tempfile.TemporaryDirectory() as tmp:
        fast = run_child("fast", os.path.join(tmp, "fast.npy"), args.repeats)
        naive = run_child("naive", os.path.join(tmp, "naive.npy"), 1)
        a, b = np.load(os.path.join(tmp, "fast.npy")), np.load(os.path.join(tmp, "naive.npy"))
    diff = float(np.abs(a.astype(np.float64) - b).max())
    equal = int((a == b).sum())
    h, w = fast["shape"]
    image_mib = h * w * 4 / 2**20
    t_fast, t_naive = min(fast["times"]), naive["times"][0]
    c_fast, c_naive = min(fast["cpu"]), naive["cpu"][0]
    print(f"command: flock /tmp/unet-bench.lock python benchmarks/bench_weights.py --repeats {args.repeats}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"numpy {np.__version__}; date {datetime.date.today().isoformat()}")
    print(f"input: ISBI 2012 train label 00.png tiled 2x2 = {h}x{w}, {fast['objects']} objects "
          f"(a float32 map of this size is {image_mib:.1f} MiB)\n")
    print("| method | wall time (s) | CPU time (s) | peak memory above baseline (MiB) | x the float32 image |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| naive: one full-image EDT per object | {t_naive:.2f} | {c_naive:.2f} | {naive['peak_rss_mib']:.0f} | "
          f"{naive['peak_rss_mib'] / image_mib:.0f} |")
    print(f"| fast: windowed EDT, two smallest kept (best of {len(fast['times'])}; all: "
          f"{', '.join(f'{t:.2f}' for t in fast['times'])}) | {t_fast:.3f} | {c_fast:.3f} | {fast['peak_rss_mib']:.0f} "
          f"(tracemalloc peak {fast['traced_mib']:.0f}) | {fast['peak_rss_mib'] / image_mib:.1f} |")
    print(f"\nspeed-up: {t_naive / t_fast:.0f}x wall, {c_naive / c_fast:.0f}x CPU; max |fast - naive| over all {h * w} pixels: {diff:.3g} "
          f"({equal} of {h * w} pixels bit-identical)")


if __name__ == "__main__":
    main()
