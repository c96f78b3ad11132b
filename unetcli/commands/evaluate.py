"""`unet evaluate`: score predictions against ground truth with the metrics of the field."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from unetcli import options

NAME = "evaluate"
HELP = ("Score predictions against ground truth: IoU, Dice, pixel error, the ISBI 2012 Rand and "
        "information scores, warping error, object F1, AP (DSB 2018) and SEG (Cell Tracking Challenge).")
EPILOG = """Examples:

  unet evaluate predictions/ --truth labels/

  unet evaluate pred.tif --truth isbi2012/train-labels.tif --json

  unet evaluate probs.tif --truth labels.tif --probability membrane --thresholds 0:1:0.05

  unet evaluate nuclei-pred/ --truth nuclei/labels/ --metrics f1,ap,seg --csv > scores.csv

  unet evaluate pred.png --truth truth.png --metrics all"""


class Probability(str, Enum):
    object = "object"
    membrane = "membrane"


def command(
    predictions: Annotated[list[str], typer.Argument(
        metavar="PREDICTION", show_default=False,
        help="Predicted images: label or mask images (0 = background/membrane), probability maps "
             "(float, 1 = object unless --probability membrane) or class probabilities (one page or "
             "channel per class). A folder stands for the images in it; a TIFF stack is scored page by "
             "page; '-' reads stdin.")],
    truth: Annotated[str, typer.Option(
        "--truth", "-t", metavar="PATH", show_default=False,
        help="Ground-truth labels: a file (or stack) for one prediction, or a folder whose files are "
             "paired with the predictions by file name without extension.")],
    metrics: Annotated[Optional[str], typer.Option(
        "--metrics", metavar="LIST",
        help="Comma-separated metric keys or groups (pixel, isbi, warping, objects, all). Default: "
             "pixel, isbi and objects for binary truth, pixel and objects for instance labels, pixel "
             "for --classes; warping only on request.")] = None,
    thresholds: Annotated[str, typer.Option(
        "--thresholds", metavar="START:STOP:STEP",
        help="Thresholds swept for probability maps (ISBI and warping metrics); the best per metric "
             "over the whole set is reported. Also a comma list.")] = "0:1:0.1",
    probability: Annotated[Probability, typer.Option(
        "--probability", case_sensitive=False,
        help="What a one-page float prediction holds: the probability of object (cell interior, the "
             "default: object where value > t) or of membrane (object where value < t).")]
        = Probability.object,
    foreground: options.Foreground = None,
    classes: options.Classes = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object: {\"images\": [...], \"mean\": {...}, \"thresholds\": {...}}.")]
        = False,
    as_csv: Annotated[bool, typer.Option(
        "--csv", help="Print CSV: a header and one row per image, nothing else (the mean: --json or the table).")] = False,
    output: options.Output = None,
) -> None:
    """Evaluate; print a table (or JSON/CSV) of the scores per image and their mean."""
    import sys

    from unetcli import console
    from unetcli import metrics as M
    from unetcli.errors import ConfigError
    from unetcli.evalfiles import read_pairs
    from unetcli.atomic import write_bytes_atomic
    from unetcli.labels import parse_values

    if as_json and as_csv:
        raise ConfigError("--json and --csv exclude each other", hint="choose one output format")
    fmt = "json" if as_json else "csv" if as_csv else None
    if fmt is None and output is not None and str(output) != "-":
        fmt = {".json": "json", ".csv": "csv"}.get(Path(str(output)).suffix.lower())
    fmt = fmt or "table"
    sweep = M.parse_thresholds(thresholds)
    fg = parse_values(foreground, option="--foreground")
    cls = parse_values(classes, option="--classes")
    if fg is not None and cls is not None:
        raise ConfigError("--foreground and --classes exclude each other",
                          hint="--classes scores a class map; its first class is the background")
    if cls is not None and len(cls) < 2:
        raise ConfigError("--classes needs at least two values (the first is the background)")

    from unetcli.commands import read_stdin as read_stdin_once
    from unetcli.guards import check_outputs

    if output is not None and str(output) != "-":
        check_outputs([*predictions, truth], [output])   # the scores never replace what they score
    pairs = read_pairs(predictions, truth, stdin=read_stdin_once)
    with console.progress(len(pairs), "evaluating") as advance:
        report = M.evaluate(pairs, metrics=metrics, thresholds=sweep, probability=probability.value,
                            foreground=fg, classes=cls, progress=lambda name: advance(1))
    text = {"json": _json, "csv": _csv, "table": _table}[fmt](report)
    if fmt == "csv" and report["thresholds"]:
        console.info("best thresholds: " + ", ".join(f"{k} {v:g}" for k, v in report["thresholds"].items()))
    if output is not None and str(output) != "-":
        write_bytes_atomic(output, text.encode("utf-8"))
        sys.stdout.write(f"{output}\n")
    else:
        sys.stdout.write(text)
    console.detail(f"{len(report['images'])} image(s) evaluated")


# ------------------------------------------------------------------------------------ outputs

def _plain(value):
    import math

    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _json(report: dict) -> str:
    import json

    clean = {"images": [{"name": img["name"], "metrics": {k: _plain(v) for k, v in img["metrics"].items()}}
                        for img in report["images"]],
             "mean": {k: _plain(v) for k, v in report["mean"].items()},
             "thresholds": report["thresholds"]}
    return json.dumps(clean, indent=2) + "\n"


def _csv(report: dict) -> str:
    import csv
    import io

    keys = list(report["mean"])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["name", *keys])
    for img in report["images"]:
        writer.writerow([img["name"], *(_cell(img["metrics"][k]) for k in keys)])
    return buf.getvalue()


def _cell(value) -> str:
    value = _plain(value)
    return "" if value is None else repr(float(value))


def _table(report: dict) -> str:
    """Rows = images and their mean, columns = metrics, split into blocks that fit the terminal."""
    import os
    import shutil

    keys = list(report["mean"])
    rows = [(img["name"], img["metrics"]) for img in report["images"]] + [("mean", report["mean"])]
    name_w = max(len(r[0]) for r in rows)
    width = int(os.environ.get("COLUMNS", 0) or shutil.get_terminal_size((100, 24)).columns)

    def fmt(v) -> str:
        v = _plain(v)
        return "-" if v is None else f"{float(v):.4f}"

    blocks, block, used = [], [], name_w
    for k in keys:
        col = max(len(k), 6) + 2
        if block and used + col > width:
            blocks.append(block)
            block, used = [], name_w
        block.append(k)
        used += col
    if block:
        blocks.append(block)
    lines = []
    for b in blocks:
        widths = [max(len(k), 6) for k in b]
        lines.append(" " * name_w + "".join(f"  {k:>{w}}" for k, w in zip(b, widths)))
        for i, (name, values) in enumerate(rows):
            if i == len(rows) - 1 and len(rows) > 1:
                lines.append("-" * (name_w + sum(w + 2 for w in widths)))
            lines.append(f"{name:<{name_w}}" + "".join(f"  {fmt(values[k]):>{w}}" for k, w in zip(b, widths)))
        lines.append("")
    if report["thresholds"]:
        lines.append("best thresholds: " + ", ".join(f"{k} {v:g}" for k, v in report["thresholds"].items()))
    return "\n".join(lines).rstrip("\n") + "\n"
