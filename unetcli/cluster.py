"""Prediction on a Dask cluster: one huge image block by block, or many files, seamless and resumable.

``--cluster local:N`` starts a ``distributed.LocalCluster`` of N single-threaded worker processes here
(N at most the cores); ``--cluster tcp://HOST:PORT`` joins a running ``dask-scheduler`` whose
``dask-worker`` processes (on any machines, with the same unet installed and the files on a shared file
system) do the work. The model file is sent to every worker ONCE (``Client.scatter(..., broadcast=True)``);
each worker process builds its predictor from it on first use and keeps it (:func:`worker_predictor`).

Two kinds of work:

- **One image, block by block** (:func:`predict_chunked`): the output (an OME-Zarr image) is cut into
  blocks of whole tiles (:mod:`unetcli.chunked`); each task reads the input window its block needs (the
  block plus the network's context, mirrored at the image border only), runs the block's tiles through
  the predictor, and writes its block into the output, chunk-aligned: nothing is gathered. The result
  equals single-process prediction with the same tile bit for bit (CPU). Instance labels take two more
  rounds of tasks (:mod:`unetcli.chunkmerge`): local labels with a margin, a merge of the small
  per-block summaries on the client, a relabelling. The store is written under a temporary name beside
  the output and renamed into place at the end; a failure or Ctrl-C cancels the tasks and removes it.
- **Many files** (:func:`predict_files_cluster`): one task per file, each worker predicting and writing
  its file atomically with :func:`unetcli.pipeline.predict_files`; ``--skip-existing`` (the caller)
  makes a rerun resume.

dask and distributed are optional (the ``cluster`` extra) and imported only here, only when used.
A library module: progress and results through callbacks, typed errors, nothing printed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import shutil
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import numpy as np

from unetcli.errors import ConfigError, UnetError

INSTALL_HINT = "pip install 'unet[cluster]'"
CONNECT_TIMEOUT = 20.0     # seconds to reach a scheduler
WORKER_TIMEOUT = 60.0      # seconds to wait for its first worker

Progress = Callable[[int, str], ContextManager[Callable[[int], None]]]   # (total, label) -> advance(n)
Note = Callable[[str, str], None]

_OVERFLOW = "the network's output overflowed: with --precision bf16 or fp16 try fp32, else check the model file"


def _distributed():
    try:
        import distributed
    except ImportError:
        raise ConfigError("--cluster needs dask's distributed package, which is not installed",
                          hint=INSTALL_HINT) from None
    return distributed


def _no_progress(total: int, label: str) -> ContextManager[Callable[[int], None]]:
    return contextlib.nullcontext(lambda n=1: None)


# ---------------------------------------------------------------------------------------- the cluster

@dataclass(frozen=True)
class ClusterSpec:
    """Where the work runs: ``workers`` local processes, or the scheduler at ``address``."""

    text: str
    workers: int | None = None
    address: str | None = None

    @property
    def local(self) -> bool:
        return self.address is None


_ADDRESS = re.compile(r"(tcp|tls)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")


def parse_cluster(text: str) -> ClusterSpec:
    """``local``, ``local:N`` or ``tcp://HOST:PORT`` (also ``tls://``), checked; N at most the cores."""
    from unetcli import guards

    value = (text or "").strip()
    hint = "use local:N (N worker processes on this machine) or tcp://HOST:PORT (a running dask-scheduler)"
    if value == "local" or value.startswith("local:"):
        count = value[6:] if value.startswith("local:") else str(guards.cpu_cores())
        if not count.isdigit() or int(count) < 1:
            raise ConfigError(f"--cluster {text}: the number of workers must be a whole number from 1", hint=hint)
        cores = guards.cpu_cores()
        if int(count) > cores:
            raise ConfigError(f"--cluster local:{count}: refused, more worker processes than the {cores} "
                              f"core{'s' if cores != 1 else ''} this machine gives us",
                              hint=f"use --cluster local:{cores} or fewer, or tcp://HOST:PORT to use more machines")
        return ClusterSpec(value, workers=int(count))
    match = _ADDRESS.fullmatch(value)
    if match:
        port = int(match.group(3))
        if not 1 <= port <= 65535:
            raise ConfigError(f"--cluster {text}: port {port} is out of range (1-65535)", hint=hint)
        return ClusterSpec(value, address=value)
    raise ConfigError(f"--cluster {text!r}: not a cluster", hint=hint)


