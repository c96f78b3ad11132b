"""Elastic deformation speed: `unetcli.transforms` next to the `elasticdeform` package, in one run.

Equal work: a 572x572 image (an ISBI slice mirrored from 512 to 572) and its labels, a 3x3 grid of
displacements with sigma 10 px, cubic interpolation for the image and nearest neighbour for the
labels, mirrored borders, the whole 572x572 output. Also timed: the same deformation sampled with
scipy's cubic B-spline (what elasticdeform interpolates with), a training tile with every default
augmentation (572 in, 388 labels out) and the torch path (grid_sample) on the CPU and, where there is
one, on the GPU. numpy, scipy and elasticdeform compute on one core; torch is set to one thread
too. The calls are interleaved round by round, so that a busy machine slows all alike;
the figures are medians.

    python benchmarks/bench_augment.py [--rounds 40]

Needs `pip install '.[bench]'` for elasticdeform (under numpy 2, build it from source:
`pip install --no-binary elasticdeform --no-build-isolation elasticdeform`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import torch

from unetcli import transforms as T

ROOT = Path(__file__).resolve().parents[1]
ISBI = ROOT.parent / "shared" / "data" / "isbi2012" / "train"


def load_slice() -> tuple[np.ndarray, np.ndarray, str]:
    if (ISBI / "images" / "00.png").is_file():
        from unetcli.images import read_image

        image = read_image(ISBI / "images" / "00.png")[0, :, :, 0].astype(np.float32) / 255.0
        labels = np.array(read_image(ISBI / "labels" / "00.png")[0, :, :, 0])
        return image, labels, "ISBI 2012 train slice 00 (512x512), mirrored to 572x572"
    rng = np.random.default_rng(0)
    return (rng.random((512, 512), dtype=np.float32), (rng.random((512, 512)) > 0.5).astype(np.uint8) * 255,
            "random 512x512 image (ISBI data not found), mirrored to 572x572")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--draws", type=int, default=1000, help="draws for the folding check")
    args = parser.parse_args()

    slice_, labels512, source = load_slice()
    image = np.pad(slice_, 30, mode="reflect")
    labels = np.pad(labels512, 30, mode="reflect")
    image3 = image[..., None]
    weights512 = np.where(labels512 > 0, 1.0, 3.0).astype(np.float32)
    rng = np.random.default_rng(0)
    elastic = T.AugmentConfig.only("elastic", grid=3, sigma=10.0, order=3)
    defaults = T.AugmentConfig()

    cases: dict[str, callable] = {}
    try:
        import elasticdeform

        cases["elasticdeform.deform_random_grid (cubic B-spline + nearest)"] = lambda: \
            elasticdeform.deform_random_grid([image, labels], sigma=10, points=3, order=[3, 0], mode="mirror")
        ed_version = getattr(elasticdeform, "__version__", None) or _dist_version("elasticdeform")
    except ImportError:
        ed_version = "not installed"

    cases["unet numpy: augment_sample, elastic only (bicubic + nearest)"] = lambda: \
        T.augment_sample(rng, elastic, image3, labels)

    def scipy_bspline():
        from scipy import ndimage

        params = T.sample_params(rng, elastic)
        ys, xs = T.source_coordinates(params, image.shape)
        out = ndimage.map_coordinates(image, [ys, xs], order=3, mode="mirror", output=np.float32)
        return out, T.sample_nearest(labels, ys, xs)

    cases["unet coordinates + scipy map_coordinates (cubic B-spline + nearest)"] = scipy_bspline
    cases["unet numpy: augment_tile, all defaults, 572 in / 388 labels+weights out"] = lambda: \
        T.augment_tile(rng, defaults, slice_[..., None], labels512, weights512, 572, 388)

    # one thread, like numpy and elasticdeform: on a shared 2-core machine, a second intra-op thread
    # mostly waits for a busy core (and makes torch ten times slower)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    timg = torch.from_numpy(image)[None, None].contiguous()
    tlab = torch.from_numpy(labels)[None].contiguous()
    cases["unet torch CPU: augment_batch_torch, elastic only, batch 1"] = lambda: \
        T.augment_batch_torch(timg, tlab, None, elastic, gen, 572)
    timg8, tlab8 = timg.repeat(8, 1, 1, 1), tlab.repeat(8, 1, 1)
    per_sample = {"unet torch CPU: augment_batch_torch, elastic only, batch 8 (per sample)": 8}
    cases["unet torch CPU: augment_batch_torch, elastic only, batch 8 (per sample)"] = lambda: \
        T.augment_batch_torch(timg8, tlab8, None, elastic, gen, 572)

    gpu = torch.cuda.is_available()
    if gpu:
        dev = torch.device("cuda")
        ggen = torch.Generator(device=dev).manual_seed(0)
        gimg8, glab8 = timg8.to(dev), tlab8.to(dev)

        def on_gpu():
            out = T.augment_batch_torch(gimg8, glab8, None, elastic, ggen, 572)
            torch.cuda.synchronize()
            return out

        name = f"unet torch GPU ({torch.cuda.get_device_name()}): batch 8 (per sample)"
        cases[name] = on_gpu
        per_sample[name] = 8

    for fn in cases.values():   # warm up: caches, lazy imports, allocator
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000 / per_sample.get(name, 1))

    print(f"# bench_augment: {' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])}")
    print(f"date: {datetime.date.today().isoformat()}; machine: {platform.machine()}, "
          f"{os.cpu_count()} CPU cores ({_cpu_name()}), torch threads {torch.get_num_threads()}"
          + ("" if gpu else "; no GPU (GPU figure not measured)"))
    print(f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
          f"torch {torch.__version__}, elasticdeform {ed_version}")
    print(f"input: {source}; grid 3x3, sigma 10 px; {args.rounds} interleaved rounds, median (min)")
    print()
    print("| method | ms per call (median) | min |")
    print("| --- | ---: | ---: |")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.1f} | {min(ts):.1f} |")

    # folding: the smallest Jacobian determinant of the default elastic deformation
    frng = np.random.default_rng(0)
    worst = {(572, 572): np.inf, (512, 512): np.inf}
    for _ in range(args.draws):
        params = T.sample_params(frng, defaults)
        for shape in worst:
            worst[shape] = min(worst[shape], float(T.jacobian_determinant(params.displacements, shape).min()))
    print()
    print(f"folding, {args.draws} draws at the defaults (grid 3, sigma 10): smallest det(I + grad d) = "
          + ", ".join(f"{v:.3f} on {h}x{w}" for (h, w), v in worst.items())
          + " (positive: no fold)")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    main()
