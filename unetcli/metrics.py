"""Evaluation metrics of the field, as pure functions on arrays.

Conventions
-----------
*Objects and membrane.* In a label image, 0 is background (for EM: membrane, the ISBI 2012 convention
where 255 = cell interior and 0 = membrane) and other values are objects. A probability map holds the
probability of object (1 = cell interior, 0 = membrane: the polarity of the labels, and how the
challenge's evaluation reads a submission, value > threshold = interior) unless it is declared a
membrane map (1 = membrane). :func:`isbi_scores` takes a *membrane* probability (1 = membrane), the
first class of a network's softmax. At threshold ``t`` a pixel is object when an object map's value is
above ``t``, or when a membrane map's value is below ``t``.

*Segments.* The ISBI metrics compare segmentations into 4-connected regions of object pixels. A truth
with several object ids uses its ids as segments; a binary truth is split into its 4-connected
components, as the challenge's scripts do.

Metric keys (stable; :data:`GROUPS` lists them by group)
-------------------------------------------------------
Pixel (class maps): ``iou`` and ``dice`` (means over the classes present in truth or prediction,
background included), ``iou_<class>``/``dice_<class>``, ``accuracy`` and ``pixel_error`` (1 - accuracy,
the fraction of wrongly classified pixels).

ISBI 2012 (Arganda-Carreras et al. 2015): ``vrand`` (foreground-restricted Rand F-score after border
thinning) with ``vrand_split`` (sum p_ij^2 / sum t_j^2, t = truth segment sizes) and ``vrand_merge``
(sum p_ij^2 / sum s_i^2, s = proposal segment sizes); ``vinfo`` (information-theoretic F-score after
thinning) with ``vinfo_split`` (I(S;T)/H(S)) and ``vinfo_merge`` (I(S;T)/H(T)); ``rand_error`` (1 - the
foreground-restricted Rand F-score without thinning, the leaderboard's older "Rand error") and
``isbi_pixel_error`` (1 - the F-score of cell-interior pixels, the leaderboard's "pixel error"). Only
pixels that are object in the truth count; proposal background (membrane) pixels there are each a
segment of their own (singletons). Each is the best over the threshold sweep.

Warping (Jain et al. 2010, see :mod:`unetcli.warping`): ``warping_error`` and
``warping_splits_mergers`` (the "minimum splits and mergers" variant), each the lowest over the sweep
without the threshold at which nothing is object (1 for object maps, 0 for membrane maps), where no
topological error could show.

Objects (instance segmentation): ``precision``, ``recall``, ``f1`` of objects matched at IoU > 0.5;
``ap``, the 2018 Data Science Bowl score (mean over IoU thresholds 0.5:0.05:0.95 of TP/(TP+FP+FN));
``seg``, the Cell Tracking Challenge SEG (mean over truth objects of the Jaccard index with the
predicted object covering more than half of it, 0 if none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

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
# For each swept key: the score whose best threshold it is reported at, and whether higher is better.
_SELECTOR = {"vrand": ("vrand", True), "vrand_split": ("vrand", True), "vrand_merge": ("vrand", True),
             "vinfo": ("vinfo", True), "vinfo_split": ("vinfo", True), "vinfo_merge": ("vinfo", True),
             "rand_error": ("rand_error", False), "isbi_pixel_error": ("isbi_pixel_error", False),
             "warping_error": ("warping_error", False),
             "warping_splits_mergers": ("warping_splits_mergers", False)}

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


def segments_of(labels: np.ndarray) -> np.ndarray:
    """The segments of a truth label image: its ids when it holds several, else 4-connected components."""
    labels = np.asarray(labels)
    nonzero = labels[labels != 0]
    if nonzero.size and nonzero.min() != nonzero.max():
        return compact_labels(labels)
    return label_components(labels != 0).astype(np.int64)


def thin_boundaries(segments: np.ndarray) -> np.ndarray:
    """Grow the segments over the background until one-pixel watershed lines separate them.

    A seeded watershed on the flat background of a binary proposal: background pixels are claimed in
    order of their (4-connected, geodesic) distance from the segments; a pixel whose already-claimed
    4-neighbours belong to different segments becomes a line pixel (0) and claims nothing further. Of
    two equidistant neighbouring pixels the one of even row + column parity is claimed first, so
    touching fronts always leave a line. Background not reachable from any segment stays 0.
    """
    segments = np.asarray(segments)
    h, w = segments.shape
    wp = w + 2
    lab = np.full((h + 2, w + 2), -1, np.int32)  # -1: outside; -2: a line pixel; 0: unclaimed
    lab[1:-1, 1:-1] = segments
    flat = lab.ravel()
    parity = (np.add.outer(np.arange(h + 2), np.arange(w + 2)) & 1).astype(np.int8).ravel()
    big = np.int32(np.iinfo(np.int32).max)
    seen = np.full(flat.size, -1, np.intp)   # for removing repeated pixels from a front
    claimed = lab > 0
    near = np.zeros_like(claimed)
    near[1:, :] |= claimed[:-1, :]
    near[:-1, :] |= claimed[1:, :]
    near[:, 1:] |= claimed[:, :-1]
    near[:, :-1] |= claimed[:, 1:]
    front = np.flatnonzero(near & (lab == 0))
    while front.size:
        par = parity[front]
        for p in (0, 1):
            f = front[par == p]
            if not f.size:
                continue
            n0, n1, n2, n3 = flat[f - wp], flat[f + wp], flat[f - 1], flat[f + 1]
            hi = np.maximum(np.maximum(n0, n1), np.maximum(n2, n3))
            lo = np.minimum(np.minimum(np.where(n0 > 0, n0, big), np.where(n1 > 0, n1, big)),
                            np.minimum(np.where(n2 > 0, n2, big), np.where(n3 > 0, n3, big)))
            flat[f] = np.where(lo == hi, hi, -2)
        grown = front[flat[front] > 0]
        nxt = np.concatenate((grown - wp, grown + wp, grown - 1, grown + 1))
        nxt = nxt[flat[nxt] == 0]
        seen[nxt] = np.arange(nxt.size)
        front = nxt[seen[nxt] == np.arange(nxt.size)]
    out = lab[1:-1, 1:-1].copy()
    out[out < 0] = 0
    return out


# ----------------------------------------------------------------------- Rand and information scores

class _TruthIndex:
    """The object pixels of a truth segmentation, prepared once for scoring many proposals."""

    def __init__(self, truth_seg: np.ndarray):
        t = np.asarray(truth_seg)
        self.shape = t.shape
        flat = t.ravel()
        self.where = np.flatnonzero(flat > 0)
        self.ids = flat[self.where].astype(np.int64)
        self.n = int(self.ids.size)
        self.nt = int(self.ids.max()) + 1 if self.n else 1
        self.sizes = np.bincount(self.ids, minlength=self.nt).astype(np.float64)

    def joint(self, prop_seg: np.ndarray):
        """(proposal ids, joint counts, truth ids) of the pixel pairs over the truth's object pixels."""
        s = np.asarray(prop_seg)
        if s.shape != self.shape:
            raise LabelError(f"truth {self.shape} and proposal {s.shape} differ in size")
        if self.n == 0:
            e = np.zeros(0, np.int64)
            return e, e, e
        sv = s.ravel()[self.where]
        ns = int(sv.max()) + 1
        if self.nt * ns <= 8_000_000:
            joint = np.bincount(self.ids * ns + sv, minlength=self.nt * ns)
            idx = np.flatnonzero(joint)
            counts = joint[idx]
        else:
            idx, counts = np.unique(self.ids * ns + sv, return_counts=True)
        return idx % ns, counts.astype(np.int64), idx // ns