def _ignore_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_versions() -> dict:
    import unetcli

    found = {"unet": unetcli.__version__}
    try:
        import torch

        found["torch"] = torch.__version__
    except ImportError:
        found["torch"] = None
    return found


class Cluster:
    """A connection to the workers, as a context manager (a local cluster is stopped on exit)."""

    def __init__(self, spec: ClusterSpec, *, dashboard: bool = False, connect_timeout: float | None = None,
                 worker_timeout: float | None = None):
        self.spec = spec
        self.dashboard = dashboard
        self.connect_timeout = CONNECT_TIMEOUT if connect_timeout is None else connect_timeout
        self.worker_timeout = WORKER_TIMEOUT if worker_timeout is None else worker_timeout
        self.client = None
        self._local = None
        self._log = None
        self._log_level = logging.NOTSET
        self._warnings = None
        self._board = None
        self._config = None
        self._shared: dict = {}

    def __enter__(self) -> "Cluster":
        distributed = _distributed()
        # distributed's own notes (a worker restarted, a slow close) are not the user's business: its
        # errors reach us as the tasks' exceptions
        self._log = logging.getLogger("distributed")
        self._log_level = self._log.level
        self._log.setLevel(logging.CRITICAL)
        # nor are the sockets it leaves to the garbage collector (ResourceWarning) while it runs
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", category=ResourceWarning)
        try:
            if self.spec.local:
                import importlib.util

                import dask

                self._board = ":8787" if self.dashboard and importlib.util.find_spec("bokeh") else None
                board = self._board or ":0"     # the scheduler's HTTP server binds one anyway: any free port
                # workers inherit this process's environment: dask's nanny would set OMP_NUM_THREADS=1,
                # which changes torch's softmax rounding (and OpenVINO's) against single-process runs;
                # each predictor's own thread count is set by its options
                self._config = dask.config.set({"distributed.nanny.pre-spawn-environ":
                                                {"MALLOC_TRIM_THRESHOLD_": 65536}})
                self._config.__enter__()
                try:
                    self._local = distributed.LocalCluster(
                        n_workers=self.spec.workers, threads_per_worker=1, processes=True,
                        dashboard_address=board, silence_logs=logging.CRITICAL)
                except (RuntimeError, OSError, TimeoutError) as exc:
                    raise UnetError(f"--cluster {self.spec.text}: the local workers did not start ({exc})",
                                    hint="run from a script file or the unet command (worker processes "
                                         "re-import the main module), or use --cluster tcp://HOST:PORT") from None
                self.client = distributed.Client(self._local)
                # the workers share this terminal's process group: Ctrl-C is this process's to handle
                # (cancel the tasks, remove the temporary output), not theirs to die of
                self.client.run(_ignore_sigint)
            else:
                try:
                    self.client = distributed.Client(self.spec.address, timeout=self.connect_timeout)
                except (OSError, TimeoutError) as exc:
                    raise UnetError(f"--cluster {self.spec.address}: no scheduler answers ({exc})",
                                    hint="start one with `dask-scheduler` and workers with "
                                         "`dask-worker ADDRESS`, or use --cluster local:N") from None
                try:
                    self.client.wait_for_workers(1, timeout=self.worker_timeout)
                except (TimeoutError, OSError):
                    raise UnetError(f"--cluster {self.spec.address}: the scheduler has no workers "
                                    f"(waited {self.worker_timeout:.0f} s)",
                                    hint="start some with `dask-worker ADDRESS --nthreads 1`") from None
            self._check_workers()
        except BaseException:
            self.close()
            raise
        return self

    def _check_workers(self) -> None:
        import unetcli

        found = self.client.run(_worker_versions)
        for worker, versions in sorted(found.items()):
            if versions.get("unet") != unetcli.__version__:
                raise UnetError(f"worker {worker} runs unet {versions.get('unet')}, this is unet "
                                f"{unetcli.__version__}", hint="install the same unet on every worker")
            if versions.get("torch") is None:
                raise UnetError(f"worker {worker} has no torch installed",
                                hint="install unet with its dependencies on every worker")

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        import gc

        with warnings.catch_warnings():
            # distributed leaves sockets to the garbage collector when a run is cut short: not ours to report
            warnings.simplefilter("ignore", ResourceWarning)
            with contextlib.suppress(Exception):
                if self.client is not None:
                    self.client.close()
            with contextlib.suppress(Exception):
                if self._local is not None:
                    self._local.close()
            with contextlib.suppress(Exception):
                if self._config is not None:
                    self._config.__exit__(None, None, None)
            self.client, self._local, self._config = None, None, None
            gc.collect()
        if self._log is not None:
            self._log.setLevel(self._log_level)
            self._log = None
        if self._warnings is not None:
            self._warnings.__exit__(None, None, None)
            self._warnings = None

    @property
    def workers(self) -> int:
        return len(self.client.scheduler_info(n_workers=-1)["workers"]) if self.client else 0

    @property
    def dashboard_link(self) -> str | None:
        """The Dask dashboard's address, where one runs (a local cluster starts one with ``dashboard``
        when bokeh is installed)."""
        if self.client is None or (self._local is not None and not self._board):
            return None
        try:
            running = "dashboard" in (self.client.scheduler_info(n_workers=0).get("services") or {})
            return self.client.dashboard_link if running else None
        except Exception:
            return None

    def share(self, obj: Any, key: str):
        """``obj`` on every worker, sent once (a future that tasks take as an argument)."""
        if key not in self._shared:
            self._shared[key] = self.client.scatter(obj, broadcast=True, hash=False)
        return self._shared[key]

    def run(self, fn: Callable, calls: Sequence[tuple], *, label: str, what: str | None = None,
            progress: Progress | None = None, on_result: Callable[[int, Any], None] | None = None) -> list:
        """Run ``fn(*args)`` for every ``args`` of ``calls`` on the workers; results in call order.

        ``on_result(i, result)`` as each one finishes (on this thread); ``progress(total, what)`` gets
        one step per finished call (``label`` names the tasks on the dashboard). The first failure (or
        Ctrl-C) cancels the calls not yet done, waits until no worker runs one, and is raised."""
        distributed = _distributed()
        progress = progress or _no_progress
        futures = [self.client.submit(fn, *args, pure=False, key=f"unet-{label}-{i}-{time.monotonic_ns()}")
                   for i, args in enumerate(calls)]
        where = {f.key: i for i, f in enumerate(futures)}
        results: list = [None] * len(futures)
        try:
            with progress(len(futures), what or label) as advance:
                for fut in distributed.as_completed(futures):
                    try:
                        value = fut.result()
                    except distributed.KilledWorker as exc:
                        raise UnetError(f"a worker died while running {label} task {where[fut.key] + 1} "
                                        f"({exc})", hint="out of memory? use a smaller --chunk or more "
                                                         "memory per worker") from None
                    i = where[fut.key]
                    results[i] = value
                    fut.release()
                    if on_result is not None:
                        on_result(i, value)
                    advance(1)
        except BaseException:
            self.cancel(futures)
            raise
        return results

    def cancel(self, futures: Sequence, wait: float = 60.0) -> None:
        """Cancel ``futures`` and wait (at most ``wait`` seconds) until no worker still executes one of
        them (a task cannot be stopped midway; the scheduler forgets it at once, the worker does not),
        so that nothing writes after the caller has cleaned up."""
        if self.client is None:
            return
        keys = {f.key for f in futures}
        with contextlib.suppress(Exception):
            self.client.cancel(list(futures), force=True)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                running = self.client.run(_executing, on_error="ignore")
            except Exception:
                return
            if not any(k in keys for found in running.values() if isinstance(found, list) for k in found):
                return
            time.sleep(0.1)


