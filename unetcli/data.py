"""Training data: pairing images with labels (and weight maps), checking them, and sampling tiles.

Everything here is checked before any training starts, so that a bad input is one line naming the file
and not a crash an hour later: unpaired files, labels whose size differs from their image, images with
different channel counts, label values that are not classes.

Inputs are either folders, paired by file stem (``images/07.png`` with ``labels/07.tif``), or multi-page
stacks, paired page by page. Each pair becomes a :class:`Sample`: the image scaled to [0, 1] by its
type's range, the class-index target (with separation borders carved between touching objects by
``labels.training_target``, the same function as ``unet weights``), the instance labels used for it, and
the loss weights.

Tiles are sampled by :class:`TileSampler`: the random generator of sample ``i`` is seeded with
``(seed, rank, i)``, so a tile depends only on its number. That makes training reproducible with any
number of worker processes, lets every process of a distributed run draw different tiles, and makes a
resumed run draw exactly the tiles the uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from unetcli.errors import ConfigError, ImageReadError, ImageShapeError, LabelError
from unetcli.images import image_files, read_image


@dataclass
class Sample:
    """One training or validation image with everything the loss and the metrics need."""

    name: str
    image: np.ndarray                 # (H, W, C) float32, raw values scaled to [0, 1] (see ``scale``)
    target: np.ndarray                # (H, W) uint8 class indices
    instances: np.ndarray | None      # (H, W) int32 object ids the target was made from, or None
    label: np.ndarray                 # (H, W) the label image as read (for metrics on the truth)
    weights: np.ndarray | None = None  # (H, W) float32 loss weights, or None for uniform
    scale: float = 1.0                # raw pixel value = image * scale
    dtype: str = ""                   # the pixel type of the file it was read from


# ------------------------------------------------------------------------------------------ pairing

def _list_images(folder: Path) -> dict[str, Path]:
    files = {}
    for p in image_files(folder):
        if p.stem in files:
            raise ImageReadError(f"{folder}: two files share the stem {p.stem!r} "
                                 f"({files[p.stem].name}, {p.name})", hint="rename one of them")
        files[p.stem] = p
    return files


def pair_files(images: str | os.PathLike, labels: str | os.PathLike,
               weights: str | os.PathLike | None = None) -> list[tuple[str, Path, Path, Path | None]]:
    """Pair image, label (and weight) files: folders by file stem, or one file each (a stack).

    Returns ``(name, image path, label path, weight path or None)``; a stack pair is one entry whose
    pages are split later. A file without its partner is an error naming it.
    """
    ipath, lpath = Path(images), Path(labels)
    wpath = Path(weights) if weights is not None else None
    for p, what in ((ipath, "images"), (lpath, "labels"), (wpath, "weights")):
        if p is not None and not p.exists():
            raise ImageReadError(f"{p}: no such file or folder (--{what})", hint="check the path")
    if ipath.is_dir() != lpath.is_dir() or (wpath is not None and wpath.is_dir() != ipath.is_dir()):
        raise ConfigError(f"{ipath} and {lpath}{' and ' + str(wpath) if wpath else ''}: give folders "
                          "for all of them or files (stacks) for all of them")
    if not ipath.is_dir():
        return [(ipath.stem, ipath, lpath, wpath)]
    imgs, labs = _list_images(ipath), _list_images(lpath)
    wts = _list_images(wpath) if wpath is not None else None
    if not imgs:
        raise ImageReadError(f"{ipath}: folder holds no image files (.tif, .png, .jpg, .bmp)")
    for stem, p in imgs.items():
        if stem not in labs:
            raise LabelError(f"{p}: no label file with the stem {stem!r} in {lpath}",
                             hint="images and labels are paired by file name without extension")
        if wts is not None and stem not in wts:
            raise LabelError(f"{p}: no weight map with the stem {stem!r} in {wpath}")
    for stem, p in labs.items():
        if stem not in imgs:
            raise LabelError(f"{p}: label file without an image of the stem {stem!r} in {ipath}",
                             hint="remove it or add its image")
    return [(stem, imgs[stem], labs[stem], wts[stem] if wts is not None else None) for stem in imgs]


def _pages(path: Path) -> np.ndarray:
    return read_image(path)


def value_scale(arr: np.ndarray) -> float:
    """The factor taking [0, 1] back to raw values: the type's maximum for integers, 1 for floats."""
    if arr.dtype.kind in "ui":
        return float(np.iinfo(arr.dtype).max)
    if arr.dtype == bool:
        return 1.0
    return 1.0