def _as_index(truth_seg) -> _TruthIndex:
    return truth_seg if isinstance(truth_seg, _TruthIndex) else _TruthIndex(truth_seg)


def _terms(truth: _TruthIndex, prop_seg: np.ndarray) -> dict:
    """Rand pair counts and entropies of a proposal against a prepared truth (see the two below)."""
    sj, c, ti = truth.joint(prop_seg)
    n = truth.n
    nan = float("nan")
    if n == 0:
        return {"n": 0, "singletons": 0, "sum_joint2": nan, "sum_truth2": nan, "sum_prop2": nan,
                "h_truth": nan, "h_prop": nan, "h_joint": nan, "h_truth_given_prop": nan,
                "h_prop_given_truth": nan, "mutual": nan}
    single = sj == 0
    aux = int(c[single].sum())
    cc = c[~single].astype(np.float64)
    b = np.bincount(sj[~single], weights=cc)
    a = truth.sizes
    logn = math.log(n)

    def neg_plogp(counts: np.ndarray) -> float:
        p = counts[counts > 0] / n
        return float(-(p * np.log(p)).sum())

    h_t = neg_plogp(a)
    h_s = neg_plogp(b) + aux / n * logn
    h_ts = neg_plogp(cc) + aux / n * logn
    return {"n": n, "singletons": aux, "sum_joint2": float(cc @ cc) + aux, "sum_truth2": float(a @ a),
            "sum_prop2": float(b @ b) + aux, "h_truth": h_t, "h_prop": h_s, "h_joint": h_ts,
            "h_truth_given_prop": max(h_ts - h_s, 0.0), "h_prop_given_truth": max(h_ts - h_t, 0.0),
            "mutual": max(h_t + h_s - h_ts, 0.0)}


