"""Scoring a whole set of prediction and truth pairs: the scores ``unet evaluate`` reports.

:func:`evaluate` decides what kind of truth the set holds (binary, instances, classes), reads each
prediction as labels, a mask, a probability map or class probabilities, computes the selected metric
groups, and chooses one threshold per swept metric for the whole set. Reading the pairs from files
is :mod:`unetcli.evalfiles`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from unetcli.errors import ConfigError, LabelError
from unetcli.isbi import SELECTOR, isbi_sweep, warping_sweep
from unetcli.scores import (DEFAULT_THRESHOLDS, GROUPS, OBJECT_KEYS, check_probabilities, compact_labels,
                            label_components, nanmean, object_scores, pixel_scores)


@dataclass
class Pair:
    """One prediction and its truth. ``pred`` is (H, W, K): K = 1 a label/mask image or a probability
    map; K >= 2 class probabilities (float). ``truth`` is (H, W) integer labels."""

    name: str
    pred: np.ndarray
    truth: np.ndarray


def metric_selection(text: str | None, kind: str) -> tuple[list[str], set[str]]:
    """(groups to compute, keys to report) for ``--metrics`` (keys, group names or ``all``).

    Without a selection: pixel, ISBI and object metrics for binary truths (warping is slower and only
    on request), pixel and object metrics for instance labels, pixel metrics for class maps.
    """
    if text is None or not str(text).strip():
        groups = {"binary": ["pixel", "isbi", "objects"], "instances": ["pixel", "objects"],
                  "classes": ["pixel"]}[kind]
        return groups, {"*"}
    groups, keys = [], set()
    for item in (s.strip() for s in str(text).split(",")):
        if not item:
            continue
        if item == "all":
            for g in GROUPS:
                if g not in groups:
                    groups.append(g)
            keys.add("*")
            continue
        group = item if item in GROUPS else next((g for g, ks in GROUPS.items() if item in ks), None)
        if group is None and (item.startswith("iou_") or item.startswith("dice_")):
            group = "pixel"
        if group is None:
            known = ", ".join(list(GROUPS) + [k for ks in GROUPS.values() for k in ks])
            raise ConfigError(f"--metrics: unknown metric {item!r}",
                              hint=f"choose from all, {known}, iou_<class>, dice_<class>")
        if group not in groups:
            groups.append(group)
        keys.add(f"group:{item}" if item in GROUPS else item)
    return groups, keys


def _wanted(key: str, group: str, keys: set[str]) -> bool:
    return "*" in keys or key in keys or f"group:{group}" in keys


def truth_kind(truths: Sequence[np.ndarray], *, foreground: Sequence[int] | None,
               classes: Sequence[int] | None) -> tuple[str, list[str], np.ndarray]:
    """('binary' | 'instances' | 'classes', class names, all truth values) of a set of truth images."""
    values = np.unique(np.concatenate([np.unique(t) for t in truths])) if truths else np.zeros(0, np.int64)
    if classes is not None:
        return "classes", [str(c) for c in classes], values
    if foreground is not None:
        fg = [v for v in values if v in set(foreground)]
        bg = [v for v in values if v not in set(foreground)]
        kind = "binary"
    else:
        fg = [v for v in values if v != 0]
        bg = [v for v in values if v == 0]
        kind = "binary" if len(fg) <= 1 else "instances"
    # one naming for two-class truth, whatever its label values (0/1, 0/255, instance ids): the class
    # columns are iou_background, iou_foreground, dice_background, dice_foreground
    return kind, ["background", "foreground"], values


@dataclass
class _Prepared:
    truth_obj: np.ndarray
    truth_seg: np.ndarray
    truth_cls: np.ndarray
    pred_cls: np.ndarray
    pred_obj: np.ndarray
    pred_inst: np.ndarray
    pred_map: np.ndarray | None   # float map for sweeps, None for masks
    membrane: bool


def _prepare(pair: Pair, kind: str, classes: Sequence[int] | None, foreground: Sequence[int] | None,
             truth_values: np.ndarray, probability: str) -> _Prepared:
    name = pair.name
    truth = np.asarray(pair.truth)
    pred = np.asarray(pair.pred)
    if pred.ndim == 2:
        pred = pred[..., None]
    if pred.shape[:2] != truth.shape:
        raise LabelError(f"{name}: prediction is {pred.shape[1]}x{pred.shape[0]} pixels but its truth is "
                         f"{truth.shape[1]}x{truth.shape[0]}", hint="predictions and truth must be the same size")
    truth_obj, truth_cls, truth_seg = _truth_maps(name, truth, kind, classes, foreground)
    pred_map, membrane = None, False
    if pred.dtype.kind == "f":
        pred_map, membrane, pred_obj, pred_cls = _probability_maps(name, pred, kind, classes, probability)
        pred_inst = label_components(pred_obj)
    else:
        pred_obj, pred_cls, pred_inst = _label_maps(name, pred, kind, classes, foreground, truth_values)
    return _Prepared(truth_obj=truth_obj, truth_seg=truth_seg, truth_cls=truth_cls, pred_cls=pred_cls,
                     pred_obj=pred_obj, pred_inst=pred_inst, pred_map=pred_map, membrane=membrane)


def _truth_maps(name: str, truth: np.ndarray, kind: str, classes: Sequence[int] | None,
                foreground: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(objects, class indices, segments) of a truth image of the set's kind."""
    if kind == "classes":
        lut = {int(v): i for i, v in enumerate(classes)}
        bad = [int(v) for v in np.unique(truth) if int(v) not in lut]
        if bad:
            raise LabelError(f"{name}: truth holds value {bad[0]}, not one of --classes "
                             f"{','.join(str(c) for c in classes)}")
        values = np.array(classes)
        order = np.argsort(values)
        truth_cls = order[np.searchsorted(values[order], truth)]
        truth_obj = truth_cls != 0
        return truth_obj, truth_cls, label_components(truth_obj).astype(np.int64)
    if kind == "binary":
        truth_obj = np.isin(truth, list(foreground)) if foreground is not None else truth != 0
        return truth_obj, truth_obj.astype(np.int64), label_components(truth_obj).astype(np.int64)
    truth_obj = truth != 0
    return truth_obj, truth_obj.astype(np.int64), compact_labels(truth)


