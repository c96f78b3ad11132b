"""Training throughput: optimiser steps per second and the convolution FLOP rate they reach.

For the paper's network (base 64, depth 4, valid padding) at input tile 572 (output 388), batch 1, SGD
with momentum 0.99 and the weighted cross-entropy, as `unet train` runs it (recipe.weighted_loss),
and for comparison the same step of other recipes. FLOPs count every convolution of the forward pass
(model.conv_flops: 2 x multiply-adds) times 3 for forward + backward (the backward pass computes the
gradients of the inputs and of the weights, each about one forward's work).

The reference is the FLOP rate of single 3x3 convolutions with the network's own layer shapes, timed
forward + backward on their own in the same run; the best of them is this machine's practical peak for
the network's arithmetic.

    python benchmarks/bench_train.py                      # CPU (and the GPU too, when there is one)
    python benchmarks/bench_train.py --steps 5 --device cpu

Data loading and augmentation are left out of the step time (they run in worker processes in a real
run) and timed separately per tile.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from unetcli import recipe
from unetcli.model import UNet, UNetConfig, conv_flops, conv_layers, output_size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(config: UNetConfig, tile: int, batch: int, steps: int, device: torch.device,
               precision: str, channels_last: bool, optimizer: str = "sgd") -> float:
    """Median seconds per training step (after two warm-up steps)."""
    torch.manual_seed(0)
    net = UNet(config).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = (torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99) if optimizer == "sgd"
           else torch.optim.Adam(net.parameters(), lr=1e-3))
    out = output_size(config, tile)
    x = torch.randn(batch, config.in_channels, tile, tile, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, config.num_classes, (batch, out, out), device=device)
    w = torch.rand(batch, out, out, device=device) + 0.5
    amp = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
           if precision != "fp32" else None)
    times = []
    for i in range(steps + 2):
        sync(device)
        t = time.perf_counter()
        if amp is not None:
            with amp:
                logits = net(x)
        else:
            logits = net(x)
        loss = recipe.weighted_loss(logits, y, w, "ce")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def single_conv_rate(cin: int, cout: int, side: int, device: torch.device, precision: str,
                     channels_last: bool, repeats: int) -> float:
    """FLOP/s of one 3x3 valid convolution, forward + backward (input and weight gradients)."""
    conv = torch.nn.Conv2d(cin, cout, 3).to(device)
    x = torch.randn(1, cin, side + 2, side + 2, device=device, requires_grad=True)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
           if precision != "fp32" else None)
    times = []
    for i in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        if amp is not None:
            with amp:
                y = conv(x)
        else:
            y = conv(x)
        y.float().sum().backward()
        sync(device)
        if i >= 1:
            times.append(time.perf_counter() - t)
    flops = 3 * 2 * 9 * cin * cout * side * side
    return flops / float(np.median(times))


def augment_time(tile: int, out: int, rounds: int) -> float:
    from unetcli import transforms

    rng = np.random.default_rng(0)
    image = rng.random((512, 512, 1), dtype=np.float32)
    target = (rng.random((512, 512)) > 0.5).astype(np.uint8)
    weights = rng.random((512, 512), dtype=np.float32)
    cfg = transforms.AugmentConfig()
    transforms.augment_tile(rng, cfg, image, target, weights, tile, out)
    t = time.perf_counter()
    for _ in range(rounds):
        transforms.augment_tile(rng, cfg, image, target, weights, tile, out)
    return (time.perf_counter() - t) / rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per recipe (median)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (both when a GPU exists)")
    args = ap.parse_args()
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and args.device in ("auto", "cuda"):
        devices = ([] if args.device == "cuda" else devices) + [torch.device("cuda")]
    print(f"# {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"# {platform.machine()} {os.cpu_count()} logical CPU(s), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; date {time.strftime('%Y-%m-%d %H:%M')}")
    if not torch.cuda.is_available():
        print("# no CUDA GPU on this machine: GPU figures not measured")
    paper = UNetConfig()
    recipes = [("paper: base 64 valid, tile 572", paper, 572, 1, "sgd"),
               ("base 16 same, tile 512", UNetConfig(base=16, padding="same"), 512, 1, "adam"),
               ("base 32 same, tile 512 (the ISBI run)", UNetConfig(base=32, padding="same"), 512, 1, "adam")]
    for device in devices:
        gpu = device.type == "cuda"
        precision = "bf16" if gpu and torch.cuda.is_bf16_supported() else "fp32"
        cl = gpu
        name = torch.cuda.get_device_name(device) if gpu else "CPU"
        print(f"\n## {name}, precision {precision}, channels_last {cl}")
        # the reference: single 3x3 convolutions with shapes of the paper's network at tile 572
        shapes = sorted({(cin, cout, side) for kind, cin, cout, k, side in conv_layers(paper, 572)
                         if kind == "conv" and cin == cout})
        rates = []
        for cin, cout, side in shapes:
            rate = single_conv_rate(cin, cout, side, device, precision, cl, repeats=3 if not gpu else 10)
            rates.append(rate)
            print(f"single 3x3 conv {cin:>4}->{cout:<4} at {side:>3}x{side:<3}: {rate / 1e9:8.1f} GFLOP/s")
        peak = max(rates)
        print(f"best single convolution: {peak / 1e9:.1f} GFLOP/s")
        print("| recipe | s/step | steps/s | output px/s | conv GFLOP/step (fwd+bwd) | GFLOP/s | of best conv |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for label, cfg, tile, batch, opt in recipes:
            dt = time_steps(cfg, tile, batch, args.steps, device, precision, cl, opt)
            flops = 3 * conv_flops(cfg, tile) * batch
            out = output_size(cfg, tile)
            print(f"| {label} | {dt:.3f} | {1 / dt:.3f} | {batch * out * out / dt:,.0f} | "
                  f"{flops / 1e9:.1f} | {flops / dt / 1e9:.1f} | {flops / dt / peak:.0%} |")
        if not gpu:
            for tile, out in ((572, 388), (512, 512)):
                print(f"augmentation of one {tile} tile (numpy, defaults, 1 core): "
                      f"{augment_time(tile, out, 5) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