def _drop_alpha(arr: np.ndarray) -> np.ndarray:
    """RGBA with an opaque alpha channel -> RGB; grey+alpha -> grey."""
    if arr.shape[-1] in (2, 4):
        alpha = arr[..., -1]
        top = np.iinfo(arr.dtype).max if arr.dtype.kind in "ui" else 1.0
        if np.all(alpha == top):
            return arr[..., :-1]
    return arr


def load_pairs(pairs, *, foreground=None, classes=None, border_width=None, norm: dict | None = None,
               channels: Sequence[int] | None = None, target: str = "two-class") -> list[Sample]:
    """Read every pair (stacks split into pages) and build its class-index target.

    ``foreground``/``classes`` are the label conventions of ``unet weights`` (parsed value lists or
    None); ``channels`` (0-based) picks and orders the image channels; ``target`` is 'two-class' or 'three-class'
    (``labels.training_target``). With a per-image ``norm`` (``normalize``: percentile or z-score) each
    page is stored normalised (``scale`` 1); otherwise scaled to [0, 1] by its type's maximum.
    """
    from unetcli import normalize
    from unetcli import labels as labelmod

    out: list[Sample] = []
    kwargs = {"target": target}
    per_image = norm is not None and normalize.kind(norm) != "dataset"
    if border_width is not None:
        kwargs["border_width"] = border_width
    for stem, ipath, lpath, wpath in pairs:
        img = _pages(ipath)
        lab = labelmod.label_planes(_pages(lpath), str(lpath))            # (N, H, W)
        wts = labelmod.label_planes(_pages(wpath), str(wpath)) if wpath is not None else None
        if img.shape[0] != lab.shape[0]:
            raise LabelError(f"{lpath}: {lab.shape[0]} page(s), but its image {ipath} has {img.shape[0]}")
        if wts is not None and wts.shape[0] != img.shape[0]:
            raise LabelError(f"{wpath}: {wts.shape[0]} page(s), but its image {ipath} has {img.shape[0]}")
        many = img.shape[0] > 1
        img = _drop_alpha(img)
        if channels is not None:
            img, _ = normalize.adapt_channels(img, len(channels), channels, str(ipath))
        scale = 1.0 if per_image else value_scale(img)
        for page in range(img.shape[0]):
            name = f"{stem}[{page}]" if many else stem
            where = f"{lpath} page {page}" if many else str(lpath)
            if lab.shape[1:3] != img.shape[1:3]:
                raise LabelError(f"{where}: labels are {lab.shape[2]}x{lab.shape[1]} but the image "
                                 f"{ipath} is {img.shape[2]}x{img.shape[1]} (width x height)",
                                 hint="each label image must have its image's size")
            label = lab[page]
            target, instances = labelmod.training_target(label, foreground=foreground, classes=classes,
                                                         name=where, **kwargs)
            w = None
            if wts is not None:
                wplane = wts[page]
                if wplane.shape != label.shape:
                    raise LabelError(f"{wpath}: weight map is {wplane.shape[1]}x{wplane.shape[0]}, its image "
                                     f"{ipath} is {img.shape[2]}x{img.shape[1]}")
                w = wplane.astype(np.float32)
                if not np.isfinite(w).all() or (w < 0).any():
                    raise LabelError(f"{wpath}: weight map holds negative or non-finite values")
            if per_image:
                image = normalize.apply(norm, img[page])
            else:
                image = img[page].astype(np.float32) / np.float32(scale)
            out.append(Sample(name=name, image=image, target=np.ascontiguousarray(target, np.uint8),
                              instances=instances, label=label, weights=w, scale=scale,
                              dtype=img.dtype.name))
    return out


