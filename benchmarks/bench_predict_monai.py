"""`unet`'s tiled prediction against MONAI's ``sliding_window_inference`` for a same-padding U-Net.

Same weights, same image, same tile (roi) size, same overlap and the same Gaussian blending (sigma =
tile / 8) on both sides; both average softmax probabilities (MONAI's predictor is ``softmax(net(x))``)
and run one tile per forward pass with the same number of threads. MONAI runs twice: on the network as
users usually hand it over (contiguous NCHW), and on a channels-last copy (MONAI's best case on a CPU).
The runs are interleaved and the best of ``--repeats`` is kept; the outputs must agree within 1e-4.

MONAI is a benchmark-only extra (``pip install '.[bench]'``), not a dependency of unet.

    python benchmarks/bench_predict_monai.py            # about 3 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_predict import test_image  # noqa: E402
from unetcli.inference import Predictor  # noqa: E402
from unetcli.model import UNet, UNetConfig, conv_flops  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--base", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import monai
    from monai.inferers import sliding_window_inference

    config = UNetConfig(base=args.base, padding="same", dropout=0.0)
    torch.manual_seed(0)
    net = UNet(config).eval()
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    image = test_image(args.size)
    pred = Predictor(copy.deepcopy(net), config, device="cpu", tile=args.tile, overlap=args.overlap,
                     blend="gaussian", batch=1)
    plan = pred.plan(args.size, args.size)
    threads = pred.threads_for(plan, 1)
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)[None]))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    flops = plan.count * conv_flops(config, args.tile, args.tile)

    def ours():
        return pred.predict(image)

    def monai_run(model, inp):
        def predictor(t):
            return torch.softmax(model(t), 1)

        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                return sliding_window_inference(inp, (args.tile, args.tile), 1, predictor, overlap=args.overlap,
                                                mode="gaussian", sigma_scale=0.125)[0].numpy()
        finally:
            torch.set_num_threads(saved)

    runs = {"unet predict": ours,
            "MONAI sliding_window_inference": lambda: monai_run(net, x),
            "MONAI, channels-last network": lambda: monai_run(net_cl, x_cl)}
    print(f"# {datetime.date.today()}  {platform.machine()}, torch {torch.__version__}, MONAI {monai.__version__}; "
          f"same-padding U-Net depth 4 base {args.base}; {args.size}x{args.size} image; tile {args.tile}, "
          f"overlap {args.overlap}, Gaussian blending; {plan.count} tiles; {threads} thread(s)", flush=True)
    best = {k: float("inf") for k in runs}
    outputs = {}
    for r in range(args.repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            outputs[name] = fn()
            dt = time.perf_counter() - t
            best[name] = min(best[name], dt)
            print(f"run {r + 1}: {name}: {dt:.2f} s", flush=True)
    ref = outputs["unet predict"]
    print()
    print("| implementation | best s | Mpx/s | conv GFLOP/s | max abs difference to unet |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in runs:
        diff = float(np.abs(outputs[name] - ref).max())
        print(f"| {name} | {best[name]:.2f} | {args.size ** 2 / best[name] / 1e6:.3f} | "
              f"{flops / best[name] / 1e9:.1f} | {diff:.1e} |")
    speed = best["MONAI sliding_window_inference"] / best["unet predict"]
    print(f"\nunet is {speed:.2f}x as fast as MONAI (target >= 1.0), "
          f"{best['MONAI, channels-last network'] / best['unet predict']:.2f}x against MONAI on a channels-last network")


if __name__ == "__main__":
    main()
