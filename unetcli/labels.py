"""Label images to training targets: objects, background, classes, and separation borders.

One function, :func:`training_target`, turns any label image into the target the network learns and
the instance map the weight map needs. ``unet weights`` and training both call it, so the carved
borders a model is trained on are the ones its weight maps were computed for.

Kinds of label image
--------------------
*Instance labels* (0 = background, one id per object; 8-, 16- or 32-bit, or whole-number floats): each
id is one object, wherever its pixels are. Objects that touch (no background pixel between them, as in
most nucleus and cell annotations) are separated by carving a border between them, see below.

*Binary masks*: an image whose non-zero pixels all hold one value (0/1, 0/255). Its objects are the
connected components of the object pixels, with **4-connectivity** (pixels sharing an edge). Why 4: in
masks such as the ISBI 2012 labels, objects are separated by thin background lines drawn by hand, and a
one-pixel line that runs diagonally is a staircase whose steps meet only at corners. Under
8-connectivity the object pixels on either side of such a line touch diagonally and two cells would
merge into one; under 4-connectivity they stay apart. (The price is that an object pinched to a single
diagonal contact counts as two; that costs a border term on a few pixels, never a merged pair.)
Binary masks are not carved: their objects are separated already, and the annotator's lines are kept
exactly as drawn.

*The ISBI convention* (255 = cell interior, 0 = membrane) is a binary mask: 255 pixels are objects, one
per connected cell interior, and the membrane (0) is background, which is where the border term of the
weight map falls. That is the default for any two-valued mask (non-zero = object). ``foreground``
(``--foreground``) names the object values explicitly: ``--foreground 255`` says the same as the
default, ``--foreground 0`` makes the zeros the objects (for masks drawn the other way round), and
``--foreground 1,2`` merges several values of an instance or class map into one binary mask.

*Multi-class maps* (``classes``, ``--classes 0,1,2``): every pixel holds one of the listed values, and the
target is its index in the list (so the first value is class 0, the background). Their instance map is
None: the border term needs objects, which a class map does not define, so only class balance applies.

Separation borders
------------------
Where two objects of an instance image touch, a border of ``border_width`` pixels is carved out of
them (set to background). A pixel of object ``i`` becomes border when an object ``j != i`` lies within
chessboard distance ``ceil(width / 2)`` if ``j < i``, or ``floor(width / 2)`` if ``j > i``: each side
gives up half the width, and for an odd width the object with the larger id gives up the extra pixel.
Along a straight contact this leaves exactly ``width`` background pixels between the two objects
(where two objects meet, any two remaining pixels of theirs joined by a straight chessboard path
through the two objects are at least ``width + 1`` apart), and for any width >= 1 no two remaining
pixels of different objects are neighbours, so touching objects end up separate under 8- and
4-connectivity alike. Pixels farther than ``ceil(width/2)`` from every other object never change, and
objects already apart are left as they are.

The default width is **2**. With an even width each of two touching objects gives up the same one-pixel
rim, so the carved target does not depend on the (arbitrary) order of the ids and every object shrinks
the same way, which a prediction can undo by growing each object by one pixel. A width of 1 would have
to take the pixel from one side only, chosen by id. Two pixels is still thin next to objects a few
pixels across, like the smallest nuclei of the DSB 2018 sample.
"""

from __future__ import annotations

import numpy as np

from unetcli.errors import ConfigError, LabelError

DEFAULT_BORDER_WIDTH = 2
MAX_BORDER_WIDTH = 64


def parse_values(text: str | None, *, option: str = "label values") -> list[int] | None:
    """The integers of a ``--foreground``/``--classes`` string such as ``"0,128,255"``; None for None/empty.

    Raises ConfigError for anything but comma-separated whole numbers >= 0, and for repeated values.
    """
    if text is None or not str(text).strip():
        return None
    values: list[int] = []
    for part in str(text).split(","):
        item = part.strip()
        try:
            value = int(item)
        except ValueError:
            raise ConfigError(f"{option}: {item!r} is not a whole number",
                              hint="give label values as comma-separated integers, e.g. 0,1,2") from None
        if value < 0:
            raise ConfigError(f"{option}: {value} is negative; label values are >= 0")
        if value in values:
            raise ConfigError(f"{option}: {value} is given twice")
        values.append(value)
    return values


