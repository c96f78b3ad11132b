"""Input intensities and channels: the one rule that train, predict, validation and previews share.

A model stores how its inputs are normalised (``ModelFile.normalization``); three kinds exist:

- ``{"kind": "percentile", "low": 1.0, "high": 99.8}`` (the default of new models): each image, each
  channel, is mapped so that its ``low`` percentile becomes 0 and its ``high`` percentile 1,
  ``x' = (x - p_low) / (p_high - p_low)``. The result does not depend on the file's type or value range:
  the same picture stored as uint8, as uint16 scaled by 257 or as float32 in 0-1 gives the same input.
- ``{"kind": "zscore"}``: each image, each channel, minus its mean, divided by its standard deviation.
- ``{"mean": [...], "std": [...]}`` (kind ``dataset``, the models of unet 0.1 and 0.2): one mean and
  standard deviation per channel of the training set's raw pixel values, ``x' = (x - mean) / std``.

Every rule is expressed as a per-image ``(offset, scale)`` pair per channel, ``x' = (x - offset) /
scale``, so the predictor can apply it tile by tile to images that are read a strip at a time: only the
statistics are computed from the whole image (from a regular subsample of at most ``MAX_STAT_PIXELS``
pixels for huge ones).

Channels: :func:`adapt_channels` picks channels (``--channels``), replicates grey into a 3-channel model
and turns RGB into luminance (ITU-R BT.601 weights) for a 1-channel model.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from unetcli.errors import ConfigError, ImageShapeError, ModelFileError

KINDS = ("percentile", "zscore", "dataset")
DEFAULT = {"kind": "percentile", "low": 1.0, "high": 99.8}
MAX_STAT_PIXELS = 1 << 22            # pixels per channel used for an image's statistics
_TINY = 1e-6                         # spread below this fraction of the value range: a flat image
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def parse(text: str) -> dict:
    """``--normalize`` text -> a normalisation record: ``percentile``, ``percentile:LOW,HIGH``, ``zscore``,
    or ``dataset`` (``{"kind": "dataset"}``: the training set's mean and std, computed by ``unet train``)."""
    name, _, args = text.strip().partition(":")
    if name == "percentile":
        low, high = DEFAULT["low"], DEFAULT["high"]
        if args:
            try:
                low, high = (float(v) for v in args.split(","))
            except ValueError:
                raise ConfigError(f"--normalize {text!r}: expected percentile:LOW,HIGH, e.g. percentile:1,99.8") from None
        return check({"kind": "percentile", "low": low, "high": high})
    if name == "zscore" and not args:
        return {"kind": "zscore"}
    if name == "dataset" and not args:
        return {"kind": "dataset"}          # statistics still to be computed from the training set
    raise ConfigError(f"--normalize {text!r}: not a normalisation",
                      hint="use percentile, percentile:LOW,HIGH, zscore or dataset")


def kind(norm: dict) -> str:
    return str(norm.get("kind", "dataset"))


def check(norm: dict, channels: int | None = None, where: str = "normalisation") -> dict:
    """Validate a normalisation record (types, ranges, finite non-zero spreads); return it.

    Raises ModelFileError naming ``where`` (a model file's path when loading one)."""
    if not isinstance(norm, dict):
        raise ModelFileError(f"{where}: damaged model file (normalisation is not a record)")
    k = kind(norm)
    if k == "percentile":
        low, high = norm.get("low"), norm.get("high")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)) \
                or not 0 <= low < high <= 100:
            raise ModelFileError(f"{where}: percentiles must satisfy 0 <= low < high <= 100, not {low!r}, {high!r}")
        return {"kind": "percentile", "low": float(low), "high": float(high)}
    if k == "zscore":
        return {"kind": "zscore"}
    if k != "dataset":
        raise ModelFileError(f"{where}: unknown normalisation kind {k!r}",
                             hint="written by a newer unet? upgrade unet: pip install -U unet")
    mean, std = norm.get("mean"), norm.get("std")
    ok = isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) and \
        all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in mean + std) \
        and all(v > 0 for v in std)
    if not ok:
        raise ModelFileError(f"{where}: damaged model file (normalisation needs finite means and "
                             f"positive finite standard deviations)")
    if channels is not None and len(mean) != channels:
        raise ModelFileError(f"{where}: normalisation does not match {channels} input channel(s)")
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def _sample(image: np.ndarray) -> np.ndarray:
    """(H, W, C) or (N, H, W, C) -> (P, C) float64 pixels, a regular subsample for huge images."""
    c = image.shape[-1]
    flat = image.reshape(-1, c)
    step = max(1, flat.shape[0] // MAX_STAT_PIXELS)
    return np.asarray(flat[::step], np.float64)


def value_range(dtype: np.dtype | str, image: np.ndarray | None = None) -> float:
    """The full value range of a pixel type: the maximum of an integer type; 1 for floats (images in
    0-1), or for a float ``image`` whose values exceed 1, its own maximum rounded up to 255 or 65535."""
    dt = np.dtype(dtype)
    if dt.kind in "ui":
        return float(np.iinfo(dt).max)
    if dt == np.bool_:
        return 1.0
    if image is not None and image.size:
        top = float(np.nanmax(_sample(image)))
        if top > 1.0:
            return 255.0 if top <= 255.0 else (65535.0 if top <= 65535.0 else top)
    return 1.0


def dtype_factor(trained_dtype: str | None, image: np.ndarray) -> float:
    """The factor taking ``image``'s values to the value range of the type a ``dataset``-normalised model
    was trained on (uint16 x 257 -> uint8 values: 1/257); 1 when the model's type is unknown."""
    if not trained_dtype:
        return 1.0
    try:
        return value_range(trained_dtype) / value_range(image.dtype, image)
    except TypeError:
        return 1.0


def image_stats(norm: dict, image: np.ndarray, trained_dtype: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel ``(offset, scale)`` that normalise ``image`` (raw values) under ``norm``.

    ``dataset`` statistics are in the units of the type the model was trained on (``trained_dtype``):
    another type is first scaled to that range (``dtype_factor``). A flat channel (spread below a
    millionth of its type's range) gets scale 1 around its value, so a blank image stays blank instead
    of amplifying noise."""
    k = kind(norm)
    c = image.shape[-1]
    if k == "dataset":
        f = dtype_factor(trained_dtype, image)
        return (np.asarray(norm["mean"], np.float32).reshape(c) / np.float32(f),
                np.asarray(norm["std"], np.float32).reshape(c) / np.float32(f))
    x = _sample(image)
    if x.size and not np.isfinite(x).all():
        raise ImageShapeError("image holds NaN or infinite pixels")
    if x.shape[0] == 0:
        return np.zeros(c, np.float32), np.ones(c, np.float32)
    if k == "percentile":
        lo, hi = np.percentile(x, [norm["low"], norm["high"]], axis=0)
        offset, spread = lo, hi - lo
    else:
        offset, spread = x.mean(0), x.std(0)
    full = float(np.iinfo(image.dtype).max) if image.dtype.kind in "ui" else max(1.0, float(np.abs(x).max()))
    flat = spread <= _TINY * full
    scale = np.where(flat, 1.0, spread)
    if flat.any() and image.dtype.kind in "ui":
        scale = np.where(flat, full, scale)   # a blank integer image maps to ~0, not to huge values
    return offset.astype(np.float32), scale.astype(np.float32)


def apply(norm: dict, image: np.ndarray) -> np.ndarray:
    """``image`` (raw values, (..., C)) normalised under ``norm``, as float32."""
    offset, scale = image_stats(norm, image)
    return ((np.asarray(image, np.float32) - offset) / scale).astype(np.float32, copy=False)


def parse_channels(text: str | None) -> list[int] | None:
    """``--channels 2`` or ``--channels 1,2,3`` (1-based, in the order wanted) -> 0-based indices."""
    if text is None or str(text).strip() == "":
        return None
    try:
        picked = [int(v) for v in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"--channels {text!r}: expected channel numbers such as 2 or 1,2,3 (1-based)") from None
    if any(v < 1 for v in picked):
        raise ConfigError(f"--channels {text!r}: channels are numbered from 1")
    return [v - 1 for v in picked]


def adapt_channels(image: np.ndarray, wanted: int, channels: Sequence[int] | None = None,
                   name: str = "image") -> tuple[np.ndarray, str | None]:
    """Give ``image`` (..., C) the model's ``wanted`` channel count; return it and a note (or None).

    ``channels`` (0-based) picks and orders channels first. Then grey -> ``wanted`` copies; 3 or 4
    channels (RGB, RGBA) -> luminance for a 1-channel model; anything else that does not match is an
    error naming ``name``."""
    note = None
    c = image.shape[-1]
    if channels is not None:
        bad = [i + 1 for i in channels if i >= c]
        if bad:
            raise ImageShapeError(f"{name}: has {c} channel(s), --channels asks for channel {bad[0]}",
                                  hint=f"channels are numbered 1 to {c}")
        image = image[..., list(channels)]
        c = image.shape[-1]
    if c == wanted:
        return image, note
    if c == 1:
        return np.repeat(image, wanted, axis=-1), f"{name}: grey image given to a {wanted}-channel model (replicated)"
    if wanted == 1 and c in (3, 4):
        luma = np.tensordot(np.asarray(image[..., :3], np.float32), LUMA, axes=([-1], [0]))[..., None]
        return luma, f"{name}: colour image given to a grey model (converted to luminance)"
    raise ImageShapeError(f"{name}: has {c} channels, the model takes {wanted}",
                          hint="pick the model's channels with --channels, e.g. --channels "
                               + ",".join(str(i + 1) for i in range(wanted)))


def range_warning(norm: dict, image: np.ndarray, trained_dtype: str | None, name: str = "image") -> str | None:
    """A one-line warning when the model's normalisation cannot absorb this input's value range:
    only ``dataset`` normalisation depends on it (percentile and z-score are per image); a 12-bit image
    in a 16-bit file given to a model trained on 8-bit images is such a case."""
    if kind(norm) != "dataset" or image.size == 0:
        return None
    offset, scale = image_stats(norm, image, trained_dtype)
    x = _sample(image)
    z = (x.mean(0) - offset) / scale
    spread = x.std(0) / scale
    if np.any(np.abs(z) > 3) or np.any(spread < 0.2) or np.any(spread > 5):
        hint = f" (the model was trained on {trained_dtype} images)" if trained_dtype else ""
        return (f"{name}: its values ({image.dtype}, mean {float(x.mean()):.4g}) are far from what this "
                f"model was trained on{hint}; results may be wrong")
    return None
