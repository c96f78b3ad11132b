"""The warping error of Jain et al. (2010), exact and vectorised.

The ground truth is warped toward a binary proposal by flipping *simple points* only: pixels whose
change leaves the topology of both the objects and the background intact. Objects (cell interior) use
4-adjacency, background (membrane) 8-adjacency, as in the paper and in the ISBI 2012 challenge's Fiji
implementation (``trainableSegmentation.metrics.WarpingError``). What cannot be flipped are the
topological disagreements; the *warping error* is their number divided by the number of pixels.

Each remaining mismatch is classified the way the reference classifies it (split, merge, hole added
or removed, object added or removed); the *minimum splits and mergers* variant counts only split and
merge pixels (the reference's ``getMinimumSplitsAndMergersErrorValue`` without clustering).

Speed: whether a pixel is simple depends only on its 8 neighbours, so a lookup table of the 256
neighbourhood configurations answers it. Pixels of the same parity in both coordinates are at least
two apart and do not see each other, so the four sub-lattices (even/odd row x even/odd column) are
processed one after the other, each in one vectorised step over all its candidate pixels. A pass over
the four is exactly a sequential pass in that visiting order; passes repeat until one flips nothing,
as in the reference. The reference visits mismatches by decreasing confidence instead (for binary
proposals: column by column). Any visiting order yields a valid topology-preserving warping; where the
truth can be warped in several ways, the order decides which pixels are left over (where, and rarely
how many), as it does in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unetcli.errors import LabelError

# Neighbour order of the 8-bit neighbourhood code: bit k is set when neighbour k is object.
#   7 0 1
#   6 . 2
#   5 4 3
_RING = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))  # (dy, dx)

# Kinds of remaining mismatch, as the reference classifies them.
OBJECT_ADDITION, OBJECT_DELETION, HOLE_ADDITION, HOLE_DELETION, MERGE, SPLIT = range(6)
KIND_NAMES = ("object_addition", "object_deletion", "hole_addition", "hole_deletion", "merge", "split")


def _ring_components(members: list[int], adjacency: int) -> list[set[int]]:
    """Connected components of the ring positions ``members`` under 4- or 8-adjacency."""
    left = set(members)
    comps = []
    while left:
        seed = left.pop()
        comp, stack = {seed}, [seed]
        while stack:
            k = stack.pop()
            yk, xk = _RING[k]
            for m in list(left):
                ym, xm = _RING[m]
                d = abs(yk - ym) + abs(xk - xm)
                if d == 1 or (adjacency == 8 and abs(yk - ym) == 1 and abs(xk - xm) == 1):
                    left.discard(m)
                    comp.add(m)
                    stack.append(m)
        comps.append(comp)
    return comps


def _simple_lut() -> np.ndarray:
    """``lut[code]``: True when the centre of that 3x3 configuration is a simple point.

    The centre is simple for (4, 8) topology when exactly one 4-component of the object pixels of its
    ring contains a 4-neighbour of the centre (T4 = 1) and the background pixels of its ring form
    exactly one 8-component (T8 = 1) (Bertrand and Malandain 1994; Jain et al. 2010).
    """
    lut = np.zeros(256, dtype=bool)
    four_neighbours = {0, 2, 4, 6}
    for code in range(256):
        obj = [k for k in range(8) if code >> k & 1]
        bg = [k for k in range(8) if not code >> k & 1]
        t4 = sum(1 for comp in _ring_components(obj, 4) if comp & four_neighbours)
        t8 = len(_ring_components(bg, 8))
        lut[code] = t4 == 1 and t8 == 1
    return lut


SIMPLE = _simple_lut()


@dataclass
class WarpResult:
    """The outcome of warping a truth mask toward a proposal mask."""

    warped: np.ndarray          # (H, W) bool: the warped truth (object = True)
    mismatches: np.ndarray      # (M, 2) int: row, column of the pixels that still disagree
    kinds: np.ndarray           # (M,) int: the kind of each mismatch (SPLIT, MERGE, ...)
    passes: int                 # passes over the image until nothing could be flipped

    @property
    def size(self) -> int:
        return int(self.warped.size)

    @property
    def warping_error(self) -> float:
        """Mismatching pixels after warping, divided by the number of pixels."""
        return len(self.kinds) / self.size if self.size else float("nan")

    @property
    def splits(self) -> int:
        return int(np.count_nonzero(self.kinds == SPLIT))

    @property
    def mergers(self) -> int:
        return int(np.count_nonzero(self.kinds == MERGE))

    @property
    def splits_mergers_error(self) -> float:
        """Split and merge pixels after warping, divided by the number of pixels."""
        return (self.splits + self.mergers) / self.size if self.size else float("nan")

    def counts(self) -> dict[str, int]:
        """How many remaining mismatches of each kind."""
        return {name: int(np.count_nonzero(self.kinds == k)) for k, name in enumerate(KIND_NAMES)}


def warp(truth: np.ndarray, proposal: np.ndarray, *, max_passes: int | None = None) -> WarpResult:
    """Warp the binary ``truth`` toward the binary ``proposal`` by flipping simple points.

    Both are (H, W) arrays read as object (True/non-zero: cell interior) and background (membrane).
    Outside the image counts as background, as in the reference. Returns the warped truth and the
    classified pixels where it still disagrees with the proposal.
    """
    truth = np.asarray(truth).astype(bool)
    proposal = np.asarray(proposal).astype(bool)
    if truth.shape != proposal.shape or truth.ndim != 2:
        raise LabelError(f"warp: shapes {truth.shape} and {proposal.shape} differ or are not 2-D")
    h, w = truth.shape
    wp = w + 2
    src = np.zeros((h + 2, w + 2), np.uint8)
    src[1:-1, 1:-1] = truth
    tgt = np.zeros((h + 2, w + 2), np.uint8)
    tgt[1:-1, 1:-1] = proposal
    flat = src.ravel()
    tflat = tgt.ravel()
    offsets = np.array([dy * wp + dx for dy, dx in _RING], np.int64)
    weights = (1 << np.arange(8)).astype(np.int64)

    cand = np.flatnonzero(flat != tflat)  # padding agrees (0 == 0), so only image pixels
    rows, cols = np.divmod(cand, wp)
    lattice = (rows & 1) * 2 + (cols & 1)
    groups = [cand[lattice == k] for k in range(4)]
    passes = 0
    while max_passes is None or passes < max_passes:
        passes += 1
        flipped = 0
        for k in range(4):
            c = groups[k]
            if c.size == 0:
                continue
            code = flat[c[:, None] + offsets] @ weights          # (M,) neighbourhood codes
            ok = SIMPLE[code]
            n_ok = int(np.count_nonzero(ok))
            if n_ok:
                flat[c[ok]] ^= 1
                groups[k] = c[~ok]
                flipped += n_ok
        if flipped == 0:
            break
    warped = src[1:-1, 1:-1].astype(bool)
    left = np.sort(np.concatenate(groups))
    ly, lx = np.divmod(left, wp)
    mism = np.stack([ly - 1, lx - 1], axis=1)
    kinds = classify(warped, mism)
    return WarpResult(warped=warped, mismatches=mism, kinds=kinds, passes=passes)


def classify(warped: np.ndarray, mismatches: np.ndarray) -> np.ndarray:
    """The kind of each remaining mismatch, by the reference's rules.

    With the 4-connected components of the warped truth and ``ids`` the distinct component ids
    (0 = background) among a pixel's 8 neighbours inside the image:

    - ids = {0}: object deletion (pixel is object) or object addition (pixel is background);
    - one object id: hole addition (object) or hole deletion (background);
    - two ids: hole addition for a background pixel; for an object pixel, removing it is tried: if its
      neighbours then see more than two ids it is a split, otherwise a hole deletion;
    - more than two ids: merge (background pixel) or split (object pixel).
    """
    from scipy import ndimage

    mismatches = np.asarray(mismatches, np.int64).reshape(-1, 2)
    kinds = np.zeros(len(mismatches), np.int64)
    if len(mismatches) == 0:
        return kinds
    h, w = warped.shape
    comps, _ = ndimage.label(warped, structure=ndimage.generate_binary_structure(2, 1))
    padded = np.full((h + 2, w + 2), -1, np.int64)  # -1: outside the image, not a neighbour
    padded[1:-1, 1:-1] = comps
    y, x = mismatches[:, 0] + 1, mismatches[:, 1] + 1
    nb = np.stack([padded[y + dy, x + dx] for dy, dx in _RING], axis=1)  # (M, 8)
    centre = padded[y, x]
    srt = np.sort(nb, axis=1)
    distinct = (srt[:, 1:] != srt[:, :-1]) & (srt[:, 1:] >= 0)
    n_ids = distinct.sum(axis=1) + (srt[:, 0] >= 0)
    has_bg = (nb == 0).any(axis=1)
    is_obj = centre > 0
    only_bg = (n_ids <= 1) & ~(nb > 0).any(axis=1)     # an empty neighbourhood counts as background
    one_obj = (n_ids == 1) & ~has_bg
    kinds[only_bg & is_obj] = OBJECT_DELETION
    kinds[only_bg & ~is_obj] = OBJECT_ADDITION
    kinds[one_obj & is_obj] = HOLE_ADDITION
    kinds[one_obj & ~is_obj] = HOLE_DELETION
    two = n_ids == 2
    kinds[two & ~is_obj] = HOLE_ADDITION
    many = n_ids > 2
    kinds[many & ~is_obj] = MERGE
    kinds[many & is_obj] = SPLIT
    todo = np.flatnonzero(two & is_obj)
    if todo.size:
        boxes = ndimage.find_objects(comps)
        for i in todo:
            kinds[i] = SPLIT if _splits_when_removed(comps, boxes, int(y[i]) - 1, int(x[i]) - 1) \
                else HOLE_DELETION
    return kinds


def _splits_when_removed(comps: np.ndarray, boxes: list, py: int, px: int) -> bool:
    """Whether the neighbours of object pixel (py, px) see more than two ids once it is background.

    Removing a pixel only cuts components, so only the components around it need relabelling, inside
    the box that holds them all (exact, as relabelling the whole image).
    """
    from scipy import ndimage

    h, w = comps.shape
    y0, y1, x0, x1 = max(py - 1, 0), min(py + 2, h), max(px - 1, 0), min(px + 2, w)
    ids = set(np.unique(comps[y0:y1, x0:x1]).tolist()) | {int(comps[py, px])}
    ids.discard(0)
    ys, xs = [y0], [x0]
    ye, xe = [y1], [x1]
    for i in ids:
        box = boxes[i - 1]
        ys.append(box[0].start)
        ye.append(box[0].stop)
        xs.append(box[1].start)
        xe.append(box[1].stop)
    by0, by1, bx0, bx1 = min(ys), max(ye), min(xs), max(xe)
    sub = comps[by0:by1, bx0:bx1]
    mask = np.isin(sub, list(ids))
    mask[py - by0, px - bx0] = False
    relab, _ = ndimage.label(mask, structure=ndimage.generate_binary_structure(2, 1))
    window = relab[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0].copy()
    window[py - y0, px - x0] = -1  # the pixel itself is not its own neighbour
    values = window[window >= 0]
    return len(np.unique(values)) > 2
