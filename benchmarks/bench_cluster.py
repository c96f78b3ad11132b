"""Prediction on a Dask cluster against one process: time, peak memory per worker, the same output.

Writes a SIZE x SIZE OME-Zarr image (a mosaic of the ISBI training slices, chunks of CHUNK pixels),
then predicts its mask

1. in one process with 2 threads, the real command line in a fresh process::

       unet predict in.zarr -o single.zarr -m MODEL --tile T --threads 2

2. on a ``LocalCluster`` of N single-threaded worker processes (N = 1 and 2: the scaling table),
   through the library (``unetcli.cluster.predict_chunked``, what ``--cluster local:N --threads 1``
   runs), timing the cluster's start apart from the prediction, and reading each worker's peak
   resident memory (``ru_maxrss`` of the worker process) at the end;

and checks that every cluster mask equals the single-process mask pixel for pixel. It also prints how
the work divides: blocks, tiles per block, input pixels read per block against the pixels it owns (the
context margins), bytes per block in and out, and the model's bytes, sent once to each worker.

    python benchmarks/bench_cluster.py                          # 8192 x 8192, em-membranes: long
    python benchmarks/bench_cluster.py --size 1024 --rounds 1      # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_predict_memory import mosaic  # noqa: E402  (the ISBI slices side by side)


def write_input(path: Path, image: np.ndarray, chunk: int) -> None:
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", data=image, chunks=(chunk, chunk))
    group.attrs["multiscales"] = [{"version": "0.4", "name": "mosaic",
                                   "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                                   "datasets": [{"path": "0", "coordinateTransformations": [
                                       {"type": "scale", "scale": [1.0, 1.0]}]}]}]


def single_process(args: list[str]) -> tuple[float, float, float]:
    """Run a command in a fresh process; (wall seconds, the prediction's seconds as the command reports
    them, peak RSS MiB from wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode("utf-8", "replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {shlex.join(args)}\n{err[-2000:]}")
    import re

    found = re.search(r", ([0-9.]+) s\)\s*$", err.strip())
    return wall, float(found.group(1)) if found else wall, usage.ru_maxrss / 1024


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _warm(model, options: tuple, tile: int) -> str:
    """On a worker: build its predictor and run one tile (torch imported, the tile shape compiled)."""
    import socket

    from unetcli.cluster import worker_predictor

    pred = worker_predictor(model, options)
    pred.predict(np.zeros((tile, tile, model.config.in_channels), np.float32))
    return socket.gethostname()


def on_cluster(workers: int, model_path: str, source: Path, output: Path, tile: int | None, chunk: int,
               extra: dict) -> dict:
    """Predict on a fresh LocalCluster of ``workers`` single-threaded workers; times and peaks. The
    workers are warmed up first (predictor built, tile shape compiled: what every run pays once per
    worker), and that is timed apart."""
    from unetcli import cluster, pipeline
    from unetcli.checkpoint import load_model
    from unetcli.inference import load_predictor

    model = load_model(model_path)
    options = dict(extra, tile=tile, threads=1)
    predictor = load_predictor(model, **options)
    t0 = time.perf_counter()
    with cluster.Cluster(cluster.parse_cluster(f"local:{workers}")) as dask_cluster:
        started = time.perf_counter() - t0
        t1 = time.perf_counter()
        opts = cluster.predictor_options(**options)
        shared = dask_cluster.share(model, f"model-{model.sha256}")
        addresses = list(dask_cluster.client.scheduler_info(n_workers=-1)["workers"])
        dask_cluster.client.gather([dask_cluster.client.submit(_warm, shared, opts, tile, workers=[a], pure=False)
                                    for a in addresses])
        warm = time.perf_counter() - t1
        report = cluster.predict_chunked(dask_cluster, model, predictor, str(source), str(output),
                                         pipeline.Output(kind="mask"), options=cluster.predictor_options(**options),
                                         chunk=chunk)
        peaks = dask_cluster.client.run(_peak_rss_mib)
    return {"workers": workers, "start_s": started, "warm_s": warm, "predict_s": report.seconds, "tile": report.tile,
            "block": report.block, "blocks": report.blocks, "peaks_mib": sorted(peaks.values())}


def division(model_path: str, size: int, tile: tuple[int, int], chunk: int) -> dict:
    """How the work divides: blocks, tiles per block, input read per block against pixels owned."""
    from unetcli.checkpoint import load_model
    from unetcli.chunked import block_grid, block_window
    from unetcli.tiling import plan_tiles

    model = load_model(model_path)
    plan = plan_tiles(model.config, size, size, tile=tile)
    grid = block_grid(plan, chunk)
    read = owned = tiles = 0
    for _by, _bx, rect in grid.rects():
        wy0, wy1, wx0, wx1 = block_window(plan, rect)
        read += (wy1 - wy0) * (wx1 - wx0)
        owned += (rect[1] - rect[0]) * (rect[3] - rect[2])
        ky = sum(1 for k, s in enumerate(plan.y.starts) if s < rect[1] and plan.y.final_until(k) > rect[0])
        kx = sum(1 for k, s in enumerate(plan.x.starts) if s < rect[3] and plan.x.final_until(k) > rect[2])
        tiles += ky * kx
    return {"blocks": grid.count, "block": grid.block, "tiles_per_block": tiles / grid.count,
            "read_per_owned": read / owned, "input_bytes_per_block": read / grid.count,
            "output_bytes_per_block": owned / grid.count, "model_bytes": os.path.getsize(model_path),
            "margin": plan.y.margin}


def read_mask(path: Path) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(str(path / "0"), mode="r")[:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=1024, help="input Zarr chunks and blocks (pixels)")
    parser.add_argument("--model", default="em-membranes")
    parser.add_argument("--tile", type=int, default=None, help="default: the cluster's choice for a block")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every run, interleaved")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()

    from unetcli.checkpoint import load_model, resolve_model
    from unetcli.inference import load_predictor

    model_path = str(resolve_model(args.model))
    extra = {"backend": args.backend, "precision": args.precision}
    tile = args.tile
    if tile is None:                    # the cluster's rule: the tile that suits a block
        pred = load_predictor(load_model(model_path), **extra)
        tile = pred.plan(min(args.size, args.chunk), min(args.size, args.chunk)).tile[0]
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        tmp = Path(tmp)
        src = tmp / "in.zarr"
        write_input(src, mosaic(args.size), args.chunk)
        print(f"image {args.size}x{args.size} uint8, OME-Zarr chunks {args.chunk}; model {args.model}; "
              f"tile {tile}; backend {args.backend}, precision {args.precision}; {os.cpu_count()} CPUs")
        single_cmd = [sys.executable, "-m", "unetcli", "predict", str(src), "-o", str(tmp / "single.zarr"),
                      "-m", model_path, "--tile", str(tile), "--threads", "2", "--backend", args.backend,
                      "--precision", args.precision]
        # The rounds interleave the runs (single process, then each cluster size), so that a noisy spell
        # of the machine hits them alike; the table gives the best round of each and every round's time.
        rows: dict[str, dict] = {}
        for k in range(args.rounds):
            wall, secs, rss = single_process(single_cmd)
            reference = read_mask(tmp / "single.zarr")
            r = rows.setdefault("single", {"run": "1 process, 2 threads", "times": [], "peak_mib": [0.0]})
            r["times"].append(secs)
            r["peak_mib"] = [max(r["peak_mib"][0], rss)]
            print(f"round {k + 1}: single process, 2 threads: {secs:.1f} s predicting ({wall:.1f} s the whole "
                  f"command), peak {rss:.0f} MiB", flush=True)
            shutil.rmtree(tmp / "single.zarr")
            for n in args.workers:
                out = tmp / f"cluster{n}.zarr"
                got = on_cluster(n, model_path, src, out, tile, args.chunk, extra)
                mask = read_mask(out)
                diff = int(np.count_nonzero(mask != reference))
                shutil.rmtree(out)
                r = rows.setdefault(n, {"run": f"LocalCluster {n} x 1 thread", "times": [], "start_s": [],
                                        "warm_s": [], "peak_mib": [], "pixels_differing": 0})
                r["times"].append(got["predict_s"])
                r["start_s"].append(got["start_s"])
                r["warm_s"].append(got["warm_s"])
                r["peak_mib"] = [max(a, b) for a, b in zip(r["peak_mib"], got["peaks_mib"])] or got["peaks_mib"]
                r["pixels_differing"] = max(r["pixels_differing"], diff)
                r["blocks"], r["block"] = got["blocks"], got["block"]
                print(f"round {k + 1}: LocalCluster {n} worker(s) x 1 thread: {got['predict_s']:.1f} s predicting "
                      f"(+{got['start_s']:.1f} s starting the cluster, +{got['warm_s']:.1f} s warming the workers "
                      f"up), {got['blocks']} blocks of {got['block'][0]}x{got['block'][1]}, worker peaks "
                      f"{', '.join(f'{p:.0f}' for p in got['peaks_mib'])} MiB; {diff} px differ from the single "
                      f"process", flush=True)
        rows = list(rows.values())
        for r in rows:
            r["seconds"] = min(r["times"])
            if "pixels_differing" in r:
                r["same_mask"] = r["pixels_differing"] == 0
        div = division(model_path, args.size, (tile, tile), args.chunk)
        print(f"division: {div['blocks']} blocks of {div['block'][0]}x{div['block'][1]}, "
              f"{div['tiles_per_block']:.1f} tiles per block, input read per block "
              f"{div['input_bytes_per_block'] / 2**20:.2f} MiB (uint8) = {div['read_per_owned']:.3f} x the pixels "
              f"it owns (margin {div['margin']} px a side), output {div['output_bytes_per_block'] / 2**20:.2f} MiB "
              f"(uint8 mask), model {div['model_bytes'] / 2**20:.1f} MiB once per worker")
        print()
        print("| run | predict (s), best of rounds | every round (s) | speed-up | peak memory per process (MiB) | mask |")
        print("| --- | ---: | --- | ---: | --- | --- |")
        base = rows[0]["seconds"]
        one = next((r["seconds"] for r in rows if r["run"].startswith("LocalCluster 1 ")), None)
        for r in rows:
            speed = f"{base / r['seconds']:.2f}x vs 1 process" + (f", {one / r['seconds']:.2f}x vs 1 worker"
                                                                   if one and r['run'].startswith("LocalCluster") else "")
            same = "reference" if "same_mask" not in r else ("identical" if r["same_mask"] else
                                                              f"{r['pixels_differing']} px differ")
            print(f"| {r['run']} | {r['seconds']:.1f} | {', '.join(f'{t:.1f}' for t in r['times'])} | {speed} | {', '.join(f'{p:.0f}' for p in r['peak_mib'])} | {same} |")
        if args.json:
            args.json.write_text(json.dumps({"size": args.size, "chunk": args.chunk, "tile": tile, "model": args.model,
                                             "rows": rows, "division": div}, indent=1, default=str))


if __name__ == "__main__":
    main()