def _executing(dask_worker) -> list:
    """On a worker: the keys of the tasks its threads are running now (cancelled ones included)."""
    state = getattr(dask_worker, "state", None)
    if state is None:
        return []
    return [ts.key for ts in list(state.executing) + list(state.long_running)]


# ----------------------------------------------------------------------------------- worker side

_PREDICTORS: "OrderedDict[tuple, Any]" = OrderedDict()
_PRED_LOCK = threading.Lock()
_PRED_KEPT = 2


def worker_predictor(model, options: tuple):
    """This worker thread's predictor for ``model`` (a ``checkpoint.ModelFile``) and ``options``
    (sorted (name, value) pairs of ``load_predictor``'s options), built once and kept; each call gets
    its own shallow copy, so per-image settings (statistics, progress) never leak between tasks."""
    from unetcli.inference import load_predictor

    key = (threading.get_ident(), model.sha256 or id(model), options)
    with _PRED_LOCK:
        pred = _PREDICTORS.get(key)
        if pred is not None:
            _PREDICTORS.move_to_end(key)
    if pred is None:
        pred = load_predictor(model, **dict(options))
        with _PRED_LOCK:
            _PREDICTORS[key] = pred
            while len(_PREDICTORS) > _PRED_KEPT:
                _PREDICTORS.popitem(last=False)
    return copy.copy(pred)


