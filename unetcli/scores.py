"""Pixel and object scores of a segmentation, and the conventions they share, as pure functions.

Pixel scores compare class maps (IoU, Dice, accuracy, pixel error); object scores compare instance
label images (precision, recall and F1 at IoU > 0.5, the DSB 2018 AP, the Cell Tracking Challenge
SEG). Here too: the metric keys and their groups, the default threshold sweep and its parsing,
connected components and compact relabelling. The conventions are written in :mod:`unetcli.metrics`.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from unetcli.errors import ConfigError, LabelError

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.1 * i, 10) for i in range(11))
DSB_IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 10) for i in range(10))

PIXEL_KEYS = ("iou", "dice", "accuracy", "pixel_error")
ISBI_KEYS = ("vrand", "vrand_split", "vrand_merge", "vinfo", "vinfo_split", "vinfo_merge",
             "rand_error", "isbi_pixel_error")
WARPING_KEYS = ("warping_error", "warping_splits_mergers")
OBJECT_KEYS = ("precision", "recall", "f1", "ap", "seg")
GROUPS: dict[str, tuple[str, ...]] = {"pixel": PIXEL_KEYS, "isbi": ISBI_KEYS, "warping": WARPING_KEYS,
                                      "objects": OBJECT_KEYS}
_FOUR = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
_EIGHT = np.ones((3, 3), bool)


# ------------------------------------------------------------------------------------ thresholds

def parse_thresholds(text: str) -> tuple[float, ...]:
    """Thresholds from ``start:stop:step`` (stop included), a comma list, or one number, all in [0, 1]."""
    spec = str(text).strip()
    try:
        if ":" in spec:
            parts = [float(p) for p in spec.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if step <= 0 or stop < start:
                raise ConfigError(f"--thresholds {spec}: needs start <= stop and a positive step",
                                  hint="e.g. --thresholds 0:1:0.1")
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            if count > 1001:
                raise ConfigError(f"--thresholds {spec}: {count} thresholds; at most 1001",
                                  hint="use a larger step")
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--thresholds {spec!r}: not start:stop:step or a comma-separated list of numbers",
                          hint="e.g. --thresholds 0:1:0.1 or --thresholds 0.3,0.5") from None
    if not values:
        raise ConfigError("--thresholds: no threshold given", hint="e.g. --thresholds 0:1:0.1")
    bad = [v for v in values if not (0.0 <= v <= 1.0) or not math.isfinite(v)]
    if bad:
        raise ConfigError(f"--thresholds: {bad[0]:g} is outside [0, 1]; thresholds apply to probabilities")
    return tuple(sorted(set(values)))

# ------------------------------------------------------------------------------------ segments

def label_components(mask: np.ndarray, connectivity: int = 4) -> np.ndarray:
    """Connected components of the True pixels, numbered 1..n (0 = background); int32."""
    from scipy import ndimage

    labels, _ = ndimage.label(np.asarray(mask, bool), structure=_FOUR if connectivity == 4 else _EIGHT)
    return labels


def compact_labels(labels: np.ndarray) -> np.ndarray:
    """The ids of a label image renumbered 1..n in increasing order (0 stays 0); int64."""
    labels = np.asarray(labels)
    values, inverse = np.unique(labels, return_inverse=True)
    ids = np.arange(len(values), dtype=np.int64) + (0 if values[0] == 0 else 1)
    return ids[inverse.reshape(labels.shape)]


# ------------------------------------------------------------------------------------ pixel scores

def pixel_scores(pred: np.ndarray, truth: np.ndarray, num_classes: int,
                 class_names: Sequence[str] | None = None) -> dict:
    """IoU (Jaccard) and Dice per class, their means, pixel accuracy and pixel error of a class map.

    ``pred`` and ``truth`` are (H, W) class indices in ``0..num_classes-1``. Keys: ``iou_<c>`` and
    ``dice_<c>`` for each class (``<c>`` is ``class_names[c]``, by default the index), ``iou`` and
    ``dice`` = the means over the classes present in the truth or the prediction (background
    included; a class absent from both is NaN and left out), ``accuracy``, ``pixel_error`` = 1 -
    accuracy. All values are floats.
    """
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    k = int(num_classes)
    if pred.shape != truth.shape:
        raise LabelError(f"prediction {pred.shape} and truth {truth.shape} differ in size")
    if k < 1:
        raise ConfigError(f"num_classes must be at least 1, not {k}")
    names = [str(c) for c in range(k)] if class_names is None else [str(c) for c in class_names]
    if len(names) != k:
        raise ConfigError(f"{len(names)} class names for {k} classes")
    for what, arr in (("prediction", pred), ("truth", truth)):
        if arr.size and (arr.min() < 0 or arr.max() >= k):
            raise LabelError(f"{what} holds class {int(arr.max() if arr.max() >= k else arr.min())}, "
                             f"outside 0..{k - 1}")
    conf = np.bincount(truth.ravel().astype(np.int64) * k + pred.ravel().astype(np.int64),
                       minlength=k * k).reshape(k, k).astype(np.float64)
    tp = np.diag(conf)
    fp = conf.sum(axis=0) - tp
    fn = conf.sum(axis=1) - tp
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        dice = np.where(union > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    total = conf.sum()
    acc = float(tp.sum() / total) if total else float("nan")
    out = {"iou": nanmean(iou), "dice": nanmean(dice), "accuracy": acc, "pixel_error": 1.0 - acc}
    for c, name in enumerate(names):
        out[f"iou_{name}"] = float(iou[c])
    for c, name in enumerate(names):
        out[f"dice_{name}"] = float(dice[c])
    return out


def nanmean(values: Iterable[float]) -> float:
    arr = np.asarray(list(values), np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")

def check_probabilities(values: np.ndarray, name: str) -> None:
    if values.size and (np.nanmin(values) < -1e-6 or np.nanmax(values) > 1 + 1e-6):
        raise LabelError(f"{name}: values from {float(np.nanmin(values)):g} to {float(np.nanmax(values)):g}; "
                         "probabilities lie in [0, 1]",
                         hint="give a probability map in [0, 1], or a label/mask image of integers")


# ------------------------------------------------------------------------------------ objects

def object_scores(pred_instances: np.ndarray, truth_instances: np.ndarray) -> dict:
    """Object-level scores of an instance segmentation (0 = background, other ids = objects).

    ``precision``, ``recall``, ``f1`` of the objects matched at IoU > 0.5 (a match is unique at that
    level); ``ap`` = mean over IoU thresholds 0.5, 0.55, ..., 0.95 of TP / (TP + FP + FN) (2018 Data
    Science Bowl); ``seg`` = mean over truth objects of |R n S| / |R u S| for the predicted object S
    covering more than half of truth object R, else 0 (Cell Tracking Challenge; NaN without truth
    objects). With neither truth nor predicted objects every score but ``seg`` is 1; a zero denominator
    otherwise gives 0. Also ``tp``, ``fp``, ``fn`` (at IoU 0.5), ``n_truth`` and ``n_pred``.
    """
    p = compact_labels(np.asarray(pred_instances))
    t = compact_labels(np.asarray(truth_instances))
    if p.shape != t.shape:
        raise LabelError(f"prediction {p.shape} and truth {t.shape} differ in size")
    n_pred = int(p.max()) if p.size else 0
    n_true = int(t.max()) if t.size else 0
    area_p = np.bincount(p.ravel(), minlength=n_pred + 1)
    area_t = np.bincount(t.ravel(), minlength=n_true + 1)
    both = (p > 0) & (t > 0)
    if np.any(both):
        key = t[both] * (n_pred + 1) + p[both]
        idx, inter = np.unique(key, return_counts=True)
        ti, pj = idx // (n_pred + 1), idx % (n_pred + 1)
        iou = inter / (area_t[ti] + area_p[pj] - inter)
    else:
        ti = pj = inter = np.zeros(0, np.int64)
        iou = np.zeros(0)
    empty = n_true == 0 and n_pred == 0

    def ratio(num: float, den: float) -> float:
        return num / den if den else (1.0 if empty else 0.0)

    tp = int(np.count_nonzero(iou > 0.5))
    fp, fn = n_pred - tp, n_true - tp
    ap = [ratio(k := int(np.count_nonzero(iou > th)), k + (n_pred - k) + (n_true - k))
          for th in DSB_IOU_THRESHOLDS]
    covers = inter > 0.5 * area_t[ti]
    seg = float(iou[covers].sum() / n_true) if n_true else float("nan")
    return {"precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "ap": float(np.mean(ap)), "seg": seg, "tp": tp, "fp": fp, "fn": fn,
            "n_truth": n_true, "n_pred": n_pred}
