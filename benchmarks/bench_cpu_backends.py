"""Inference on the CPU, every path side by side: `unet predict`'s default against torch (fp32, bf16),
ONNX Runtime (fp32) and OpenVINO (fp32, bf16) running the same exported network on the same input.

Two cases (issue 17):

- the paper's U-Net (base 64, depth 4, valid padding, He-initialised weights) on one 572x572 tile
  (`unet predict --tile 572` on a 388x388 image: one tile, its context mirrored);
- the shipped `em-membranes` model on a whole ISBI 2012 slice (512x512): the references run the
  exported network once on the slice mirrored out to the smallest input the network takes, the
  predictors of `unet predict` run their overlap-tile engine (tiles, blending, stitching included).

Rounds are interleaved (one call of every path per round, in a shuffled order) and the best of the
rounds is reported, with the median beside it; the machine should be otherwise idle. Converting for
ONNX Runtime and OpenVINO happens before timing (the predictor's OpenVINO network comes from its cache
after the first round, as in a second `unet predict` run).

    python benchmarks/bench_cpu_backends.py              # needs the bench extra: pip install '.[bench]'
    python benchmarks/bench_cpu_backends.py --rounds 7 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unetcli.checkpoint import load_model  # noqa: E402
from unetcli.devices import cpu_native_bf16, resolve_precision  # noqa: E402
from unetcli.inference import Predictor, load_predictor  # noqa: E402
from unetcli.model import UNet, UNetConfig, output_size  # noqa: E402
from unetcli.tiling import mirror_index  # noqa: E402


def smallest_cover(config: UNetConfig, side: int) -> int:
    """The smallest valid input whose output covers ``side`` pixels."""
    s = side
    while output_size(config, s) is None or output_size(config, s) < side:
        s += 1
    return s


def mirrored(image: np.ndarray, config: UNetConfig) -> np.ndarray:
    """(1, 1, S, S) float32: the normalised image mirrored out to the smallest input covering it."""
    h, w = image.shape
    s = smallest_cover(config, max(h, w))
    out = output_size(config, s)
    top, left = (s - out) // 2, (s - out) // 2
    ys = mirror_index(np.arange(s) - top, h)
    xs = mirror_index(np.arange(s) - left, w)
    x = image[np.ix_(ys, xs)].astype(np.float32)
    x = (x - x.mean()) / (x.std() + 1e-6)
    return x[None, None]


def references(net: torch.nn.Module, x: np.ndarray, threads: int, work: Path) -> dict:
    """name -> callable running the exported network on ``x``: torch fp32/bf16, ORT fp32, OV fp32/bf16."""
    paths = {}
    xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
    net_cl = net.to(memory_format=torch.channels_last)

    def torch_run(bf16: bool):
        def run():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return net_cl(xt).float().numpy()
        return run

    paths["torch fp32 (channels-last)"] = torch_run(False)
    paths["torch bf16 autocast"] = torch_run(True)
    try:
        import onnxruntime as ort

        onnx_path = work / "net.onnx"
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")            # the legacy exporter's deprecation note
            torch.onnx.export(net.to(memory_format=torch.contiguous_format), torch.from_numpy(x),
                              str(onnx_path), input_names=["x"], output_names=["y"], dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        paths["ONNX Runtime fp32"] = lambda: sess.run(None, {"x": x})[0]
    except Exception as exc:  # noqa: BLE001 - a missing reference is reported, not fatal
        print(f"(ONNX Runtime not measured: {type(exc).__name__}: {str(exc)[:120]})")
    try:
        from unetcli.backends import import_openvino

        ov = import_openvino()
        core = ov.Core()
        with torch.no_grad():
            model = ov.convert_model(net.to(memory_format=torch.contiguous_format), example_input=torch.from_numpy(x))
        for prec in ("f32", "bf16"):
            compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": prec,
                                                         "PERFORMANCE_HINT": "LATENCY",
                                                         "INFERENCE_NUM_THREADS": threads})
            paths[f"OpenVINO {'fp32' if prec == 'f32' else 'bf16'}"] = (lambda c=compiled: c(x)[0])
    except Exception as exc:  # noqa: BLE001
        print(f"(OpenVINO not measured: {type(exc).__name__}: {str(exc)[:120]})")
    return paths


def predictors(net: torch.nn.Module, config: UNetConfig, image: np.ndarray, threads: int,
               model=None) -> dict:
    """name -> callable predicting ``image`` with unet's overlap-tile engine."""
    def make(backend: str, precision: str):
        if model is not None:
            pred = load_predictor(model, device="cpu", backend=backend, precision=precision, threads=threads)
        else:
            pred = Predictor(net, config, device="cpu", backend=backend, precision=precision,
                             threads=threads, tile=572, mean=[float(image.mean())], std=[float(image.std())])
        return lambda: pred.predict(image[..., None])

    auto = resolve_precision("auto", torch.device("cpu"))
    return {f"unet predict default (auto: {'openvino' if _has_ov() else 'torch'} {auto})": make("auto", "auto"),
            "unet predict --backend torch --precision fp32": make("torch", "fp32"),
            "unet predict --backend torch --precision bf16": make("torch", "bf16")}