_RAND_KEYS = ("n", "singletons", "sum_joint2", "sum_truth2", "sum_prop2")
_INFO_KEYS = ("h_truth", "h_prop", "h_joint", "h_truth_given_prop", "h_prop_given_truth", "mutual")


def rand_terms(truth_seg: np.ndarray, prop_seg: np.ndarray) -> dict:
    """Pair counts of the foreground-restricted Rand index (proposal 0 = singletons).

    ``sum_joint2`` = sum over (truth i, proposal j) of n_ij^2, ``sum_truth2`` = sum of squared truth
    segment sizes, ``sum_prop2`` = sum of squared proposal segment sizes, each over the truth's object
    pixels only, where every proposal background pixel counts as a segment of size 1; ``n`` = pixels,
    ``singletons`` = proposal background pixels among them.
    """
    terms = _terms(_as_index(truth_seg), prop_seg)
    return {k: terms[k] for k in _RAND_KEYS}


def information_terms(truth_seg: np.ndarray, prop_seg: np.ndarray) -> dict:
    """Entropies (natural log) of the truth T and proposal S over the truth's object pixels.

    Proposal background pixels are singletons. Keys: ``h_truth`` H(T), ``h_prop`` H(S), ``h_joint``
    H(T,S), ``h_truth_given_prop`` H(T|S), ``h_prop_given_truth`` H(S|T), ``mutual`` I(S;T).
    """
    terms = _terms(_as_index(truth_seg), prop_seg)
    return {k: terms[k] for k in _INFO_KEYS}


def _f(a: float, b: float) -> float:
    return 2.0 * a * b / (a + b) if a + b > 0 else 0.0


def segmentation_scores(truth_seg: np.ndarray, prop_seg: np.ndarray) -> dict:
    """Foreground-restricted Rand and information scores of a proposal segmentation (no thinning).

    ``vrand_split`` = sum n_ij^2 / sum t_i^2 (truth sizes), ``vrand_merge`` = sum n_ij^2 / sum s_j^2
    (proposal sizes), ``vrand`` their harmonic mean; ``vinfo_split`` = I/H(S), ``vinfo_merge`` = I/H(T),
    ``vinfo`` their harmonic mean. A ratio 0/0 (a single segment: nothing to split or merge) is 1. All
    NaN when the truth has no object pixel. ``truth_seg`` may be given prepared (internal use).
    """
    r = _terms(_as_index(truth_seg), prop_seg)
    if r["n"] == 0:
        return dict.fromkeys(("vrand", "vrand_split", "vrand_merge", "vinfo", "vinfo_split",
                              "vinfo_merge"), float("nan"))
    split = r["sum_joint2"] / r["sum_truth2"]
    merge = r["sum_joint2"] / r["sum_prop2"]
    i_split = min(r["mutual"] / r["h_prop"], 1.0) if r["h_prop"] > 1e-12 else 1.0
    i_merge = min(r["mutual"] / r["h_truth"], 1.0) if r["h_truth"] > 1e-12 else 1.0
    return {"vrand": _f(split, merge), "vrand_split": split, "vrand_merge": merge,
            "vinfo": _f(i_split, i_merge), "vinfo_split": i_split, "vinfo_merge": i_merge}


