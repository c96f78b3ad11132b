"""The loss weight map of the U-Net paper, exact and fast.

For every pixel x of a training target,

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

with w_c the class-balance weight of x's class, and d1, d2 the Euclidean distances from x to the
nearest pixel of the nearest and of the second-nearest object (so a background pixel next to an object
has distance 1). The border term is added on background pixels only (where the instance map is 0),
which is where the paper's figure shows it: in the gaps between objects. Defaults: w0 = 10,
sigma = 5 pixels, as in the paper. With fewer than two objects the border term is 0 everywhere; a
multi-class map has no instance map and gets class weights only.

Class balance
-------------
The paper does not give w_c. Here, for K classes with pixel counts n_1..n_K over N = sum n_c pixels,

    w_c = N / (K' * n_c)        for every class with n_c > 0,  K' = the number of such classes,
    w_c = 1                     for a class with no pixels (no pixel carries it),

the inverse class frequency scaled so that the class weights summed over the pixels give N (the loss
keeps the scale of an unweighted one) and every present class carries the same total weight N / K'.
``--balance image`` counts each 2-D label image (each page of a stack) on its own, ``dataset`` counts
all inputs together, ``none`` sets every w_c to 1.

Exact and fast
--------------
The naive method computes one Euclidean distance transform per object over the whole image and sorts
them per pixel: time and memory both grow with objects x pixels. But the border term is below the
tolerance ``t = 1e-6`` (absolute) as soon as d1 + d2 > R = sigma * sqrt(2 ln(w0 / t)) (about 28.4 px
for the defaults), so an object farther than R from a pixel can never be one of the two that matter
there. :func:`two_nearest` therefore computes each object's distance transform only inside its bounding
box grown by ``ceil(R)`` pixels, and keeps the two smallest distances per pixel as it goes (two float64
images, so memory stays a small multiple of the image).

Why this equals the naive result within t on every pixel: inside its window, an object's distance
transform is exact (the whole object lies in the window, and the Euclidean distance to it is attained
by one of its pixels); outside, the true distance exceeds the margin. Let d1 <= d2 be the naive two
smallest distances at a background pixel. If d1 + d2 <= R, then both objects lie within R of the pixel,
so both windows cover it and both distances are computed exactly; every other computed distance is
exact too and at least d2, so the fast d1, d2 equal the naive ones bit for bit. If d1 + d2 > R, the
fast method sees a subset of the exact distances, so its two smallest are no smaller and its term is
below t as well; the two maps then differ by less than t = 1e-6. Since the same float64 arithmetic runs
on equal distances, the float32 maps agree exactly wherever the term is not negligible.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np

DEFAULT_W0 = 10.0
DEFAULT_SIGMA = 5.0
TOLERANCE = 1e-6
BALANCES = ("image", "dataset", "none")


def cutoff_distance(w0: float, sigma: float, tolerance: float = TOLERANCE) -> float:
    """R such that ``w0 * exp(-s^2 / (2 sigma^2)) < tolerance`` for every d1 + d2 = s > R (0 if w0 <= tolerance)."""
    if w0 <= tolerance or sigma <= 0:
        return 0.0
    return sigma * math.sqrt(2.0 * math.log(w0 / tolerance))


# The peak memory of weight_map beyond its inputs, measured with ru_maxrss on 2048x2048 maps (numpy
# 1.26/2.x, scipy 1.1x): about 30 bytes per image pixel (d1 and d2 in float64, the class weights
# gathered in float64, the float32 result, the target and instance maps) plus about 40 per pixel of
# the largest object window (its Euclidean distance transform: the mask, scipy's int32 feature
# transform of two planes on the way, the float64 distances). Rounded up here.
PEAK_BYTES_PER_PIXEL = 32
PEAK_BYTES_PER_WINDOW_PIXEL = 42


def peak_bytes(height: int, width: int, window_pixels: float = 0) -> float:
    """Memory :func:`weight_map` needs for one ``height`` x ``width`` map whose largest object window
    (see :func:`largest_window`) has ``window_pixels`` pixels; pass ``height * width`` when unknown."""
    return PEAK_BYTES_PER_PIXEL * float(height) * float(width) + PEAK_BYTES_PER_WINDOW_PIXEL * float(window_pixels)


def largest_window(instances: np.ndarray, w0: float = DEFAULT_W0, sigma: float = DEFAULT_SIGMA,
                   tolerance: float = TOLERANCE) -> int:
    """Pixels of the largest window :func:`two_nearest` computes a distance transform in: an object's
    bounding box grown by the cut-off distance, clipped to the image. 0 without objects."""
    from scipy import ndimage

    inst = np.asarray(instances)
    if inst.ndim != 2 or inst.size == 0 or not inst.any():
        return 0
    radius = cutoff_distance(w0, sigma, tolerance)
    if radius <= 0:
        return 0
    if inst.dtype.kind not in "ui" or int(inst.max()) > 4 * inst.size:
        from unetcli.labels import relabel

        inst = relabel(inst)
    h, w = inst.shape
    margin = min(int(math.ceil(radius)), h + w)
    largest = 0
    for box in ndimage.find_objects(inst):
        if box is not None:
            rows = min(box[0].stop + margin, h) - max(box[0].start - margin, 0)
            cols = min(box[1].stop + margin, w) - max(box[1].start - margin, 0)
            largest = max(largest, rows * cols)
    return largest


def two_nearest(instances: np.ndarray, max_distance: float,
                progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the distances d1 <= d2 to the nearest and second-nearest object of ``instances``.

    Exact (equal to one Euclidean distance transform per object over the whole image) wherever
    d1 + d2 <= ``max_distance``; elsewhere the values returned are >= the exact ones, possibly inf.
    Object pixels get d1 = 0 (the distance to their own object). ``progress(done, total)`` is called
    after each object. Returns two float64 (H, W) arrays.
    """
    from scipy import ndimage

    inst = np.asarray(instances)
    if inst.ndim != 2:
        raise ValueError(f"two_nearest needs a 2-D instance map, not shape {inst.shape}")
    h, w = inst.shape
    d1 = np.full((h, w), np.inf)
    d2 = np.full((h, w), np.inf)
    if inst.size == 0 or not inst.any():
        return d1, d2
    if inst.dtype.kind not in "ui" or int(inst.max()) > 4 * inst.size:
        from unetcli.labels import relabel

        inst = relabel(inst)
    margin = min(int(math.ceil(max_distance)), h + w)   # a wider margin adds nothing
    boxes = ndimage.find_objects(inst)
    total = len(boxes)
    for k, box in enumerate(boxes, start=1):
        if box is None:
            continue
        y0, y1 = max(box[0].start - margin, 0), min(box[0].stop + margin, h)
        x0, x1 = max(box[1].start - margin, 0), min(box[1].stop + margin, w)
        window = inst[y0:y1, x0:x1]
        dist = ndimage.distance_transform_edt(window != k)
        s1 = d1[y0:y1, x0:x1]  # views: updated in place
        s2 = d2[y0:y1, x0:x1]
        np.minimum(s2, np.maximum(s1, dist), out=s2)  # second smallest of {s1, s2, dist}
        np.minimum(s1, dist, out=s1)
        if progress is not None:
            progress(k, total)
    return d1, d2


