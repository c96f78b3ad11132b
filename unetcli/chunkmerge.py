"""Instance labels of an image decoded block by block: one id per object across block borders.

Three steps, none of which gathers the image:

1. **Local labels** (:func:`label_block`, one task per block): the block's probabilities plus a margin
   of ``margin`` pixels from its neighbours (clipped at the image border) are decoded with the project's
   instance decoding (:func:`unetcli.instances.decode`, minimum size left for step 2); the block keeps
   its own pixels, numbered 1..n in the order of their first pixel. It returns a small summary
   (:class:`BlockLabels`): each object's size and first pixel, its labels along the four edges of the
   block, and its *view* of the neighbours' edge lines just outside (its decoding of those pixels,
   mapped to its own ids).
2. **Merge** (:func:`merge`, on the client, from the summaries): across every shared edge (and corner),
   the pairs (this block's id, the neighbour's id) of the pixels that both decode as objects are
   joined by union-find (``scipy.sparse.csgraph.connected_components`` over all (block, id) nodes);
   objects under ``min_size`` pixels (their global size) are dropped, ``largest`` keeps the largest
   object of each page, and the objects are numbered 1, 2, ... in the order of their first pixel
   (raster order), as a single-process decoding numbers them. The result is a small lookup table per
   block (per-block offsets: unique ids without gathering the image).
3. **Relabel** (:func:`relabel_block`, one task per block): the block's local labels through its table.

Exactness. For the two-class decoding without growing (4-connected components of ``p > threshold``),
any shared pixel joins two pieces, and the labels equal single-process labels exactly, ids included: a
component that crosses a border has two 4-adjacent pixels on either side, and each block decodes the
pixel across the border the same way (its margin holds it). For the three-class watershed and for
growing objects back (``grow``), a block decodes from its margin only, so a pair is joined only when it
covers more than half of the smaller piece along the border (two touching objects that the two blocks
split one pixel differently stay two); they equal single-process labels up to renumbering except for
objects that reach farther than the margin beyond a border. ``fill_holes`` needs whole objects and is
refused by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable

import numpy as np

from unetcli.errors import ConfigError

LABEL_MARGIN = 64
"""Pixels of the neighbours' probabilities each block decodes with (at least 1 is needed to merge)."""

SIDES = ("top", "bottom", "left", "right")
CORNERS = ("tl", "tr", "bl", "br")


@dataclass
class BlockLabels:
    """What the local labelling of one block returns: small, whatever the block's size."""

    page: int
    by: int
    bx: int
    count: int                       # local ids 1..count
    sizes: np.ndarray                # (count,) pixels of each id inside the block
    firsts: np.ndarray               # (count,) raster index (y * width + x) of each id's first pixel
    inner: dict                      # side -> the block's labels along that edge (1-D); corner -> int
    outer: dict                      # side -> its decoding of the line just outside, in its own ids
                                     # (0 where not one of its ids; absent at the image border)


def exact_decoding(classes: int, params) -> bool:
    """True where block-wise labels equal single-process labels exactly (two classes, no growing)."""
    return classes == 2 and int(params.grow) == 0