def predictor_options(*, device: str = "auto", tile=None, batch: int | None = None, precision: str = "auto",
                      tta: bool = False, memory_budget: int | None = None, overlap: float = 0.25,
                      blend: str = "gaussian", threads: int | None = None, backend: str = "auto") -> tuple:
    """The options a worker builds its predictor with, as a hashable tuple."""
    if isinstance(tile, list):
        tile = tuple(tile)
    return tuple(sorted(dict(device=device, tile=tile, batch=batch, precision=precision, tta=tta,
                             memory_budget=memory_budget, overlap=overlap, blend=blend, threads=threads,
                             backend=backend).items()))


# ------------------------------------------------------------------------------- one image in blocks

@dataclass(frozen=True)
class ChunkReport:
    """What a block-wise prediction did."""

    input: str
    output: str
    shape: tuple[int, int, int]          # pages, height, width
    tile: tuple[int, int]
    block: tuple[int, int]
    blocks: int                          # per page
    workers: int
    seconds: float
    objects: list | None = None          # labels: objects per page


def image_statistics(pred, ref) -> tuple:
    """(mean, std) the predictor normalises this image with, found once here as single-process
    prediction finds them (per-image statistics from the same source: see
    ``chunked.statistics_source``); the model's own for dataset normalisation."""
    from unetcli.chunked import statistics_source

    p = copy.copy(pred)
    src = statistics_source(ref, p.budget if p.device.type == "cpu" else None)
    try:
        p.image_statistics(src)
    finally:
        src.close()
    return (None if p.mean is None else np.asarray(p.mean, np.float32),
            None if p.std is None else np.asarray(p.std, np.float32))


def _block_task(model, options: tuple, ref, stats, page: int, rect: tuple, store: str, array: str,
                index: tuple, kind: str, threshold: float | None) -> None:
    """On a worker: predict one block and write it (probabilities or a class map)."""
    from unetcli import guards
    from unetcli.chunked import predict_block, write_region
    from unetcli.inference import probs_to_mask

    pred = worker_predictor(model, options)
    pred.mean, pred.std = stats
    pred.normalization = None           # the whole image's statistics, found once by the client
    _n, h, w, _c = ref.shape
    probs = predict_block(pred, ref.read, page, h, w, rect,
                          check=lambda p: guards.check_finite(p, ref.path, hint=_OVERFLOW))
    write_region(store, array, index, probs_to_mask(probs, threshold) if kind == "mask" else probs)


def _label_task(store: str, page: int, by: int, bx: int, rect: tuple, height: int, width: int, params,
                margin: int):
    """On a worker: decode one block with its margin, write its local labels, return its summary."""
    from unetcli.chunked import read_region, write_region
    from unetcli.chunkmerge import label_block, label_window

    win = label_window(rect, height, width, margin)
    probs = read_region(store, "probs", (page, slice(None), slice(win[0], win[1]), slice(win[2], win[3])))
    local, summary = label_block(probs, win, rect, width, params, page, by, bx)
    write_region(store, "labels", (page, slice(rect[0], rect[1]), slice(rect[2], rect[3])), local)
    return summary