def num_classes(classes: list[int] | None) -> int:
    """How many classes a target has: 2 (background, object) unless a class list is given."""
    return 2 if classes is None else len(classes)


def label_planes(arr: np.ndarray, name: str = "labels") -> np.ndarray:
    """The 2-D label planes of an ``(N, H, W, C)`` image as an ``(N, H, W)`` array.

    Several channels are accepted only if they are all equal (a grey label saved as RGB); otherwise
    LabelError names ``name``.
    """
    arr = np.asarray(arr)
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3:
        return arr
    if arr.ndim != 4:
        raise LabelError(f"{name}: label image of shape {arr.shape} is not a 2-D image or stack")
    if arr.shape[3] > 1:
        if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, arr.shape[3])):
            raise LabelError(f"{name}: label image has {arr.shape[3]} channels that differ; labels need "
                             "one value per pixel", hint="save the labels as a grey (one-channel) image")
    return arr[..., 0]


def integer_labels(label: np.ndarray, name: str = "labels") -> np.ndarray:
    """``label`` as a non-negative integer array; LabelError for fractions, negatives or non-finite values."""
    label = np.asarray(label)
    if label.dtype == bool:
        return label.astype(np.uint8)
    if label.dtype.kind == "f":
        if not np.isfinite(label).all():
            raise LabelError(f"{name}: labels contain NaN or infinite values")
        if not np.array_equal(label, np.floor(label)):
            frac = label[label != np.floor(label)].flat[0]
            raise LabelError(f"{name}: labels contain fractions (e.g. {frac:g}); labels are whole numbers",
                             hint="give an instance, binary or class image, not a probability map")
        if label.size and label.max() > np.iinfo(np.int64).max / 2:
            raise LabelError(f"{name}: label values too large ({label.max():g})")
        label = label.astype(np.int64)
    elif label.dtype.kind not in "ui":
        raise LabelError(f"{name}: labels of type {label.dtype} are not numbers")
    if label.dtype.kind == "i" and label.size and label.min() < 0:
        raise LabelError(f"{name}: labels contain negative values (e.g. {label.min()})",
                         hint="labels are 0 for background and positive ids or classes")
    return label


def carve_borders(instances: np.ndarray, width: int) -> np.ndarray:
    """The separation borders between touching objects of an instance map, as a boolean (H, W) mask.

    True marks object pixels to turn into background: a pixel of object ``i`` is border when another
    object ``j`` lies within chessboard distance ``ceil(width/2)`` (``j < i``) or ``floor(width/2)``
    (``j > i``). See the module docstring for what this guarantees. ``width`` 0 carves nothing.
    """
    inst = np.asarray(instances)
    if inst.ndim != 2:
        raise ValueError(f"carve_borders needs a 2-D instance map, not shape {inst.shape}")
    border = np.zeros(inst.shape, dtype=bool)
    if width <= 0 or inst.size == 0:
        return border
    hi, lo = (width + 1) // 2, width // 2
    h, w = inst.shape
    padded = np.pad(inst, hi)
    objects = inst != 0
    for dy in range(-hi, hi + 1):
        for dx in range(-hi, hi + 1):
            if dy == 0 and dx == 0:
                continue
            near = padded[hi + dy:hi + dy + h, hi + dx:hi + dx + w]
            other = (near != inst) & (near != 0)
            if max(abs(dy), abs(dx)) > lo:  # only the higher id gives up the odd pixel
                other &= near < inst
            border |= other
    border &= objects
    return border


def relabel(inst: np.ndarray) -> np.ndarray:
    """Renumber the ids of an instance map to 1..K in their original order (0 stays 0); int32."""
    if inst.size == 0:
        return inst.astype(np.int32)
    top = int(inst.max())
    if top == 0:
        return np.zeros(inst.shape, np.int32)
    if top < (1 << 24):
        present = np.zeros(top + 1, bool)
        present[inst.ravel()] = True
        present[0] = False
        lut = np.zeros(top + 1, np.int32)
        lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
        return lut[inst]
    ids, inverse = np.unique(inst, return_inverse=True)
    offset = 0 if ids[0] == 0 else 1
    return (inverse.reshape(inst.shape) + offset).astype(np.int32)


