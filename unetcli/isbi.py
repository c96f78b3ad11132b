"""The ISBI 2012 challenge's scores and the warping error, swept over thresholds.

Foreground-restricted Rand and information-theoretic scores of a proposal segmentation against the
truth's segments (Arganda-Carreras et al. 2015), before and after thinning the proposal's borders to
one-pixel lines; the pixel F-score of cell interiors; the warping error (Jain et al. 2010, via
:mod:`unetcli.warping`). Probability maps are swept over thresholds and each score reported at its
best one. The conventions (object or membrane maps, segments) are written in :mod:`unetcli.metrics`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from unetcli.errors import LabelError
from unetcli.scores import (DEFAULT_THRESHOLDS, ISBI_KEYS, check_probabilities, compact_labels,
                            label_components, nanmean)

# For each swept key: the score whose best threshold it is reported at, and whether higher is better.
SELECTOR = {"vrand": ("vrand", True), "vrand_split": ("vrand", True), "vrand_merge": ("vrand", True),
             "vinfo": ("vinfo", True), "vinfo_split": ("vinfo", True), "vinfo_merge": ("vinfo", True),
             "rand_error": ("rand_error", False), "isbi_pixel_error": ("isbi_pixel_error", False),
             "warping_error": ("warping_error", False),
             "warping_splits_mergers": ("warping_splits_mergers", False)}


# ------------------------------------------------------------------------------------ segments

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
    m, truth = _membrane_map(membrane_prob_or_mask, truth_labels)
    seg = segments_of(truth)
    ts, sweep = isbi_sweep(m, seg, thresholds, membrane=True)
    out, best = _best_of(ts, {k: [v] for k, v in sweep.items()})
    cut = (m if m.dtype == bool else m >= 0.5)
    out["pixel_error"] = float(np.count_nonzero(cut == (seg > 0)) / cut.size) if cut.size else float("nan")
    out["thresholds"] = best
    return out


def _membrane_map(membrane_prob_or_mask: np.ndarray, truth_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The membrane map (a bool mask, or float probabilities checked to lie in [0, 1]; integer 0/1
    maps become masks, other integers are refused) and the truth, both 2-D of one size."""
    m = np.asarray(membrane_prob_or_mask)
    truth = np.asarray(truth_labels)
    if m.shape != truth.shape or m.ndim != 2:
        raise LabelError(f"membrane map {m.shape} and truth {truth.shape} must be 2-D of the same size")
    if m.dtype.kind in "ui" and m.size and m.max() <= 1 and m.min() >= 0:
        m = m.astype(bool)
    if m.dtype != bool:
        if m.dtype.kind != "f":
            raise LabelError(f"membrane map of type {m.dtype}: give probabilities in [0, 1] or a bool mask")
        check_probabilities(m, "membrane map")
    return m, truth


def _best_of(ts: list, per_image: dict[str, list[np.ndarray]]) -> tuple[dict, dict]:
    """Pick for each key the threshold whose mean over the images is best; values are those means."""
    out, best = {}, {}
    for key, arrays in per_image.items():
        sel_key, higher = SELECTOR[key]
        sel = np.array([np.asarray(a, np.float64) for a in per_image[sel_key]])  # (images, thresholds)
        with np.errstate(invalid="ignore"):
            mean = np.array([nanmean(sel[:, i]) for i in range(sel.shape[1])])
        if np.all(np.isnan(mean)):
            i = 0
        else:
            i = int(np.nanargmax(mean) if higher else np.nanargmin(mean))
        vals = np.array([np.asarray(a, np.float64)[i] for a in arrays])
        out[key] = nanmean(vals) if len(vals) > 1 else float(vals[0])
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
    m, truth = _membrane_map(membrane_prob_or_mask, truth_labels)
    ts, sweep = warping_sweep(m, truth != 0, thresholds, membrane=True)
    out, best = _best_of(ts, {k: [v] for k, v in sweep.items()})
    out["thresholds"] = best
    return out