def label_block(probs: np.ndarray, window: tuple[int, int, int, int], rect: tuple[int, int, int, int],
                width: int, params, page: int = 0, by: int = 0, bx: int = 0) -> tuple[np.ndarray, BlockLabels]:
    """Local labels (uint32, ids 1..n by first pixel) of the block ``rect`` from the probabilities
    ``probs`` (K, h, w) of ``window`` (y0, y1, x0, x1 in image coordinates, holding ``rect``), and the
    block's summary. ``params``: ``instances.DecodeParams`` (its ``min_size`` is applied by :func:`merge`)."""
    from unetcli.instances import decode

    wy0, wy1, wx0, wx1 = window
    y0, y1, x0, x1 = rect
    if not (wy0 <= y0 < y1 <= wy1 and wx0 <= x0 < x1 <= wx1) or probs.shape[1:] != (wy1 - wy0, wx1 - wx0):
        raise ConfigError(f"block {rect} is not inside its window {window} of shape {probs.shape[1:]}")
    lab = decode(probs, replace(params, min_size=0)).astype(np.int64, copy=False)
    cy, cx = y0 - wy0, x0 - wx0
    core = lab[cy:cy + (y1 - y0), cx:cx + (x1 - x0)]
    ids, first_idx = np.unique(core.ravel(), return_index=True)
    keep = ids > 0
    ids, first_idx = ids[keep], first_idx[keep]
    order = np.argsort(first_idx, kind="stable")            # number by first pixel in raster order
    ids, first_idx = ids[order], first_idx[order]
    n = int(ids.size)
    lut = np.zeros(int(lab.max(initial=0)) + 1, np.uint32)
    lut[ids] = np.arange(1, n + 1, dtype=np.uint32)
    local = lut[core]
    view = lut[lab]                                           # the window in the block's ids
    sizes = np.bincount(local.ravel(), minlength=n + 1)[1:].astype(np.int64)
    bw = x1 - x0
    fy, fx = np.divmod(first_idx, bw)
    firsts = (fy + y0).astype(np.int64) * int(width) + (fx + x0)
    inner = {"top": local[0].copy(), "bottom": local[-1].copy(), "left": local[:, 0].copy(),
             "right": local[:, -1].copy(), "tl": int(local[0, 0]), "tr": int(local[0, -1]),
             "bl": int(local[-1, 0]), "br": int(local[-1, -1])}
    outer: dict = {}
    up, down, left, right = y0 > wy0, y1 < wy1, x0 > wx0, x1 < wx1
    if up:
        outer["top"] = view[cy - 1, cx:cx + bw].copy()
    if down:
        outer["bottom"] = view[cy + (y1 - y0), cx:cx + bw].copy()
    if left:
        outer["left"] = view[cy:cy + (y1 - y0), cx - 1].copy()
    if right:
        outer["right"] = view[cy:cy + (y1 - y0), cx + bw].copy()
    if up and left:
        outer["tl"] = int(view[cy - 1, cx - 1])
    if up and right:
        outer["tr"] = int(view[cy - 1, cx + bw])
    if down and left:
        outer["bl"] = int(view[cy + (y1 - y0), cx - 1])
    if down and right:
        outer["br"] = int(view[cy + (y1 - y0), cx + bw])
    return local, BlockLabels(page, by, bx, n, sizes, firsts, inner, outer)


def label_window(rect: tuple[int, int, int, int], height: int, width: int,
                 margin: int = LABEL_MARGIN) -> tuple[int, int, int, int]:
    """The probabilities a block decodes with: the block and ``margin`` pixels around, within the image."""
    if margin < 1:
        raise ConfigError(f"the label margin must be at least 1 pixel, not {margin}")
    y0, y1, x0, x1 = rect
    return max(0, y0 - margin), min(height, y1 + margin), max(0, x0 - margin), min(width, x1 + margin)


@dataclass
class Merged:
    """The result of :func:`merge`: a lookup table per block (local id -> final id), the output dtype,
    and the number of objects of each page."""

    tables: dict                     # (page, by, bx) -> np.ndarray (count + 1,) of final ids
    dtype: str                       # 'uint16' or 'uint32', as a single-process decoding chooses
    objects: list[int]               # per page


def _neighbour_pairs(a: BlockLabels, b: BlockLabels, side_a: str, side_b: str) -> Iterable[tuple]:
    """(ids of a, ids of b) along a shared edge or corner, both ways: a's view against b's labels and
    b's view against a's labels."""
    if side_a in a.outer:
        yield np.atleast_1d(a.outer[side_a]), np.atleast_1d(b.inner[side_b])
    if side_b in b.outer:
        yield np.atleast_1d(a.inner[side_a]), np.atleast_1d(b.outer[side_b])


