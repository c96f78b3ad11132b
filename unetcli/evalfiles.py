"""Reading ``unet evaluate``'s inputs: prediction files paired with truth files, page by page.

A truth file serves one prediction; a truth folder pairs its files with the predictions by name
without extension. Every header is checked, and the memory of the whole set, before any image is
decoded. Labels are read as integer pages (:func:`unetcli.labels.integer_labels`), predictions as
labels, masks, probability maps or class probabilities (one page of K channels, or K pages per truth
page). The caller gives stdin's bytes through a callable; nothing here prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from unetcli.errors import ConfigError, ImageReadError, LabelError
from unetcli.evaluation import Pair
from unetcli.guards import check_memory, declared_shape
from unetcli.images import image_files, is_zarr, read_image
from unetcli.labels import integer_labels, label_planes


# Memory, measured with ru_maxrss on 2048x2048 pairs (binary, instance and probability maps, every
# metric): the pages read are held until the end (labels as int64 and predictions: 16 bytes per pixel
# of each image, rounded up) and one pair's metrics take 80 to 95 bytes per pixel at their peak.
_HELD_BYTES = 8
_METRIC_BYTES = 100


def read_pairs(predictions: Sequence[str], truth: str, stdin: Callable[[], bytes] | None = None) -> list[Pair]:
    """Pair the predictions with their truths and read both, page by page, as :class:`Pair`.

    ``predictions``: files, folders (the images in them) or ``-``, whose bytes ``stdin()`` gives
    (called once, after the pairing is checked). ``truth``: one file for one prediction, or a folder
    whose files pair with the predictions by name without extension. Every header is checked, and the
    memory of the whole set, before any image is decoded.
    """
    preds, matched = _match(predictions, truth)
    data = stdin() if "-" in preds and stdin is not None else None
    held, largest, dims = 0.0, 0.0, ""
    for pred_path, truth_file in matched:
        for shape in (declared_shape(data if pred_path == "-" else pred_path,
                                     "<stdin>" if pred_path == "-" else None), declared_shape(truth_file)):
            if shape is not None:
                pixels = float(shape[1]) * float(shape[2])
                held += _HELD_BYTES * shape[0] * pixels
                if pixels > largest:
                    largest, dims = pixels, f"{shape[1]}x{shape[2]}"
    name = "<stdin>" if preds == ["-"] else (str(preds[0]) if len(preds) == 1 else f"{len(preds)} predictions")
    check_memory(held + _METRIC_BYTES * largest, f"scoring (the largest image {dims} pixels)", name)
    return [pair for pred_path, truth_file in matched for pair in _read_pair(pred_path, truth_file, data)]


def _match(predictions: Sequence[str], truth: str) -> tuple[list, list[tuple]]:
    """(the prediction files, ``[(prediction, its truth file)]``), folders expanded; nothing read."""
    preds: list[Path | str] = []
    for arg in predictions:
        if arg == "-":
            preds.append("-")
            continue
        p = Path(arg)
        if p.is_dir() and not is_zarr(p):      # a folder of images (an OME-Zarr folder is one image)
            found = image_files(p)
            if not found:
                raise ImageReadError(f"{p}: folder holds no image files (TIFF, PNG, JPEG, BMP)")
            preds.extend(found)
        elif not p.exists():
            raise ImageReadError(f"{p}: no such file or folder", hint="check the path")
        else:
            preds.append(p)
    if preds.count("-") > 1:
        raise ConfigError("'-' (stdin) can be given once")
    truth_path = Path(truth)
    if not truth_path.exists():
        raise ImageReadError(f"--truth {truth}: no such file or folder", hint="check the path")
    if not truth_path.is_dir() or is_zarr(truth_path):
        if len(preds) != 1:
            raise ConfigError(f"{len(preds)} predictions but --truth {truth} is one file",
                              hint="give a folder of truth files named like the predictions")
        return preds, [(preds[0], truth_path)]
    by_stem: dict[str, Path] = {}
    for f in image_files(truth_path):
        if f.stem in by_stem:
            raise LabelError(f"{truth_path}: two truth files for {f.stem!r} ({by_stem[f.stem].name}, {f.name})",
                             hint="keep one label file per prediction name")
        by_stem[f.stem] = f
    matched = []
    for p in preds:
        if p == "-":
            raise ConfigError("a prediction read from stdin needs --truth to be one file, not a folder")
        if p.stem not in by_stem:
            raise LabelError(f"{p}: no truth file named {p.stem}.* in {truth_path}",
                             hint="truth files are paired with predictions by file name without extension")
        matched.append((p, by_stem[p.stem]))
    return preds, matched


def _read_pair(pred_path: Path | str, truth_file: Path, stdin: bytes | None) -> list[Pair]:
    """One prediction file and its truth as pairs of pages: labels or masks page by page, class
    probabilities as one page of K channels or K pages per truth page."""
    pname = "<stdin>" if pred_path == "-" else str(pred_path)
    tname = str(truth_file)
    truth_pages = integer_labels(label_planes(read_image(truth_file), tname), tname)
    pred = read_image(pred_path, stdin_bytes=stdin if pred_path == "-" else None)
    nt, npg = truth_pages.shape[0], pred.shape[0]
    h, w = truth_pages.shape[1:]
    if pred.shape[1:3] != (h, w):
        raise LabelError(f"{pname}: {pred.shape[2]}x{pred.shape[1]} pixels but its truth {tname} has {w}x{h}",
                         hint="predictions and truth must be the same size")
    floaty = pred.dtype.kind == "f"
    if floaty and pred.shape[3] >= 2:
        if npg != nt:
            raise LabelError(f"{pname}: {npg} page(s) of class probabilities but {tname} has {nt}")
        planes = [pred[i] for i in range(nt)]
    elif floaty and npg != nt and nt >= 1 and npg % nt == 0:
        k = npg // nt
        planes = [np.moveaxis(pred[i * k:(i + 1) * k, :, :, 0], 0, -1) for i in range(nt)]
    else:
        if npg != nt:
            raise LabelError(f"{pname}: {npg} page(s) but its truth {tname} has {nt}",
                             hint="give one prediction page per truth page")
        if not floaty:
            pred = label_planes(pred, pname)[..., None]
        planes = [pred[i] for i in range(nt)]
    base = "<stdin>" if pred_path == "-" else Path(pred_path).name
    return [Pair(name=base if nt == 1 else f"{base}[{i}]", pred=plane, truth=truth_pages[i])
            for i, plane in enumerate(planes)]
