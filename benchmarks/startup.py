"""Start-up time of `unet --help` (which must not import torch), beside reference commands.

Usage: python benchmarks/startup.py [--runs 20]
Prints the median and best wall time of each command over the runs, in one table.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def timed(cmd: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    exe = shutil.which("unet") or str(Path(sys.executable).with_name("unet"))
    cases = [
        ("python -c pass (interpreter alone)", [sys.executable, "-c", "pass"]),
        ("unet --help", [exe, "--help"]),
        ("unet predict --help", [exe, "predict", "--help"]),
        ("python -m unetcli --help", [sys.executable, "-m", "unetcli", "--help"]),
        ("python -c 'import torch' (what --help avoids)", [sys.executable, "-c", "import torch"]),
    ]
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
          f"python {platform.python_version()}, runs {args.runs}")
    print(f"{'command':48s} {'median s':>9s} {'best s':>8s}")
    for label, cmd in cases:
        timed(cmd, 2)  # warm the file cache
        t = timed(cmd, args.runs)
        print(f"{label:48s} {statistics.median(t):9.3f} {min(t):8.3f}")


if __name__ == "__main__":
    main()
