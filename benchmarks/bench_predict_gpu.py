"""512 x 512 images per second with the paper's network on a GPU, with and without file I/O.

1. Without I/O: a stack of ``--count`` 512 x 512 slices held in memory, predicted to masks by one
   Predictor (tiles of several slices batched together, bf16 autocast, channels-last).
2. With I/O, through the real command line in a fresh process (start-up and model loading included):
   a. a folder of ``--count`` PNG files -> a folder of PNG masks;
   b. one ``--count``-page TIFF stack -> a TIFF stack of masks.

    python benchmarks/bench_predict_gpu.py                          # needs a CUDA GPU
    python benchmarks/bench_predict_gpu.py --device cpu --precision fp32 --base 4 --count 8   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def slices(count: int) -> np.ndarray:
    """``count`` 512 x 512 uint8 EM slices (the ISBI sets, repeated), or noise without the data."""
    from unetcli.images import read_image

    data = ROOT.parent / "shared" / "data" / "isbi2012"
    files = sorted((data / "train" / "images").glob("*.png")) + sorted((data / "test" / "images").glob("*.png"))
    if not files:
        return np.random.default_rng(0).integers(0, 256, (count, 512, 512, 1), dtype=np.uint8)
    pool = [read_image(f)[0] for f in files]
    return np.stack([pool[i % len(pool)] for i in range(count)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--base", type=int, default=64)
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--batch", type=int, default=None)
    args = ap.parse_args()

    import torch

    from unetcli.checkpoint import save_model
    from unetcli.images import write_image
    from unetcli.inference import Predictor
    from unetcli.model import UNet, UNetConfig

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: this benchmark was not run (see benchmarks/README.md)")
    config = UNetConfig(base=args.base)
    torch.manual_seed(0)
    net = UNet(config)
    stack = slices(args.count)
    work = Path(tempfile.mkdtemp(prefix="unet-gpu-"))
    model = save_model(work / "paper.unet", net.state_dict(), config,
                       normalization={"mean": [127.0], "std": [50.0]})
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"# {datetime.date.today()}  {name}, torch {torch.__version__}, {args.precision}, base {args.base}, "
          f"{args.count} slices of 512x512")

    pred = Predictor(net, config, device=args.device, precision=args.precision, batch=args.batch,
                     mean=[127.0], std=[50.0])
    plan = pred.plan(512, 512)
    pred.predict_mask(stack[:min(len(stack), 16)])          # warm-up: cuDNN autotuning, allocations
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    pred.predict_mask(stack)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    no_io = time.perf_counter() - t
    print(f"| in memory, {args.count}-slice stack, tile {plan.tile[0]}x{plan.tile[1]}, batch "
          f"{pred.batch_for(plan, args.count)} | {args.count / no_io:.1f} images/s |", flush=True)

    pngs = work / "pngs"
    pngs.mkdir()
    for i, s in enumerate(stack):
        write_image(pngs / f"{i:04d}.png", s[..., 0])
    write_image(work / "stack.tif", stack[..., 0], "ZYX")
    common = ["-m", str(model), "--device", args.device, "--precision", args.precision, "-q"]
    for label, cmd in (("folder of PNG files -> PNG masks (command line, start-up included)",
                        ["predict", str(pngs), "-o", str(work / "out") + "/", "--format", "png"]),
                       ("TIFF stack -> TIFF stack (command line, start-up included)",
                        ["predict", str(work / "stack.tif"), "-o", str(work / "masks.tif")])):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "unetcli", *cmd, *common], check=True)
        dt = time.perf_counter() - t
        print(f"| {label} | {args.count / dt:.1f} images/s |", flush=True)


if __name__ == "__main__":
    main()