def _relabel_task(scratch: str, page: int, rect: tuple, table: np.ndarray, dtype: str, store: str,
                  index: tuple) -> None:
    """On a worker: one block's local labels through its table, into the output."""
    from unetcli.chunked import read_region, write_region
    from unetcli.chunkmerge import relabel_block

    local = read_region(scratch, "labels", (page, slice(rect[0], rect[1]), slice(rect[2], rect[3])))
    write_region(store, "0", index, relabel_block(local, table, dtype))


def check_chunked(source: str, output: str, out) -> None:
    """Refuse, before any work, what block-wise prediction cannot do or may not write."""
    from unetcli import zarrio

    if out.kind == "mask" and out.post:
        raise ConfigError("--min-size, --fill-holes and --largest-component need the whole mask; with "
                          "--cluster they apply to --output-type labels (except --fill-holes)",
                          hint="use --output-type labels, or predict without --cluster")
    if out.kind == "labels" and out.fill_holes:
        raise ConfigError("--fill-holes needs whole objects and is not available with --cluster",
                          hint="leave --fill-holes out, or predict without --cluster")
    zarrio.check_output(output, out.kind, [source])
    zarrio.check_inputs_outputs([source], [output])


def _block_bytes(block: tuple[int, int], tile: tuple[int, int], channels: int, classes: int, tta: bool,
                 kind: str) -> int:
    """What one task holds besides the network: its input window (the block and up to a tile around it,
    float32), the block's probabilities (twice with TTA: the sum and a frame), and for labels the
    probabilities and labels of the block with its margin."""
    (by, bx), (ty, tx) = block, tile
    held = (by + ty) * (bx + tx) * channels * 4 + classes * by * bx * 4 * (2 if tta else 1)
    if kind == "labels":
        held += (by + 128) * (bx + 128) * (classes * 4 + 8)
    return held


