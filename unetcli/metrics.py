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

Where they live
---------------
This module is the public home of the metrics and re-exports them from three: pixel and object
scores, the keys and the threshold rules in :mod:`unetcli.scores`; the ISBI 2012 Rand and
information scores and the warping error, with their threshold sweeps, in :mod:`unetcli.isbi`; the
scoring of a whole set (kinds of truth, reading of predictions, one threshold per metric) in
:mod:`unetcli.evaluation`. Pairing and reading the files of ``unet evaluate`` is :mod:`unetcli.evalfiles`.
"""

from __future__ import annotations

from unetcli.evaluation import Pair, evaluate, metric_selection, truth_kind
from unetcli.isbi import (information_terms, isbi_scores, isbi_sweep, pixel_fscore, rand_terms,
                          segmentation_scores, segments_of, thin_boundaries, warping_scores, warping_sweep)
from unetcli.scores import (_FOUR, DEFAULT_THRESHOLDS, DSB_IOU_THRESHOLDS, GROUPS, ISBI_KEYS, OBJECT_KEYS,
                            PIXEL_KEYS, WARPING_KEYS, compact_labels, label_components, object_scores,
                            parse_thresholds, pixel_scores)

__all__ = ["DEFAULT_THRESHOLDS", "DSB_IOU_THRESHOLDS", "GROUPS", "ISBI_KEYS", "OBJECT_KEYS", "PIXEL_KEYS",
           "WARPING_KEYS", "_FOUR", "Pair", "compact_labels", "evaluate", "information_terms", "isbi_scores",
           "isbi_sweep", "label_components", "metric_selection", "object_scores", "parse_thresholds",
           "pixel_fscore", "pixel_scores", "rand_terms", "segmentation_scores", "segments_of",
           "thin_boundaries", "truth_kind", "warping_scores", "warping_sweep"]
