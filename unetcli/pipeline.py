"""Predicting a list of files: read ahead, predict, write behind, streamed masks, provenance records.

Inputs go through the predictor one after another. The next input is read in a background thread
while the current one is predicted, and each output is written in another thread while the next input
is predicted (one write in flight at a time). A uint8 class map without post-processing, going to a
TIFF file, is streamed: tile rows become compressed strips as they finish, so only one band of the
mask is ever held; masks and probabilities going to OME-Zarr are streamed likewise, a chunk row at a
time (``zarrio.ZarrOutput``), and OME-Zarr inputs are read a band of rows at a time
(``zarrio.ZarrRows``). With provenance, a JSON record ``OUTPUT.json`` goes beside each output once the
output exists: input and model hashes, every parameter, the software, the command line given.

The caller resolves stdin and stdout: an input is a file's path or the bytes of an image, an output a
file's path or a binary stream the caller owns. Nothing here prints, exits, or reads the command line;
results are reported through callbacks (paths written, one report per input, notes, progress).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, ContextManager, Sequence

import numpy as np

from unetcli import guards
from unetcli import provenance as prov
from unetcli.errors import ImageShapeError, ImageWriteError

OUTPUT_TYPES = ("probs", "mask", "labels")
STREAM_TIFF_BYTES = 64 * 2**20   # TIFFs larger than this (decoded) are read strip by strip as needed
PROVENANCE_SUFFIX = ".json"
_OVERFLOW = "the network's output overflowed: with --precision bf16 or fp16 try fp32, else check the model file"

Note = Callable[[str, str], None]                                # (level 'detail' or 'warn', text)
Progress = Callable[[int, str], ContextManager[Callable[[int], None]]]   # (total, label) -> advance(n)


@dataclass(frozen=True)
class Job:
    """One input and where its result goes."""

    source: str | bytes              # an image file's path, or the bytes of an image (stdin)
    output: str | BinaryIO           # the output file's path, or a binary stream (stdout)

    @property
    def input_name(self) -> str:
        return "<stdin>" if isinstance(self.source, bytes) else str(self.source)

    @property
    def output_name(self) -> str:
        return self.output if isinstance(self.output, str) else "<stdout>"


@dataclass(frozen=True)
class Output:
    """What is made of the probabilities: their type, the post-processing, the format of a stream."""

    kind: str = "mask"                    # 'probs', 'mask' or 'labels'
    threshold: float | None = None        # two-class masks: foreground where p1 > threshold
    min_size: int | None = None
    fill_holes: bool = False
    largest_component: bool = False
    decode: Any = None                    # labels: ``instances.DecodeParams``
    fmt: str | None = None                # a stream output's format ('tiff', 'png', or for labels 'zip'
                                          # or 'geojson': ``roifiles``; default tiff)

    @property
    def post(self) -> bool:
        """True when masks are cleaned after prediction (so they cannot be streamed)."""
        return self.fill_holes or self.largest_component or (self.min_size or 0) > 0


@dataclass(frozen=True)
class Report:
    """What one input gave: its name, where the result went, its size, the tiling, the time."""

    input: str
    output: str
    shape: tuple[int, int, int]           # pages, height, width
    tile: tuple[int, int]
    tiles: int
    seconds: float


@dataclass
class _Loaded:
    source: Any                           # an (N, H, W, C) array or a ``sources.TiffRows``
    digest: str | None
    size: int | None

    def close(self) -> None:
        if hasattr(self.source, "close"):
            self.source.close()


def _no_progress(total: int, label: str) -> ContextManager[Callable[[int], None]]:
    return contextlib.nullcontext(lambda n=1: None)


def predict_files(jobs: Sequence[Job], predictor, model, output: Output, *,
                  channels: Sequence[int] | None = None, provenance: dict | None = None,
                  on_written: Callable[[str], None] | None = None,
                  on_done: Callable[[Report], None] | None = None,
                  on_note: Note | None = None, progress: Progress | None = None) -> None:
    """Predict every job with ``predictor`` (made from the model file ``model``) and write the results.

    ``channels``: 0-based input channels to pick, in order (see ``normalize.adapt_channels``).
    ``provenance``: None, or ``{"command": [...], "parameters": {...}}`` to write a JSON record beside
    every file output (the caller passes the command line it was given). Callbacks: ``on_written(path)``
    once a file output (and its record) is complete, in input order; ``on_done(report)`` after each
    input is predicted; ``on_note(level, text)`` for channel adaptations ('detail') and pixel ranges
    the model was not trained on ('warn'), from the read-ahead thread; ``progress(total, label)``, a
    context manager yielding ``advance(n)`` for each input's tiles.
    """
    run = _Run(predictor, model, output, channels, provenance, on_written or (lambda path: None),
               on_done or (lambda report: None), on_note or (lambda level, text: None),
               progress or _no_progress)
    run.all(list(jobs))


class _Run:
    """The state of one :func:`predict_files` call."""

    def __init__(self, predictor, model, output: Output, channels, provenance, on_written, on_done, on_note,
                 progress):
        self.predictor, self.model, self.output, self.channels = predictor, model, output, channels
        self.provenance = provenance
        self.on_written, self.on_done, self.on_note, self.progress = on_written, on_done, on_note, progress
        self.environment = prov.environment(("torch", "numpy")) if provenance is not None else None

    # -- the loop -----------------------------------------------------------------------------------

    def all(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as writer:
            ahead = reader.submit(self.load, jobs[0])     # reading the next file overlaps the current one
            written = None                                # (future, path, record) of the write in flight
            loaded = None
            try:
                for idx, job in enumerate(jobs):
                    loaded = ahead.result()
                    if idx + 1 < len(jobs):
                        ahead = reader.submit(self.load, jobs[idx + 1])
                    try:
                        written = self.one(job, loaded, written, writer)
                    finally:
                        loaded.close()
                self.finish(written)
            finally:                                      # a source opened ahead and never used
                if ahead.done() and not ahead.cancelled() and ahead.exception() is None:
                    nxt = ahead.result()
                    if nxt is not loaded:
                        nxt.close()

    def finish(self, written) -> None:
        """Wait for a background write, add its provenance record, then report its path."""
        if written is not None:
            future, path, record = written
            future.result()
            if record is not None:
                write_provenance(path, record)
            self.on_written(path)

    # -- reading ------------------------------------------------------------------------------------

    def load(self, job: Job) -> _Loaded:
        """Read one input (a huge striped TIFF or any OME-Zarr image as a row source), hashed for
        provenance, channels adapted."""
        from unetcli import normalize, zarrio
        from unetcli.images import TIFF, format_from_name, read_image
        from unetcli.sources import ChannelRows, TiffRows

        mf = self.model
        k = mf.config.in_channels
        digest = size = None
        raw = job.source if isinstance(job.source, bytes) else None
        if self.provenance is not None:
            if raw is not None:
                digest, size = prov.sha256_bytes(raw), len(raw)
            elif zarrio.is_zarr_path(job.source):
                digest, size = zarrio.digest(job.source)
            else:
                digest, size = prov.sha256_file(job.source), os.path.getsize(job.source)
        self.check_memory(job, raw)
        arr = None
        if raw is None and zarrio.is_zarr_path(job.source):
            arr = zarrio.ZarrRows.open(job.source)                          # chunks decoded on demand
        elif raw is None and (format_from_name(job.source) == TIFF or Path(job.source).suffix == ""):
            arr = TiffRows.open(job.source, min_bytes=STREAM_TIFF_BYTES)   # rows decoded on demand
        if arr is None:                                                     # anything else (or errors): whole
            arr = read_image("-", stdin_bytes=raw) if raw is not None else read_image(job.source)
        name = job.input_name
        if isinstance(arr, np.ndarray) and (self.channels is not None or arr.shape[-1] != k):
            arr, note = normalize.adapt_channels(arr, k, self.channels, name)
            if note:
                self.on_note("detail", note)
        elif self.channels is not None or arr.shape[-1] != k:            # a row source: band by band
            try:
                arr = ChannelRows(arr, k, self.channels, name)
            except BaseException:
                arr.close()
                raise
            if arr.note:
                self.on_note("detail", arr.note)
        if isinstance(arr, np.ndarray) and arr.shape[-1] == k:
            warning = normalize.range_warning(mf.normalization, arr, (mf.inputs or {}).get("dtype"), name)
            if warning:
                self.on_note("warn", warning)
        if arr.shape[-1] != k:
            if hasattr(arr, "close"):
                arr.close()
            raise ImageShapeError(f"{name}: has {arr.shape[-1]} channel(s), the model {mf.name} takes {k}",
                                  hint=("convert it to grey" if k == 1 else f"give images with {k} channels"))
        return _Loaded(arr, digest, size)

    def check_memory(self, job: Job, raw: bytes | None) -> None:
        """Refuse, from the header alone, an input whose result (and decoded image, unless it is a
        striped TIFF read a strip at a time) would not fit the memory available: a 300-byte JPEG may
        declare 65000x65000 pixels."""
        from unetcli import guards

        shape = guards.declared_shape(raw if raw is not None else job.source, job.input_name)
        if shape is None:
            return
        n, h, w = shape
        per_pixel = self.result_bytes_per_pixel(job)
        from unetcli.images import TIFF, format_from_name

        may_stream = raw is None and format_from_name(job.source) == TIFF     # perhaps read strip by strip
        image = 0 if may_stream else n * h * w * self.model.config.in_channels * 4   # float32 copies
        from unetcli import zarrio

        if raw is None and zarrio.is_zarr_path(job.source):                 # read a band at a time
            image = zarrio.stream_bytes(zarrio.open_image(job.source))
        guards.check_memory(float(n) * h * w * per_pixel + image + self.writer_bytes(job, n, h, w),
                            f"predicting {w}x{h} pixels{f' x {n} pages' if n > 1 else ''}", job.input_name)

    # -- one input ----------------------------------------------------------------------------------

    def result_bytes_per_pixel(self, job: Job) -> int:
        """Host bytes per pixel of the result kept whole (a streamed result keeps one band only)."""
        k = self.model.config.num_classes
        streamed = self.streamed(job)
        return {"probs": 0 if streamed else 4 * k, "mask": 0 if streamed else 1,
                "labels": 4 * k + 4}[self.output.kind]

    def streamed(self, job: Job) -> bool:
        """Written as rows finish: a mask to a TIFF, a mask or probabilities to OME-Zarr."""
        from unetcli.zarrio import is_zarr_output

        out = job.output
        if not isinstance(out, str) or self.output.post:
            return False
        if self.output.kind == "mask" and out.lower().endswith((".tif", ".tiff")):
            return True
        return self.output.kind in ("mask", "probs") and is_zarr_output(out)

    def writer_bytes(self, job: Job, n: int, h: int, w: int) -> int:
        """Host bytes a streamed OME-Zarr output holds while rows arrive (one chunk row)."""
        from unetcli import zarrio

        if not (self.streamed(job) and zarrio.is_zarr_output(job.output)):
            return 0
        k = self.model.config.num_classes if self.output.kind == "probs" else None
        return zarrio.buffer_bytes(zarrio.Geometry.of_pages(n, h, w), np.float32 if k else np.uint8, k)

    def reduce(self, name: str) -> Callable[[np.ndarray], np.ndarray]:
        """Probabilities -> class map, refusing non-finite probabilities first."""
        from unetcli.inference import probs_to_mask

        threshold = self.output.threshold

        def to_mask(p: np.ndarray) -> np.ndarray:
            guards.check_finite(p, name, hint=_OVERFLOW)
            return probs_to_mask(p, threshold)

        return to_mask

    def one(self, job: Job, loaded: _Loaded, written, writer: ThreadPoolExecutor):
        """Predict one input and write (or start writing) its output; returns the write in flight."""
        from unetcli import tiffmeta

        pred, stack = self.predictor, loaded.source
        n, h, w = stack.shape[:3]
        streamed = self.streamed(job)
        held = pred.held_bytes(stack, self.result_bytes_per_pixel(job)) + self.writer_bytes(job, n, h, w)
        plan = pred.plan(h, w, held)
        calibration = (stack.pixel_size if hasattr(stack, "pixel_size")        # an OME-Zarr image's own
                       else None if isinstance(job.source, bytes) else tiffmeta.pixel_size(job.source))
        start = time.perf_counter()
        data = None
        total = plan.count * n * (8 if pred.tta else 1)
        with self.progress(total, Path(job.input_name).name) as advance:
            pred.progress = _Ticker(advance)
            if streamed:
                self.finish(written)
                written = None
                dtype = self.stream(job, stack, held, calibration)
                if self.provenance is not None:
                    write_provenance(job.output, self.record(job, loaded, plan, start, dtype))
                self.on_written(job.output)
            else:
                data, layout = self.compute(job, stack, held)
        secs = time.perf_counter() - start
        if data is not None:
            self.finish(written)                          # one write in flight at a time
            written = self.write(job, loaded, data, layout, plan, start, calibration, writer)
        self.on_done(Report(job.input_name, job.output_name, (n, h, w), plan.tile, plan.count * n, secs))
        return written

    def stream(self, job: Job, stack, held: int, calibration) -> str:
        """Predict and write a streamed output as rows finish (a mask to a TIFF or OME-TIFF, a mask or
        probabilities to OME-Zarr); returns the pixel type written."""
        from unetcli import tiffmeta, zarrio

        pred = self.predictor
        if not zarrio.is_zarr_output(job.output):
            write_mask_streaming(job.output, pred, stack, self.reduce(job.output_name), held, calibration,
                                 ome=tiffmeta.is_ome_name(job.output))
            return "uint8"
        probs = self.output.kind == "probs"
        k = self.model.config.num_classes if probs else None
        dtype = np.dtype(np.float32 if probs else np.uint8)
        with zarrio.ZarrOutput(job.output, zarrio.geometry_of(stack, calibration), dtype, kind=self.output.kind,
                               channels=k, channel_names=self.class_names() if probs else None,
                               attrs=self.zarr_attrs()) as out:
            for page, y0, block in pred.iter_blocks(stack, None if probs else self.reduce(job.output_name),
                                                    np.uint8, held):
                if probs:
                    guards.check_finite(block, job.output_name, hint=_OVERFLOW)
                out.add_rows(page, y0, block)
        return dtype.name

    def class_names(self) -> list[str]:
        names = list(self.model.class_names or [])
        k = self.model.config.num_classes
        return names if len(names) == k else [f"class{i}" for i in range(k)]

    def zarr_attrs(self) -> dict:
        """unet's record in an OME-Zarr output (also the mark that lets a later run replace it)."""
        from unetcli import __version__

        return {"version": __version__, "model": self.model.name, "model_sha256": self.model.sha256}

    def write_zarr(self, job: Job, loaded: _Loaded, data: np.ndarray, plan, start: float, calibration,
                   writer: ThreadPoolExecutor):
        """Start writing a whole result (labels, a cleaned mask) as OME-Zarr in the background."""
        from unetcli import zarrio

        probs = self.output.kind == "probs"
        record = (self.record(job, loaded, plan, start, data.dtype.name)
                  if self.provenance is not None else None)
        future: Future = writer.submit(
            zarrio.write_array, job.output, data, zarrio.geometry_of(loaded.source, calibration),
            kind=self.output.kind, channels=self.model.config.num_classes if probs else None,
            channel_names=self.class_names() if probs else None, attrs=self.zarr_attrs())
        return future, job.output, record

    def compute(self, job: Job, stack, held: int) -> tuple[np.ndarray, str]:
        """The output array of one input (probabilities, labels or a mask) and its layout."""
        from unetcli.postprocess import clean

        out, pred = self.output, self.predictor
        n, h, w = stack.shape[:3]
        if out.kind in ("probs", "labels"):
            probs = pred.predict(stack, held)                         # (N, K, H, W)
            guards.check_finite(probs, job.output_name, hint=_OVERFLOW)
            if out.kind == "probs":
                return probs.reshape(n * probs.shape[1], h, w), "ZYX"
            from unetcli.instances import decode_image

            labs = [decode_image(p, out.decode, fill=out.fill_holes, largest=out.largest_component)
                    for p in probs]
            del probs
            dtype = np.uint32 if any(lab.dtype == np.uint32 for lab in labs) else np.uint16
            data = np.stack([lab.astype(dtype) for lab in labs])
        else:
            data = np.empty((n, h, w), np.uint8)
            for page, y0, block in pred.iter_blocks(stack, self.reduce(job.output_name), np.uint8, held):
                data[page, y0:y0 + block.shape[0]] = block
            if out.post:
                data = np.stack([clean(m, fill=out.fill_holes, min_size=out.min_size or 0,
                                       largest=out.largest_component) for m in data])
        return (data[0], "YX") if n == 1 else (data, "ZYX")

    def write(self, job: Job, loaded: _Loaded, data: np.ndarray, layout: str, plan, start: float,
              calibration, writer: ThreadPoolExecutor):
        """Write to a stream now, or start writing a file in the background; returns the write in flight."""
        from unetcli.images import encode_image, write_image, write_stream

        outline = self.outline_format(job)
        if outline is not None:                           # labels as ImageJ ROIs or QuPath GeoJSON
            return self.write_outlines(job, loaded, data, plan, start, writer, outline)
        from unetcli.zarrio import is_zarr_output

        if isinstance(job.output, str) and is_zarr_output(job.output):
            return self.write_zarr(job, loaded, data, plan, start, calibration, writer)
        classes = self.model.config.num_classes if self.output.kind == "probs" else None
        names = self.class_names() if classes else [self.output.kind]   # OME-TIFF channel names
        if not isinstance(job.output, str):
            payload = encode_image(data, self.output.fmt or "tiff", layout, name="<stdout>",
                                   pixel_size=calibration, classes=classes)
            write_stream(job.output, payload)
            return None
        record = (self.record(job, loaded, plan, start, data.dtype.name)
                  if self.provenance is not None else None)
        future: Future = writer.submit(write_image, job.output, data, layout, pixel_size=calibration,
                                       classes=classes, channel_names=names)
        return future, job.output, record

    def outline_format(self, job: Job) -> str | None:
        """'zip' or 'geojson' for labels written as outlines (by the file's name, or ``fmt`` for a stream)."""
        from unetcli.roifiles import FORMATS, outline_format

        if isinstance(job.output, str):
            return outline_format(job.output)
        return self.output.fmt if self.output.fmt in FORMATS else None

    def write_outlines(self, job: Job, loaded: _Loaded, data: np.ndarray, plan, start: float,
                       writer: ThreadPoolExecutor, fmt: str):
        """Labels traced into an ROI set or a GeoJSON file: to a stream now, or to a file in the
        background (the tracing included); the objects' class is the model's object class."""
        from unetcli import roifiles
        from unetcli.errors import ConfigError
        from unetcli.images import write_stream

        if self.output.kind != "labels":
            raise ConfigError(f"{job.output_name}: outline files hold instance labels, not {self.output.kind}",
                              hint="predict with output type labels, or write a .tif")
        names = list(self.model.class_names or [])
        options = {"classification": names[1] if len(names) == 2 else "object"}
        if not isinstance(job.output, str):
            write_stream(job.output, roifiles.encode(data, fmt, name="<stdout>", **options))
            return None
        record = (self.record(job, loaded, plan, start, data.dtype.name)
                  if self.provenance is not None else None)
        return writer.submit(roifiles.write, job.output, data, fmt, **options), job.output, record

    # -- provenance ---------------------------------------------------------------------------------

    def record(self, job: Job, loaded: _Loaded, plan, start: float, dtype: str) -> dict:
        """Everything that made this output, except the output's own hash (added once it is written)."""
        pred, mf, stack = self.predictor, self.model, loaded.source
        n, h, w, c = stack.shape
        batch_used = pred.batch_for(plan, plan.count * n)
        used = dict(self.provenance.get("parameters") or {}, tile_used=list(plan.tile), tiles=plan.count * n,
                    batch_used=batch_used, device_used=str(pred.device),
                    threads_used=pred.threads_for(plan, batch_used))
        source = "<stdin>" if isinstance(job.source, bytes) else os.path.abspath(job.source)
        names = getattr(stack, "channel_names", None)            # an OME-Zarr image's, else an OME-TIFF's
        if names is None and not isinstance(job.source, bytes):
            from unetcli.tiffmeta import channel_names

            names = channel_names(job.source)
        return {"input": {"path": source, "sha256": loaded.digest, "bytes": loaded.size, "shape": [n, h, w, c],
                          "dtype": stack.dtype.name, "channel_names": names},
                "output": {"type": self.output.kind, "dtype": dtype,
                           "format": self.outline_format(job) or
                           _file_format(job.output_name)},
                "model": {"name": mf.name, "path": str(mf.path.resolve()) if mf.path else None,
                          "sha256": mf.sha256, "config": mf.config.to_dict(), "trained": mf.provenance},
                "parameters": used, "environment": self.environment,
                "command": list(self.provenance.get("command") or []),
                "seconds": round(time.perf_counter() - start, 3)}


