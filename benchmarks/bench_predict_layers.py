"""Where the paper's network spends its time: every convolution of one tile, timed alone.

For each layer of the paper's network (base 64, depth 4, valid padding) at the sides it has in a
``--tile`` input, one convolution on random data, channels-last, best of three calls, with its ReLU
for the 3x3 layers (as the network runs them). Prints GFLOP/s and milliseconds per layer, and the
sum: the rate of the tile's convolutions with no other work at all, which caps the compute
efficiency that ``bench_predict.py`` measures.

    python benchmarks/bench_predict_layers.py --tile 700      # about a minute on a 2-core CPU
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unetcli.model import UNetConfig, conv_layers  # noqa: E402


def best(call, repeats: int = 3) -> float:
    call()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tile", type=int, default=700)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = UNetConfig()
    cl = torch.channels_last
    print(f"# {datetime.date.today()}  torch {torch.__version__}, {args.threads} thread(s), tile {args.tile}")
    print("| layer | side | GFLOP/s | ms |")
    print("| --- | ---: | ---: | ---: |")
    total_t = total_f = 0.0
    with torch.inference_mode():
        for kind, cin, cout, k, side in conv_layers(config, args.tile):
            if kind == "up":
                m = torch.nn.ConvTranspose2d(cin, cout, 2, 2).eval().to(memory_format=cl)
                x = torch.randn(1, cin, side // 2, side // 2).contiguous(memory_format=cl)
                flops = 2 * cin * cout * side * side
                dt = best(lambda: m(x))
            else:
                m = torch.nn.Conv2d(cin, cout, k).eval().to(memory_format=cl)
                x = torch.randn(1, cin, side + k - 1, side + k - 1).contiguous(memory_format=cl)
                flops = 2 * k * k * cin * cout * side * side
                dt = best(lambda: torch.relu_(m(x)) if kind == "conv" else m(x))
            total_t += dt
            total_f += flops
            print(f"| {kind} {cin}->{cout} {k}x{k} | {side} | {flops / dt / 1e9:.1f} | {dt * 1e3:.1f} |", flush=True)
    print(f"\nall {len(conv_layers(config, args.tile))} layers: {total_t:.2f} s, {total_f / total_t / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
