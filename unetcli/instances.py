"""Instance labels from class probabilities, and the tuning of their parameters (numpy/scipy only).

Two decodings, chosen by the model's classes:

- **two classes** (background, object), the paper's set-up: objects are the 4-connected components of
  ``p_object > threshold``; the separation borders carved into the training targets leave touching
  objects apart; each object can then be grown back by the carved rim (``grow`` pixels, into pixels that
  no other object reaches at the same step), so labels cover the objects' full extent.
- **three classes** (background, interior, border between and around objects): seeds are the
  4-connected components of ``p_interior > seed`` (at least ``min_seed`` pixels); the foreground is
  ``1 - p_background > threshold``; every foreground pixel joins the seed it reaches by the path whose
  largest step in ``1 - p_interior`` is smallest (the image foresting transform of
  ``scipy.ndimage.watershed_ift``, whose steps cost the difference of neighbours) without leaving the
  foreground, so the border class given back to the objects restores their full extent. A foreground
  component without a seed becomes one object.

Both then drop objects under ``min_size`` pixels. :func:`tune` searches these parameters on
validation images for the best mean object F1 (IoU 0.5) or DSB AP.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields, replace
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from unetcli.errors import ConfigError

_FOUR = ndimage.generate_binary_structure(2, 1)
_EIGHT = ndimage.generate_binary_structure(2, 2)
TARGETS = ("two-class", "three-class")


@dataclass(frozen=True)
class DecodeParams:
    """Parameters of the decoding; a model file stores the tuned ones (``postprocess``)."""

    threshold: float = 0.5    # foreground: p_object (two classes) or 1 - p_background (three) above this
    seed: float = 0.5         # three classes: interior probability of a seed
    min_seed: int = 2         # three classes: smallest seed, pixels
    min_size: int = 0         # smallest object kept, pixels
    grow: int = 0             # two classes: pixels each object grows back (the carved rim)

    def __post_init__(self) -> None:
        for name in ("threshold", "seed"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 < float(v) < 1.0:
                raise ConfigError(f"{name} must be a probability strictly between 0 and 1, not {v!r}")
        for name in ("min_seed", "min_size", "grow"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= int(v) <= 1_000_000:
                raise ConfigError(f"{name} must be a whole number from 0 to 1000000, not {v!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "DecodeParams":
        """From a model file's ``postprocess`` record (unknown keys are ignored: newer files)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


def border_target(instances: np.ndarray, width: int = 1) -> np.ndarray:
    """Three-class target of an instance image: 0 background, 1 interior, 2 border.

    A pixel of an object is border when a pixel within chessboard distance ``width`` belongs to another
    object or to the background; the remaining object pixels are interior."""
    inst = np.asarray(instances)
    size = 2 * int(width) + 1
    same = (ndimage.maximum_filter(inst, size=size, mode="nearest") == inst) & \
        (ndimage.minimum_filter(inst, size=size, mode="nearest") == inst)
    out = np.zeros(inst.shape, np.uint8)
    obj = inst != 0
    out[obj] = 2
    out[obj & same] = 1
    return out


