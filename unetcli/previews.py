"""Pictures for a person: label contours drawn over a shrunk image, the contact sheet of augmented
samples, and the overlay of a prediction over its input (``unet predict --preview``)."""

from __future__ import annotations

import math

import numpy as np

from unetcli.augparams import check_range
from unetcli.errors import ConfigError


# ------------------------------------------------------------------------------------------- previews

def label_contours(labels: np.ndarray) -> np.ndarray:
    """Boolean map of the pixels whose label differs from the right or lower neighbour."""
    edge = np.zeros(labels.shape, bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def preview_panel(image: np.ndarray, labels: np.ndarray | None = None,
                  value_range: tuple[float, float] = (0.0, 1.0), size: int = 256,
                  color: tuple[int, int, int] = (255, 40, 0)) -> np.ndarray:
    """An RGB uint8 picture of an ``(H, W, C)`` image, shrunk to at most ``size`` px, label contours drawn.

    The image is shrunk by an integer factor with block means; labels by picking every factor-th pixel,
    so that their contours stay one pixel wide and exactly on the labels' boundaries.
    """
    lo, hi = check_range(value_range)
    h, w = image.shape[:2]
    f = max(1, math.ceil(max(h, w) / max(int(size), 1)))
    hh, ww = max(h // f, 1), max(w // f, 1)
    img = image[:hh * f, :ww * f].astype(np.float32)
    img = img.reshape(hh, f, ww, f, -1).mean(axis=(1, 3)) if f > 1 else img
    if img.shape[2] >= 3:
        img = img[..., :3]
    else:
        img = np.repeat(img[..., :1], 3, axis=2)
    rgb = np.clip(np.rint((img - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
    if labels is not None:
        rgb[label_contours(labels[:hh * f:f, :ww * f:f])] = color
    return rgb


def contact_sheet(panels: list[np.ndarray], columns: int | None = None, gap: int = 4,
                  background: int = 255) -> np.ndarray:
    """The RGB panels laid out row by row on one sheet, ``gap`` px apart.

    Without ``columns``, the layout closest to 16:9 panels across to down, with few empty places.
    """
    if not panels:
        raise ConfigError("a contact sheet needs at least one panel")
    n = len(panels)
    if columns is None:
        def badness(c: int) -> float:
            r = math.ceil(n / c)
            return 2.0 * (r * c - n) / n + abs(math.log(c / r / (16 / 9)))

        columns = min(range(1, n + 1), key=badness)
    rows = math.ceil(n / columns)
    ph = max(p.shape[0] for p in panels)
    pw = max(p.shape[1] for p in panels)
    sheet = np.full((rows * ph + (rows + 1) * gap, columns * pw + (columns + 1) * gap, 3), background, np.uint8)
    for i, p in enumerate(panels):
        r, c = divmod(i, columns)
        y, x = gap + r * (ph + gap), gap + c * (pw + gap)
        sheet[y:y + p.shape[0], x:x + p.shape[1]] = p
    return sheet


OVERLAY_MAX_SIDE = 2048


def overlay(image_path: str, result_path: str) -> np.ndarray:
    """An RGB uint8 picture of an input image (its first page, each channel shown between its 1st and
    99.8th percentile) with the borders of a result drawn in red: class borders of a mask, outlines of
    instance labels, the borders of the most probable class of probabilities. At most
    ``OVERLAY_MAX_SIDE`` pixels a side (shrunk by an integer factor)."""
    from unetcli import normalize
    from unetcli.images import read_image

    image = read_image(image_path)[0]
    result = read_image(result_path)[0]
    labels = result.argmax(-1) if result.dtype.kind == "f" and result.shape[-1] > 1 else result[..., 0]
    shown = np.clip(normalize.apply(normalize.DEFAULT, image), 0.0, 1.0)
    return preview_panel(shown, labels, (0.0, 1.0), size=min(max(image.shape[:2]), OVERLAY_MAX_SIDE))