class _Ticker:
    """Turns the predictor's ``progress(done, total)`` into increments for ``advance(n)``."""

    def __init__(self, advance: Callable[[int], None]):
        self.advance, self.last = advance, 0

    def __call__(self, done: int, total: int) -> None:
        self.advance(done - self.last if done >= self.last else done)
        self.last = done


def _file_format(name: str) -> str:
    """The format a file output is written in, by its name: png, ome-tiff, zarr (OME-Zarr) or tiff."""
    from unetcli.tiffmeta import is_ome_name
    from unetcli.zarrio import is_zarr_output

    low = name.lower()
    if low.endswith(".png"):
        return "png"
    if is_ome_name(low):
        return "ome-tiff"
    return "zarr" if name != "<stdout>" and is_zarr_output(name) else "tiff"


def write_provenance(out: str, record: dict) -> None:
    """The JSON record ``OUT.json`` of one output, written atomically after the output itself."""
    from unetcli.atomic import write_bytes_atomic

    record = dict(record)
    if os.path.isdir(out):                                 # an OME-Zarr output: every file in it
        from unetcli.zarrio import digest

        sha = digest(out, whole=True)[0]
    else:
        sha = prov.sha256_file(out)
    record["output"] = dict(record["output"], path=os.path.abspath(out), sha256=sha)
    record["created"] = prov.utc_now()
    text = json.dumps(record, indent=2) + "\n"
    try:
        write_bytes_atomic(out + PROVENANCE_SUFFIX, text.encode("utf-8"))
    except OSError as exc:
        raise ImageWriteError(f"{out}{PROVENANCE_SUFFIX}: cannot write ({exc.strerror})") from exc