def _relabel_sizes(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Ids 1..K in order of first appearance after dropping objects under ``min_size`` pixels."""
    sizes = np.bincount(labels.ravel())
    keep = sizes >= max(1, min_size)
    keep[0] = False
    lut = np.zeros(sizes.size, np.int64)
    lut[keep] = np.arange(1, int(keep.sum()) + 1)
    out = lut[labels]
    return out.astype(np.uint16) if out.max(initial=0) <= np.iinfo(np.uint16).max else out.astype(np.uint32)


def decode_two(prob: np.ndarray, params: DecodeParams) -> np.ndarray:
    """(2, H, W) probabilities -> instance labels (uint16/uint32), 4-connected objects grown back."""
    fg = prob[1] > params.threshold
    lab, n = ndimage.label(fg, structure=_FOUR)
    if n and params.grow > 0:
        for _ in range(int(params.grow)):
            grown = ndimage.grey_dilation(lab, footprint=_FOUR)
            # a pixel joins only when exactly one object reaches it
            other = ndimage.grey_erosion(np.where(lab > 0, lab, np.iinfo(lab.dtype).max), footprint=_FOUR)
            rival = (grown != other) & (other != np.iinfo(lab.dtype).max)
            take = (lab == 0) & (grown > 0) & ~rival
            if not take.any():
                break
            lab = np.where(take, grown, lab)
    return _relabel_sizes(lab, params.min_size)


def decode_three(prob: np.ndarray, params: DecodeParams) -> np.ndarray:
    """(3, H, W) probabilities (background, interior, border) -> instance labels (seeded watershed)."""
    fg = (1.0 - prob[0]) > params.threshold
    seeds, n = ndimage.label((prob[1] > params.seed) & fg, structure=_FOUR)
    if n:
        sizes = np.bincount(seeds.ravel())
        small = sizes < max(1, params.min_seed)
        small[0] = False
        seeds[small[seeds]] = 0
    comps, m = ndimage.label(fg, structure=_EIGHT)
    if m:   # a foreground component without any seed becomes one object of its own
        seeded = np.zeros(m + 1, bool)
        seeded[comps[seeds > 0]] = True
        lone = ~seeded[comps] & (comps > 0)
        if lone.any():
            extra, _ = ndimage.label(lone, structure=_EIGHT)
            seeds = np.where(lone, extra + seeds.max(initial=0), seeds)
    if seeds.max(initial=0) == 0:
        return np.zeros(prob.shape[1:], np.uint16)
    # SciPy's watershed_ift weighs a step between neighbours by the absolute difference of their costs
    # (a path costs its largest step), not by the cost of the pixel entered. Costs 0..32767 inside the
    # foreground and 65535 outside make any step into the background (>= 32768) dearer than every step
    # inside it, so each pixel is reached from a seed of its own foreground component first. (0..65534
    # and 65535 made the step out of an object's border into the background the cheapest of all: seeds
    # took other objects' borders across the background.)
    cost = np.where(fg, np.round((1.0 - prob[1]) * 32767.0), 65535).astype(np.uint16)
    markers = seeds.astype(np.int32)
    flooded = ndimage.watershed_ift(cost, markers, structure=_EIGHT)
    flooded[~fg] = 0
    flooded[flooded < 0] = 0
    return _relabel_sizes(flooded.astype(np.int64), params.min_size)


def decode(prob: np.ndarray, params: DecodeParams | None = None) -> np.ndarray:
    """Instance labels of one image's (K, H, W) class probabilities (K = 2 or 3)."""
    params = params or DecodeParams()
    if prob.ndim != 3 or prob.shape[0] not in (2, 3):
        raise ConfigError(f"instance decoding needs 2 or 3 class probabilities, got {prob.shape[0]} classes",
                          hint="instance labels need a model trained on instance or binary labels")
    return decode_three(prob, params) if prob.shape[0] == 3 else decode_two(prob, params)


# -------------------------------------------------------------------------------------------- tuning

GRID = {
    "threshold": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    "seed": (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    "min_size": (0, 5, 10, 15, 20, 30, 40, 60, 80, 120),
    "grow": (0, 1, 2),
}


def tune(probs: Sequence[np.ndarray], truths: Sequence[np.ndarray], *, metric: str = "f1",
         base: DecodeParams | None = None, grid: dict | None = None) -> tuple[DecodeParams, float]:
    """The decoding parameters with the best mean ``metric`` ('f1' at IoU 0.5, or 'ap') over the images.

    Searches threshold and seed together (the seed only for three classes), then the minimum size with
    the best pair; returns the parameters and their mean score."""
    from unetcli.metrics import object_scores

    if metric not in ("f1", "ap"):
        raise ConfigError(f"instance tuning maximises f1 or ap, not {metric!r}")
    if not probs:
        raise ConfigError("no validation images to tune the instance decoding on")
    grid = {**GRID, **(grid or {})}
    base = base or DecodeParams()
    three = probs[0].shape[0] == 3

    def score(p: DecodeParams) -> float:
        return float(np.mean([object_scores(decode(pr, p), t)[metric] for pr, t in zip(probs, truths)]))

    seeds: Iterable[float] = grid["seed"] if three else (base.seed,)
    def keep_best(candidates: Iterable[DecodeParams], best: DecodeParams, best_score: float):
        for cand in candidates:
            s = score(cand)
            if s > best_score:
                best, best_score = cand, s
        return best, best_score

    pairs = itertools.product(grid["threshold"], seeds)
    best, best_score = keep_best((replace(base, threshold=float(th), seed=float(sd), min_size=0)
                                  for th, sd in pairs), base, -1.0)
    if not three:
        best, best_score = keep_best([replace(best, grow=int(g)) for g in grid["grow"]], best, best_score)
    return keep_best([replace(best, min_size=int(ms)) for ms in grid["min_size"] if ms], best, best_score)


def fill_label_holes(labels: np.ndarray) -> np.ndarray:
    """Background enclosed by one object becomes that object (a copy); holes shared by several objects
    are filled from their neighbours, one pixel ring at a time."""
    out = labels.copy()
    holes = ndimage.binary_fill_holes(out > 0, structure=_FOUR) & (out == 0)
    while holes.any():
        grown = ndimage.grey_dilation(out, footprint=_FOUR)
        take = holes & (grown > 0)
        if not take.any():
            break
        out[take] = grown[take]
        holes &= ~take
    return out


def largest_object(labels: np.ndarray) -> np.ndarray:
    """Only the largest object stays, with id 1 (a copy)."""
    sizes = np.bincount(labels.ravel())
    if sizes.size <= 1:
        return labels.copy()
    sizes[0] = 0
    return (labels == int(np.argmax(sizes))).astype(labels.dtype)


def decode_image(prob: np.ndarray, params: DecodeParams | None = None, *, fill: bool = False,
                 largest: bool = False) -> np.ndarray:
    """:func:`decode`, then optionally holes filled and only the largest object kept (``unet predict``).

    Two classes: the holes of the foreground are filled before the objects are labelled (objects that
    enclose a hole together become one); three classes: the holes of each decoded object."""
    params = params or DecodeParams()
    if fill and prob.shape[0] == 2:
        filled = ndimage.binary_fill_holes(prob[1] > params.threshold, structure=_FOUR)
        prob = np.stack([prob[0], np.where(filled, 1.0, prob[1]).astype(prob.dtype)])
        fill = False
    labels = decode(prob, params)
    if fill:
        labels = fill_label_holes(labels)
    if largest:
        labels = largest_object(labels)
    return labels
