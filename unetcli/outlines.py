"""Outlines of instance labels, traced along the pixels' edges (numpy and scipy only, no I/O).

Coordinates are ``(x, y)`` of pixel corners: pixel (row r, column c) is the unit square
``[c, c+1] x [r, r+1]``, the convention of ImageJ and QuPath (origin at the top-left corner of the
top-left pixel). An outline therefore runs exactly along its object's border, and filling it at pixel
centres (even-odd rule) gives back exactly the object's pixels, holes included.

Objects are 4-connected, the convention of the labels ``unet`` writes (``postprocess``): where two
pixels of one id touch only at a corner the outline passes between them, so an id whose pixels form
several 4-connected pieces gets several parts (a MultiPolygon). A background region enclosed by an
object is a hole whatever its shape (8-connected background, the dual of 4-connected objects); where a
hole or a notch touches the outside or another hole at one corner only, the rings touch at that corner
and are split there, so that every ring is simple (OGC: a hole may touch its shell at a point).

Orientation, as RFC 7946 asks: every exterior ring has a positive shoelace area in ``(x, y)`` as
written (counter-clockwise when y points up; clockwise as seen on screen, where y points down), every
hole a negative one.

The tracing is vectorised over the whole image: the directed border edges of all objects are found
with array comparisons, linked at each corner (at a corner shared diagonally by two pixels of one id,
the outline turns to stay with its pixel: the 4-connected rule), then put in ring order by pointer
jumping; the pixels of ids in several pieces are split into their pieces once, all ids together, to give
each piece its holes.
Time and memory grow with the pixels and the border edges, never with objects x pixels: 2000 objects
on 2048 x 2048 pixels take 0.12 s on a 2-core CPU; the worst case, 1024 x 1024 pixels of noise (69000
objects, a million border edges), 2.7 s and about 175 bytes an edge (``EDGE_BYTES`` bounds it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from unetcli.errors import LabelError

_FOUR = ndimage.generate_binary_structure(2, 1)
EDGE_BYTES = 200        # peak bytes per border edge while tracing (measured: 175 on 1024^2 of noise)


@dataclass(frozen=True)
class Outline:
    """One object: its id, its parts (each ``(exterior, *holes)``), its size in pixels.

    A ring is an ``(n, 2)`` int64 array of ``(x, y)`` corners, open (the first corner is not repeated
    at the end), holding only the corners where the border turns."""

    label: int
    parts: tuple[tuple[np.ndarray, ...], ...]
    area: int

    @property
    def holes(self) -> int:
        return sum(len(part) - 1 for part in self.parts)

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)``: the pixel corners of the bounding box."""
        pts = np.concatenate([part[0] for part in self.parts])
        (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
        return int(x0), int(y0), int(x1), int(y1)


def ring_area(ring: np.ndarray) -> float:
    """Signed shoelace area of an open ring of ``(x, y)`` vertices (positive: exterior)."""
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return float((x * np.roll(y, -1) - np.roll(x, -1) * y).sum() / 2)


def count_edges(labels: np.ndarray) -> int:
    """Border edges of all objects (the size of the tracing's work), without tracing."""
    lab = _check(labels)
    if lab.size == 0:
        return 0
    n = 0
    for a, b in ((lab[:-1], lab[1:]), (lab[:, :-1], lab[:, 1:])):
        d = a != b
        n += int(np.count_nonzero(d & (a != 0))) + int(np.count_nonzero(d & (b != 0)))
    # the image's own border
    n += int(np.count_nonzero(lab[0])) + int(np.count_nonzero(lab[-1]))
    n += int(np.count_nonzero(lab[:, 0])) + int(np.count_nonzero(lab[:, -1]))
    return n


def trace(labels: np.ndarray) -> list[Outline]:
    """The outline of every object of a 2-D label image (0 is background), sorted by id."""
    lab = _check(labels)
    if lab.size == 0 or not lab.any():
        return []
    edges = _edges(lab)
    nxt = _link(edges)
    order, starts = _ring_order(nxt)
    return _assemble(lab, edges, order, starts)


# ------------------------------------------------------------------------------------------- internals

def _check(labels: np.ndarray) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise LabelError(f"outlines are traced on one 2-D label image, not an array of shape {lab.shape}")
    if lab.dtype == bool:
        return lab.astype(np.uint8)
    if lab.dtype.kind not in "ui":
        raise LabelError(f"instance labels are whole numbers, not {lab.dtype}")
    if lab.dtype.kind == "i" and lab.size and lab.min() < 0:
        raise LabelError("instance labels are 0 (background) or positive ids, not negative numbers")
    if lab.dtype == np.uint64 and lab.size and lab.max() > np.iinfo(np.int64).max:
        raise LabelError(f"instance ids run up to {lab.max()}, beyond the 2^63 ids outlines can name")
    return lab


@dataclass
class _Edges:
    """Directed border edges: start corner ``(x, y)``, direction, the id of the object on their left."""

    x: np.ndarray            # int64
    y: np.ndarray            # int64
    d: np.ndarray            # int8: 0 +x, 1 +y, 2 -x, 3 -y
    label: np.ndarray        # int64
    width: int               # corners per row: image width + 1

    @property
    def vertex(self) -> np.ndarray:
        return self.y * self.width + self.x


# a step in each direction; the object lies on the left of the step, (dx, dy) turned by +90 degrees
_DX = np.array([1, 0, -1, 0], np.int64)
_DY = np.array([0, 1, 0, -1], np.int64)


def _edges(lab: np.ndarray) -> _Edges:
    """Every pixel side between two different ids, once for each non-zero id beside it, directed so
    that its object is on its left (exteriors then run with positive shoelace area)."""
    h, w = lab.shape
    pad = np.pad(lab, 1)
    xs, ys, ds, ls = [], [], [], []

    def add(mask, values, x0: int, y0: int, d: int) -> None:
        r, c = np.nonzero(mask)
        xs.append(c.astype(np.int64) + x0)
        ys.append(r.astype(np.int64) + y0)
        ds.append(np.full(r.size, d, np.int8))
        ls.append(values[r, c].astype(np.int64))

    up, down = pad[:-1, 1:-1], pad[1:, 1:-1]           # rows y-1 and y around the line y (0..h)
    diff = up != down
    add(diff & (down != 0), down, 0, 0, 0)             # top side of the pixel below: +x from (c, y)
    add(diff & (up != 0), up, 1, 0, 2)                 # bottom side of the pixel above: -x from (c+1, y)
    left, right = pad[1:-1, :-1], pad[1:-1, 1:]        # columns x-1 and x around the line x (0..w)
    diff = left != right
    add(diff & (right != 0), right, 0, 1, 3)           # left side of the pixel right of it: -y from (x, r+1)
    add(diff & (left != 0), left, 0, 0, 1)             # right side of the pixel left of it: +y from (x, r)
    del pad, up, down, left, right, diff
    return _Edges(np.concatenate(xs), np.concatenate(ys), np.concatenate(ds), np.concatenate(ls), w + 1)


def _link(e: _Edges) -> np.ndarray:
    """The edge that follows each edge along its object's border.

    A directed edge is known by its start corner and direction (no two edges share both), so the
    candidates at the end corner are looked up by that key. Of the same object's edges leaving that
    corner, a left turn is taken first: at a corner where two pixels of one id touch diagonally (the
    only corners with two ways on), turning left keeps going round the same pixel, so the two pixels
    stay apart, as 4-connectivity says."""
    vertex = e.vertex
    key = vertex * 4 + e.d
    order = np.argsort(key, kind="stable")
    sorted_keys = key[order]
    end = vertex + _DX[e.d] + _DY[e.d] * e.width
    nxt = np.full(key.size, -1, np.int64)
    for turn in (1, 0, 3):                                 # left, straight on, right
        want = end * 4 + (e.d + turn) % 4
        pos = np.minimum(np.searchsorted(sorted_keys, want), key.size - 1)
        cand = order[pos]
        ok = (sorted_keys[pos] == want) & (e.label[cand] == e.label) & (nxt < 0)
        nxt[ok] = cand[ok]
    if (nxt < 0).any():                                     # cannot happen for a closed border
        raise AssertionError("outline tracing: a border edge without a successor")
    return nxt


def _ring_order(nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The edges ring by ring, each ring in border order from its lowest edge; and where each ring
    starts in that order. ``nxt`` is a permutation whose cycles are the rings; pointer jumping finds
    each cycle's lowest index and each edge's distance from it in O(edges x log(longest ring))."""
    n = nxt.size
    idx = np.arange(n, dtype=np.int64)
    root, jump = idx.copy(), nxt.copy()
    while True:                                            # root: the lowest index on the cycle
        new = np.minimum(root, root[jump])
        if np.array_equal(new, root):
            break
        root, jump = new, jump[jump]
    is_root = root == idx
    dist = (~is_root).astype(np.int64)                     # steps to the root, by doubling
    succ = np.where(is_root, idx, nxt)
    while not np.array_equal(succ, root):
        dist = dist + dist[succ]
        succ = succ[succ]
    length = np.bincount(root, minlength=n)[root]
    pos = (length - dist) % length
    order = np.lexsort((pos, root))
    starts = np.flatnonzero(is_root[order])                 # the root comes first in its ring
    return order, starts


def _split_pinches(ring: np.ndarray) -> list[np.ndarray]:
    """A ring that passes a corner twice, as loops that each pass every corner once."""
    stack: list[tuple[int, int]] = []
    where: dict[tuple[int, int], int] = {}
    loops = []
    for pt in map(tuple, ring.tolist()):
        j = where.get(pt)
        if j is None:
            where[pt] = len(stack)
            stack.append(pt)
            continue
        loops.append(stack[j:])
        for q in stack[j + 1:]:
            del where[q]
        del stack[j + 1:]
    loops.append(stack)
    out = []
    for loop in loops:
        arr = np.asarray(loop, np.int64)
        if len(arr) < 4:                                   # an axis-aligned ring has 4 corners at least
            continue
        prev, nxt = np.roll(arr, 1, 0), np.roll(arr, -1, 0)
        turn = ((arr - prev)[:, 0] * (nxt - arr)[:, 1] - (arr - prev)[:, 1] * (nxt - arr)[:, 0]) != 0
        out.append(arr[turn])                              # the split corner may no longer be a turn
    return out


def _assemble(lab: np.ndarray, e: _Edges, order: np.ndarray, starts: np.ndarray) -> list[Outline]:
    """Rings (corners only, pinches split) grouped into objects: shells with their holes."""
    n_rings = starts.size
    ring_of = np.repeat(np.arange(n_rings), np.diff(np.append(starts, order.size)))
    d = e.d[order]
    prev_d = np.roll(d, 1)
    prev_d[starts] = d[np.append(starts[1:], order.size) - 1]       # a ring's first edge follows its last
    corner = d != prev_d
    cx, cy = e.x[order][corner], e.y[order][corner]
    c_ring = ring_of[corner]
    bounds = np.searchsorted(c_ring, np.arange(n_rings + 1))
    pts = np.stack([cx, cy], axis=1)

    # signed area of each ring, from its corners
    nx = np.roll(cx, -1)
    ny = np.roll(cy, -1)
    last = bounds[1:] - 1
    nx[last], ny[last] = cx[bounds[:-1]], cy[bounds[:-1]]
    area = np.bincount(c_ring, weights=(cx * ny - nx * cy).astype(np.float64), minlength=n_rings) / 2
    first = order[starts]
    ring_label = e.label[first]
    # the pixel on the left of each ring's first edge: a pixel of the ring's object
    px = e.x[first] - (e.d[first] == 1) - (e.d[first] == 2)
    py = e.y[first] - (e.d[first] == 2) - (e.d[first] == 3)

    # rings passing a corner twice (only at corners shared diagonally): found by sorting the corners
    vkey = cy * e.width + cx
    srt = np.lexsort((vkey, c_ring))
    dup = (c_ring[srt][1:] == c_ring[srt][:-1]) & (vkey[srt][1:] == vkey[srt][:-1])
    pinched = np.zeros(n_rings, bool)
    pinched[c_ring[srt][1:][dup]] = True

    # one entry per ring: (label, component, [loops with their signed areas])
    by_label: dict[int, list[tuple[int, list[np.ndarray], list[float]]]] = {}
    for r in np.argsort(ring_label, kind="stable"):
        ring = pts[bounds[r]:bounds[r + 1]]
        if pinched[r]:
            loops = _split_pinches(ring)
            areas = [ring_area(lp) for lp in loops]
        else:
            loops, areas = [ring], [float(area[r])]
        by_label.setdefault(int(ring_label[r]), []).append((int(r), loops, areas))

    several = [label for label, rings in by_label.items()
               if sum(a > 0 for _r, _l, areas in rings for a in areas) > 1]
    piece = _pieces(lab, several) if several else None
    out = []
    for label, rings in by_label.items():
        if piece is None or label not in several:
            comp = {r: 0 for r, _l, _a in rings}
        else:
            comp = {r: int(piece[py[r], px[r]]) for r, _l, _a in rings}
        parts: dict[int, list] = {}
        for r, loops, areas in rings:
            entry = parts.setdefault(comp[r], [None, []])
            for lp, a in zip(loops, areas):
                if a > 0:
                    entry[0] = lp
                else:
                    entry[1].append(lp)
        ordered = [(p[0], *p[1]) for _c, p in sorted(parts.items())]
        size = round(sum(a for _r, _l, areas in rings for a in areas))   # shells minus holes: its pixels
        out.append(Outline(label, tuple(ordered), int(size)))
    out.sort(key=lambda o: o.label)
    return out


def _pieces(lab: np.ndarray, labels: list[int]) -> np.ndarray:
    """The 4-connected pieces of the ids ``labels`` (ids in several pieces), all at once: a map of piece
    numbers (-1 elsewhere). One graph over their pixels, linked where a neighbour holds the same id, so
    the work grows with the pixels, however many ids are split and however far apart their pieces lie
    (labelling each id's bounding box took hours on 1024 x 1024 pixels of random ids)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    inside = np.isin(lab, np.asarray(labels, dtype=lab.dtype))
    index = np.full(lab.shape, -1, np.int64)
    n = int(inside.sum())
    index[inside] = np.arange(n)
    a, b = [], []
    for same, ia, ib in ((inside[:, 1:] & inside[:, :-1] & (lab[:, 1:] == lab[:, :-1]), index[:, 1:], index[:, :-1]),
                         (inside[1:] & inside[:-1] & (lab[1:] == lab[:-1]), index[1:], index[:-1])):
        a.append(ia[same])
        b.append(ib[same])
    a, b = np.concatenate(a), np.concatenate(b)
    graph = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(n, n))
    _count, number = connected_components(graph, directed=False)
    piece = np.full(lab.shape, -1, np.int64)
    piece[inside] = number
    return piece