def _probability_maps(name: str, pred: np.ndarray, kind: str, classes: Sequence[int] | None,
                      probability: str) -> tuple[np.ndarray, bool, np.ndarray, np.ndarray]:
    """(the map swept, whether it is a membrane map, objects, class indices) of a float prediction."""
    nclass = len(classes) if classes is not None else 2
    check_probabilities(pred, f"{name}: prediction")
    if pred.shape[2] == 1:
        pred_map = pred[..., 0].astype(np.float64)
        membrane = probability == "membrane"
        pred_obj = pred_map < 0.5 if membrane else pred_map > 0.5
        if kind == "classes" and nclass != 2:
            raise LabelError(f"{name}: a one-page probability map for {nclass} classes",
                             hint="give one probability page per class, or a class map")
        return pred_map, membrane, pred_obj, pred_obj.astype(np.int64)
    if kind == "classes" and pred.shape[2] != nclass:
        raise LabelError(f"{name}: {pred.shape[2]} class probability pages for {nclass} --classes")
    pred_map = 1.0 - pred[..., 0].astype(np.float64)   # object: not class 0 (background/membrane)
    arg = np.argmax(pred, axis=2)
    pred_obj = arg != 0
    return pred_map, False, pred_obj, (arg if kind == "classes" else pred_obj.astype(np.int64))