# ------------------------------------------------------------------------------------ streamed masks

def _mask_strips(blocks, height: int, width: int):
    """Zlib-compressed TIFF strips of a uint8 class map, from row blocks as they are predicted."""
    import zlib

    rows = max(1, min(height, (1 << 18) // max(width, 1)))
    pending = np.empty((rows, width), np.uint8)
    filled = 0
    for _page, y0, block in blocks:
        pos = 0
        while pos < block.shape[0]:
            take = min(rows - filled, block.shape[0] - pos)
            pending[filled:filled + take] = block[pos:pos + take]
            filled += take
            pos += take
            if filled == rows:
                yield zlib.compress(pending.tobytes(), 6)
                filled = 0
        # a page ends with its own (shorter) strip: strips never straddle pages
        if y0 + block.shape[0] == height and filled:
            yield zlib.compress(pending[:filled].tobytes(), 6)
            filled = 0


def write_mask_streaming(path: str, predictor, stack, reduce, held: int, pixel_size: dict | None = None,
                         ome: bool = False) -> None:
    """Predict and write a uint8 class map tile row by tile row; only one band is ever held. A
    ``pixel_size`` is written as ImageJ calibration, or with ``ome`` as OME-XML physical sizes."""
    import tifffile

    from unetcli import tiffmeta
    from unetcli.atomic import atomic_output

    n, h, w = stack.shape[:3]
    rows = max(1, min(h, (1 << 18) // max(w, 1)))
    shape = (n, h, w) if n > 1 else (h, w)
    blocks = predictor.iter_blocks(stack, reduce, np.uint8, held)
    try:
        with atomic_output(path) as tmp:
            if ome:
                calib = tiffmeta.ome_options(shape, "ZYX" if n > 1 else "YX", pixel_size, names=["mask"])
                calib.pop("shape", None)
            else:
                calib = tiffmeta.imagej_options(np.zeros((n, 1, 1) if n > 1 else (1, 1), np.uint8),
                                                "ZYX" if n > 1 else "YX", pixel_size)
                calib.setdefault("metadata", None)
                calib["photometric"] = "minisblack"
            tifffile.imwrite(tmp, data=_mask_strips(blocks, h, w), shape=shape, dtype=np.uint8,
                             compression="zlib", rowsperstrip=rows, **calib)
    except OSError as exc:
        raise ImageWriteError(f"{path}: cannot write ({exc.strerror})") from exc