def training_target(label: np.ndarray, *, foreground: list[int] | None = None,
                    classes: list[int] | None = None, border_width: int = DEFAULT_BORDER_WIDTH,
                    name: str = "labels", target: str = "two-class") -> tuple[np.ndarray, np.ndarray | None]:
    """The training target and instance map of one 2-D label image.

    Returns ``(target, instances)``:

    - instance labels and binary masks (no ``classes``): ``target`` is uint8 (H, W) with 0 = background
      and 1 = object, touching objects of an instance image separated by carved borders of
      ``border_width`` pixels (binary masks are not carved); ``instances`` is int32 (H, W), 0 on
      background and 1..K on the objects of the target (ids renumbered in their original order).
    - ``foreground`` values: the pixels holding them are the objects of a binary mask (4-connected
      components), every other value is background.
    - ``classes`` values: a multi-class map; ``target`` holds each pixel's index in ``classes``;
      ``instances`` is None.

    - ``target="three-class"`` (instance labels and binary masks): ``target`` holds 0 = background,
      1 = object interior, 2 = the object's rim (``instances.border_target``, one pixel: touching objects
      are two border pixels apart); nothing is carved and ``instances`` keeps every object whole.

    Raises LabelError naming ``name`` for fractional, negative or non-finite labels, for values not in
    ``classes``, and for more than 255 classes; ConfigError for ``foreground`` with ``classes``.
    """
    label = integer_labels(label, name)
    if label.ndim != 2:
        raise LabelError(f"{name}: expected a 2-D label image, got shape {label.shape}")
    if foreground is not None and classes is not None:
        raise ConfigError("--foreground and --classes exclude each other",
                          hint="--foreground makes a two-class target, --classes a multi-class one")
    if border_width < 0 or border_width > MAX_BORDER_WIDTH:
        raise ConfigError(f"--border-width {border_width}: must be between 0 and {MAX_BORDER_WIDTH} pixels")

    if classes is not None:
        if len(classes) < 2:
            raise ConfigError("--classes needs at least two values (background first)")
        if len(classes) > 255:
            raise LabelError(f"{name}: {len(classes)} classes do not fit a uint8 target (at most 255)")
        values = np.asarray(classes, dtype=np.int64)
        order = np.argsort(values)
        pos = np.searchsorted(values[order], label)
        pos = np.minimum(pos, len(values) - 1)
        known = values[order][pos] == label
        if not known.all():
            unknown = np.unique(label[~known])
            shown = ", ".join(str(v) for v in unknown[:5]) + (", ..." if unknown.size > 5 else "")
            raise LabelError(f"{name}: label values {shown} are not in --classes "
                             f"{','.join(str(c) for c in classes)}",
                             hint="list every value the image holds, background first")
        return order[pos].astype(np.uint8), None

    from scipy import ndimage

    from unetcli.instances import TARGETS, border_target

    if target not in TARGETS:
        raise ConfigError(f"--target must be one of {', '.join(TARGETS)}, not {target!r}")
    three = target == "three-class"
    if foreground is not None:
        mask = np.isin(label, np.asarray(foreground, dtype=np.int64))
        instances, _ = ndimage.label(mask)  # default structure in 2-D: 4-connectivity
        instances = instances.astype(np.int32)
        return (border_target(instances) if three else mask.astype(np.uint8)), instances

    objects = label != 0
    values = label[objects]
    if values.size == 0 or values.min() == values.max():  # binary mask (or empty): components
        instances, _ = ndimage.label(objects)
        instances = instances.astype(np.int32)
        return (border_target(instances) if three else objects.astype(np.uint8)), instances
    if three:
        instances = relabel(label)
        return border_target(instances), instances

    carved = np.where(carve_borders(label, border_width), 0, label)
    instances = relabel(carved)
    return (instances > 0).astype(np.uint8), instances