def _label_maps(name: str, pred: np.ndarray, kind: str, classes: Sequence[int] | None,
                foreground: Sequence[int] | None, truth_values: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(objects, class indices, instances) of an integer prediction: labels, a mask or a class map."""
    nclass = len(classes) if classes is not None else 2
    if pred.dtype.kind not in "uib":
        raise LabelError(f"{name}: prediction of type {pred.dtype} is neither labels nor probabilities")
    if pred.shape[2] != 1:
        raise LabelError(f"{name}: an integer prediction with {pred.shape[2]} channels; labels need one")
    lab = pred[..., 0].astype(np.int64)
    if lab.size and lab.min() < 0:
        raise LabelError(f"{name}: prediction holds negative labels ({int(lab.min())})")
    pvals = np.unique(lab)
    same_values = foreground is not None and np.isin(pvals, truth_values).all()
    if kind == "classes":
        cvals = np.array(classes)
        if np.isin(pvals, cvals).all():
            order = np.argsort(cvals)
            pred_cls = order[np.searchsorted(cvals[order], lab)]
        elif pvals.max() < nclass:
            pred_cls = lab
        else:
            raise LabelError(f"{name}: prediction holds value {int(pvals[~np.isin(pvals, cvals)][0])}, "
                             f"neither one of --classes nor a class index below {nclass}")
        pred_obj = pred_cls != 0
    else:
        pred_obj = np.isin(lab, list(foreground)) if same_values else lab != 0
        pred_cls = pred_obj.astype(np.int64)
    nonzero = pvals[pvals != 0]
    if kind != "classes" and nonzero.size > 1 and not same_values:
        return pred_obj, pred_cls, compact_labels(np.where(pred_obj, lab, 0))
    return pred_obj, pred_cls, label_components(pred_obj)


def evaluate(pairs: Sequence[Pair], *, metrics: str | None = None,
             thresholds: Sequence[float] = DEFAULT_THRESHOLDS, probability: str = "object",
             foreground: Sequence[int] | None = None, classes: Sequence[int] | None = None,
             progress: Callable[[str], None] | None = None) -> dict:
    """Score a set of predictions: ``{"images": [{"name", "metrics"}], "mean": {...}, "thresholds": {...}}``.

    Probability maps are swept over ``thresholds``; one threshold per swept metric is chosen for the
    whole set (the one with the best mean over the images, as the challenge picks one threshold for
    its whole test stack) and every image is reported at it. ``thresholds`` in the report says which,
    on the scale of the prediction files (see the module's conventions); it is empty when no
    prediction is a probability map. ``probability`` is ``object`` or ``membrane``: what a one-page
    float map holds. NaN scores (undefined, e.g. no truth objects) are left out of the mean.
    """
    if probability not in ("object", "membrane"):
        raise ConfigError(f"--probability {probability}: choose object or membrane")
    if not pairs:
        raise ConfigError("nothing to evaluate: no prediction was given")
    if probability == "membrane":
        many = next((p for p in pairs if np.asarray(p.pred).dtype.kind == "f" and np.asarray(p.pred).shape[-1] >= 2),
                    None)
        if many is not None:
            raise LabelError(f"{many.name}: --probability membrane describes a one-page probability map, but "
                              f"this prediction holds {np.asarray(many.pred).shape[-1]} class probabilities",
                              hint="leave --probability out: class probabilities say which class each is")
    truths = [np.asarray(p.truth) for p in pairs]
    kind, names, values = truth_kind(truths, foreground=foreground, classes=classes)
    groups, keys = metric_selection(metrics, kind)
    nclass = len(names)
    per_image: list[dict[str, float]] = []
    sweeps: dict[str, list[np.ndarray]] = {}
    swept_images: list[bool] = []
    sweep_ts: dict[str, list] = {}
    scales: set[bool] = set()
    for pair in pairs:
        prep = _prepare(pair, kind, classes, foreground, values, probability)
        row: dict[str, float] = {}
        if "pixel" in groups:
            row.update(pixel_scores(prep.pred_cls, prep.truth_cls, nclass, names))
        values_for_sweep = prep.pred_map if prep.pred_map is not None else prep.pred_obj
        membrane = prep.membrane if prep.pred_map is not None else False
        swept_images.append(prep.pred_map is not None)
        if prep.pred_map is not None:
            scales.add(membrane)
            if len(scales) > 1 and ({"isbi", "warping"} & set(groups)):
                raise LabelError(f"{pair.name}: a probability map read on another scale than the maps "
                                 "before it (one-page membrane maps and class probabilities)",
                                 hint="evaluate the two kinds of prediction separately")
        if "isbi" in groups:
            ts, sw = isbi_sweep(values_for_sweep, prep.truth_seg, thresholds, membrane=membrane)
            _collect(sweeps, sweep_ts, ts, sw, prep.pred_map is not None)
        if "warping" in groups:
            ts, sw = warping_sweep(values_for_sweep, prep.truth_obj, thresholds, membrane=membrane)
            _collect(sweeps, sweep_ts, ts, sw, prep.pred_map is not None)
        if "objects" in groups:
            obj = object_scores(prep.pred_inst, prep.truth_seg)
            row.update({k: obj[k] for k in OBJECT_KEYS})
        per_image.append(row)
        if progress is not None:
            progress(pair.name)
    best: dict[str, float | None] = {}
    for key, arrays in sweeps.items():
        ts = sweep_ts[key]
        sel_key, higher = SELECTOR[key]
        chosen = _choose_threshold(sweeps[sel_key], swept_images, higher)
        best[key] = ts[chosen] if any(swept_images) else None
        for row, arr in zip(per_image, arrays):
            row[key] = float(arr[chosen if len(arr) > 1 else 0])
    order = _key_order(groups, names)
    images = []
    for pair, row in zip(pairs, per_image):
        images.append({"name": pair.name, "metrics": {k: row[k] for k in order
                                                      if k in row and _wanted(k, _group_of(k), keys)}})
    reported = list(images[0]["metrics"]) if images else []
    mean = {k: nanmean(img["metrics"][k] for img in images) for k in reported}
    thresholds_out = {k: v for k, v in best.items() if k in reported and v is not None}
    return {"images": images, "mean": mean, "thresholds": thresholds_out}


def _collect(sweeps: dict, sweep_ts: dict, ts: list, sw: dict, swept: bool) -> None:
    """Append one image's sweep; remember the thresholds of the probability maps."""
    for key, arr in sw.items():
        sweeps.setdefault(key, []).append(arr)
        if swept or key not in sweep_ts:
            sweep_ts[key] = ts


def _choose_threshold(arrays: list[np.ndarray], swept: list[bool], higher: bool) -> int:
    """Index of the threshold with the best mean over the swept images (0 when nothing is swept)."""
    rows = [a for a, s in zip(arrays, swept) if s and len(a) > 1]
    if not rows:
        return 0
    table = np.array(rows, np.float64)
    means = np.array([nanmean(table[:, i]) for i in range(table.shape[1])])
    if np.all(np.isnan(means)):
        return 0
    return int(np.nanargmax(means) if higher else np.nanargmin(means))


def _group_of(key: str) -> str:
    for g, ks in GROUPS.items():
        if key in ks:
            return g
    return "pixel"


def _key_order(groups: Sequence[str], class_names: Sequence[str]) -> list[str]:
    order: list[str] = []
    for g in GROUPS:
        if g not in groups:
            continue
        order.extend(GROUPS[g])
        if g == "pixel":
            order.extend(f"iou_{c}" for c in class_names)
            order.extend(f"dice_{c}" for c in class_names)
    return order
