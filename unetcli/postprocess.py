"""Clean-up of predicted class maps and their conversion to instance labels (pure numpy/scipy).

A class map holds 0 for background and 1..K-1 for the other classes. Every operation works on one
2-D map and treats each foreground class on its own; objects are 4-connected regions of one class
(pixels that touch only at a corner are separate objects, which keeps touching cells apart).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from unetcli.errors import ConfigError

_FOUR = ndimage.generate_binary_structure(2, 1)


def _classes(mask: np.ndarray) -> list[int]:
    return [int(k) for k in np.unique(mask) if k != 0]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background regions enclosed by one foreground class become that class (a copy)."""
    out = mask.copy()
    for k in _classes(mask):
        filled = ndimage.binary_fill_holes(mask == k, structure=_FOUR)
        out[filled & (out == 0)] = k
    return out


def remove_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Objects of fewer than ``min_size`` pixels become background (a copy)."""
    if min_size < 0:
        raise ConfigError(f"min-size must be at least 0, not {min_size}")
    out = mask.copy()
    if min_size <= 1:
        return out
    for k in _classes(mask):
        lab, n = ndimage.label(mask == k, structure=_FOUR)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())
        small = sizes < min_size
        small[0] = False
        out[small[lab]] = 0
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Only the largest object of each foreground class stays; the rest becomes background (a copy)."""
    out = mask.copy()
    for k in _classes(mask):
        lab, n = ndimage.label(mask == k, structure=_FOUR)
        if n <= 1:
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        out[(lab != 0) & (lab != int(np.argmax(sizes)))] = 0
    return out


def label_instances(mask: np.ndarray) -> np.ndarray:
    """Instance labels: each 4-connected object of a foreground class gets its own id, 1, 2, ...

    Ids run through the classes in order (class 1's objects first). The dtype is uint16 when the ids
    fit, else uint32.
    """
    labels = np.zeros(mask.shape, np.uint32)
    offset = 0
    for k in _classes(mask):
        lab, n = ndimage.label(mask == k, structure=_FOUR)
        sel = lab != 0
        labels[sel] = lab[sel].astype(np.uint32) + offset
        offset += n
    return labels.astype(np.uint16) if offset <= np.iinfo(np.uint16).max else labels


def clean(mask: np.ndarray, *, fill: bool = False, min_size: int = 0, largest: bool = False) -> np.ndarray:
    """Fill holes, then drop small objects, then keep the largest object: in that order, on a 2-D map."""
    if fill:
        mask = fill_holes(mask)
    if min_size > 1:
        mask = remove_small(mask, min_size)
    if largest:
        mask = largest_component(mask)
    return mask