def pixel_fscore(objects: np.ndarray, truth_objects: np.ndarray) -> float:
    """F-score of the object (cell interior) pixels: 2TP / (2TP + FP + FN); 1 when neither has any."""
    o = np.asarray(objects, bool)
    t = np.asarray(truth_objects, bool)
    tp = np.count_nonzero(o & t)
    wrong = np.count_nonzero(o ^ t)
    return 2.0 * tp / (2.0 * tp + wrong) if (tp or wrong) else 1.0


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
    out = {"iou": _nanmean(iou), "dice": _nanmean(dice), "accuracy": acc, "pixel_error": 1.0 - acc}
    for c, name in enumerate(names):
        out[f"iou_{name}"] = float(iou[c])
    for c, name in enumerate(names):
        out[f"dice_{name}"] = float(dice[c])
    return out


def _nanmean(values: Iterable[float]) -> float:
    arr = np.asarray(list(values), np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


# ------------------------------------------------------------------------------------ ISBI 2012

def _object_maps(values: np.ndarray, thresholds: Sequence[float] | None, membrane: bool):
    """Yield (threshold or None, object mask) for a probability map, or once for a mask."""
    values = np.asarray(values)
    if values.dtype == bool:
        yield None, (~values if membrane else values)
        return
    for t in thresholds:
        yield t, (values < t if membrane else values > t)


def isbi_sweep(values: np.ndarray, truth_seg: np.ndarray, thresholds: Sequence[float] | None = None,
               *, membrane: bool = False) -> tuple[list, dict[str, np.ndarray]]:
    """The ISBI scores at every threshold: (thresholds, {key: array over thresholds}).

    ``values`` is a float probability map (object probability, or membrane probability with
    ``membrane=True``) or a bool mask (one "threshold", None). ``truth_seg`` holds the truth segments
    (0 = membrane/background, excluded from scoring).
    """
    truth_seg = np.asarray(truth_seg)
    truth_obj = truth_seg > 0
    index = _TruthIndex(truth_seg)
    ts, rows = [], []
    for t, obj in _object_maps(values, thresholds if thresholds is not None else DEFAULT_THRESHOLDS,
                               membrane):
        segs = label_components(obj)
        raw = segmentation_scores(index, segs)
        row = segmentation_scores(index, thin_boundaries(segs))
        row["rand_error"] = 1.0 - raw["vrand"]
        row["isbi_pixel_error"] = 1.0 - pixel_fscore(obj, truth_obj)
        ts.append(t)
        rows.append(row)
    return ts, {key: np.array([r[key] for r in rows], np.float64) for key in ISBI_KEYS}


def isbi_scores(membrane_prob_or_mask: np.ndarray, truth_labels: np.ndarray,
                thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict:
    """The ISBI 2012 challenge scores of one 2-D membrane map against its truth labels.

    ``membrane_prob_or_mask``: (H, W) float membrane probability in [0, 1] (1 = membrane, e.g. the
    first softmax class of an EM membrane model), or bool mask (True = membrane). At threshold ``t`` a
    pixel is cell interior when its membrane probability is below ``t``. ``truth_labels``: (H, W) labels
    with 0 = membrane/background (the ISBI 0/255 labels, a 0/1 class map, or instance ids).

    Returns a flat dict of floats: ``vrand``, ``vrand_split``, ``vrand_merge``, ``vinfo``,
    ``vinfo_split``, ``vinfo_merge`` (after border thinning), ``rand_error`` (no thinning),
    ``isbi_pixel_error`` (1 - best F-score of interior pixels), each the best over ``thresholds`` (the
    split and merge parts at their F-score's threshold), and ``pixel_error`` (fraction of wrongly
    classified pixels at the 0.5 cut, the same value as :func:`pixel_scores`); plus ``thresholds``, a
    dict of the best threshold per key (None for a mask). NaN when the truth has no object pixel.
    About 0.14 s for a 512x512 slice and the 11 default thresholds (see benchmarks/README.md).
    """
    m = np.asarray(membrane_prob_or_mask)
    truth = np.asarray(truth_labels)
    if m.shape != truth.shape or m.ndim != 2:
        raise LabelError(f"membrane map {m.shape} and truth {truth.shape} must be 2-D of the same size")
    if m.dtype.kind in "ui" and m.size and m.max() <= 1 and m.min() >= 0:
        m = m.astype(bool)
    if m.dtype != bool:
        if m.dtype.kind != "f":
            raise LabelError(f"membrane map of type {m.dtype}: give probabilities in [0, 1] or a bool mask")
        _check_probabilities(m, "membrane map")
    seg = segments_of(truth)
    ts, sweep = isbi_sweep(m, seg, thresholds, membrane=True)
    out, best = _best_of(ts, {k: [v] for k, v in sweep.items()})
    cut = (m if m.dtype == bool else m >= 0.5)
    out["pixel_error"] = float(np.count_nonzero(cut == (seg > 0)) / cut.size) if cut.size else float("nan")
    out["thresholds"] = best
    return out


def _check_probabilities(values: np.ndarray, name: str) -> None:
    if values.size and (np.nanmin(values) < -1e-6 or np.nanmax(values) > 1 + 1e-6):
        raise LabelError(f"{name}: values from {float(np.nanmin(values)):g} to {float(np.nanmax(values)):g}; "
                         "probabilities lie in [0, 1]",
                         hint="give a probability map in [0, 1], or a label/mask image of integers")


def _best_of(ts: list, per_image: dict[str, list[np.ndarray]]) -> tuple[dict, dict]:
    """Pick for each key the threshold whose mean over the images is best; values are those means."""
    out, best = {}, {}
    for key, arrays in per_image.items():
        sel_key, higher = _SELECTOR[key]
        sel = np.array([np.asarray(a, np.float64) for a in per_image[sel_key]])  # (images, thresholds)
        with np.errstate(invalid="ignore"):
            mean = np.array([_nanmean(sel[:, i]) for i in range(sel.shape[1])])
        if np.all(np.isnan(mean)):
            i = 0
        else:
            i = int(np.nanargmax(mean) if higher else np.nanargmin(mean))
        vals = np.array([np.asarray(a, np.float64)[i] for a in arrays])
        out[key] = _nanmean(vals) if len(vals) > 1 else float(vals[0])
        best[key] = ts[i] if ts and ts[i] is not None else None
    return out, best


# ------------------------------------------------------------------------------------ warping

def warping_sweep(values: np.ndarray, truth_objects: np.ndarray,
                  thresholds: Sequence[float] | None = None, *,
                  membrane: bool = False) -> tuple[list, dict[str, np.ndarray]]:
    """Warping error and minimum splits-and-mergers error at each threshold (or once for a mask).

    The threshold at which nothing can be object is left out (1 for an object map, 0 for a membrane
    map), as the challenge's sweep stops at 0.9: there every object shrinks to a point and no split or
    merge can show.
    """
    from unetcli import warping

    truth_objects = np.asarray(truth_objects, bool)
    ts, we, sm = [], [], []
    given = thresholds if thresholds is not None else DEFAULT_THRESHOLDS
    use = [t for t in given if (t > 0.0 if membrane else t < 1.0)] or [0.5]
    for t, obj in _object_maps(values, use, membrane):
        r = warping.warp(truth_objects, obj)
        ts.append(t)
        we.append(r.warping_error)
        sm.append(r.splits_mergers_error)
    return ts, {"warping_error": np.array(we), "warping_splits_mergers": np.array(sm)}


def warping_scores(membrane_prob_or_mask: np.ndarray, truth_labels: np.ndarray,
                   thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict:
    """``warping_error`` and ``warping_splits_mergers`` of one membrane map, each the lowest over the
    thresholds above 0 (same map convention as :func:`isbi_scores`), with ``thresholds``."""
    m = np.asarray(membrane_prob_or_mask)
    truth = np.asarray(truth_labels)
    if m.shape != truth.shape or m.ndim != 2:
        raise LabelError(f"membrane map {m.shape} and truth {truth.shape} must be 2-D of the same size")
    if m.dtype.kind in "ui" and m.size and m.max() <= 1 and m.min() >= 0:
        m = m.astype(bool)
    if m.dtype != bool:
        _check_probabilities(m, "membrane map")
    ts, sweep = warping_sweep(m, truth != 0, thresholds, membrane=True)
    out, best = _best_of(ts, {k: [v] for k, v in sweep.items()})
    out["thresholds"] = best
    return out


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


# ------------------------------------------------------------------------------------ a whole set

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
    nclass = len(classes) if classes is not None else 2
    # the truth
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
        truth_seg = label_components(truth_obj).astype(np.int64)
    elif kind == "binary":
        truth_obj = np.isin(truth, list(foreground)) if foreground is not None else truth != 0
        truth_cls = truth_obj.astype(np.int64)
        truth_seg = label_components(truth_obj).astype(np.int64)
    else:
        truth_obj = truth != 0
        truth_cls = truth_obj.astype(np.int64)
        truth_seg = compact_labels(truth)
    # the prediction
    pred_map, membrane = None, False
    if pred.dtype.kind == "f":
        _check_probabilities(pred, f"{name}: prediction")
        if pred.shape[2] == 1:
            pred_map = pred[..., 0].astype(np.float64)
            membrane = probability == "membrane"
            pred_obj = pred_map < 0.5 if membrane else pred_map > 0.5
            pred_cls = pred_obj.astype(np.int64)
            if kind == "classes" and nclass != 2:
                raise LabelError(f"{name}: a one-page probability map for {nclass} classes",
                                 hint="give one probability page per class, or a class map")
        else:
            if kind == "classes" and pred.shape[2] != nclass:
                raise LabelError(f"{name}: {pred.shape[2]} class probability pages for {nclass} --classes")
            pred_map = 1.0 - pred[..., 0].astype(np.float64)   # object: not class 0 (background/membrane)
            membrane = False
            arg = np.argmax(pred, axis=2)
            pred_obj = arg != 0
            pred_cls = arg if kind == "classes" else pred_obj.astype(np.int64)
        pred_inst = label_components(pred_obj)
    else:
        if pred.dtype.kind not in "uib":
            raise LabelError(f"{name}: prediction of type {pred.dtype} is neither labels nor probabilities")
        if pred.shape[2] != 1:
            raise LabelError(f"{name}: an integer prediction with {pred.shape[2]} channels; labels need one")
        lab = pred[..., 0].astype(np.int64)
        if lab.size and lab.min() < 0:
            raise LabelError(f"{name}: prediction holds negative labels ({int(lab.min())})")
        pvals = np.unique(lab)
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
            same_values = foreground is not None and np.isin(pvals, truth_values).all()
            pred_obj = np.isin(lab, list(foreground)) if same_values else lab != 0
            pred_cls = pred_obj.astype(np.int64)
        nonzero = pvals[pvals != 0]
        if kind != "classes" and nonzero.size > 1 and not (foreground is not None and np.isin(pvals, truth_values).all()):
            pred_inst = compact_labels(np.where(pred_obj, lab, 0))
        else:
            pred_inst = label_components(pred_obj)
    return _Prepared(truth_obj=truth_obj, truth_seg=truth_seg, truth_cls=truth_cls, pred_cls=pred_cls,
                     pred_obj=pred_obj, pred_inst=pred_inst, pred_map=pred_map, membrane=membrane)


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
        sel_key, higher = _SELECTOR[key]
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
    mean = {k: _nanmean(img["metrics"][k] for img in images) for k in reported}
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
    means = np.array([_nanmean(table[:, i]) for i in range(table.shape[1])])
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
