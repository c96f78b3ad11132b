"""`unet predict`: segment images with the overlap-tile strategy (options -> ``pipeline.predict_files``)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer

from unetcli import console
from unetcli.errors import ConfigError, ImageWriteError, ModelFileError
from unetcli.options import Device, Model, OutputName, PredictFormat, choices

NAME = "predict"
HELP = ("Segment images with the overlap-tile strategy and mirrored borders: any image size, any "
        "number of files.")
EPILOG = """Examples:

  unet predict in.tif -o mask.tif --tile 572

  unet predict images/*.png -o masks/ --model em-membranes

  unet predict stack.tif -o probs.tif --output-type probs --tta

  unet predict nuclei.png -o labels.tif --output-type labels --min-size 30 --fill-holes

  unet predict nuclei.png -o cells.zip --output-type labels -m nuclei   # Fiji ROIs (.geojson: QuPath)

  unet predict img.ome.zarr -o img.ome.zarr/labels/nuclei --output-type labels -m nuclei   # OME-Zarr

  cat in.png | unet predict - -o - --format png > mask.png

  unet predict images/ -o masks/ --provenance      # masks/NAME.tif + masks/NAME.tif.json"""

DEFAULT_MODEL = "em-membranes"
OUTPUT_TYPES = ("probs", "mask", "labels")
_WHAT = {"probs": "probabilities", "mask": "a class map (mask)", "labels": "labels"}


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
    from unetcli.images import expand_folders

    if "-" in inputs and len(inputs) > 1:
        raise ConfigError("'-' (stdin) must be the only input", hint="give either files or '-'")
    return expand_folders(inputs)


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


def _outputs(inputs: list[str], name: Optional[str], fmt: Optional[str], output_type: str) -> list[str]:
    """The output path of every input (or '-'); checks the folder up front so nothing is computed
    for an output that cannot be written.

    ``-o`` is a folder when it ends in '/', exists as a folder, or has no image extension (nor .zip or
    .geojson, the outline files of labels); otherwise it names one file, and several inputs into one
    file name are refused."""
    output = None if name is None else Path(name)
    if output is None:
        if inputs == ["-"]:
            return ["-"]
        raise ConfigError("no output given", hint="add -o mask.tif, -o outdir/ for several inputs, or -o - for stdout")
    text = str(output)
    if text == "-":
        if len(inputs) > 1:
            raise ConfigError("several inputs cannot all go to stdout", hint="give an output folder: -o outdir/")
        if fmt == "zarr":
            raise ConfigError("an OME-Zarr image is a folder, which cannot go to stdout",
                              hint="give -o NAME.zarr")
        return ["-"]
    from unetcli.images import format_from_name
    from unetcli.roifiles import check_available, outline_format
    from unetcli.zarrio import (check_inputs_outputs, check_output as check_zarr_output, is_zarr_output,
                                labels_target)

    check_inputs_outputs([], [text])             # not inside a Zarr store, before any folder is made

    # a folder: a name ending in '/', an existing folder, or a name without an image or outline extension
    # (an OME-Zarr output, NAME.zarr or IMAGE.zarr/labels/NAME, is one output though it is a folder)
    folder_mode = not is_zarr_output(text) and (
        text.endswith(("/", os.sep)) or output.is_dir()
        or (format_from_name(output) is None and outline_format(output) is None))
    if not folder_mode and len(inputs) > 1:
        raise ConfigError(f"{len(inputs)} inputs cannot all be written to one file, {text}",
                          hint=f"give an output folder: -o {Path(text).stem}/")
    ext = {"png": ".png", "zip": ".zip", "geojson": ".geojson", "zarr": ".zarr"}.get(fmt or "", ".tif")
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
        if labels_target(text) is not None:     # into an image's labels group: written from the image
            folder = labels_target(text)[0]
        if not folder.is_dir():
            raise ImageWriteError(f"{text}: folder {folder} does not exist", hint="create it first")
        _check_writable(folder, text)
        outs = [text]
    for out in outs:
        if is_zarr_output(out):                  # OME-Zarr (NAME.zarr, or IMAGE.zarr/labels/NAME)
            check_zarr_output(out, output_type, inputs)
            continue
        outline = outline_format(out)
        if outline is not None:                  # ImageJ ROI set or QuPath GeoJSON: outlines of labels
            if output_type != "labels":
                raise ConfigError(f"{out}: {'an ImageJ ROI set' if outline == 'zip' else 'a GeoJSON file'} "
                                  f"holds the outlines of instance labels, not {_WHAT[output_type]}",
                                  hint="add --output-type labels, or name the output .tif")
            check_available(outline, out)
            continue
        kind = format_from_name(out)
        if kind not in ("tiff", "png"):
            raise ImageWriteError(f"{out}: unknown output format",
                                  hint="use a .tif, .tiff or .png name (labels: also .zip or .geojson)")
        if kind == "png" and output_type == "probs":
            raise ImageWriteError(f"{out}: probabilities are float32 and need a TIFF file",
                                  hint="name the output .tif, or use --output-type mask")
    return outs


def _outline(name: str) -> bool:
    from unetcli.roifiles import outline_format

    return outline_format(name) is not None


def _check_writable(folder: Path, name: str) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ImageWriteError(f"{name}: cannot write in {folder} (permission denied)")


def _describe(path: Path, summary: str) -> dict:
    """What ``--list-models --json`` says of one model file."""
    from unetcli.checkpoint import load_model

    mf = load_model(path)
    return {"name": mf.name, "path": str(path), "summary": summary, "sha256": mf.sha256,
            "classes": mf.class_names, "network": mf.config.to_dict(), "normalization": mf.normalization,
            "inputs": mf.inputs, "postprocess": mf.postprocess}


def command(
    ctx: typer.Context,
    inputs: Optional[List[str]] = typer.Argument(
        None, metavar="IMAGE", show_default=False,
        help="Images to segment (TIFF stacks are predicted slice by slice), folders of images, or '-' for stdin."),
    output_name: OutputName = None,
    model: Model = None,
    list_models: bool = typer.Option(False, "--list-models", help="List the models found by name and exit."),
    json_: bool = typer.Option(False, "--json", help="With --list-models: one JSON array of the models, "
                               "each with its classes, normalisation, inputs and tuned post-processing."),
    output_type: str = typer.Option(
        "mask", "--output-type", metavar="probs|mask|labels", autocompletion=choices("probs", "mask", "labels"),
        help="probs: float32 class probabilities (an ImageJ hyperstack, slices x classes); mask: the class "
             "map (uint8); labels: instance labels (uint16/uint32), decoded with the model's tuned values."),
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
    tuned: bool = typer.Option(
        True, "--tuned/--untuned",
        help="Labels: decode with the values the model was tuned with (default), or with the plain "
             "defaults (threshold 0.5, seed 0.5, no minimum size) to see what the tuning gives."),
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
    precision: str = typer.Option("auto", "--precision", metavar="auto|fp32|bf16|fp16",
                                  autocompletion=choices("auto", "fp32", "bf16", "fp16"),
                                  help="Arithmetic precision. auto: bf16 on a CPU that computes it natively "
                                       "(AVX512-BF16, AMX) or a GPU that has it, else fp32."),
    backend: str = typer.Option("auto", "--backend", metavar="auto|torch|openvino",
                                autocompletion=choices("auto", "torch", "openvino"),
                                help="What runs the network. auto: OpenVINO on a CPU where it is installed "
                                     "(the fastest there), else torch."),
    threads: Optional[int] = typer.Option(None, "--threads", metavar="N",
                                          help="CPU threads for the network (default: one per core; 1 for tiny "
                                               "networks)."),
    fmt: PredictFormat = None,
    preview: Optional[Path] = typer.Option(
        None, "--preview", metavar="PNG",
        help="Also write a picture of the input with the mask's class borders or the instances' outlines "
             "drawn in red (one input only)."),
    skip_existing: bool = typer.Option(False, "--skip-existing",
                                       help="Skip inputs whose output exists already (to restart a batch job)."),
    provenance: bool = typer.Option(
        False, "--provenance",
        help="Write OUTPUT.json beside each output: the model's name and SHA-256, the input's SHA-256, every "
             "parameter and the software versions, to audit a batch run later."),
    cluster: Optional[str] = typer.Option(
        None, "--cluster", metavar="local:N|tcp://HOST:PORT",
        help="Predict on a Dask cluster: N worker processes here, or the workers of a running dask-scheduler. "
             "One image to -o NAME.zarr is predicted block by block (the same result, seamless); several "
             "files go to the workers one file each. Needs pip install 'unet[cluster]'."),
    chunk: Optional[int] = typer.Option(
        None, "--chunk", metavar="PIXELS",
        help="With --cluster and a .zarr output: the side of the blocks each task predicts (default: the "
             "input's Zarr chunks, else 1024), rounded to whole tiles."),
) -> None:
    if list_models:
        _list_models(json_)
        return
    fmt = _check_options(inputs, output_type, fmt, threshold, min_size, seed, fill_holes, largest_component)
    spec = _cluster_spec(cluster, chunk, inputs, output_name, preview)
    from unetcli import guards, normalize, pipeline

    picked = normalize.parse_channels(channels)
    budget = _parse_size(memory_budget)
    if provenance and output_name == "-":
        raise ConfigError("--provenance writes a file beside each output, and stdout is not a file",
                          hint="write to a file (-o mask.tif) or leave --provenance out")
    if threads is not None:
        threads = guards.cap_threads(threads)

    given = list(inputs)
    inputs = _expand_inputs(given)
    outs = _outputs(inputs, output_name, fmt, output_type)
    sidecars = [o + pipeline.PROVENANCE_SUFFIX for o in outs if o != "-"] if provenance else []
    if preview is not None and (len(inputs) != 1 or outs == ["-"] or inputs == ["-"]):
        raise ConfigError("--preview draws one input with its result: give one input file and an output file")
    if preview is not None and outs != ["-"] and _outline(outs[0]):
        raise ConfigError(f"--preview draws the result from an image, and {outs[0]} holds outlines",
                          hint="write the labels as .tif for a preview, or leave --preview out")
    if preview is not None and Path(preview).suffix.lower() != ".png":
        raise ConfigError(f"--preview {preview}: the picture is a PNG", hint="name it .png")
    extra = [str(preview)] if preview is not None else []
    guards.check_outputs(given, outs + sidecars + extra)  # no output over an input or over another output
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
    decode = _decoding(mf, output_type, threshold, seed, min_size, tuned)
    if threshold is not None and mf.config.num_classes != 2 and output_type != "labels":
        raise ConfigError(f"--threshold applies to two-class models; {mf.name} has {mf.config.num_classes} classes",
                          hint="leave --threshold out: each pixel gets its most probable class")
    from unetcli.inference import load_predictor

    predictor = load_predictor(mf, device=device, tile=tile, batch=batch, precision=precision, tta=tta,
                               memory_budget=budget, overlap=overlap, blend=blend, threads=threads,
                               backend=backend)
    console.detail(f"model {mf.name} ({mf.path}); device {predictor.device}, backend {predictor.backend}, "
                   f"precision {predictor.precision}, "
                   f"{'valid' if mf.config.padding == 'valid' else 'same'} padding")
    if predictor.tile_note:
        console.detail(predictor.tile_note)

    # '-' is resolved here: the core reads bytes and writes to a stream
    from unetcli.commands import read_stdin

    jobs = [pipeline.Job(read_stdin() if i == "-" else i, sys.stdout.buffer if o == "-" else o)
            for i, o in todo]
    record = None
    if provenance:
        argv = (ctx.obj or {}).get("argv") or ["unet"]     # handed down by cli.run
        record = {"command": argv, "parameters": {
            "output_type": output_type, "threshold": threshold, "min_size": min_size, "fill_holes": fill_holes,
            "largest_component": largest_component, "tta": tta, "tile": tile, "batch": batch,
            "memory_budget": memory_budget, "overlap": overlap, "blend": blend, "device": device,
            "precision": predictor.precision, "backend": predictor.backend, "threads": threads, "format": fmt, "skip_existing": skip_existing}}
    settings = pipeline.Output(kind=output_type, threshold=threshold, min_size=min_size, fill_holes=fill_holes,
                               largest_component=largest_component, decode=decode, fmt=fmt)
    if spec is not None:
        _on_cluster(spec, chunk, todo, mf, predictor, settings, picked, record, threads,
                    dict(device=device, tile=tile, batch=batch, precision=precision, tta=tta, memory_budget=budget,
                         overlap=overlap, blend=blend, backend=backend))
        return
    pipeline.predict_files(jobs, predictor, mf, settings, channels=picked, provenance=record,
                           on_written=_print_path, on_done=_report, on_note=_note, progress=console.progress)
    if preview is not None:
        from unetcli.images import write_image
        from unetcli.previews import overlay

        write_image(preview, overlay(inputs[0], outs[0]), "YXC")
        _print_path(str(preview))


def _list_models(as_json: bool) -> None:
    """``--list-models``: one name (and summary) a line, or one JSON array with each model's records."""
    from unetcli.checkpoint import list_models as found

    if as_json:
        sys.stdout.write(json.dumps([_describe(path, summary) for _name, path, summary in found()],
                                    indent=1) + "\n")
        return
    for name, _path, summary in found():
        typer.echo(f"{name}\t{summary}" if summary else name)


def _check_options(inputs, output_type: str, fmt: str | None, threshold, min_size, seed, fill_holes: bool,
                   largest_component: bool) -> str | None:
    """Refuse contradictory or out-of-range options; return the output format ('tiff', 'png', 'zip',
    'geojson', 'zarr' or None)."""
    if not inputs:
        raise ConfigError("no input images given", hint="unet predict IMAGE... -o OUTPUT (see --help)")
    if output_type not in OUTPUT_TYPES:
        raise ConfigError(f"unknown output type {output_type!r}", hint="use probs, mask or labels")
    known = {"tiff": "tiff", "tif": "tiff", "png": "png", "zip": "zip", "geojson": "geojson", "zarr": "zarr"}
    if fmt is not None and fmt.lower() not in known:
        raise ConfigError(f"unknown format {fmt!r}", hint="use tiff, png or zarr (OME-Zarr); for labels also "
                                                         "zip or geojson")
    fmt = None if fmt is None else known[fmt.lower()]
    if fmt in ("zip", "geojson") and output_type != "labels":
        raise ConfigError(f"--format {fmt} writes the outlines of instance labels, not {_WHAT[output_type]}",
                          hint="add --output-type labels, or use --format tiff")
    if fmt in ("zip", "geojson"):
        from unetcli.roifiles import check_available

        check_available(fmt, f"--format {fmt}")
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
    return fmt


def _decoding(mf, output_type: str, threshold, seed, min_size, tuned_values: bool = True):
    """Labels: the model's tuned instance decoding (or the defaults with ``tuned_values`` off) with the
    flags given on top; else None."""
    if output_type != "labels":
        return None
    from unetcli.instances import DecodeParams

    tuned = DecodeParams.from_dict(mf.postprocess if tuned_values else None)
    changes = {k: v for k, v in (("threshold", threshold), ("seed", seed), ("min_size", min_size)) if v is not None}
    decode = DecodeParams.from_dict({**tuned.to_dict(), **changes})
    if mf.postprocess:
        console.detail(f"instance decoding {decode.to_dict()} (tuned values of {mf.name}, flags override)")
    return decode


def _cluster_spec(cluster: Optional[str], chunk: Optional[int], inputs, output_name, preview):
    """``--cluster`` parsed and checked against the other options (None without it)."""
    if cluster is None:
        if chunk is not None:
            raise ConfigError("--chunk sizes the blocks of --cluster", hint="add --cluster local:N, or leave --chunk out")
        return None
    from unetcli.cluster import parse_cluster

    spec = parse_cluster(cluster)
    if chunk is not None and chunk < 1:
        raise ConfigError(f"--chunk must be at least 1 pixel, not {chunk}")
    if "-" in (inputs or []) or output_name == "-":
        raise ConfigError("--cluster reads and writes files, not stdin or stdout",
                          hint="give input files and -o NAME.zarr or -o folder/")
    if preview is not None:
        raise ConfigError("--preview is not available with --cluster", hint="leave --preview out")
    return spec


def _on_cluster(spec, chunk, todo, mf, predictor, settings, picked, record, threads, options: dict) -> None:
    """--cluster: one image to an OME-Zarr output block by block, else one file per task."""
    from unetcli import cluster as dask_cluster
    from unetcli.zarrio import is_zarr_output

    one_image = len(todo) == 1 and is_zarr_output(todo[0][1])
    if threads is None and spec.local:       # the cores shared among the local workers
        from unetcli.guards import cpu_cores

        threads = max(1, cpu_cores() // spec.workers)
    opts = dask_cluster.predictor_options(threads=threads, **options)
    if record is not None:
        record["parameters"].update(cluster=spec.text, chunk=chunk, threads_per_worker=threads)
    if not one_image and chunk is not None:
        raise ConfigError("--chunk applies to one image written to -o NAME.zarr", hint="leave --chunk out")
    with dask_cluster.Cluster(spec, dashboard=console.level() >= console.VERBOSE) as workers:
        board = workers.dashboard_link
        console.detail(f"cluster {spec.text}: {workers.workers} workers" + (f", dashboard {board}" if board else ""))
        if one_image:
            source, output = todo[0]
            report = dask_cluster.predict_chunked(workers, mf, predictor, source, output, settings, options=opts,
                                                  channels=picked, chunk=chunk, provenance=record,
                                                  progress=console.progress, on_note=_note)
            _print_path(output)
            n, h, w = report.shape
            found = f", {sum(report.objects)} objects" if report.objects is not None else ""
            console.info(f"{source} -> {output} ({h}x{w}{f', {n} pages' if n > 1 else ''}, tile "
                         f"{report.tile[0]}x{report.tile[1]}, {report.blocks * n} blocks of {report.block[0]}x"
                         f"{report.block[1]} on {report.workers} workers{found}, {report.seconds:.1f} s)")
        else:
            dask_cluster.predict_files_cluster(workers, mf, todo, settings, options=opts, channels=picked,
                                               provenance=record, on_written=_print_path, on_done=_report,
                                               on_note=_note, progress=console.progress)


def _print_path(path: str) -> None:
    """A finished output's path on stdout: data for pipelines."""
    sys.stdout.write(f"{path}\n")
    sys.stdout.flush()


def _report(r) -> None:
    n, h, w = r.shape
    pages = f", {n} pages" if n > 1 else ""
    console.info(f"{r.input} -> {r.output} ({h}x{w}{pages}, tile {r.tile[0]}x{r.tile[1]}, {r.tiles} tile{'' if r.tiles == 1 else 's'}, "
                 f"{r.seconds:.1f} s)")


def _note(level: str, text: str) -> None:
    (console.warn if level == "warn" else console.detail)(text)