def merge(blocks: Iterable[BlockLabels], *, exact: bool, min_size: int = 0, largest: bool = False) -> Merged:
    """Join the pieces of objects cut by block borders and number them (see the module's notes).

    ``exact``: join on any shared pixel (two-class components); otherwise a pair needs more than half of
    the smaller piece's pixels along the border."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    blocks = sorted(blocks, key=lambda b: (b.page, b.by, b.bx))
    index = {(b.page, b.by, b.bx): b for b in blocks}
    offsets, total = {}, 0
    for b in blocks:
        offsets[(b.page, b.by, b.bx)] = total
        total += b.count
    us, vs = [], []
    links = (((0, 1), "right", "left"), ((1, 0), "bottom", "top"),
             ((1, 1), "br", "tl"), ((1, -1), "bl", "tr"))
    for b in blocks:
        for (dy, dx), side_a, side_b in links:
            other = index.get((b.page, b.by + dy, b.bx + dx))
            if other is None:
                continue
            pairs = list(_neighbour_pairs(b, other, side_a, side_b))
            if not pairs:
                continue
            la = np.concatenate([p[0] for p in pairs]).astype(np.int64)
            lb = np.concatenate([p[1] for p in pairs]).astype(np.int64)
            both = (la > 0) & (lb > 0)
            if not both.any():
                continue
            pa, pb = la[both], lb[both]
            if not exact:
                ab, n_ab = np.unique(np.stack([pa, pb]), axis=1, return_counts=True)
                n_a = np.bincount(la[la > 0], minlength=b.count + 1)
                n_b = np.bincount(lb[lb > 0], minlength=other.count + 1)
                strong = 2 * n_ab > np.minimum(n_a[ab[0]], n_b[ab[1]])
                pa, pb = ab[0][strong], ab[1][strong]
            us.append(pa - 1 + offsets[(b.page, b.by, b.bx)])
            vs.append(pb - 1 + offsets[(other.page, other.by, other.bx)])
    if total == 0:
        return Merged({(b.page, b.by, b.bx): np.zeros(1, np.uint32) for b in blocks}, "uint16",
                      [0] * (max((b.page for b in blocks), default=-1) + 1))
    u = np.concatenate(us) if us else np.zeros(0, np.int64)
    v = np.concatenate(vs) if vs else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(u.size, np.int8), (u, v)), shape=(total, total))
    ncomp, comp = connected_components(graph, directed=False)
    sizes = np.concatenate([b.sizes for b in blocks]).astype(np.int64)
    firsts = np.concatenate([b.firsts for b in blocks]).astype(np.int64)
    pages = np.concatenate([np.full(b.count, b.page, np.int64) for b in blocks])
    csize = np.bincount(comp, weights=sizes, minlength=ncomp).astype(np.int64)
    cfirst = np.full(ncomp, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(cfirst, comp, firsts)
    cpage = np.zeros(ncomp, np.int64)
    cpage[comp] = pages
    keep = csize >= max(1, int(min_size))
    final = np.zeros(ncomp, np.int64)
    npages = int(pages.max(initial=0)) + 1
    counts, widest = [], 0
    for p in range(max(npages, max((b.page for b in blocks), default=0) + 1)):
        sel = np.flatnonzero(keep & (cpage == p))
        sel = sel[np.argsort(cfirst[sel], kind="stable")]
        widest = max(widest, sel.size)                        # the ids before keeping the largest
        if largest and sel.size:
            sel = sel[[int(np.argmax(csize[sel]))]]           # ties: the first in raster order
        final[sel] = np.arange(1, sel.size + 1)
        counts.append(int(sel.size))
    dtype = "uint16" if widest <= np.iinfo(np.uint16).max else "uint32"
    tables = {}
    for b in blocks:
        off = offsets[(b.page, b.by, b.bx)]
        table = np.zeros(b.count + 1, np.uint32)
        table[1:] = final[comp[off:off + b.count]]
        tables[(b.page, b.by, b.bx)] = table
    return Merged(tables, dtype, counts)


def relabel_block(local: np.ndarray, table: np.ndarray, dtype: str) -> np.ndarray:
    """A block's local labels through its lookup table, as the output's dtype."""
    return table[local].astype(dtype, copy=False)


def label_image_blocks(probs: np.ndarray, rects: Iterable[tuple[int, int, tuple]], params, *,
                       margin: int = LABEL_MARGIN, min_size: int = 0, largest: bool = False,
                       map_fn: Callable = map) -> np.ndarray:
    """The whole procedure on an in-memory (K, H, W) array, block by block (for tests and small images):
    labels equal to what the distributed path writes."""
    k, h, w = probs.shape
    rects = list(rects)

    def one(item):
        by, bx, rect = item
        win = label_window(rect, h, w, margin)
        return label_block(probs[:, win[0]:win[1], win[2]:win[3]], win, rect, w, params, 0, by, bx)

    results = list(map_fn(one, rects))
    merged = merge([r[1] for r in results], exact=exact_decoding(k, params), min_size=min_size,
                   largest=largest)
    out = np.zeros((h, w), merged.dtype)
    for (by, bx, rect), (local, summary) in zip(rects, results):
        y0, y1, x0, x1 = rect
        out[y0:y1, x0:x1] = relabel_block(local, merged.tables[(0, by, bx)], merged.dtype)
    return out
