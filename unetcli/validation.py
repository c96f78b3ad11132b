"""Validation during training: which score picks ``best.unet``, and the scores of a network on images.

A validation predicts every validation image whole (overlap-tile, as ``unet predict`` does) and averages
per-image scores: the unweighted cross-entropy ``loss``, the pixel scores of ``metrics.pixel_scores``
(IoU, Dice, pixel error), the ISBI scores ``vrand``/``vinfo`` for membrane-type labels, and object scores
(``f1``, ``ap``) for instance labels, with the instance decoding tuned on these images for the metric.
"""

from __future__ import annotations

import numpy as np

from unetcli.errors import ConfigError

METRICS = ("auto", "loss", "iou", "dice", "vrand", "vinfo", "pixel_error", "f1", "ap")
OBJECT_METRICS = ("f1", "ap")
LOWER_IS_BETTER = {"loss", "pixel_error"}


def plan(metric: str, samples, num_classes: int, membrane: bool | None = None) -> tuple[str, bool, str | None]:
    """``(best metric, membrane, objects)`` for validating on ``samples``.

    ``membrane``: whether the labels are membrane-type (ISBI: a bright majority of cells, two values),
    detected from ``samples`` unless given (a resumed run keeps what it found). ``auto`` picks vrand
    for membranes, object F1 for instance labels, IoU otherwise, and the loss without validation
    images. ``objects`` is the object metric the instance decoding is tuned for, or None.
    """
    if membrane is None:
        membrane = bool(samples) and num_classes == 2 and \
            np.mean([float((s.target == 0).mean()) for s in samples]) < 0.5 and \
            all(len(np.unique(s.label)) <= 2 for s in samples)
    membrane = bool(membrane)
    objects_known = bool(samples) and all(s.instances is not None for s in samples) and num_classes in (2, 3)
    if metric == "auto":
        metric = ("vrand" if membrane else ("f1" if objects_known else "iou")) if samples else "loss"
    if metric in OBJECT_METRICS and not objects_known:
        raise ConfigError(f"--val-metric {metric} needs instance labels or binary masks to validate on")
    objects = metric if metric in OBJECT_METRICS else ("f1" if objects_known and not membrane else None)
    return metric, membrane or metric in ("vrand", "vinfo"), objects


def better(metric: str, value: float, best: float | None) -> bool:
    """True when ``value`` of ``metric`` beats ``best`` (None: nothing yet)."""
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def validate(net, samples, *, normalization: dict, config, device, precision: str, tile: int | None,
             membrane: bool, objects: str | None = None) -> dict:
    """Whole-image overlap-tile prediction of every validation image; mean scores over the images.

    Keys: ``loss`` (unweighted cross-entropy), the pixel scores of ``metrics.pixel_scores`` (iou, dice,
    per class, pixel_error) and, for membrane-type data, ``vrand`` and ``vinfo`` (thinned). With
    ``objects`` ('f1' or 'ap'), the instance decoding is tuned on these images for that metric
    (``instances.tune``): ``f1``, ``ap`` of the tuned decoding and its parameters as ``decode_*`` keys.
    """
    from unetcli import data as datamod
    from unetcli import inference, instances, metrics

    mean, std = datamod.tile_mean_std(normalization, config.in_channels)
    rows, probs, truths = [], [], []
    was_training = net.training
    net.eval()
    try:
        for s in samples:
            x = (s.image * np.float32(s.scale) - mean) / std
            prob = np.asarray(inference.predict_proba(net, x, config=config, tile=tile, batch=1,
                                                      device=str(device), precision=precision))
            k = prob.shape[0]
            pt = np.take_along_axis(prob, s.target[None].astype(np.int64), 0)[0]
            row = {"loss": float(-np.log(np.clip(pt, 1e-7, 1.0)).mean())}
            pred = prob.argmax(0).astype(np.uint8)
            row.update({key: float(v) for key, v in metrics.pixel_scores(pred, s.target, k).items()})
            if membrane:
                truth = s.instances if s.instances is not None else s.target
                scores = metrics.isbi_scores(prob[0], truth)
                row.update({key: float(scores[key]) for key in ("vrand", "vinfo") if key in scores})
            if objects and s.instances is not None and k in (2, 3):
                probs.append(prob)
                whole = k == 2 and s.label is not None and len(np.unique(s.label)) > 2   # not the carved copy
                truths.append(s.label if whole else s.instances)
            rows.append(row)
    finally:
        net.train(was_training)
    keys = sorted(set().union(*rows)) if rows else []
    out = {key: float(np.mean([r[key] for r in rows if key in r])) for key in keys}
    if probs:
        params, _ = instances.tune(probs, truths, metric=objects)
        scored = [metrics.object_scores(instances.decode(p, params), t) for p, t in zip(probs, truths)]
        for key in ("f1", "ap", "precision", "recall"):
            out[key if key in ("f1", "ap") else f"object_{key}"] = float(np.mean([r[key] for r in scored]))
        out.update({f"decode_{k}": float(v) for k, v in params.to_dict().items()})
    return out


def decode_params_of(val: dict | None) -> dict:
    """The tuned instance decoding recorded by :func:`validate` (``decode_*`` keys), as a model file's
    ``postprocess`` record; empty when there is none."""
    from unetcli import instances

    got = {k.removeprefix("decode_"): v for k, v in (val or {}).items() if k.startswith("decode_")}
    if not got:
        return {}
    ints = {"min_seed", "min_size", "grow"}
    return instances.DecodeParams(**{k: int(round(v)) if k in ints else float(v) for k, v in got.items()}).to_dict()
