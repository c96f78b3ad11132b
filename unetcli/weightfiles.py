"""Weight maps for a list of label files: the work of ``unet weights``.

Two passes over the inputs. The first reads every label image (each page of a stack), makes its
training target (carved borders, :func:`unetcli.labels.training_target`), checks the memory its
largest distance transform needs and counts the classes; nothing is written before every input has
passed. The second computes each page's weight map (:func:`unetcli.weightmap.weight_map`, with class
weights per image, over the data set or none), writes one float32 TIFF per input (a stack for a stack)
and, when asked, the targets and a preview picture of the first input. Targets of the first pass are
kept for the second up to a memory cap; the rest are made again.

The caller plans the output names (one file, or a folder's files) and resolves stdin and stdout: an
input named ``-`` is read from the ``stdin`` bytes passed in, an output may be a binary stream.
Nothing here prints; paths written, notes and progress go through callbacks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, ContextManager, Sequence, Union

import numpy as np

from unetcli.errors import ConfigError, LabelError
from unetcli.guards import check_finite, check_memory, check_outputs, declared_shape
from unetcli.images import TIFF, encode_image, format_from_name, read_image, write_image
from unetcli.labels import label_planes, num_classes, training_target
from unetcli.weightmap import (class_counts, class_weights_for, largest_window, peak_bytes, preview as picture,
                               weight_map)

Destination = Union[Path, BinaryIO]                 # a file, or a stream the caller owns (stdout)
Plan = Union[list, Destination]                     # a folder's files (one per input), or one destination
Note = Callable[[str, str], None]                   # (level 'info' or 'detail', text)
Progress = Callable[[int, str], ContextManager[Callable[[int], None]]]   # (total, label) -> advance(n)

CACHE_BYTES = 512 * 2**20   # targets of the first pass kept for the second, at the most


@dataclass(frozen=True)
class Settings:
    """What the maps are made of: the target rule and the weight map's parameters."""

    foreground: Sequence[int] | None = None
    classes: Sequence[int] | None = None
    balance: str = "image"
    w0: float = 10.0
    sigma: float = 5.0
    border_width: int = 2


@dataclass
class _Inputs:
    """The label files, read on demand; their targets, kept up to :data:`CACHE_BYTES`."""

    paths: list[str]
    stdin: bytes | None
    settings: Settings
    cache: dict = field(default_factory=dict)
    cached: int = 0
    decoded_stdin: np.ndarray | None = None

    def name(self, i: int) -> str:
        return "<stdin>" if self.paths[i] == "-" else self.paths[i]

    def load(self, i: int) -> np.ndarray:
        if self.paths[i] != "-":
            return read_image(self.paths[i])
        if self.decoded_stdin is None:
            self.decoded_stdin = read_image("-", stdin_bytes=self.stdin)
        return self.decoded_stdin

    def targets(self, i: int) -> list:
        """``[(target, instances or None)]``, one per page of input ``i``."""
        if i in self.cache:
            return self.cache[i]
        s = self.settings
        return [training_target(plane, foreground=s.foreground, classes=s.classes,
                                border_width=s.border_width, name=self.name(i))
                for plane in label_planes(self.load(i), self.name(i))]

    def keep(self, i: int, planes: list) -> None:
        size = sum(t.nbytes + (0 if inst is None else inst.nbytes) for t, inst in planes)
        if self.cached + size <= CACHE_BYTES:
            self.cache[i], self.cached = planes, self.cached + size


def _quiet(level: str, text: str) -> None:
    return None


def _no_progress(total: int, label: str) -> ContextManager[Callable[[int], None]]:
    return contextlib.nullcontext(lambda n=1: None)


def weight_files(inputs: Sequence[str], outputs: Plan, settings: Settings, *, masks: Plan | None = None,
                 stdin: bytes | None = None, preview: Path | None = None, image: Path | None = None,
                 sources: Sequence = (), on_written: Callable[[str], None] | None = None,
                 on_note: Note | None = None, progress: Progress | None = None) -> int:
    """Write the weight map of every input to ``outputs``; returns how many were written.

    ``outputs``: one destination for one input, or a list of paths (one per input). ``masks``: where the
    targets go, alike, except that a list holds paths without extension (``.png`` for one page,
    ``.tif`` for a stack is added). ``preview``: a PNG of the first input's weights, drawn over
    ``image`` if given. ``sources``: every path the caller reads (as given, folders included), which no
    output may replace. Callbacks: ``on_written(path)`` after each weight map written to a file,
    ``on_note(level, text)``, ``progress(total, label)`` yielding ``advance(n)`` per input.
    """
    on_note, progress = on_note or _quiet, progress or _no_progress
    data = _Inputs(list(inputs), stdin, settings)
    declared = [declared_shape(stdin if p == "-" else p, "<stdin>" if p == "-" else None) for p in inputs]
    _check_paths(outputs, masks, [d[0] if d is not None else 1 for d in declared], sources, image, preview)
    for i, d in enumerate(declared):
        if d is not None:
            check_memory(least_bytes(*d), f"weight maps of {d[0]} x {d[1]}x{d[2]} pixels", data.name(i))
    counts, pages, first_shape = _first_pass(data, masks, progress)
    base = None
    if image is not None:
        base = read_image(image)[0]
        if base.shape[:2] != first_shape:
            raise LabelError(f"{inputs[0]}: label image is {first_shape[0]}x{first_shape[1]} pixels but "
                             f"--image {image} is {base.shape[0]}x{base.shape[1]}",
                             hint="give the raw image these labels belong to")
    _check_paths(outputs, masks, pages, sources, image, preview)   # again, with the page counts read
    masks = _with_extensions(masks, pages)
    for plan in (outputs, masks):
        if isinstance(plan, list):
            plan[0].parent.mkdir(parents=True, exist_ok=True)
    on_note("detail", f"class pixel counts over all inputs: {', '.join(str(int(c)) for c in counts)}")
    written = 0
    with progress(len(inputs), "weight maps") as advance:
        for i in range(len(inputs)):
            _second_pass(data, i, counts, _pick(outputs, i), _pick(masks, i),
                         preview if i == 0 else None, base, on_note)
            if isinstance(_pick(outputs, i), Path) and on_written is not None:
                on_written(str(_pick(outputs, i)))
            written += 1
            advance()
    return written