def predict_chunked(cluster: Cluster, model, predictor, source: str, output: str, out, *,
                    options: tuple, channels: Sequence[int] | None = None, chunk: int | None = None,
                    label_margin: int | None = None, provenance: dict | None = None,
                    progress: Progress | None = None, on_note: Note | None = None) -> ChunkReport:
    """Predict the image ``source`` (OME-Zarr, Zarr array or TIFF) block by block on ``cluster`` into the
    OME-Zarr image ``output``.

    ``model``: the ``checkpoint.ModelFile``; ``predictor``: a predictor built here with the same
    ``options`` (its tile, when fixed, is used; else the tile that suits a block within its memory
    budget); ``out``: a ``pipeline.Output`` (kind 'probs', 'mask' or 'labels'; masks without clean-up;
    labels with ``min_size`` and ``largest_component`` but not ``fill_holes``). ``chunk``: block side
    in pixels (default: the input's own chunking when it is at least 256, else
    ``chunked.DEFAULT_CHUNK``), rounded to whole tile strides. ``label_margin``: pixels of its
    neighbours each block's labelling sees. ``provenance``: None, or ``{"command": [...], "parameters":
    {...}}`` for a JSON record beside the output (``pipeline.write_provenance``)."""
    from unetcli import chunked
    from unetcli.chunkmerge import LABEL_MARGIN, exact_decoding, merge
    from unetcli.tiling import plan_tiles

    on_note = on_note or (lambda level, text: None)
    start = time.perf_counter()
    check_chunked(source, output, out)
    cfg = model.config
    ref = chunked.open_image(source).with_channels(channels, cfg.in_channels)
    n, h, w, _c = ref.shape
    want = chunk if chunk is not None else (min(ref.chunks) if ref.chunks and min(ref.chunks) >= 256
                                            else chunked.DEFAULT_CHUNK)
    tile = predictor.tile
    if tile is None:
        tile = predictor.plan(min(h, want), min(w, want)).tile
        on_note("detail", f"tile {tile[0]}x{tile[1]}, chosen for blocks of about {want} pixels (predicting "
                          f"without --cluster with --tile {tile[0]}x{tile[1]} gives the same result)")
    plan = plan_tiles(cfg, h, w, tile=tile, overlap=predictor.overlap, blend=predictor.blend)
    grid = chunked.block_grid(plan, want)
    # a task holds its block's input window, probabilities (and labels): bounded by the memory budget
    # like one image of a single process; the default block shrinks to fit, a --chunk too large is refused
    c, k_ = cfg.in_channels, cfg.num_classes
    while chunk is None and _block_bytes(grid.block, tile, c, k_, predictor.tta, out.kind) > predictor.budget \
            and want > 256:
        want //= 2
        grid = chunked.block_grid(plan, want)
    need = _block_bytes(grid.block, tile, c, k_, predictor.tta, out.kind)
    if need > predictor.budget:
        from unetcli.guards import format_bytes

        raise ConfigError(f"blocks of {grid.block[0]}x{grid.block[1]} need about {format_bytes(need)} on a "
                          f"worker, more than the memory budget of {format_bytes(predictor.budget)}",
                          hint="give a smaller --chunk, or raise --memory-budget")
    options = tuple((key, tuple(tile) if key == "tile" else value) for key, value in options)
    stats = image_statistics(predictor, ref)         # also checks that the channels fit the model
    shared = cluster.share(model, f"model-{model.sha256}")
    geometry = ref.geometry
    k = cfg.num_classes
    names = list(model.class_names or [])
    blocks = [(p, by, bx, rect) for p in range(n) for by, bx, rect in grid.rects()]
    by_, bx_ = grid.block
    from unetcli import __version__

    attrs = {"version": __version__, "model": model.name, "model_sha256": model.sha256}   # the pipeline's mark
    label = os.path.basename(os.path.normpath(source))
    objects = None
    if out.kind != "labels":
        dest = chunked.BlockOutput(output, geometry, "float32" if out.kind == "probs" else "uint8", grid.block,
                                   kind=out.kind, channels=k if out.kind == "probs" else None,
                                   channel_names=(names if len(names) == k else None) if out.kind == "probs" else None,
                                   attrs=attrs)
        dest.open()
        try:
            root = os.path.abspath(dest.root)      # the workers may run in another folder
            cluster.run(_block_task, [(shared, options, ref, stats, p, rect, root, "0",
                                       chunked.region(dest.axes, geometry.page_axes, geometry.page_shape, p, rect),
                                       out.kind, out.threshold) for p, by, bx, rect in blocks],
                        label="predict", what=f"{label}: predict", progress=progress)
            dest.finish()
        except BaseException:
            dest.abort()
            raise
    else:
        params = out.decode
        margin = label_margin if label_margin is not None else LABEL_MARGIN
        scratch = chunked.scratch_store(output, {"probs": ((n, k, h, w), (1, k, by_, bx_), "float32"),
                                                 "labels": ((n, h, w), (1, by_, bx_), "uint32")})
        dest = None
        try:
            sc = str(scratch)
            cluster.run(_block_task, [(shared, options, ref, stats, p, rect, sc, "probs",
                                       (p, slice(None), slice(rect[0], rect[1]), slice(rect[2], rect[3])),
                                       "probs", None) for p, by, bx, rect in blocks],
                        label="predict", what=f"{label}: predict", progress=progress)
            summaries = cluster.run(_label_task, [(sc, p, by, bx, rect, h, w, params, margin)
                                                  for p, by, bx, rect in blocks],
                                    label="labels", what=f"{label}: labels", progress=progress)
            merged = merge(summaries, exact=exact_decoding(k, params), min_size=params.min_size,
                           largest=out.largest_component)
            objects = merged.objects
            dest = chunked.BlockOutput(output, geometry, merged.dtype, grid.block, kind="labels", attrs=attrs)
            dest.open()
            root = os.path.abspath(dest.root)      # the workers may run in another folder
            cluster.run(_relabel_task, [(sc, p, rect, merged.tables[(p, by, bx)], merged.dtype, root,
                                         chunked.region(dest.axes, geometry.page_axes, geometry.page_shape, p, rect))
                                        for p, by, bx, rect in blocks], label="relabel", what=f"{label}: relabel", progress=progress)
            dest.finish()
        except BaseException:
            if dest is not None:
                dest.abort()
            raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    report = ChunkReport(source, output, (n, h, w), tuple(tile), grid.block, grid.count, cluster.workers,
                         time.perf_counter() - start, objects)
    if provenance is not None:
        from unetcli.pipeline import write_provenance

        write_provenance(output, chunk_record(report, ref, model, out, provenance, dest.dtype.name, options))
    return report


