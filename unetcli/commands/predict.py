"""`unet predict`: segment images with the overlap-tile strategy (options -> inference -> files)."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from unetcli import console
from unetcli.errors import ConfigError, ImageReadError, ImageShapeError, ImageWriteError, ModelFileError
from unetcli.options import Device, Format, Model, Output

NAME = "predict"
HELP = ("Segment images with the overlap-tile strategy and mirrored borders: any image size, any "
        "number of files.")
EPILOG = """Examples:

  unet predict in.tif -o mask.tif --tile 572

  unet predict images/*.png -o masks/ --model em-membranes

  unet predict stack.tif -o probs.tif --output-type probs --tta

  unet predict nuclei.png -o labels.tif --output-type labels --min-size 30 --fill-holes

  cat in.png | unet predict - -o - --format png > mask.png

  unet predict images/ -o masks/ --provenance      # masks/NAME.tif + masks/NAME.tif.json"""

DEFAULT_MODEL = "em-membranes"
STREAM_TIFF_BYTES = 64 * 2**20   # TIFFs larger than this (decoded) are read strip by strip as needed
OUTPUT_TYPES = ("probs", "mask", "labels")


def _parse_size(text: str | None) -> int | None:
    """'512M', '2G', '1.5GiB', '800' (MiB) -> bytes."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise ConfigError(f"memory budget {text!r} is not a size", hint="write e.g. 512M or 2G")
    value = float(m.group(1)) * {"": 2**20, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2)]
    if value <= 0:
        raise ConfigError(f"memory budget {text!r} must be positive")
    return int(value)


def _expand_inputs(inputs: list[str]) -> list[str]:
    from unetcli.images import image_files

    if "-" in inputs and len(inputs) > 1:
        raise ConfigError("'-' (stdin) must be the only input", hint="give either files or '-'")
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if item != "-" and p.is_dir():
            found = [str(f) for f in image_files(p)]
            if not found:
                raise ImageReadError(f"{item}: folder holds no image files (.tif, .png, .jpg, .bmp)")
            out.extend(found)
        else:
            out.append(item)
    return out


def _load(model_name: Optional[str]):
    from unetcli.checkpoint import load_model, resolve_model

    if model_name is None:
        try:
            resolve_model(DEFAULT_MODEL)
        except ModelFileError:
            raise ModelFileError(f"no model given, and the default model {DEFAULT_MODEL} is not installed",
                                 hint="give one with --model PATH.unet (make one with `unet train`); "
                                      "`unet predict --list-models` lists the models found by name") from None
        model_name = DEFAULT_MODEL
    return load_model(model_name)


def _outputs(inputs: list[str], output: Optional[Path], fmt: Optional[str], output_type: str) -> list[str]:
    """The output path of every input (or '-'); checks the folder up front so nothing is computed
    for an output that cannot be written."""
    if output is None:
        if inputs == ["-"]:
            return ["-"]
        raise ConfigError("no output given", hint="add -o mask.tif, -o outdir/ for several inputs, or -o - for stdout")
    text = str(output)
    if text == "-":
        if len(inputs) > 1:
            raise ConfigError("several inputs cannot all go to stdout", hint="give an output folder: -o outdir/")
        return ["-"]
    from unetcli.images import format_from_name

    # a folder: several inputs, an existing folder, or a name without an image extension ('masks/')
    folder_mode = len(inputs) > 1 or output.is_dir() or format_from_name(output) is None
    ext = ".png" if fmt == "png" else ".tif"
    if folder_mode:
        if output.exists() and not output.is_dir():
            raise ImageWriteError(f"{text}: is a file, not an output folder", hint="give a folder for several inputs")
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ImageWriteError(f"{text}: cannot create the output folder ({exc.strerror})") from exc
        _check_writable(output, text)
        stems = ["stdin" if i == "-" else Path(i).stem for i in inputs]
        seen: dict[str, str] = {}
        for inp, stem in zip(inputs, stems):
            if stem in seen:
                raise ConfigError(f"{inp} and {seen[stem]} would both be written to {output / (stem + ext)}",
                                  hint="rename one of them or predict them in separate runs")
            seen[stem] = inp
        outs = [str(output / (s + ext)) for s in stems]
    else:
        folder = output.parent if str(output.parent) else Path(".")
        if not folder.is_dir():
            raise ImageWriteError(f"{text}: folder {folder} does not exist", hint="create it first")
        _check_writable(folder, text)
        outs = [text]
    for inp, out in zip(inputs, outs):
        if inp != "-" and Path(inp).exists() and Path(out).exists() and Path(inp).resolve() == Path(out).resolve():
            raise ConfigError(f"{out}: the output would overwrite its own input", hint="write to another file or folder")

    for out in outs:
        kind = format_from_name(out)
        if kind not in ("tiff", "png"):
            raise ImageWriteError(f"{out}: unknown output format", hint="use a .tif, .tiff or .png name")
        if kind == "png" and output_type == "probs":
            raise ImageWriteError(f"{out}: probabilities are float32 and need a TIFF file",
                                  hint="name the output .tif, or use --output-type mask")
    return outs


PROVENANCE_SUFFIX = ".json"


def _sha256_file(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _environment() -> dict:
    import platform

    import numpy
    import torch

    from unetcli import __version__

    return {"unet": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "platform": platform.platform()}


def _write_provenance(out: str, record: dict) -> None:
    """The JSON sidecar ``OUT.json`` of one output, written atomically after the output itself."""
    import datetime
    import json

    from unetcli.images import write_bytes_atomic

    record = dict(record)
    record["output"] = dict(record["output"], path=os.path.abspath(out), sha256=_sha256_file(out))
    record["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    text = json.dumps(record, indent=2) + "\n"
    try:
        write_bytes_atomic(out + PROVENANCE_SUFFIX, text.encode("utf-8"))
    except OSError as exc:
        raise ImageWriteError(f"{out}{PROVENANCE_SUFFIX}: cannot write ({exc.strerror})") from exc


def _check_writable(folder: Path, name: str) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ImageWriteError(f"{name}: cannot write in {folder} (permission denied)")


def _mask_strips(blocks, pages: int, height: int, width: int):
    """Zlib-compressed TIFF strips of a uint8 class map, from row blocks as they are predicted."""
    import zlib

    import numpy as np

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


def _write_mask_streaming(path: str, predictor, stack, reduce, held: int, pixel_size: dict | None = None) -> None:
    """Predict and write a uint8 class map tile row by tile row; only one band is ever held. A
    ``pixel_size`` is written as ImageJ calibration."""
    import numpy as np
    import tifffile

    from unetcli.images import atomic_output

    n, h, w = stack.shape[:3]
    rows = max(1, min(h, (1 << 18) // max(w, 1)))
    shape = (n, h, w) if n > 1 else (h, w)
    blocks = predictor.iter_blocks(stack, reduce, np.uint8, held)
    try:
        with atomic_output(path) as tmp:
            from unetcli import tiffmeta

            calib = tiffmeta.imagej_options(np.zeros((n, 1, 1) if n > 1 else (1, 1), np.uint8),
                                            "ZYX" if n > 1 else "YX", pixel_size)
            calib.setdefault("metadata", None)
            tifffile.imwrite(tmp, data=_mask_strips(blocks, n, h, w), shape=shape, dtype=np.uint8,
                             compression="zlib", rowsperstrip=rows, photometric="minisblack", **calib)
    except OSError as exc:
        raise ImageWriteError(f"{path}: cannot write ({exc.strerror})") from exc


def _describe(path: Path, summary: str) -> dict:
    """What ``--list-models --json`` says of one model file."""
    from unetcli.checkpoint import load_model

    mf = load_model(path)
    return {"name": mf.name, "path": str(path), "summary": summary, "sha256": mf.sha256,
            "classes": mf.class_names, "network": mf.config.to_dict(), "normalization": mf.normalization,
            "inputs": mf.inputs, "postprocess": mf.postprocess}


def command(
    inputs: Optional[List[str]] = typer.Argument(
        None, metavar="IMAGE...", show_default=False,
        help="Images to segment (TIFF stacks are predicted slice by slice), folders of images, or '-' for stdin."),
    output: Output = None,
    model: Model = None,
    list_models: bool = typer.Option(False, "--list-models", help="List the models found by name and exit."),
    json_: bool = typer.Option(False, "--json", help="With --list-models: one JSON array of the models, "
                               "each with its classes, normalisation, inputs and tuned post-processing."),
    output_type: str = typer.Option(
        "mask", "--output-type", metavar="probs|mask|labels",
        help="probs: float32 class probabilities, one page per class; mask: the class map (uint8); "
             "labels: instance labels, the connected components of the foreground classes (uint16/uint32)."),
    threshold: Optional[float] = typer.Option(
        None, "--threshold", metavar="P",
        help="Two-class models: foreground where its probability exceeds P (default: the more probable "
             "class); labels: the foreground threshold of the decoding (default: the model's tuned value)."),
    min_size: Optional[int] = typer.Option(
        None, "--min-size", metavar="PIXELS",
        help="Remove objects smaller than this many pixels (masks and labels; default for labels: the "
             "model's tuned value, else 0)."),
    seed: Optional[float] = typer.Option(
        None, "--seed-threshold", metavar="P",
        help="Three-class models, labels: interior probability that starts an object (default: the model's "
             "tuned value, else 0.5)."),
    channels: Optional[str] = typer.Option(
        None, "--channels", metavar="LIST",
        help="Pick and order the input's channels, 1-based: e.g. 2 for the nuclear stain of a 3-channel "
             "TIFF (default: the channels the model was trained on)."),
    fill_holes: bool = typer.Option(False, "--fill-holes", help="Fill holes inside objects (masks and labels)."),
    largest_component: bool = typer.Option(
        False, "--largest-component",
        help="Keep only the largest object of each class, for tasks with one region (a nerve, an organ)."),
    tta: bool = typer.Option(False, "--tta",
                             help="Average over the 8 flips and 90-degree rotations of the input (8x slower)."),
    tile: Optional[str] = typer.Option(
        None, "--tile", metavar="SIZE",
        help="Input tile side (e.g. 572) or HxW; default: the tile needing the fewest operations that fits "
             "--memory-budget."),
    batch: Optional[int] = typer.Option(
        None, "--batch", metavar="N", help="Tiles per forward pass (default: 1 on CPU, as many as fit on a GPU)."),
    memory_budget: Optional[str] = typer.Option(
        None, "--memory-budget", metavar="SIZE",
        help="Memory for one batch of tiles plus the image and result held, e.g. 512M or 4G (default: CPU a "
             "quarter of the free memory, at most 512M; GPU half the free device memory, for the tiles)."),
    overlap: float = typer.Option(0.25, "--overlap", metavar="FRACTION",
                                  help="Same-padding networks: overlap of neighbouring tiles."),
    blend: str = typer.Option("gaussian", "--blend", metavar="gaussian|mean",
                              help="Same-padding networks: how overlapping tiles are blended."),
    device: Device = "auto",
    precision: str = typer.Option("fp32", "--precision", metavar="fp32|bf16|fp16",
                                  help="Arithmetic precision; bf16/fp16 only where the device supports them."),
    threads: Optional[int] = typer.Option(None, "--threads", metavar="N",
                                          help="CPU threads for the network (default: one per core; 1 for tiny "
                                               "networks)."),
    fmt: Format = None,
    skip_existing: bool = typer.Option(False, "--skip-existing",
                                       help="Skip inputs whose output exists already (to restart a batch job)."),
    provenance: bool = typer.Option(
        False, "--provenance",
        help="Write OUTPUT.json beside each output: the model's name and SHA-256, the input's SHA-256, every "
             "parameter and the software versions, to audit a batch run later."),
) -> None:
    if list_models:
        from unetcli.checkpoint import list_models as found

        if json_:
            sys.stdout.write(json.dumps([_describe(path, summary) for _name, path, summary in found()],
                                        indent=1) + "\n")
            return
        for name, _path, summary in found():
            typer.echo(f"{name}\t{summary}" if summary else name)
        return
    if not inputs:
        raise ConfigError("no input images given", hint="unet predict IMAGE... -o OUTPUT (see --help)")
    if output_type not in OUTPUT_TYPES:
        raise ConfigError(f"unknown output type {output_type!r}", hint="use probs, mask or labels")
    if fmt is not None and fmt.lower() not in ("tiff", "tif", "png"):
        raise ConfigError(f"unknown format {fmt!r}", hint="use tiff or png")
    fmt = None if fmt is None else ("png" if fmt.lower() == "png" else "tiff")
    post = fill_holes or largest_component or (min_size or 0) > 0
    if output_type == "probs" and (post or threshold is not None):
        raise ConfigError("--threshold, --min-size, --fill-holes and --largest-component apply to masks and "
                          "labels, not to probabilities", hint="use --output-type mask or labels")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold must be between 0 and 1, not {threshold}")
    if min_size is not None and min_size < 0:
        raise ConfigError(f"--min-size must be at least 0, not {min_size}")
    if seed is not None and output_type != "labels":
        raise ConfigError("--seed-threshold applies to --output-type labels")
    from unetcli import normalize

    picked = normalize.parse_channels(channels)
    budget = _parse_size(memory_budget)
    if provenance and output is not None and str(output) == "-":
        raise ConfigError("--provenance writes a file beside each output, and stdout is not a file",
                          hint="write to a file (-o mask.tif) or leave --provenance out")

    inputs = _expand_inputs(list(inputs))
    outs = _outputs(inputs, output, fmt, output_type)
    if fmt == "png" and output_type == "probs":
        raise ImageWriteError("probabilities are float32 and need TIFF", hint="use --format tiff")
    todo = [(i, o) for i, o in zip(inputs, outs) if not (skip_existing and o != "-" and Path(o).exists())]
    for i, o in zip(inputs, outs):
        if (i, o) not in todo:
            console.info(f"{o}: exists, skipped")
    if not todo:
        return

    mf = _load(model)
    if picked is None and (mf.inputs or {}).get("channels"):
        picked = [int(c) - 1 for c in mf.inputs["channels"]]
    decode = None
    if output_type == "labels":
        from unetcli.instances import DecodeParams

        tuned = DecodeParams.from_dict(mf.postprocess)
        changes = {k: v for k, v in (("threshold", threshold), ("seed", seed), ("min_size", min_size))
                   if v is not None}
        decode = DecodeParams.from_dict({**tuned.to_dict(), **changes})
        if mf.postprocess:
            console.detail(f"instance decoding {decode.to_dict()} (tuned values of {mf.name}, flags override)")
    if threshold is not None and mf.config.num_classes != 2 and output_type != "labels":
        raise ConfigError(f"--threshold applies to two-class models; {mf.name} has {mf.config.num_classes} classes",
                          hint="leave --threshold out: each pixel gets its most probable class")
    import numpy as np

    from unetcli.images import read_image, write_image
    from unetcli.images import TIFF, format_from_name
    from unetcli.inference import TiffRows, load_predictor, probs_to_mask
    from unetcli.postprocess import clean

    predictor = load_predictor(mf, device=device, tile=tile, batch=batch, precision=precision, tta=tta,
                               memory_budget=budget, overlap=overlap, blend=blend, threads=threads)
    console.detail(f"model {mf.name} ({mf.path}); device {predictor.device}, precision {precision}, "
                   f"{'valid' if mf.config.padding == 'valid' else 'same'} padding")

    def reduce(p):
        return probs_to_mask(p, threshold)

    def load(path: str):
        digest = size = raw = None
        if provenance:
            import hashlib

            if path == "-":
                raw = sys.stdin.buffer.read()
                digest, size = hashlib.sha256(raw).hexdigest(), len(raw)
            else:
                digest, size = _sha256_file(path), os.path.getsize(path)
        arr = None
        if path != "-" and (format_from_name(path) == TIFF or Path(path).suffix == ""):
            arr = TiffRows.open(path, min_bytes=STREAM_TIFF_BYTES)   # huge striped TIFF: rows on demand
        if arr is None:                                              # anything else (or errors): whole
            arr = read_image(path, stdin_bytes=raw)
        name = "<stdin>" if path == "-" else path
        if isinstance(arr, np.ndarray) and (picked is not None or arr.shape[-1] != mf.config.in_channels):
            arr, note = normalize.adapt_channels(arr, mf.config.in_channels, picked, name)
            if note:
                console.detail(note)
        if isinstance(arr, np.ndarray) and arr.shape[-1] == mf.config.in_channels:
            warning = normalize.range_warning(mf.normalization, arr, (mf.inputs or {}).get("dtype"), name)
            if warning:
                console.warn(warning)
        if arr.shape[-1] != mf.config.in_channels:
            if hasattr(arr, "close"):
                arr.close()
            raise ImageShapeError(f"{name}: has {arr.shape[-1]} channel(s), the model {mf.name} takes "
                                  f"{mf.config.in_channels}",
                                  hint=("convert it to grey" if mf.config.in_channels == 1
                                        else f"give images with {mf.config.in_channels} channels"))
        return arr, digest, size

    from unetcli import cli

    environment = _environment() if provenance else None
    parameters = {"output_type": output_type, "threshold": threshold, "min_size": min_size,
                  "fill_holes": fill_holes, "largest_component": largest_component, "tta": tta,
                  "tile": tile, "batch": batch, "memory_budget": memory_budget, "overlap": overlap,
                  "blend": blend, "device": device, "precision": precision, "threads": threads,
                  "format": fmt, "skip_existing": skip_existing}
    model_record = {"name": mf.name, "path": str(mf.path.resolve()) if mf.path else None, "sha256": mf.sha256,
                    "config": mf.config.to_dict(), "trained": mf.provenance}

    def record(inp, out, stack, digest, size, plan, start, dtype) -> dict:
        """Everything that made this output, except the output's own hash (added once it is written)."""
        n, h, w, c = stack.shape
        batch_used = predictor.batch_for(plan, plan.count * n)
        used = dict(parameters, tile_used=list(plan.tile), tiles=plan.count * n, batch_used=batch_used,
                    device_used=str(predictor.device), threads_used=predictor.threads_for(plan, batch_used))
        return {"input": {"path": "<stdin>" if inp == "-" else os.path.abspath(inp), "sha256": digest,
                          "bytes": size, "shape": [n, h, w, c], "dtype": stack.dtype.name},
                "output": {"type": output_type, "dtype": dtype,
                           "format": "png" if out.lower().endswith(".png") else "tiff"},
                "model": model_record, "parameters": used, "environment": environment,
                "command": list(cli.ARGV),
                "seconds": round(time.perf_counter() - start, 3)}

    from concurrent.futures import ThreadPoolExecutor

    def finish(job) -> None:
        """Wait for a background write, then print its path on stdout (data for pipelines)."""
        if job is not None:
            job[0].result()
            if job[2] is not None:
                _write_provenance(job[1], job[2])
            sys.stdout.write(f"{job[1]}\n")
            sys.stdout.flush()

    def predict_one(stack, digest, size, inp: str, out: str, written, writer):
        """Predict one input and write (or start writing) its output; returns the write in flight."""
        n, h, w = stack.shape[:3]
        streamed = output_type == "mask" and not post and out != "-" and out.lower().endswith((".tif", ".tiff"))
        # host bytes per pixel of the result kept whole (the streamed mask keeps one band only)
        per_pixel = {"probs": 4 * mf.config.num_classes, "mask": 0 if streamed else 1,
                     "labels": 4 * mf.config.num_classes + 4}[output_type]
        held = predictor.held_bytes(stack, per_pixel)
        plan = predictor.plan(h, w, held)
        name = "<stdin>" if inp == "-" else inp
        from unetcli import tiffmeta

        calibration = None if inp == "-" else tiffmeta.pixel_size(inp)
        start = time.perf_counter()
        data = None
        with console.progress(plan.count * n * (8 if tta else 1), f"{Path(name).name}") as advance:
            last = [0]

            def tick(done, total):
                advance(done - last[0] if done >= last[0] else done)
                last[0] = done

            predictor.progress = tick
            if streamed:
                finish(written)
                written = None
                _write_mask_streaming(out, predictor, stack, reduce, held, calibration)
                if provenance:
                    _write_provenance(out, record(inp, out, stack, digest, size, plan, start, "uint8"))
                sys.stdout.write(f"{out}\n")
                sys.stdout.flush()
            elif output_type == "probs":
                probs = predictor.predict(stack, held)                     # (N, K, H, W)
                data, layout = probs.reshape(n * probs.shape[1], h, w), "ZYX"
            elif output_type == "labels":
                from unetcli.instances import decode_image

                probs = predictor.predict(stack, held)                     # (N, K, H, W)
                labs = [decode_image(p, decode, fill=fill_holes, largest=largest_component) for p in probs]
                del probs
                dtype = np.uint32 if any(lab.dtype == np.uint32 for lab in labs) else np.uint16
                data = np.stack([lab.astype(dtype) for lab in labs])
                data, layout = (data[0], "YX") if n == 1 else (data, "ZYX")
            else:
                masks = np.empty((n, h, w), np.uint8)
                for page, y0, block in predictor.iter_blocks(stack, reduce, np.uint8, held):
                    masks[page, y0:y0 + block.shape[0]] = block
                if post:
                    masks = np.stack([clean(m, fill=fill_holes, min_size=min_size or 0, largest=largest_component)
                                      for m in masks])
                data, layout = (masks[0], "YX") if n == 1 else (masks, "ZYX")
        secs = time.perf_counter() - start
        if data is not None:
            finish(written)                            # one write in flight at a time
            written = None
            if out == "-":
                write_image("-", data, layout, fmt=fmt or "tiff", pixel_size=calibration,
                            classes=mf.config.num_classes if output_type == "probs" else None)
            else:
                rec = record(inp, out, stack, digest, size, plan, start, data.dtype.name) if provenance else None
                written = (writer.submit(write_image, out, data, layout, pixel_size=calibration,
                                         classes=mf.config.num_classes if output_type == "probs" else None),
                           out, rec)
        pages = f", {n} pages" if n > 1 else ""
        console.info(f"{name} -> {'<stdout>' if out == '-' else out} ({h}x{w}{pages}, "
                     f"tile {plan.tile[0]}x{plan.tile[1]}, {plan.count * n} tiles, {secs:.1f} s)")
        return written

    with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as writer:
        ahead = reader.submit(load, todo[0][0])       # reading the next file overlaps the current one
        written = None                                # (future, path, provenance) of the write in flight
        stack = None
        try:
            for idx, (inp, out) in enumerate(todo):
                stack, digest, size = ahead.result()
                if idx + 1 < len(todo):
                    ahead = reader.submit(load, todo[idx + 1][0])
                try:
                    written = predict_one(stack, digest, size, inp, out, written, writer)
                finally:
                    if hasattr(stack, "close"):
                        stack.close()
            finish(written)
        finally:                                      # a source opened ahead and never used
            if ahead.done() and not ahead.cancelled() and ahead.exception() is None:
                nxt = ahead.result()[0]
                if nxt is not stack and hasattr(nxt, "close"):
                    nxt.close()