def border_term(instances: np.ndarray, *, w0: float = DEFAULT_W0, sigma: float = DEFAULT_SIGMA,
                tolerance: float = TOLERANCE,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """``w0 * exp(-(d1 + d2)^2 / (2 sigma^2))`` on the background pixels of ``instances`` (0 on objects).

    Float64 (H, W); equal to the naive per-object computation within ``tolerance`` on every pixel.
    """
    inst = np.asarray(instances)
    radius = cutoff_distance(w0, sigma, tolerance)
    if radius <= 0 or inst.size == 0:
        return np.zeros(inst.shape, np.float64)
    d1, d2 = two_nearest(inst, radius, progress)
    term = np.add(d1, d2, out=d1)  # in place, as below: memory stays at two float64 images
    del d2
    # inf - inf and 0 / 0 cannot occur on background pixels; a tiny sigma gives -inf, so exp gives 0
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        np.square(term, out=term)
        np.negative(term, out=term)
        np.divide(term, 2.0 * sigma * sigma, out=term)
        np.exp(term, out=term)  # exp(-inf) = 0 where fewer than two objects are near
        np.multiply(term, w0, out=term)
    term[inst != 0] = 0.0
    return term


def class_counts(targets: Iterable[np.ndarray], num_classes: int) -> np.ndarray:
    """Pixel counts per class (int64, length ``num_classes``) summed over the given targets."""
    counts = np.zeros(num_classes, np.int64)
    for target in targets:
        counts += np.bincount(np.asarray(target).ravel(), minlength=num_classes)[:num_classes]
    return counts


def balance_weights(counts: np.ndarray) -> np.ndarray:
    """Class weights ``w_c = N / (K' * n_c)`` from pixel counts (see the module docstring); float64."""
    counts = np.asarray(counts, dtype=np.float64)
    weights = np.ones(counts.shape, np.float64)
    present = counts > 0
    if present.any():
        weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def class_weights_for(balance: str, target: np.ndarray, num_classes: int,
                      dataset_counts: np.ndarray | None = None) -> np.ndarray:
    """The class weights ``balance`` ('image', 'dataset' or 'none') gives one target.

    'dataset' needs ``dataset_counts`` (from :func:`class_counts` over all targets).
    """
    if balance == "none":
        return np.ones(num_classes, np.float64)
    if balance == "image":
        return balance_weights(class_counts([target], num_classes))
    if balance == "dataset":
        if dataset_counts is None:
            raise ValueError("balance 'dataset' needs the class counts of the whole data set")
        return balance_weights(dataset_counts)
    raise ValueError(f"unknown balance {balance!r}; expected one of {', '.join(BALANCES)}")


def weight_map(target: np.ndarray, instances: np.ndarray | None, *, w0: float = DEFAULT_W0,
               sigma: float = DEFAULT_SIGMA, class_weights: np.ndarray | None = None,
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """The weight map ``w_c(x) + w0 exp(-(d1 + d2)^2 / (2 sigma^2))`` of one target, float32 (H, W).

    ``target``: uint8 class indices (H, W). ``instances``: int32 instance map (0 = background) for the
    border term, or None for none (multi-class maps). ``class_weights``: one weight per class index,
    or None for w_c = 1 (no balancing; use :func:`balance_weights` for balancing). The border term is
    added where ``instances`` is 0 and equals the naive per-object result within 1e-6.
    """
    target = np.asarray(target)
    if target.ndim != 2:
        raise ValueError(f"weight_map needs a 2-D target, not shape {target.shape}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, not {sigma}")
    if w0 < 0:
        raise ValueError(f"w0 must be >= 0, not {w0}")
    if class_weights is None:
        cw = np.ones(max(int(target.max()) + 1 if target.size else 1, 1), np.float64)
    else:
        cw = np.asarray(class_weights, dtype=np.float64)
        if target.size and int(target.max()) >= cw.size:
            raise ValueError(f"target holds class {int(target.max())} but only {cw.size} class weights given")
    if instances is None:
        return cw[target].astype(np.float32)
    inst = np.asarray(instances)
    if inst.shape != target.shape:
        raise ValueError(f"instances {inst.shape} and target {target.shape} differ in shape")
    weights = border_term(inst, w0=w0, sigma=sigma, progress=progress)
    weights += cw[target]
    return weights.astype(np.float32)


# --------------------------------------------------------------------------------------------- preview

# A dark-to-bright ramp (black, indigo, crimson, orange, pale yellow): dark = low weight.
_RAMP = np.array([[0, 0, 0], [52, 18, 110], [178, 34, 78], [246, 133, 30], [253, 246, 170]], np.float64)


def colour_map(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``values`` mapped linearly from [low, high] onto the ramp; uint8 (..., 3)."""
    span = high - low if high > low else 1.0
    v = np.clip((np.asarray(values, np.float64) - low) / span, 0.0, 1.0) * (len(_RAMP) - 1)
    i = np.minimum(v.astype(np.int64), len(_RAMP) - 2)
    f = (v - i)[..., None]
    return np.round(_RAMP[i] * (1 - f) + _RAMP[i + 1] * f).astype(np.uint8)


def preview(weights: np.ndarray, target: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
    """A picture for a person: the labels (or ``image``) beside the colour-mapped weights over them.

    Left: the base, ``image`` scaled to grey if given (its first three channels averaged), else the
    target (objects light, background dark). Right: the weight map on the ramp of :func:`colour_map`
    (dark = lowest weight, pale yellow = highest) blended 70/30 over the base. uint8 (H, 2W + 4, 3).
    """
    weights = np.asarray(weights, np.float64)
    h, w = weights.shape
    if image is not None:
        img = np.asarray(image, np.float64)
        if img.ndim == 3:
            img = img[..., :3].mean(axis=2)
        lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
        grey = np.clip((img - lo) / (hi - lo if hi > lo else 1.0), 0, 1) * 255
    else:
        t = np.asarray(target)
        top = max(int(t.max()), 1) if t.size else 1
        grey = 40 + (t.astype(np.float64) / top) * 160
    base = np.repeat(grey[..., None], 3, axis=2)
    heat = colour_map(weights, float(weights.min()) if weights.size else 0.0,
                      float(weights.max()) if weights.size else 1.0).astype(np.float64)
    over = 0.7 * heat + 0.3 * base
    gap = np.full((h, 4, 3), 255.0)
    return np.round(np.concatenate([base, gap, over], axis=1)).astype(np.uint8)
