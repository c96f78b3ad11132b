"""Peak memory of `unet predict` on very large images: it grows with the tile, not with the image.

Writes a 16384 x 16384 uint8 TIFF (a mosaic of the ISBI training slices, 256 Mi pixels) and a
random-weight base-16 U-Net (the paper's depth 4, valid padding), then runs the real command line,

    unet predict big.tif -o mask.tif -m base16.unet

in a fresh process under ``/usr/bin/time -v`` and reports its peak resident memory (maximum RSS) and
wall time; the same for a 4096 x 4096 image, whose peak should differ only by the input image it holds
(the mask is written tile row by tile row). Finally it checks the mask: a 1024 x 1024 corner predicted
on its own must agree with the big mask wherever the corner's own border does not reach (rows and
columns below 1024 - 92).

    python benchmarks/bench_predict_memory.py                    # about 10 minutes on a 2-core CPU
    python benchmarks/bench_predict_memory.py --sizes 4096 --extra "--tile 572"
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def mosaic(size: int) -> np.ndarray:
    folder = ROOT.parent / "shared" / "data" / "isbi2012" / "train" / "images"
    files = sorted(folder.glob("*.png"))
    from unetcli.images import read_image

    if not files:
        return np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)
    tiles = [read_image(f)[0, ..., 0] for f in files]
    reps = math.ceil(size / tiles[0].shape[0])
    out = np.empty((reps * tiles[0].shape[0],) * 2, np.uint8)
    s = tiles[0].shape[0]
    for r in range(reps):
        for c in range(reps):
            out[r * s:(r + 1) * s, c * s:(c + 1) * s] = tiles[(r * reps + c) % len(tiles)]
    return out[:size, :size]


def timed(args: list[str]) -> tuple[float, float, str]:
    """Run a command under /usr/bin/time -v; return (peak RSS in MB, wall seconds, stderr)."""
    proc = subprocess.run(["/usr/bin/time", "-v", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    secs = sum(float(p) * 60 ** i for i, p in enumerate(reversed(wall.split(":"))))
    return rss_kb * 1024 / 1e6, secs, proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="4096,16384", help="image sides, comma-separated")
    ap.add_argument("--extra", default="", help="extra options for unet predict, e.g. '--tile 572'")
    ap.add_argument("--workdir", default=None, help="where to write the images (default: a temp folder)")
    args = ap.parse_args()

    import torch

    from unetcli.checkpoint import save_model
    from unetcli.images import read_image, write_image
    from unetcli.model import UNet, UNetConfig

    work = Path(args.workdir or tempfile.mkdtemp(prefix="unet-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    config = UNetConfig(base=16)
    torch.manual_seed(0)
    net = UNet(config)
    with torch.no_grad():  # a random network whose masks hold both classes
        net.head.bias.copy_(torch.tensor([0.0, 0.3]))
    model = save_model(work / "base16.unet", net.state_dict(), config,
                       normalization={"mean": [127.0], "std": [50.0]}, class_names=["membrane", "cell"])
    print(f"# {datetime.date.today()}  {os.cpu_count()} CPUs; torch {torch.__version__}; workdir {work}")
    print("| image | command | peak RSS | wall time |")
    print("| --- | --- | ---: | ---: |")
    sizes = [int(s) for s in args.sizes.split(",")]
    for size in sizes:
        src = work / f"in{size}.tif"
        if not src.exists():
            write_image(src, mosaic(size))
        out = work / f"mask{size}.tif"
        cmd = [sys.executable, "-m", "unetcli", "predict", str(src), "-o", str(out), "-m", str(model), "-q",
               *shlex.split(args.extra)]
        rss, secs, _ = timed(cmd)
        shown = f"unet predict in{size}.tif -o mask.tif -m base16.unet {args.extra}".strip()
        print(f"| {size}x{size} uint8 ({size * size / 1e6:.0f} MB) | `{shown}` | {rss:.0f} MB | {secs:.0f} s |",
              flush=True)

    # the big mask is the same as predicting a corner on its own, away from the corner's own border
    biggest = max(sizes)
    mask = read_image(work / f"mask{biggest}.tif")[0, ..., 0]
    corner = read_image(work / f"in{biggest}.tif")[0, :1024, :1024, 0]
    write_image(work / "corner.tif", corner)
    subprocess.run([sys.executable, "-m", "unetcli", "predict", str(work / "corner.tif"), "-o",
                    str(work / "corner-mask.tif"), "-m", str(model), "-q"], check=True)
    small = read_image(work / "corner-mask.tif")[0, ..., 0]
    inner = 1024 - 92
    differ = int((small[:inner, :inner] != mask[:inner, :inner]).sum())
    print(f"\ncorner check: a 1024x1024 corner predicted alone against the {biggest}x{biggest} mask, first "
          f"{inner} rows and columns: {differ} of {inner * inner} pixels differ; foreground fraction "
          f"{mask.mean():.3f}")


if __name__ == "__main__":
    main()