def check_samples(samples: Sequence[Sample], num_classes: int, what: str = "training") -> int:
    """All images have one channel count and targets lie in 0..num_classes-1; return the channels."""
    if not samples:
        raise ConfigError(f"no {what} images left", hint="check --val-index / --val-split")
    chans = {s.image.shape[-1] for s in samples}
    if len(chans) > 1:
        names = ", ".join(f"{s.name}: {s.image.shape[-1]}" for s in samples[:6])
        raise ImageShapeError(f"{what} images have different channel counts ({names})",
                              hint="convert them all to grey or all to RGB")
    for s in samples:
        top = int(s.target.max()) if s.target.size else 0
        if top >= num_classes:
            raise LabelError(f"{s.name}: class index {top} but the network has {num_classes} classes")
    return chans.pop()


def normalization(samples: Sequence[Sample]) -> dict:
    """Per-channel mean and standard deviation of the raw pixel values of the training images."""
    c = samples[0].image.shape[-1]
    total = np.zeros(c)
    sq = np.zeros(c)
    n = 0
    for s in samples:
        x = s.image.reshape(-1, c).astype(np.float64) * s.scale
        total += x.sum(0)
        sq += (x * x).sum(0)
        n += x.shape[0]
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean * mean, 0.0))
    std = np.where(std > 1e-12, std, 1.0)
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def tile_mean_std(norm: dict, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(mean, std)`` that training tiles are normalised with: the dataset statistics of an old
    (``dataset``) rule; zeros and ones for per-image rules, whose samples are stored normalised."""
    from unetcli import normalize

    if normalize.kind(norm) == "dataset":
        return np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)
    return np.zeros(channels, np.float32), np.ones(channels, np.float32)


def parse_index(text: str, count: int) -> list[int]:
    """'25-29', '3,5,9', '-5:' style page selections -> sorted list of indices in [0, count)."""
    chosen: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo, hi = int(a), int(b)
                chosen.update(range(lo, hi + 1))
            else:
                i = int(part)
                chosen.add(i if i >= 0 else count + i)
        except ValueError as exc:
            raise ConfigError(f"--val-index {text!r}: not a list of indices or ranges",
                              hint="write e.g. 25-29 or 0,5,9") from exc
    bad = [i for i in chosen if not 0 <= i < count]
    if bad:
        raise ConfigError(f"--val-index {text!r}: index {bad[0]} is outside 0..{count - 1}")
    return sorted(chosen)


def count_pages(pairs) -> int:
    """Number of (image, label) pages across the pairs, without decoding pixels where possible."""
    import tifffile

    total = 0
    for _stem, ipath, _l, _w in pairs:
        n = 1
        if str(ipath).lower().endswith((".tif", ".tiff")):
            try:
                with tifffile.TiffFile(ipath) as tf:
                    shape, axes = tf.series[0].shape, tf.series[0].axes
                    n = int(np.prod([s for s, a in zip(shape, axes) if a not in "YXSC"] or [1]))
            except Exception:  # an unreadable file is reported properly when it is read
                n = 1
        total += n
    return total


def split_validation(count: int, fraction: float, seed: int) -> list[int]:
    """Indices of a random ``fraction`` of ``count`` pages (at least one) for validation."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"--val-split must be between 0 and 1, not {fraction}")
    k = max(1, int(round(fraction * count)))
    if k >= count:
        raise ConfigError(f"--val-split {fraction} leaves no training images out of {count}")
    rng = np.random.default_rng([seed, 7])
    return sorted(int(i) for i in rng.choice(count, size=k, replace=False))


def fingerprint(samples: Sequence[Sample]) -> str:
    """A short hash of the training pixels and targets (names the weight cache)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.name.encode())
        h.update(np.ascontiguousarray(s.image).tobytes())
        h.update(np.ascontiguousarray(s.target).tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------- weight maps

def auto_weights(samples: Sequence[Sample], *, w0: float, sigma: float, balance: str,
                 cache_dir: Path | None = None) -> None:
    """Fill ``sample.weights`` with the paper's weight map, computed once and cached as float32 TIFF.

    ``balance`` is 'dataset' (class frequencies over all training targets), 'image' or 'none'.
    """
    from unetcli import weightmap
    from unetcli.images import write_image

    num = max(2, max(int(s.target.max()) for s in samples) + 1)
    dataset_counts = weightmap.class_counts((s.target for s in samples), num) if balance == "dataset" else None
    dataset_cw = weightmap.balance_weights(dataset_counts).tolist() if dataset_counts is not None else None
    for s in samples:
        if s.weights is not None:
            continue
        cached = None
        if cache_dir is not None:
            key = hashlib.sha256(np.ascontiguousarray(s.target).tobytes()
                                 + (s.instances.tobytes() if s.instances is not None else b"")
                                 + f"{w0},{sigma},{balance},{dataset_cw}".encode()).hexdigest()[:12]
            safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in s.name)
            cached = cache_dir / f"{safe}-{key}.tif"
            if cached.is_file():
                s.weights = read_image(cached)[0, ..., 0].astype(np.float32)
                continue
        cw = weightmap.class_weights_for(balance, s.target, num, dataset_counts)
        s.weights = np.asarray(weightmap.weight_map(s.target, s.instances, w0=w0, sigma=sigma,
                                                    class_weights=cw), np.float32)
        if cached is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            write_image(cached, s.weights, "YX")


# ------------------------------------------------------------------------------------ tile sampling

class TileSampler:
    """Draws augmented training tiles; tile ``i`` depends only on ``(seed, rank, i)``.

    Images are picked with probability proportional to their area, then ``transforms.augment_tile``
    picks the tile's centre, deforms image, target and weights together, and cuts the input tile
    (``in_size``) and the output-sized target and weights (``out_size``).
    """

    def __init__(self, samples: Sequence[Sample], in_size: int, out_size: int, augment, *,
                 seed: int, rank: int = 0, mean: Sequence[float], std: Sequence[float],
                 raw_crops: bool = False):
        self.images = [s.image for s in samples]
        self.targets = [s.target for s in samples]
        self.weights = [s.weights for s in samples]
        self.scales = [s.scale for s in samples]
        areas = np.array([s.target.size for s in samples], np.float64)
        self.p = areas / areas.sum()
        self.in_size, self.out_size = in_size, out_size
        self.augment = augment
        self.seed, self.rank = int(seed), int(rank)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.raw_crops = raw_crops

    def __len__(self) -> int:  # a Dataset needs one; the sampler decides which indices are drawn
        return 2**62

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, int(i)])

    def __getitem__(self, i: int):
        """(image (C, in, in) float32, target (o, o) int64, weights (o, o) float32, scale float32).

        Normally the tile is augmented here, the image normalised and ``o`` is ``out_size``. With
        ``raw_crops`` (augmentation on the GPU) only the tile's position is drawn: the image comes
        back scaled to [0, 1] and not normalised, target and weights at ``in_size``, and the
        deformation, rotations and gray values happen batch-wise on the device
        (``transforms.augment_batch_torch``); ``scale`` takes [0, 1] back to raw values.
        """
        from unetcli import transforms

        rng = self.rng(i)
        k = int(rng.choice(len(self.images), p=self.p))
        image, target, w = self.images[k], self.targets[k], self.weights[k]
        if self.raw_crops:
            h, wd = target.shape
            center = tuple(transforms.random_center(rng, n, self.in_size, self.out_size) for n in (h, wd))
            img, tgt, wt = transforms.augment_tile(rng, transforms.AugmentConfig.none(), image, target, w,
                                                   self.in_size, self.in_size, center=center)
            size = self.in_size
        else:
            img, tgt, wt = transforms.augment_tile(rng, self.augment, image, target, w,
                                                   self.in_size, self.out_size)
            img = (np.asarray(img, np.float32) * np.float32(self.scales[k]) - self.mean) / self.std
            size = self.out_size
        if wt is None:
            wt = np.ones((size, size), np.float32)
        return (np.ascontiguousarray(np.moveaxis(np.asarray(img, np.float32), -1, 0)),
                np.asarray(tgt, np.int64), np.asarray(wt, np.float32), np.float32(self.scales[k]))