def _pick(plan: Plan | None, i: int) -> Destination | None:
    return plan[i] if isinstance(plan, list) else plan


def _with_extensions(masks: Plan | None, pages: list[int]) -> Plan | None:
    """A folder's target paths with the extension they get: ``.tif`` for a stack, ``.png`` for one page."""
    if not isinstance(masks, list):
        return masks
    return [m.with_name(m.name + (".tif" if n > 1 else ".png")) for m, n in zip(masks, pages)]


def _check_paths(outputs: Plan, masks: Plan | None, pages: list[int], sources: Sequence,
                 image: Path | None, preview: Path | None) -> None:
    """Refuse outputs that would replace an input or each other (streams are nobody's file)."""
    def files(plan) -> list:
        return [p for p in (plan if isinstance(plan, list) else [plan]) if isinstance(p, Path)]

    check_outputs([*sources, image], [*files(outputs), *files(_with_extensions(masks, pages)), preview])


def _first_pass(data: _Inputs, masks: Plan | None, progress: Progress) -> tuple[np.ndarray, list[int], tuple]:
    """Read and check every input; returns the class counts over all, the page counts, the first shape."""
    s = data.settings
    counts = np.zeros(num_classes(s.classes), np.int64)
    pages: list[int] = []
    first_shape = None
    with progress(len(data.paths), "checking labels") as advance:
        for i in range(len(data.paths)):
            planes = data.targets(i)
            pages.append(len(planes))
            # now the objects are known: the memory of the largest distance transform, exactly
            h, w = planes[0][0].shape
            window = max((largest_window(inst, s.w0, s.sigma) for _, inst in planes if inst is not None),
                         default=0)
            check_memory(least_bytes(len(planes), h, w) + peak_bytes(0, 0, window),
                         f"weight maps of {len(planes)} x {h}x{w} pixels (an object's distance "
                         f"transform over {window:,} of them)", data.name(i))
            if first_shape is None:
                first_shape = planes[0][0].shape
            counts += class_counts((t for t, _ in planes), len(counts))
            data.keep(i, planes)
            if masks is not None and len(planes) > 1:
                target = _pick(masks, i)
                if isinstance(masks, Path) and format_from_name(target) != TIFF:
                    raise ConfigError(f"{target}: {data.paths[i]} is a stack of {len(planes)} pages; PNG "
                                      "holds one", hint="name the --mask-out file something.tif")
            advance()
    return counts, pages, first_shape


def _second_pass(data: _Inputs, i: int, counts: np.ndarray, dest: Destination, mask_dest: Destination | None,
                 preview: Path | None, base: np.ndarray | None, on_note: Note) -> None:
    """Compute and write input ``i``'s weight maps (and targets, and the preview)."""
    s = data.settings
    planes = data.targets(i)
    maps, targets = [], []
    for target, instances in planes:
        cw = class_weights_for(s.balance, target, len(counts), counts)
        with np.errstate(over="ignore", invalid="ignore"):   # checked below instead
            maps.append(weight_map(target, instances, w0=s.w0, sigma=s.sigma, class_weights=cw))
        targets.append(target * 255 if s.classes is None else target)
    stack = np.stack(maps)
    check_finite(stack, str(dest) if isinstance(dest, Path) else "<stdout>",
                 hint=f"weights above float32's largest value (3.4e38): lower --w0 {s.w0:g}")
    objects = sum(int(inst.max()) for _, inst in planes if inst is not None and inst.size)
    on_note("detail", f"{data.paths[i]}: {len(planes)} page(s), {objects} object(s), weights "
                      f"{float(stack.min()):.4g} to {float(stack.max()):.4g}")
    layout = "ZYX" if len(maps) > 1 else "YX"
    _put(dest, stack if len(maps) > 1 else stack[0], layout, TIFF)
    if mask_dest is not None:
        mstack = np.stack(targets)
        _put(mask_dest, mstack if len(targets) > 1 else mstack[0], layout, "png" if len(targets) == 1 else TIFF)
    if preview is not None:
        write_image(preview, picture(maps[0], planes[0][0], base), "YXC")
        on_note("info", f"preview: {preview} (weights {float(maps[0].min()):.3g} dark to "
                        f"{float(maps[0].max()):.3g} bright)")


def _put(dest: Destination, data: np.ndarray, layout: str, stream_format: str) -> None:
    """Write to a file (its format from its name) or to a stream (in ``stream_format``)."""
    if isinstance(dest, Path):
        write_image(dest, data, layout)
        return
    dest.write(encode_image(data, stream_format, layout, name="<stdout>"))
    dest.flush()


def least_bytes(pages: int, height: int, width: int) -> float:
    """The memory `unet weights` needs for one input at the least, before its objects are known.

    Per page kept for the whole input: the label as decoded (1 byte at the least), its target and
    instance map (5), its float32 map and the stack of them (8), its 0/255 target and that stack (2),
    and the compressed TIFF (at most 4); plus one map's computation (weightmap.peak_bytes without the
    object windows, which :func:`weightmap.largest_window` adds once the objects are known).
    """
    return 20.0 * pages * height * width + peak_bytes(height, width)