def _has_ov() -> bool:
    from unetcli.backends import openvino_installed

    return openvino_installed()


def race(paths: dict, rounds: int) -> dict:
    times = {name: [] for name in paths}
    for fn in paths.values():   # warm-up (and the predictor's first conversion)
        fn()
    for _ in range(rounds):
        order = list(paths)
        random.shuffle(order)
        for name in order:
            t = time.perf_counter()
            paths[name]()
            times[name].append(time.perf_counter() - t)
    return times


def report(title: str, times: dict, against: str) -> None:
    best_ref = min(times[against]) if against in times else None
    print(f"\n### {title}\n")
    print("| path | best (s) | median (s) | speed vs OpenVINO bf16 |")
    print("| --- | ---: | ---: | ---: |")
    for name, ts in times.items():
        rel = f"{best_ref / min(ts):.2f}x" if best_ref else "-"
        print(f"| {name} | {min(ts):.3f} | {statistics.median(ts):.3f} | {rel} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--model", default=str(ROOT / "pretrained" / "em-membranes.unet"))
    ap.add_argument("--image", default=str(ROOT.parent / "shared" / "data" / "isbi2012" / "train" / "images" / "25.png"))
    ap.add_argument("--only", choices=("paper", "em"), default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} threads; native bf16: {cpu_native_bf16()}; torch {torch.__version__}")
    from imageio.v3 import imread

    slice_ = np.asarray(imread(args.image), np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("UNET_CACHE", str(Path(tmp) / "cache"))
        if args.only in (None, "paper"):
            torch.manual_seed(0)
            config = UNetConfig()                       # the paper's: base 64, depth 4, valid
            net = UNet(config).eval()
            # the references run one 572x572 input; `unet predict --tile 572` predicts a 388x388 image
            # (the tile's output) with the same one tile, its context mirrored from the image
            crop = slice_[:388, :388]
            ys = mirror_index(np.arange(572) - 92, 388)
            tile = crop[np.ix_(ys, ys)]
            x = ((tile - tile.mean()) / tile.std()).astype(np.float32)[None, None]
            paths = {**references(net, x, args.threads, Path(tmp)),
                     **predictors(net, config, crop, args.threads)}
            report("the paper's U-Net, one 572x572 tile (output 388x388)", race(paths, args.rounds),
                   "OpenVINO bf16")
        if args.only in (None, "em"):
            mf = load_model(args.model)
            net = mf.network("cpu")
            x = (mirrored(slice_, mf.config) if mf.config.padding == "valid"
                 else ((slice_ - slice_.mean()) / slice_.std()).astype(np.float32)[None, None])
            paths = {**references(net, x, args.threads, Path(tmp)),
                     **predictors(net, mf.config, slice_, args.threads, model=mf)}
            report(f"em-membranes ({mf.config.padding} padding, base {mf.config.base}) on a whole "
                   f"512x512 ISBI slice (references: one call on a {x.shape[-1]}x{x.shape[-1]} input)",
                   race(paths, args.rounds), "OpenVINO bf16")


if __name__ == "__main__":
    main()