def chunk_record(report: ChunkReport, ref, model, out, provenance: dict, dtype: str, options: tuple) -> dict:
    """The provenance record of a block-wise prediction (the pipeline's fields, the blocks added)."""
    from unetcli import provenance as prov
    from unetcli import zarrio

    if ref.kind == "zarr":
        digest, size = zarrio.digest(ref.path)
    else:
        digest, size = prov.sha256_file(ref.path), os.path.getsize(ref.path)
    used = dict(provenance.get("parameters") or {}, tile_used=list(report.tile), block=list(report.block),
                blocks=report.blocks * report.shape[0], workers=report.workers,
                worker_options={k: (list(v) if isinstance(v, tuple) else v) for k, v in options})
    if report.objects is not None:
        used["objects"] = report.objects
    return {"input": {"path": os.path.abspath(ref.path), "sha256": digest, "bytes": size,
                      "shape": list(ref.shape), "dtype": ref.dtype},
            "output": {"type": out.kind, "dtype": dtype, "format": "zarr"},
            "model": {"name": model.name, "path": str(model.path.resolve()) if model.path else None,
                      "sha256": model.sha256, "config": model.config.to_dict(), "trained": model.provenance},
            "parameters": used, "environment": prov.environment(("torch", "numpy", "dask", "distributed", "zarr")),
            "command": list(provenance.get("command") or []), "seconds": round(report.seconds, 3)}


# ------------------------------------------------------------------------------------------ many files

@dataclass
class FileResult:
    """What one file's task sends back."""

    reports: list
    notes: list
    written: list


def _file_task(model, options: tuple, source: str, output: str, out, channels, provenance) -> FileResult:
    """On a worker: predict one file and write its output atomically (the single-process pipeline)."""
    from unetcli import pipeline

    pred = worker_predictor(model, options)
    result = FileResult([], [], [])
    pipeline.predict_files([pipeline.Job(source, output)], pred, model, out, channels=channels,
                           provenance=provenance, on_written=result.written.append,
                           on_done=result.reports.append,
                           on_note=lambda level, text: result.notes.append((level, text)))
    return result


def predict_files_cluster(cluster: Cluster, model, jobs: Sequence[tuple[str, str]], out, *, options: tuple,
                          channels: Sequence[int] | None = None, provenance: dict | None = None,
                          on_written: Callable[[str], None] | None = None,
                          on_done: Callable[[Any], None] | None = None, on_note: Note | None = None,
                          progress: Progress | None = None) -> None:
    """Predict every (input path, output path) of ``jobs`` on ``cluster``, one task per file.

    Each worker runs :func:`unetcli.pipeline.predict_files` on its file (the same reading, prediction,
    atomic writing and provenance as without a cluster), so each output equals the single-process one.
    Callbacks as there, called here as each file finishes (in the order files finish)."""
    shared = cluster.share(model, f"model-{model.sha256}")
    on_written = on_written or (lambda path: None)
    on_done = on_done or (lambda report: None)
    on_note = on_note or (lambda level, text: None)

    given = {}                             # absolute paths go to the workers, the names given come back
    for src, dst in jobs:
        given[os.path.abspath(src)], given[os.path.abspath(dst)] = src, dst

    def named(text: str) -> str:
        for path, shown in given.items():
            text = text.replace(path, shown)
        return text

    def arrived(_i: int, result: FileResult) -> None:
        from dataclasses import replace

        for level, text in result.notes:
            on_note(level, named(text))
        for report in result.reports:
            on_done(replace(report, input=named(report.input), output=named(report.output)))
        for path in result.written:
            on_written(given.get(path, path))

    calls = [(shared, options, os.path.abspath(src), os.path.abspath(dst), out,
              None if channels is None else list(channels), provenance) for src, dst in jobs]
    cluster.run(_file_task, calls, label="files", what="files", progress=progress, on_result=arrived)
