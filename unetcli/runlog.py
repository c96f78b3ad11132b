"""A training run's records: ``metrics.jsonl`` (one JSON object per line), ``curves.png``, ``config.json``.

``metrics.jsonl`` holds a ``{"kind": "train", ...}`` row every ``--log-every`` steps (the mean loss of
the steps since the last row) and a ``{"kind": "val", ...}`` row per validation (``val_`` keys). A
resumed run keeps the rows up to the step of its state and drops the rest, so the file reads as if the
run had never stopped.

``curves.png`` draws them in three panels, each with its own labelled axes: the training loss (the
weighted loss the network minimises, log scale), the validation loss (unweighted cross-entropy, log
scale) and the validation metric that picks ``best.unet``.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
CURVES_SIZE = (800, 420)   # width, height in pixels


def read_metrics(path: Path, upto_step: int | None = None) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (none when it is missing), up to ``upto_step`` when given;
    lines that are not JSON (a row cut by a crash) are skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if upto_step is None or row.get("step", 0) <= upto_step:
                    rows.append(row)
    return rows


def write_json(path: Path, data: dict) -> None:
    """``data`` as indented JSON with sorted keys, written atomically."""
    from unetcli.atomic import write_bytes_atomic

    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode())


class RunLog:
    """The rows of a run's ``metrics.jsonl``: kept in memory, and appended to the file by the writer.

    Only the process that writes the run folder (rank 0) passes ``write=True``; the others keep the
    rows in memory alone.
    """

    def __init__(self, run_dir: Path, *, write: bool, resume_at: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.write = write
        self.rows = read_metrics(self.path, upto_step=resume_at) if resume_at is not None else []
        if write:                               # drop rows written after the state we continue from
            with open(self.path, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(row) + "\n" for row in self.rows)

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.write:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    def validated_at(self, step: int) -> bool:
        """True when one of the last rows is a validation at ``step``."""
        return any(r.get("kind") == "val" and r.get("step") == step for r in self.rows[-3:])

    def draw(self, metric: str) -> None:
        """Redraw ``curves.png`` beside the metrics; a failure to draw never costs the run."""
        with contextlib.suppress(Exception):
            draw_curves(self.path.parent / CURVES_FILE, self.rows, metric)


# ------------------------------------------------------------------------------------------ curves

_BLUE, _ORANGE, _RED, _GRID = (31, 119, 180), (255, 127, 14), (214, 39, 40), (225, 225, 225)


def draw_curves(path: Path, rows: Sequence[dict], metric: str) -> None:
    """A PNG of three panels against the step: training loss, validation loss, validation ``metric``."""
    from PIL import Image, ImageDraw

    from unetcli.images import write_image

    width, height = CURVES_SIZE
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train" and "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    score = [(r["step"], r[f"val_{metric}"]) for r in rows if f"val_{metric}" in r]
    steps = [s for s, _ in train + val + score] or [0, 1]
    span = (min(steps), max(max(steps), min(steps) + 1))     # one step axis for the three panels
    panels = (("training loss (weighted)", "loss", train, True, _BLUE),
              ("validation loss (cross-entropy)", "loss", val, True, _ORANGE),
              (f"validation {metric}", metric, score, False, _RED))
    third = width // len(panels)
    for i, (title, ylabel, points, log, colour) in enumerate(panels):
        _panel(draw, (i * third, 0, (i + 1) * third, height), span, points, title, ylabel, log, colour)
    write_image(path, np.asarray(img), "YXC")


def _panel(draw, box, span, points, title, ylabel, log, colour) -> None:
    """One panel in ``box`` (x0, y0, x1, y1): a title, a framed plot, y and step axes with labels."""
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 58, x1 - 12, y0 + 46, y1 - 44
    draw.text((x0 + 10, y0 + 8), title, fill=colour)
    draw.text((x0 + 10, y0 + 26), ylabel + (" (log scale)" if log else ""), fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) // 2 - 12, bottom + 24), "step", fill="black")
    for k in range(3):                                            # step ticks: start, middle, end
        step = span[0] + k * (span[1] - span[0]) / 2
        x = left + k * (right - left) / 2
        draw.line([x, bottom, x, bottom + 4], fill="black")
        draw.text((x - 3 * len(str(int(step))), bottom + 8), f"{int(step)}", fill="black")
    values = [v for _, v in points if math.isfinite(v) and (v > 0 or not log)]
    if not values:
        draw.text((left + 10, (top + bottom) // 2), "no values yet", fill="grey")
        return
    lo, hi = _value_range(values, log)
    for k in range(5):                                            # value ticks and grid lines
        y = top + k * (bottom - top) / 4
        level = hi - k * (hi - lo) / 4
        if 0 < k < 4:
            draw.line([left + 1, y, right - 1, y], fill=_GRID)
        draw.text((x0 + 4, y - 6), f"{10 ** level if log else level:.3g}", fill="black")

    def xy(step: float, value: float) -> tuple[float, float]:
        v = math.log10(max(value, 1e-12)) if log else value
        return (left + (step - span[0]) / (span[1] - span[0]) * (right - left),
                top + (hi - v) / (hi - lo) * (bottom - top))

    line = [xy(s, v) for s, v in points if math.isfinite(v)]
    if len(line) > 1:
        draw.line(line, fill=colour, width=2)
    if len(line) < 20:                                            # sparse points (validations) as dots
        for x, y in line:
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour)


def _value_range(values: list[float], log: bool) -> tuple[float, float]:
    """The panel's value axis: log10 of the values or the values, with a margin for flat curves."""
    vals = [math.log10(v) for v in values] if log else values
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-6:
        pad = 0.5 if log else max(abs(hi) * 0.01, 0.01)
        return lo - pad, hi + pad
    return lo, hi
