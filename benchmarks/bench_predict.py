"""Prediction speed of the paper's network: compute efficiency, and against the usual tile loop.

One process measures, interleaved so that other load on the machine hits every contender alike:

1. ``unet``'s predictor (default settings: the tile that needs the fewest operations within the default
   memory budget, channels-last, the thread count it picks) on a 2048 x 2048 image;
2. every distinct 3x3 convolution shape of the network at the sides it has in that tile, each on its
   own (channels-last and contiguous, the same thread count; best of several calls): the best of these
   rates is this machine's practical peak for the network;
3. the plain loop most U-Net code runs: mirror-pad the image once, feed 572 x 572 tiles one at a time
   in fp32 to ``net(x)`` (contiguous NCHW, torch's default threads), write each 388 x 388 output;
4. the tile's own convolutions one by one, each alone (channels-last), their times summed: what the
   prediction would take with no other work at all.

It prints the convolution FLOP rate of the prediction (FLOPs of every convolution executed, counted by
``model.conv_flops``, over wall time) against that peak, and output pixels per second of both loops.

    python benchmarks/bench_predict.py                 # about 6 minutes on a 2-core CPU
    python benchmarks/bench_predict.py --size 1024 --repeats 2 --loop-threads same
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unetcli.inference import Predictor  # noqa: E402
from unetcli.model import UNet, UNetConfig, conv_flops, conv_layers, margin, output_size  # noqa: E402


def test_image(size: int) -> np.ndarray:
    """A size x size mosaic of the ISBI training slices (real EM content), normalised; noise if absent."""
    folder = ROOT.parent / "shared" / "data" / "isbi2012" / "train" / "images"
    files = sorted(folder.glob("*.png"))
    if files:
        from unetcli.images import read_image

        tiles = [read_image(f)[0, ..., 0] for f in files]
        reps = math.ceil(size / tiles[0].shape[0])
        rows = [np.concatenate([tiles[(r * reps + c) % len(tiles)] for c in range(reps)], 1) for r in range(reps)]
        img = np.concatenate(rows, 0)[:size, :size].astype(np.float32)
    else:
        img = np.random.default_rng(0).normal(128, 40, (size, size)).astype(np.float32)
    return ((img - img.mean()) / img.std())[..., None]


def plain_loop(net: torch.nn.Module, image: np.ndarray, tile: int = 572) -> np.ndarray:
    """What most U-Net code does: pad by mirroring, one 572 tile at a time, fp32, contiguous NCHW."""
    config = net.config
    h, w = image.shape[:2]
    m, o = margin(config), output_size(config, tile)
    ny, nx = math.ceil(h / o), math.ceil(w / o)
    padded = np.pad(image[..., 0], ((m, ny * o - h + m), (m, nx * o - w + m)), mode="reflect")
    out = np.empty((config.num_classes, ny * o, nx * o), np.float32)
    with torch.no_grad():
        for i in range(ny):
            for j in range(nx):
                x = torch.from_numpy(padded[i * o:i * o + tile, j * o:j * o + tile].copy())[None, None]
                out[:, i * o:(i + 1) * o, j * o:(j + 1) * o] = torch.softmax(net(x), 1)[0].numpy()
    return out[:, :h, :w]


def conv_peak(config: UNetConfig, tile: tuple[int, int], threads: int, calls: int) -> tuple[float, str, float]:
    """Best FLOP rate of one 3x3 convolution of the network's own shapes, alone, at the tile's sides;
    and the rate of all the tile's convolutions (3x3, up and head) timed one by one, alone, summed."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    best, where, total_time, total_flops = 0.0, "", 0.0, 0
    layers = zip(conv_layers(config, tile[0]), conv_layers(config, tile[1]))
    try:
        with torch.inference_mode():
            for (kind, cin, cout, k, sy), (_, _, _, _, sx) in layers:
                if kind == "up":
                    conv, x = torch.nn.ConvTranspose2d(cin, cout, 2, 2), torch.randn(1, cin, sy // 2, sx // 2)
                    flops = 2 * cin * cout * sy * sx
                else:
                    conv, x = torch.nn.Conv2d(cin, cout, k), torch.randn(1, cin, sy + k - 1, sx + k - 1)
                    flops = 2 * k * k * cin * cout * sy * sx
                layer_best = 0.0
                layouts = ("channels_last", "contiguous") if kind == "conv" and cin > 1 else ("channels_last",)
                for layout in layouts:
                    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                    c = conv.eval().to(memory_format=fmt)
                    xf = x.contiguous(memory_format=fmt)
                    c(xf)
                    for _ in range(calls):
                        t = time.perf_counter()
                        c(xf)
                        rate = flops / (time.perf_counter() - t)
                        if layout == "channels_last":
                            layer_best = max(layer_best, rate)
                        if kind == "conv" and cin > 1 and rate > best:
                            best, where = rate, f"{cin}->{cout} at {sy}x{sx}, {layout}"
                total_time += flops / layer_best
                total_flops += flops
    finally:
        torch.set_num_threads(saved)
    return best, where, total_flops / total_time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each loop (best is kept)")
    ap.add_argument("--conv-calls", type=int, default=3)
    ap.add_argument("--loop-threads", choices=("default", "same"), default="default",
                    help="threads of the plain loop: torch's default, or the same number unet uses")
    args = ap.parse_args()

    config = UNetConfig()                                 # the paper's: depth 4, base 64, valid
    torch.manual_seed(0)
    net = UNet(config).eval()
    image = test_image(args.size)
    pred = Predictor(UNet(config), config, device="cpu")
    pred.net.load_state_dict(net.state_dict())
    plan = pred.plan(args.size, args.size)
    threads = pred.threads_for(plan, 1)
    flops = plan.count * conv_flops(config, *plan.tile)
    loop_threads = torch.get_num_threads() if args.loop_threads == "default" else threads
    default_threads = torch.get_num_threads()
    pixels = args.size * args.size
    print(f"# {datetime.date.today()}  {platform.machine()} {torch.get_num_threads()} torch threads by default, "
          f"torch {torch.__version__}", flush=True)
    print(f"# unet plan: tile {plan.tile[0]}x{plan.tile[1]}, {plan.count} tiles, {flops / 1e12:.2f} TFLOP, "
          f"{threads} thread(s); plain loop: 572x572, {math.ceil(args.size / 388) ** 2} tiles, "
          f"{math.ceil(args.size / 388) ** 2 * conv_flops(config, 572, 572) / 1e12:.2f} TFLOP, "
          f"{loop_threads} thread(s)", flush=True)

    peak_before, where_before, layers_before = conv_peak(config, plan.tile, threads, args.conv_calls)
    print(f"# single-convolution peak (before): {peak_before / 1e9:.1f} GFLOP/s ({where_before})", flush=True)
    best_unet, best_loop = math.inf, math.inf
    for r in range(args.repeats):
        t = time.perf_counter()
        probs = pred.predict(image)
        dt = time.perf_counter() - t
        best_unet = min(best_unet, dt)
        print(f"run {r + 1}: unet predict {dt:.1f} s, {flops / dt / 1e9:.1f} GFLOP/s, "
              f"{pixels / dt / 1e3:.1f} kpx/s", flush=True)
        torch.set_num_threads(loop_threads)
        t = time.perf_counter()
        ref = plain_loop(net, image)
        dt = time.perf_counter() - t
        torch.set_num_threads(default_threads)
        best_loop = min(best_loop, dt)
        print(f"run {r + 1}: plain 572 loop {dt:.1f} s, {pixels / dt / 1e3:.1f} kpx/s", flush=True)
    peak_after, where_after, layers_after = conv_peak(config, plan.tile, threads, args.conv_calls)
    print(f"# single-convolution peak (after): {peak_after / 1e9:.1f} GFLOP/s ({where_after})", flush=True)
    peak = max(peak_before, peak_after)
    layers_rate = max(layers_before, layers_after)
    rate = flops / best_unet
    print()
    print("| measure | value |")
    print("| --- | ---: |")
    print(f"| unet predict, {args.size}x{args.size}, tile {plan.tile[0]}x{plan.tile[1]} ({plan.count} tiles), "
          f"{threads} thread(s) | {best_unet:.1f} s |")
    print(f"| convolution FLOP rate during prediction | {rate / 1e9:.1f} GFLOP/s |")
    print(f"| best single 3x3 convolution of the network alone | {peak / 1e9:.1f} GFLOP/s |")
    print(f"| efficiency (target >= 80%) | {100 * rate / peak:.0f}% |")
    print(f"| the tile's own convolutions (3x3, up, head) each alone, channels-last, times summed | "
          f"{layers_rate / 1e9:.1f} GFLOP/s |")
    print(f"| prediction against its own convolutions alone | {100 * rate / layers_rate:.0f}% |")
    print(f"| unet predict output pixels/s | {pixels / best_unet / 1e3:.1f} k |")
    print(f"| plain 572 loop ({loop_threads} thread(s)) output pixels/s | {pixels / best_loop / 1e3:.1f} k |")
    print(f"| speed-up over the plain loop (target >= 1.5) | {best_loop / best_unet:.2f}x |")
    differ = float((np.argmax(probs, 0) != np.argmax(ref, 0)).mean())
    print(f"\nunet against the plain loop: mean |difference| of probabilities {np.abs(probs - ref).mean():.2e}, "
          f"{100 * differ:.2f}% of mask pixels differ (the loop's 388-pixel stride is not a multiple of 16, "
          "so its tiles see shifted pooling grids; unet's result equals one tile covering the image)")


if __name__ == "__main__":
    main()
