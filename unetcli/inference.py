"""Overlap-tile prediction with mirrored borders: any image size, batched tiles, CPU or GPU.

The :class:`Predictor` cuts an image into the tiles of a plan (:mod:`unetcli.tiling`: where tiles go,
which size, mirroring, blending), normalises them batch by batch, runs the network's lean forward pass
(:func:`unetcli.model.lean_forward`) on the device, precision and threads that :mod:`unetcli.devices`
settles, and assembles finished rows. Images come as arrays or as sources read on demand
(:mod:`unetcli.sources`).

Memory grows with the tile, not with the image: tiles are cut from the image (of any dtype) and
normalised one batch at a time, and results come out as blocks of finished rows (:meth:`Predictor.
iter_blocks`), so a caller can turn them into a mask and write them before the next rows exist.

Everything here is a library: no printing, typed errors from :mod:`unetcli.errors`, progress through a
callback ``progress(done_tiles, total_tiles)``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from unetcli.devices import (PRECISIONS, auto_threads, autocast_dtype, default_memory_budget, resolve_device,
                             resolve_precision, threads_for_work)
from unetcli.errors import ConfigError, ImageShapeError
from unetcli.model import UNetConfig, check_tile, conv_flops, conv_layers, lean_forward
from unetcli.prefetch import prefetch
from unetcli.sources import ArraySource, TiffRows, as_source, take
from unetcli.tiling import (BLENDS, DEFAULT_OVERLAP, RowAssembler, TilePlan, axis_take, blend_window,
                            parse_tile, plan_tiles, tile_memory, fit_tile)

MAX_AUTO_BATCH = 16

Progress = Callable[[int, int], None]


# ----------------------------------------------------------------------------------- the predictor

DIHEDRAL = [(t, fy, fx) for t in (False, True) for fy in (False, True) for fx in (False, True)]


def dihedral_view(a: np.ndarray, g: tuple[bool, bool, bool], axes: tuple[int, int]) -> np.ndarray:
    """Apply the dihedral element ``g`` = (transpose, flip rows, flip cols) to two axes (a view)."""
    t, fy, fx = g
    ay, ax = axes
    if t:
        a = np.swapaxes(a, ay, ax)
    if fy:
        a = np.flip(a, ay)
    if fx:
        a = np.flip(a, ax)
    return a


class Predictor:
    """A network ready to predict images of any size with the overlap-tile strategy.

    ``net`` is moved to ``device`` (in eval mode, channels-last) for the predictor's lifetime; use
    :func:`predict_proba` to borrow a network that is being trained. ``mean``/``std`` (one value per
    input channel) normalise raw pixels as ``(x - mean) / std`` tile by tile; leave them None for
    images that are already normalised.

    Options: ``tile`` (an input side, or (ty, tx); default: the tile that predicts each image with the
    fewest FLOPs within ``memory_budget`` bytes), ``batch`` (tiles per forward pass; default 1 on CPU,
    as many as fit the budget (at most 16) on a GPU), ``precision`` ('fp32', 'bf16', 'fp16'), ``tta``
    (average over the 8 flips and 90-degree rotations), ``overlap`` and ``blend`` (same padding only),
    ``threads`` (CPU threads for the network; default: :meth:`threads_for`), ``backend`` (``torch``,
    ``openvino`` or ``auto``: :mod:`unetcli.backends`; precision 'auto': :mod:`unetcli.devices`).
    """

    def __init__(self, net: nn.Module, config: UNetConfig, *, device: str | torch.device = "cpu",
                 precision: str = "fp32", tile: int | tuple[int, int] | str | None = None,
                 batch: int | None = None, memory_budget: int | None = None, tta: bool = False,
                 overlap: float = DEFAULT_OVERLAP, blend: str = "gaussian",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 threads: int | None = None, channels_last: bool | None = None,
                 progress: Progress | None = None, normalization: dict | None = None,
                 trained_dtype: str | None = None, backend: str = "torch"):
        from unetcli.backends import OpenVINORunner, resolve_backend

        self.config = config
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.amp_dtype = autocast_dtype(self.device, self.precision)
        self.backend = resolve_backend(backend, self.device)
        self._runner = (OpenVINORunner(net, self.precision)
                        if self.backend == "openvino" else None)
        self.tile = parse_tile(tile)
        self.tile_note: str | None = None
        if self.tile is not None:
            self.tile, self.tile_note = fit_tile(config, self.tile)
            for side in self.tile:
                check_tile(config, side)
        if batch is not None and batch < 1:
            raise ConfigError(f"batch must be at least 1, not {batch}")
        self.batch = batch
        self.budget = int(memory_budget) if memory_budget is not None else default_memory_budget(self.device)
        if self.budget <= 0:
            raise ConfigError(f"memory budget must be positive, not {memory_budget}")
        self.tta = bool(tta)
        if blend not in BLENDS:
            raise ConfigError(f"unknown blending {blend!r}", hint="use gaussian or mean")
        if not 0.0 <= overlap < 1.0:
            raise ConfigError(f"overlap must be in [0, 1), not {overlap}")
        self.overlap, self.blend = float(overlap), blend
        c = config.in_channels
        self.mean = None if mean is None else np.asarray(mean, np.float32).reshape(c)
        self.std = None if std is None else np.asarray(std, np.float32).reshape(c)
        self.normalization = normalization     # a per-image rule (normalize): mean/std set per image
        self.trained_dtype = trained_dtype     # dataset rule: the pixel type its statistics are in
        self._dataset_stats = (self.mean, self.std)   # as given: an image of another type rescales a copy
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be at least 1, not {threads}")
        self.threads = None if threads is None else int(threads)
        self._auto_threads = auto_threads()
        self.channels_last = (self.device.type in ("cpu", "cuda")) if channels_last is None else channels_last
        self.progress = progress
        self.net = net
        self._prepare()

    # -- set-up -------------------------------------------------------------------------------------

    def _prepare(self) -> None:
        self.net.eval()
        self.net.to(self.device)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True   # tiles of one shape: let cuDNN pick its fastest kernel

    @property
    def itemsize(self) -> int:
        return 4 if self.amp_dtype is None else 2

    def plan(self, height: int, width: int, held: int = 0) -> TilePlan:
        """The tiling this predictor uses for a ``height`` x ``width`` image.

        Without a fixed tile: the tile needing the fewest FLOPs whose activations (one batch) fit what
        the budget leaves after ``held`` bytes (image and result in host memory; not subtracted on a
        CUDA device, whose budget is its own memory), but at least a quarter of the budget."""
        budget = self.budget
        if self.tile is None and self.device.type != "cuda":
            budget = max(self.budget - int(held), self.budget // 4)
        try:
            return plan_tiles(self.config, height, width, tile=self.tile, budget=budget,
                              batch=self.batch or 1, itemsize=self.itemsize, overlap=self.overlap,
                              blend=self.blend)
        except ConfigError as exc:   # say what was given, not only what the tiles got of it
            if budget != self.budget and "memory budget" in exc.message:
                exc.message += f" (--memory-budget {self.budget} bytes, less the image and its result)"
            raise

    def held_bytes(self, stack, result_bytes_per_pixel: float) -> int:
        """Host memory a prediction of ``stack`` (an array or a source) keeps besides its tiles: the
        input, the result (the caller says how many bytes a pixel), and the TTA accumulator."""
        src = as_source(stack)
        n, h, w = src.shape[:3]
        tta = (self.config.num_classes * 4 + src.dtype.itemsize * src.shape[3]) * h * w if self.tta else 0
        return int(src.nbytes + n * h * w * result_bytes_per_pixel + tta)

    def batch_for(self, plan: TilePlan, tiles: int) -> int:
        """Tiles per forward pass: the given batch, else 1 on CPU, else as many as the budget allows."""
        if self.batch is not None:
            return self.batch
        if self.device.type == "cpu":
            return 1
        one = tile_memory(self.config, *plan.tile, itemsize=self.itemsize)
        return int(max(1, min(MAX_AUTO_BATCH, tiles, self.budget // max(one, 1))))

    # -- the loop -----------------------------------------------------------------------------------

    def _check(self, stack) -> "ArraySource | TiffRows":
        if not hasattr(stack, "rows"):
            stack = np.asarray(stack)
            if stack.ndim not in (3, 4):
                raise ImageShapeError(f"expected an (H, W, C) image or (N, H, W, C) stack, got shape {stack.shape}")
        src = as_source(stack)
        if src.shape[-1] != self.config.in_channels:
            raise ImageShapeError(f"image has {src.shape[-1]} channel(s), the network takes "
                                  f"{self.config.in_channels}")
        if src.shape[1] < 1 or src.shape[2] < 1:
            raise ImageShapeError(f"image has no pixels ({src.shape[1]}x{src.shape[2]})")
        return src

    def image_statistics(self, src) -> None:
        """With a per-image normalisation (percentile, z-score), set mean/std from this image: the whole
        stack's statistics, from at most 512 rows spread over its pages for a source read on demand."""
        from unetcli import normalize

        if self.normalization is None:
            return
        if normalize.kind(self.normalization) == "dataset":
            self.mean, self.std = self._dataset_stats   # never the previous image's rescaled statistics
            if self.trained_dtype and src.dtype != np.dtype(self.trained_dtype):
                sample = src.array if isinstance(src, ArraySource) else np.zeros((1, 1, 1, src.shape[-1]), src.dtype)
                self.mean, self.std = normalize.image_stats(self.normalization, sample, self.trained_dtype)
            return
        if isinstance(src, ArraySource):
            sample = src.array
        else:
            n, h = src.shape[0], src.shape[1]
            per_page = max(1, 512 // n)
            rows = np.unique(np.linspace(0, h - 1, min(h, per_page)).astype(np.int64))
            sample = np.stack([src.rows(p, rows) for p in range(n)])
        self.mean, self.std = normalize.image_stats(self.normalization, sample)

    def normalise(self, tile: np.ndarray, out: np.ndarray) -> None:
        """A raw tile (ty, tx, C) into ``out`` (float32), normalised with this image's statistics (see
        :meth:`image_statistics`): the step every tile takes, whole images and blocks alike."""
        np.copyto(out, tile, casting="unsafe")
        if self.mean is not None:
            out -= self.mean
        if self.std is not None:
            out /= self.std

    def _batches(self, src, plan: TilePlan, batch: int):
        """Yield (jobs, array (B, ty, tx, C) float32) in page, tile-row, tile-column order."""
        ty, tx = plan.tile
        c = src.shape[-1]
        jobs = [(n, ky, kx) for n in range(src.shape[0])
                for ky in range(plan.y.count) for kx in range(plan.x.count)]
        takes_y = [axis_take(s - plan.y.margin, ty, plan.y.length) for s in plan.y.starts]
        takes_x = [axis_take(s - plan.x.margin, tx, plan.x.length) for s in plan.x.starts]
        band_key, band = None, None
        for i in range(0, len(jobs), batch):
            chunk = jobs[i:i + batch]
            buf = np.empty((len(chunk), ty, tx, c), np.float32)
            for b, (n, ky, kx) in enumerate(chunk):
                if band_key != (n, ky):             # the input rows of this tile row, mirrored
                    band_key, band = (n, ky), src.rows(n, takes_y[ky])
                self.normalise(take(band, takes_x[kx], 1), buf[b])
            yield chunk, buf

    def threads_for(self, plan: TilePlan, batch: int) -> int | None:
        """CPU threads for this plan: the given number; else 1 when each layer is too little work to
        share (the threads' hand-overs would cost more than they save); else :func:`auto_threads`."""
        if self.device.type != "cpu":
            return None
        work = conv_flops(self.config, *plan.tile) * batch / len(conv_layers(self.config, plan.tile[0]))
        return threads_for_work(work, self.threads, self._auto_threads)

    def infer(self, buf: np.ndarray, threads: int | None = None) -> torch.Tensor:
        """Softmax probabilities (B, K, oy, ox) float32 on the device for a batch (B, ty, tx, C)."""
        if self._runner is not None:
            logits = self._runner(buf.transpose(0, 3, 1, 2), threads or self._auto_threads)
            return torch.softmax(torch.from_numpy(logits), dim=1)
        if threads is not None and threads != torch.get_num_threads():
            saved = torch.get_num_threads()
            torch.set_num_threads(threads)     # only for this call: the caller's setting is restored
            try:
                return self.infer(buf)
            finally:
                torch.set_num_threads(saved)
        x = torch.from_numpy(buf)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            x = x.to(self.device)
        x = x.permute(0, 3, 1, 2)                        # NHWC memory seen as NCHW: channels-last
        if not self.channels_last:
            x = x.contiguous()
        amp = (torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
               if self.amp_dtype is not None else contextlib.nullcontext())
        with amp:
            logits = lean_forward(self.net, x)
        return torch.softmax(logits.float(), dim=1)

    def _stream(self, stack, reduce=None, dtype=np.uint8,
                held: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (page, y0, probs (K, h, W) or reduce(probs)) blocks of finished rows, in order."""
        n, h, w, _ = stack.shape
        plan = self.plan(h, w, held)
        total = plan.count * n
        batch = self.batch_for(plan, total)
        threads = self.threads_for(plan, batch)
        window = blend_window(plan)
        k = self.config.num_classes
        rows: RowAssembler | None = None
        page = -1
        done = 0
        source = self._batches(stack, plan, batch)
        if self.device.type == "cuda":
            source = prefetch(source, depth=2)

        def assemble(chunk, probs: np.ndarray):
            nonlocal rows, page
            for b, (pn, ky, kx) in enumerate(chunk):
                if pn != page:
                    rows, page = RowAssembler(plan, k, window, reduce, dtype), pn
                for y0, block in rows.add(ky, kx, probs[b]):
                    yield pn, y0, block

        pending = None
        for chunk, buf in source:
            # inference mode only around the network: this generator yields to its caller in between
            with torch.inference_mode():
                probs = self.infer(buf, threads)
                if self.device.type == "cuda":
                    probs = probs.contiguous()      # one plain copy to pinned host memory, async
                    host = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
                    host.copy_(probs, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                else:
                    host = probs.cpu()
            if self.device.type == "cuda":
                if pending is not None:         # the previous batch is assembled while this one runs
                    yield from assemble(pending[0], _host(pending))
                    done += len(pending[0])
                    self._report(done, total)
                pending = (chunk, host, event)
            else:
                yield from assemble(chunk, host.numpy())
                done += len(chunk)
                self._report(done, total)
        if pending is not None:
            yield from assemble(pending[0], _host(pending))
            done += len(pending[0])
            self._report(done, total)

    def _report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)

    # -- public -------------------------------------------------------------------------------------

    def iter_blocks(self, stack: np.ndarray, reduce: Callable[[np.ndarray], np.ndarray] | None = None,
                    dtype=np.uint8, held: int | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(page, y0, probs)`` with ``probs`` (K, h, W) float32: rows ``y0..y0+h`` of that page.

        ``stack`` is (H, W, C) or (N, H, W, C), raw when the predictor has mean/std, else normalised.
        Without TTA the blocks stream out as tile rows finish (memory grows with the tile only); with
        TTA each page comes as one block, averaged over the 8 flips and rotations. A block is a view that
        may be reused after the next one is requested: copy what you keep.

        ``reduce`` (e.g. ``probs_to_mask``) turns probabilities (K, h, w) into per-pixel values (h, w)
        of ``dtype``; blocks are then (h, W) and, with valid padding, only reduced rows are ever held.
        ``held``: host bytes the caller keeps besides the tiles (see :meth:`plan`); default: the input
        and a full result (probabilities, or ``dtype`` values with ``reduce``).
        """
        src = self._check(stack)
        self.image_statistics(src)
        if held is None:
            per_pixel = self.config.num_classes * 4 if reduce is None else np.dtype(dtype).itemsize
            held = self.held_bytes(src, per_pixel)
        if not self.tta:
            yield from self._stream(src, reduce, dtype, held)
            return
        k = self.config.num_classes
        for n in range(src.shape[0]):
            probs = self._tta_page(src.page(n), k, held)
            yield n, 0, (reduce(probs) if reduce is not None else probs)

    def _tta_page(self, page: np.ndarray, k: int, held: int = 0) -> np.ndarray:
        h, w = page.shape[:2]
        acc = np.zeros((k, h, w), np.float32)
        for g in DIHEDRAL:
            view = dihedral_view(page, g, (0, 1))           # the transformed image (a view)
            target = dihedral_view(acc, g, (1, 2))          # the accumulator seen in the same frame
            for _n, y0, block in self._stream(ArraySource(view), held=held):
                target[:, y0:y0 + block.shape[1]] += block
        acc /= len(DIHEDRAL)
        return acc

    def predict(self, stack, held: int | None = None) -> np.ndarray:
        """Probabilities of an (H, W, C) image as (K, H, W), or of an (N, H, W, C) stack or an image
        source as (N, K, H, W)."""
        single = not hasattr(stack, "rows") and np.ndim(stack) == 3
        arr = self._check(stack)
        n, h, w, _ = arr.shape
        out = np.empty((n, self.config.num_classes, h, w), np.float32)
        for page, y0, block in self.iter_blocks(arr, held=held):
            out[page, :, y0:y0 + block.shape[1]] = block
        return out[0] if single else out

    def predict_mask(self, stack, threshold: float | None = None) -> np.ndarray:
        """The class map (uint8) of an (H, W, C) image as (H, W), or of a stack or source as (N, H, W)."""
        single = not hasattr(stack, "rows") and np.ndim(stack) == 3
        arr = self._check(stack)
        n, h, w, _ = arr.shape
        out = np.empty((n, h, w), np.uint8)
        for page, y0, block in self.iter_blocks(arr, lambda p: probs_to_mask(p, threshold)):
            out[page, y0:y0 + block.shape[0]] = block
        return out[0] if single else out


def _host(pending) -> np.ndarray:
    _chunk, host, event = pending
    event.synchronize()
    return host.numpy()


def probs_to_mask(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Class map (uint8) from probabilities (K, ...): argmax, or for two classes ``p1 > threshold``."""
    if threshold is not None:
        if probs.shape[0] != 2:
            raise ConfigError(f"a threshold applies to two-class models; this one has {probs.shape[0]} classes",
                              hint="leave --threshold out: the class of highest probability is taken")
        return (probs[1] > threshold).astype(np.uint8)
    if probs.shape[0] == 2:
        return (probs[1] > probs[0]).astype(np.uint8)
    return np.argmax(probs, axis=0).astype(np.uint8)


# ------------------------------------------------------------------------------------- entry points

def predict_proba(net: nn.Module, image: np.ndarray, *, config: UNetConfig, tile: int | None = None,
                  batch: int = 1, device: str | torch.device = "cpu", precision: str = "fp32",
                  tta: bool = False) -> np.ndarray:
    """Softmax probabilities (K, H, W) float32 of one image with the overlap-tile strategy.

    ``image`` is (H, W, C) float32, already normalised the way the network was trained. ``tile`` is
    the input tile side (None: the tile that needs the fewest FLOPs within the default memory budget);
    ``batch`` tiles go through the network at once. The border is mirrored; with valid padding the
    result does not depend on ``tile``. ``tta`` averages over the 8 flips and 90-degree rotations.

    The network is borrowed: it is put in eval mode (dropout off) and on ``device`` for the call, then
    returned to its former mode and device, so a training loop can validate with it. Its weights'
    memory layout may become channels-last, which changes no result. ``precision`` also takes 'auto'
    (bf16 on a CUDA GPU that has it, else fp32); a reduced precision that ``devices.resolve_precision``
    refuses on this device falls back to fp32 here (the command line refuses it instead).
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ImageShapeError(f"expected an (H, W, C) image, got shape {image.shape}")
    dev = resolve_device(device)
    try:
        precision = resolve_precision(precision, dev)
    except ConfigError:
        if precision not in PRECISIONS:
            raise
        precision = "fp32"
    params = list(net.parameters())
    home = params[0].device if params else dev
    was_training = net.training
    cudnn_benchmark = torch.backends.cudnn.benchmark
    try:
        pred = Predictor(net, config, device=dev, precision=precision, tile=tile, batch=batch, tta=tta)
        return pred.predict(image.astype(np.float32, copy=False))
    finally:
        net.train(was_training)
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if home != dev:
            net.to(home)


def load_predictor(model, *, device: str | torch.device = "auto", **options) -> Predictor:
    """A :class:`Predictor` for a loaded model file (``checkpoint.ModelFile``), with its normalisation.

    ``options`` are those of :class:`Predictor` (tile, batch, precision, tta, memory_budget, overlap,
    blend, threads, progress).
    """
    dev = resolve_device(device)
    net = model.network("cpu")
    from unetcli import normalize

    norm = model.normalization or {}
    if normalize.kind(norm) != "dataset":
        return Predictor(net, model.config, device=dev, normalization=norm, **options)
    return Predictor(net, model.config, device=dev, mean=norm.get("mean"), std=norm.get("std"),
                     normalization=norm, trained_dtype=(model.inputs or {}).get("dtype"), **options)


def predict_image(model, image: np.ndarray, *, device: str | torch.device = "auto", **options) -> np.ndarray:
    """Probabilities of a raw image with a model file: (H, W, C) -> (K, H, W), (N, H, W, C) ->
    (N, K, H, W). The model's normalisation is applied tile by tile."""
    return load_predictor(model, device=device, **options).predict(image)
