"""OME-Zarr (NGFF) images: opened lazily and read a band of rows at a time; results written chunk by chunk.

Reading. :func:`open_image` takes an OME-Zarr image group (NGFF 0.4, Zarr v2, or 0.5, Zarr v3, as
ome-zarr-py and bioformats2raw write them; older 0.1-0.3 too), a bioformats2raw folder holding one
series, one level of an image (``img.zarr/0``: the axes come from its group), or a plain Zarr array
(2-D: yx, 3-D: zyx, or any axes named in Zarr v3 ``dimension_names``). The full-resolution level
(``datasets[0]``) is read; its axes (any of t, c, z, y, x) come from the metadata, its pixel size from
the scale of that level (micrometres where the axes name a length unit). Every axis other than c, y
and x (time points and z slices) becomes a page of the canonical ``(N, H, W, C)`` layout, t before z,
as the TIFF reader does. Nothing is decoded until rows are asked for: :class:`ZarrRows` is an image
source for the predictor (see ``sources.py``) that decodes only the chunks a band of rows touches.

Writing. :class:`ZarrOutput` writes a result (mask, labels, probabilities) as an OME-Zarr image: rows
arrive in order, are buffered to whole chunk rows and written, so only one chunk row of the result is
ever held; then a pyramid (stride-2 for integer maps, 2x2 means for probabilities) is built from the
written level a band at a time, and the NGFF metadata written. The whole folder is written under a
temporary name beside its target (``.NAME.PID.XXXXXXXX.part``, the conventions of ``atomic.py``) and
renamed over it at the end, so a failed or interrupted run never leaves a half-written image; a later
writer removes the temporaries of writers that died.

Labels beside the image. An output named ``IMAGE.zarr/labels/NAME`` (with IMAGE.zarr an OME-Zarr image)
is written as an NGFF label image into the image's ``labels`` group, with ``image-label`` metadata and
the image's pixel size. Only ``labels/NAME`` is created (and the ``labels`` group's list of names
updated); the image's own arrays and metadata are never written. An existing ``labels/NAME`` is
replaced only when unet wrote it (its attributes say so); one written by someone else is refused.

The zarr package (3.0 or later) is an optional dependency (the ``interop`` extra): it is imported only
when a Zarr image is opened or written, and its absence is a one-line error with the install hint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from unetcli.errors import ConfigError, ImageReadError, ImageShapeError, ImageWriteError

ZARR_SUFFIX = ".zarr"
_META_FILES = (".zgroup", ".zarray", "zarr.json")
AXES = "tczyx"                       # NGFF's axis names, in the order the specification requires
_INSTALL_HINT = "pip install 'unet[interop]' (zarr 3, Python 3.11 or later)"
WRITE_VERSION = "0.4"                # outputs that do not follow an OME-Zarr input: the version most viewers read
CHUNK = 512                          # chunk side of written images (rows shrink for very wide outputs)
BUFFER_BYTES = 64 * 2**20            # a chunk row of the result kept while rows arrive, at most about this
PYRAMID_SIDE = 512                   # levels are added until the smallest one fits this side
MAX_LEVELS = 10
LABEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

# NGFF (UDUNITS-2) length units -> micrometres; the short forms other tools write too
_UM = {"angstrom": 1e-4, "attometer": 1e-12, "centimeter": 1e4, "decimeter": 1e5, "exameter": 1e24,
       "femtometer": 1e-9, "foot": 304800.0, "gigameter": 1e15, "hectometer": 1e8, "inch": 25400.0,
       "kilometer": 1e9, "megameter": 1e12, "meter": 1e6, "micrometer": 1.0, "mile": 1.609344e9,
       "millimeter": 1e3, "nanometer": 1e-3, "parsec": 3.0857e22, "petameter": 1e21, "picometer": 1e-6,
       "terameter": 1e18, "yard": 914400.0, "yoctometer": 1e-18, "yottameter": 1e30, "zeptometer": 1e-15,
       "zettameter": 1e27, "um": 1.0, "µm": 1.0, "μm": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3,
       "cm": 1e4, "m": 1e6}


# --------------------------------------------------------------------------------------- the package

def require_zarr(name: str):
    """The ``zarr`` module (3.0 or later), or ConfigError naming ``name`` with the install hint."""
    try:
        import zarr
    except ImportError:
        raise ConfigError(f"{name}: OME-Zarr needs the optional zarr package, which is not installed",
                          hint=_INSTALL_HINT) from None
    major = str(getattr(zarr, "__version__", "0")).split(".")[0]
    if not major.isdigit() or int(major) < 3:
        raise ConfigError(f"{name}: OME-Zarr needs zarr 3 or later, found zarr {zarr.__version__}",
                          hint=_INSTALL_HINT)
    return zarr


@contextlib.contextmanager
def _quiet():
    """zarr warns (on stderr) about foreign files in a hierarchy and v2 codecs; the core never prints."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------------------- detection

def is_zarr_name(path: str | os.PathLike) -> bool:
    """True for a name ending in ``.zarr`` (``.ome.zarr`` too): an output written as OME-Zarr."""
    return str(path).rstrip("/" + os.sep).lower().endswith(ZARR_SUFFIX)


def is_zarr_path(path: str | os.PathLike) -> bool:
    """True for an existing folder that is a Zarr array or group (its own metadata file, or a name
    ending in ``.zarr``): one image, never a folder of images."""
    if str(path) == "-":
        return False
    p = Path(path)
    if not p.is_dir():
        return False
    return is_zarr_name(p) or any((p / m).is_file() for m in _META_FILES)


def _is_store(path: Path) -> bool:
    """A folder with Zarr metadata of its own (what an output may replace)."""
    return path.is_dir() and any((path / m).is_file() for m in _META_FILES)


def _read_json(path: Path) -> dict:
    """A metadata file's JSON object; {} where it is missing, damaged or over 16 MiB."""
    try:
        if os.path.getsize(path) > 16 * 2**20:
            return {}
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _node_attrs(folder: Path) -> tuple[dict, int | None, str | None]:
    """(attributes, Zarr format, node type 'group'/'array') of a Zarr node folder, from its JSON files."""
    v3 = folder / "zarr.json"
    if v3.is_file():
        meta = _read_json(v3)
        attrs = meta.get("attributes") or {}
        return (attrs if isinstance(attrs, dict) else {}), 3, meta.get("node_type")
    kind = "array" if (folder / ".zarray").is_file() else ("group" if (folder / ".zgroup").is_file() else None)
    if kind is None and not (folder / ".zattrs").is_file():
        return {}, None, None
    return _read_json(folder / ".zattrs"), 2, kind


def _ngff(attrs: dict) -> dict:
    """The NGFF part of a node's attributes: 0.5 keeps it under "ome", earlier versions at the top."""
    ome = attrs.get("ome")
    return ome if isinstance(ome, dict) else attrs


def _multiscale(attrs: dict) -> dict | None:
    ms = _ngff(attrs).get("multiscales")
    if isinstance(ms, list) and ms and isinstance(ms[0], dict):
        return ms[0]
    return None


def image_group(path: str | os.PathLike) -> Path | None:
    """The OME-Zarr image group (the folder with ``multiscales``) that ``path`` is or lies in: the path
    itself, or the group of a level (``img.zarr/0``); None for anything else."""
    p = Path(os.path.realpath(str(path)))
    for folder in (p, p.parent):
        ms = _multiscale(_node_attrs(folder)[0]) if folder.is_dir() else None
        if ms is not None and (folder == p or p.name in _level_paths(ms)):
            return folder
    return None


def _level_paths(ms: dict) -> list[str]:
    return [str(d.get("path")) for d in ms.get("datasets") or [] if isinstance(d, dict)]


def _version(ms: dict, attrs: dict) -> str | None:
    """The NGFF version of an image: in its multiscales record (0.4 and earlier) or beside it (0.5)."""
    return str(ms.get("version") or _ngff(attrs).get("version") or "") or None


def labels_target(path: str | os.PathLike) -> tuple[Path, str] | None:
    """``(image group, NAME)`` when ``path`` names ``IMAGE/labels/NAME`` of an existing OME-Zarr image,
    else None. Only the form matters here; :func:`check_output` says whether it may be written."""
    p = Path(os.path.realpath(str(path)))
    if p.parent.name != "labels":
        return None
    image = p.parent.parent
    if not image.is_dir() or _multiscale(_node_attrs(image)[0]) is None:
        return None
    return image, p.name


def is_zarr_output(path: str | os.PathLike) -> bool:
    """True when an output path is written as OME-Zarr: a ``.zarr`` name, or ``IMAGE.zarr/labels/NAME``."""
    return str(path) != "-" and (is_zarr_name(path) or labels_target(path) is not None)


# ------------------------------------------------------------------------------------------- reading

def _um_factor(unit: str | None) -> float | None:
    return _UM.get((unit or "").strip().lower()) if unit else None


@dataclass
class ZarrImage:
    """The full-resolution level of an OME-Zarr image (or a plain Zarr array), opened, nothing decoded.

    ``axes``: one letter per array dimension, from t, c, z, y, x. ``scale``/``units``: the physical
    size of one pixel along each axis and its NGFF unit (None where unknown). Pages are every
    combination of the axes other than c, y and x (t major), as in the canonical (N, H, W, C) layout.
    """

    name: str
    array: Any
    axes: str
    scale: dict[str, float]
    units: dict[str, str | None]
    version: str | None                    # the NGFF version, None for a plain array
    zarr_format: int
    group: Path | None                     # the image group, None for a plain array outside one
    dataset: str | None                    # the level's path inside the group
    channel_names: list[str] | None = None
    _perm: tuple[int, ...] = field(default=(), repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        dt = np.dtype(self.array.dtype)
        return np.dtype(np.uint8) if dt == bool else dt

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.array.chunks)

    def size(self, axis: str) -> int:
        return self.shape[self.axes.index(axis)] if axis in self.axes else 1

    @property
    def page_axes(self) -> str:
        """The axes that make pages (t, z in that order where present)."""
        return "".join(a for a in self.axes if a not in "cyx")

    @property
    def page_shape(self) -> tuple[int, ...]:
        return tuple(self.size(a) for a in self.page_axes)

    @property
    def canonical_shape(self) -> tuple[int, int, int, int]:
        """(N pages, H, W, C)."""
        return (int(np.prod(self.page_shape, dtype=np.int64)) if self.page_shape else 1,
                self.size("y"), self.size("x"), self.size("c"))

    @property
    def pixel_size(self) -> dict | None:
        """x and y pixel size in micrometres (``tiffmeta``'s record; with ``z`` when known), or None
        where the axes name no length unit."""
        fx, fy = _um_factor(self.units.get("x")), _um_factor(self.units.get("y"))
        if not fx or not fy:
            return None
        x, y = self.scale.get("x", 1.0) * fx, self.scale.get("y", 1.0) * fy
        if not (np.isfinite(x) and np.isfinite(y) and x > 0 and y > 0):
            return None
        size = {"x": float(x), "y": float(y), "unit": "um"}
        fz = _um_factor(self.units.get("z"))
        if "z" in self.axes and fz and self.scale.get("z", 0) > 0:
            size["z"] = float(self.scale["z"] * fz)
        return size

    def geometry(self) -> "Geometry":
        """Where a result of this image goes: its axes without c, sizes, scale, units, NGFF version."""
        axes = "".join(a for a in self.axes if a != "c")
        return Geometry(axes=axes, shape=tuple(self.size(a) for a in axes),
                        scale={a: float(self.scale.get(a, 1.0)) for a in axes},
                        units={a: self.units.get(a) for a in axes if self.units.get(a)},
                        version=self.version if self.version in ("0.4", "0.5") else WRITE_VERSION)

    def page_index(self, page: int) -> dict[str, int]:
        """Canonical page number -> index along each page axis."""
        if not self.page_axes:
            if page != 0:
                raise IndexError(page)
            return {}
        return dict(zip(self.page_axes, (int(i) for i in np.unravel_index(page, self.page_shape))))

    def read(self, page: int, rows: slice | np.ndarray = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """Pixels of one page as (rows, cols, C) in the array's own type, decoding only the chunks touched.

        ``rows``: a slice or row numbers (any order, repeats allowed: mirrored borders)."""
        h = self.size("y")
        if isinstance(rows, slice):
            start, stop, step = rows.indices(h)
            if step != 1:
                return self.read(page, np.arange(start, stop, step), cols)
            want, back = slice(start, stop), None
        else:
            idx = np.asarray(rows, np.int64).reshape(-1)
            if idx.size and (idx.min() < 0 or idx.max() >= h):
                raise IndexError(f"rows outside 0..{h - 1}")
            uniq, back = np.unique(idx, return_inverse=True)
            if uniq.size and uniq[-1] - uniq[0] + 1 == uniq.size:
                want = slice(int(uniq[0]), int(uniq[-1]) + 1)        # contiguous: a plain slice
            else:
                want = uniq
            if np.array_equal(uniq, idx):
                back = None
        where = self.page_index(page)
        sel = tuple(where[a] if a in where else (want if a == "y" else (cols if a == "x" else slice(None)))
                    for a in self.axes)
        try:
            with _quiet():
                if isinstance(want, np.ndarray):
                    block = self.array.get_orthogonal_selection(sel)
                else:
                    block = self.array[sel]
        except MemoryError:
            raise
        except Exception as exc:
            detail = " ".join(str(exc).split())[:160] or type(exc).__name__
            raise ImageReadError(f"{self.name}: damaged Zarr chunk ({detail})",
                                 hint="the Zarr store is incomplete or damaged; copy or convert it again") from exc
        block = np.asarray(block)
        if block.dtype == bool:
            block = block.astype(np.uint8)
        kept = [a for a in self.axes if a in "cyx"]
        block = np.transpose(block, [kept.index(a) for a in "yx"] + ([kept.index("c")] if "c" in kept else []))
        if "c" not in kept:
            block = block[..., None]
        block = np.ascontiguousarray(block)
        if back is not None:
            block = block[back]
        if block.dtype.kind == "f" and not np.isfinite(block).all():
            raise ImageReadError(f"{self.name}: contains NaN or infinite pixel values",
                                 hint="replace them (e.g. with 0) before using the image")
        return block

    def read_all(self) -> np.ndarray:
        """The whole image as (N, H, W, C)."""
        n = self.canonical_shape[0]
        return np.stack([self.read(p) for p in range(n)]) if n else np.empty(self.canonical_shape, self.dtype)


def _axes_of(ms: dict, ndim: int, name: str) -> tuple[str, dict[str, str | None]]:
    """Axis letters and units of a multiscales record (0.3: names; 0.4+: records; 0.1/0.2: tczyx)."""
    raw = ms.get("axes")
    if raw is None:
        if ndim != 5:
            raise ImageShapeError(f"{name}: OME-Zarr without axes metadata must be 5-D (t, c, z, y, x), "
                                  f"this one has {ndim} dimensions")
        return AXES, {}
    names, units = [], {}
    for ax in raw if isinstance(raw, list) else []:
        if isinstance(ax, str):
            names.append(ax.lower())
        elif isinstance(ax, dict) and isinstance(ax.get("name"), str):
            letter = ax["name"].lower()
            names.append(letter)
            if isinstance(ax.get("unit"), str):
                units[letter] = ax["unit"]
        else:
            names.append("?")
    return _check_axes(names, ndim, name), units


def _check_axes(names: Sequence[str], ndim: int, name: str) -> str:
    shown = ",".join(names)
    if len(names) != ndim:
        raise ImageShapeError(f"{name}: its metadata names {len(names)} axes ({shown}) for an array of "
                              f"{ndim} dimensions", hint="the OME-Zarr metadata is damaged")
    if any(a not in AXES for a in names) or len(set(names)) != len(names) or "y" not in names or "x" not in names:
        raise ImageShapeError(f"{name}: unsupported axes ({shown}); unet reads images with axes among "
                              "t, c, z, y, x, including y and x")
    return "".join(names)


def _scale_of(ms: dict, dataset: dict, axes: str) -> dict[str, float]:
    """The pixel size of one level: its ``scale`` transformation times the multiscale-wide one."""
    scale = np.ones(len(axes))
    for transforms in (dataset.get("coordinateTransformations"), ms.get("coordinateTransformations")):
        for t in transforms if isinstance(transforms, list) else []:
            if isinstance(t, dict) and t.get("type") == "scale" and isinstance(t.get("scale"), list) \
                    and len(t["scale"]) == len(axes):
                try:
                    scale = scale * np.asarray(t["scale"], np.float64)
                except (TypeError, ValueError):
                    pass
    return {a: float(s) for a, s in zip(axes, scale) if np.isfinite(s) and s > 0}


def _channel_names(attrs: dict, count: int) -> list[str] | None:
    omero = _ngff(attrs).get("omero")
    chans = omero.get("channels") if isinstance(omero, dict) else None
    if not isinstance(chans, list) or len(chans) != count:
        return None
    names = [c.get("label") if isinstance(c, dict) else None for c in chans]
    return [str(n) for n in names] if all(isinstance(n, str) for n in names) else None


def _series(root: Path, attrs: dict, name: str) -> Path:
    """The one image of a bioformats2raw folder (refused where it holds several)."""
    listed = _node_attrs(root / "OME")[0].get("series")
    series = [str(s) for s in listed] if isinstance(listed, list) else sorted(
        (d.name for d in root.iterdir() if d.is_dir() and d.name.isdigit()), key=int)
    if not series:
        raise ImageReadError(f"{name}: bioformats2raw folder without any image series")
    if len(series) > 1:
        raise ImageShapeError(f"{name}: holds {len(series)} image series (bioformats2raw)",
                              hint=f"give one of them, e.g. {os.path.join(name, series[0])}")
    return root / series[0]


def _open_node(zarr, folder: Path, name: str):
    try:
        with _quiet():
            return zarr.open(store=str(folder), mode="r")
    except Exception as exc:
        detail = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise ImageReadError(f"{name}: not a readable Zarr store ({detail})",
                             hint="give an OME-Zarr image folder (NAME.zarr) or a Zarr array") from exc


def open_image(path: str | os.PathLike) -> ZarrImage:
    """Open the full-resolution level of the OME-Zarr image (or plain Zarr array) at ``path``, lazily.

    Raises ImageReadError for a missing, foreign or damaged store, ImageShapeError for layouts unet
    cannot read (HCS plates, several series, unknown axes), ConfigError when zarr is not installed.
    """
    name = str(path)
    folder = Path(path)
    if not folder.exists():
        raise ImageReadError(f"{name}: no such file or folder", hint="check the path")
    if not folder.is_dir() or not any((folder / m).is_file() for m in _META_FILES + (".zattrs",)):
        raise ImageReadError(f"{name}: not a Zarr store (no .zgroup, .zarray or zarr.json in it)",
                             hint="give an OME-Zarr image folder (NAME.zarr) or a Zarr array")
    attrs, _fmt, kind = _node_attrs(folder)
    ngff = _ngff(attrs)
    if "bioformats2raw.layout" in ngff and _multiscale(attrs) is None:
        folder = _series(folder, attrs, name)
        attrs, _fmt, kind = _node_attrs(folder)
        ngff = _ngff(attrs)
    if "plate" in ngff or "well" in ngff:
        raise ImageShapeError(f"{name}: an OME-Zarr {'plate' if 'plate' in ngff else 'well'} (HCS), "
                              "not one image", hint=f"give one of its images, e.g. {name}/A/1/0")
    zarr = require_zarr(name)
    ms = _multiscale(attrs)
    if kind == "array" or ms is None:
        if kind != "array":
            raise ImageReadError(f"{name}: a Zarr group without OME-Zarr multiscales metadata",
                                 hint="give an OME-Zarr image, one of its levels (NAME.zarr/0), or a Zarr array")
        return _open_array(zarr, folder, name)
    datasets = [d for d in ms.get("datasets") or [] if isinstance(d, dict) and isinstance(d.get("path"), str)]
    if not datasets:
        raise ImageReadError(f"{name}: OME-Zarr multiscales metadata lists no datasets",
                             hint="the OME-Zarr metadata is damaged")
    level = datasets[0]
    array = _open_node(zarr, folder / level["path"], os.path.join(name, level["path"]))
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        raise ImageReadError(f"{name}: its full-resolution level {level['path']} is not an array")
    axes, units = _axes_of(ms, len(array.shape), name)
    img = ZarrImage(name=name, array=array, axes=axes, scale=_scale_of(ms, level, axes), units=units,
                    version=_version(ms, attrs), zarr_format=int(array.metadata.zarr_format), group=folder.resolve(),
                    dataset=level["path"], channel_names=_channel_names(attrs, _size(array, axes, "c")))
    return _checked(img)


def _size(array, axes: str, axis: str) -> int:
    return int(array.shape[axes.index(axis)]) if axis in axes else 1


def _open_array(zarr, folder: Path, name: str) -> ZarrImage:
    """A plain array: the axes of its image group when it is a level of one, else from its dimension
    names or its rank (2-D: yx; 3-D: zyx)."""
    array = _open_node(zarr, folder, name)
    group = image_group(folder)
    if group is not None:
        gattrs = _node_attrs(group)[0]
        ms = _multiscale(gattrs) or {}
        level = next(d for d in ms.get("datasets") or [] if isinstance(d, dict) and d.get("path") == folder.name)
        axes, units = _axes_of(ms, len(array.shape), name)
        return _checked(ZarrImage(name=name, array=array, axes=axes, scale=_scale_of(ms, level, axes),
                                  units=units, version=_version(ms, gattrs),
                                  zarr_format=int(array.metadata.zarr_format), group=group, dataset=folder.name,
                                  channel_names=_channel_names(gattrs, _size(array, axes, "c"))))
    dims = getattr(array.metadata, "dimension_names", None)
    ndim = len(array.shape)
    if dims and all(isinstance(d, str) for d in dims):
        axes = _check_axes([d.lower() for d in dims], ndim, name)
    elif ndim in (2, 3):
        axes = "yx" if ndim == 2 else "zyx"
    else:
        raise ImageShapeError(f"{name}: a plain Zarr array of {ndim} dimensions, whose axes are not named",
                              hint="write it as OME-Zarr (axes in its metadata), or as a 2-D (yx) or 3-D (zyx) array")
    return _checked(ZarrImage(name=name, array=array, axes=axes, scale={}, units={}, version=None,
                              zarr_format=int(array.metadata.zarr_format), group=None, dataset=None))


def _checked(img: ZarrImage) -> ZarrImage:
    dt = np.dtype(img.array.dtype)
    if dt != bool and dt.kind not in "uif":
        raise ImageShapeError(f"{img.name}: {dt} pixels are not supported", hint="use integer or float pixels")
    if dt.itemsize > 8:
        raise ImageShapeError(f"{img.name}: {dt} pixels are not supported")
    n, h, w, c = img.canonical_shape
    if h == 0 or w == 0 or n == 0 or c == 0:
        raise ImageShapeError(f"{img.name}: image has no pixels (shape {'x'.join(map(str, img.shape))})")
    return img


def declared_shape(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """``(pages, height, width)`` of a Zarr image from its metadata; None where it cannot be opened
    (the reader then says why)."""
    try:
        n, h, w, _c = open_image(path).canonical_shape
    except Exception:
        return None
    return n, h, w


def digest(path: str | os.PathLike, whole: bool = False) -> tuple[str, int]:
    """(SHA-256, bytes) of a Zarr image for provenance, over file names and contents in name order: an
    input's image group metadata and full-resolution level (the pixels read: its labels, written
    later, do not change it); with ``whole`` (an output), every file under ``path``."""
    from unetcli.provenance import CHUNK as BLOCK

    root = Path(path)
    files: list[Path] = []
    try:
        img = None if whole else open_image(path)
    except Exception:
        img = None
    if img is not None and img.group is not None and img.dataset is not None:
        files += [img.group / m for m in _META_FILES + (".zattrs",) if (img.group / m).is_file()]
        level = img.group / img.dataset
        files += sorted(f for f in level.rglob("*") if f.is_file())
        base = img.group
    else:
        files = sorted(f for f in root.rglob("*") if f.is_file())
        base = root
    h = hashlib.sha256()
    total = 0
    for f in files:
        h.update(str(f.relative_to(base)).encode() + b"\0")
        with open(f, "rb") as fh:
            while True:
                block = fh.read(BLOCK)
                if not block:
                    break
                h.update(block)
                total += len(block)
    return h.hexdigest(), total


# ------------------------------------------------------------------------------------------- source

class ZarrRows:
    """An OME-Zarr image as an image source for prediction (``shape`` (N, H, W, C), ``dtype``,
    ``nbytes``, ``rows``, ``page``, ``close``), decoded a band of rows at a time.

    Each band reads only the chunks its rows touch; nothing is kept between bands, so predicting an
    image of any size holds about one band of rows (and the chunks being decoded), not the image.
    ``pixel_size`` and ``geometry()`` carry the image's metadata to the outputs.
    """

    def __init__(self, image: ZarrImage):
        self.image = image
        self.name = image.name
        self.shape = image.canonical_shape
        self.dtype = image.dtype
        self.pixel_size = image.pixel_size
        self.channel_names = image.channel_names

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ZarrRows":
        return cls(open_image(path))

    @property
    def nbytes(self) -> int:
        """What a band read takes at its peak: the band (a tile's height, at most 1600 rows) as read,
        reordered and mirrored, plus the chunks decoded at once."""
        return stream_bytes(self.image)

    def rows(self, page: int, index: slice | np.ndarray) -> np.ndarray:
        """Rows ``index`` (a slice or row numbers) of ``page`` as (rows, W, C)."""
        return self.image.read(page, index)

    def page(self, n: int) -> np.ndarray:
        return self.image.read(n)

    def geometry(self) -> "Geometry":
        return self.image.geometry()

    def close(self) -> None:
        pass


def stream_bytes(image: ZarrImage) -> int:
    """Memory a :class:`ZarrRows` band read of ``image`` needs at its peak (see ``ZarrRows.nbytes``)."""
    _n, h, w, c = image.canonical_shape
    band = min(h, 1600) * w * c * image.dtype.itemsize
    chunks = image.chunks
    chunk_bytes = int(np.prod(chunks, dtype=np.float64)) * np.dtype(image.array.dtype).itemsize
    per_band = 1
    for axis, size, ch in zip(image.axes, image.shape, chunks):
        if axis == "y":
            per_band *= min(math.ceil(size / ch), math.ceil(min(h, 1600) / ch) + 1)
        elif axis in "xc":
            per_band *= math.ceil(size / ch)
    try:
        import zarr

        at_once = int(zarr.config.get("async.concurrency") or 10)
    except Exception:
        at_once = 10
    return int(3 * band + min(per_band, at_once) * chunk_bytes)


# ------------------------------------------------------------------------------------------- writing

@dataclass(frozen=True)
class Geometry:
    """The layout of a result: its axes (t, z, y, x, without c), their sizes, the physical size of a
    pixel along each (``scale``, in ``units`` where known) and the NGFF version to write."""

    axes: str
    shape: tuple[int, ...]
    scale: dict = field(default_factory=dict)
    units: dict = field(default_factory=dict)
    version: str = WRITE_VERSION

    @property
    def page_axes(self) -> str:
        return self.axes[:-2]

    @property
    def page_shape(self) -> tuple[int, ...]:
        return self.shape[:-2]

    @property
    def pages(self) -> int:
        return int(np.prod(self.page_shape, dtype=np.int64)) if self.page_shape else 1

    @classmethod
    def of_pages(cls, pages: int, height: int, width: int, pixel_size: dict | None = None) -> "Geometry":
        """A result of N pages (a TIFF stack: z) with the pixel size ``tiffmeta`` read (micrometres)."""
        axes = "zyx" if pages > 1 else "yx"
        shape = (pages, height, width) if pages > 1 else (height, width)
        scale, units = {a: 1.0 for a in axes}, {}
        size = pixel_size if isinstance(pixel_size, dict) else None
        if size and size.get("x") and size.get("y"):
            scale.update(x=float(size["x"]), y=float(size["y"]))
            units.update(x="micrometer", y="micrometer")
            if pages > 1 and size.get("z"):
                scale["z"], units["z"] = float(size["z"]), "micrometer"
        return cls(axes, shape, scale, units, WRITE_VERSION)

    def output_axes(self, channels: bool) -> str:
        """The axes of the array written: these, with c after t for a result of several channels."""
        if not channels:
            return self.axes
        return ("t" if "t" in self.axes else "") + "c" + self.axes.replace("t", "")


def geometry_of(source, pixel_size: dict | None = None) -> Geometry:
    """The :class:`Geometry` of a prediction's result: an OME-Zarr source's own, else N pages with
    ``pixel_size`` (from ``tiffmeta``)."""
    if hasattr(source, "geometry"):
        return source.geometry()
    n, h, w = source.shape[:3]
    return Geometry.of_pages(n, h, w, pixel_size)


def chunk_rows(width: int, bytes_per_pixel: int) -> int:
    """Rows of a written chunk: :data:`CHUNK`, fewer (powers of two, at least 16) where a chunk row of
    the whole width would exceed :data:`BUFFER_BYTES`."""
    rows = CHUNK
    while rows > 16 and rows * width * bytes_per_pixel > BUFFER_BYTES:
        rows //= 2
    return rows


def buffer_bytes(geometry: Geometry, dtype, channels: int | None = None) -> int:
    """Memory a :class:`ZarrOutput` holds while rows arrive: one chunk row of the result, and twice as
    much again while zarr cuts it into chunks and encodes them (measured with tracemalloc)."""
    per_pixel = np.dtype(dtype).itemsize * (channels or 1)
    rows = min(geometry.shape[-2], chunk_rows(geometry.shape[-1], per_pixel))
    return 3 * rows * geometry.shape[-1] * per_pixel


def _alive(pid: int) -> bool:
    from unetcli.atomic import _alive as alive

    return alive(pid)


def remove_stale_folders(folder: Path, stem: str) -> list[Path]:
    """Remove ``.STEM.PID.XXXXXXXX.part`` folders in ``folder`` whose writer PID has ended (the
    temporaries of killed writers; ``atomic.remove_stale_temporaries`` for folders)."""
    pattern = re.compile(r"(\d{1,10})\.[A-Za-z0-9_]{8}\.part")
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            name = entry.name
            if not name.startswith(f".{stem}.") or not entry.is_dir(follow_symlinks=False):
                continue
            match = pattern.fullmatch(name[len(stem) + 2:])
            if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
    return removed


def _temp_folder(folder: Path, stem: str, target: str) -> Path:
    pid = os.getpid()
    budget = 255 - len(f"..{pid}.XXXXXXXX.part".encode())
    stem = stem.encode()[:max(budget, 1)].decode("utf-8", "ignore")
    remove_stale_folders(folder, stem)
    try:
        tmp = tempfile.mkdtemp(prefix=f".{stem}.{pid}.", suffix=".part", dir=folder)
    except OSError as exc:
        raise ImageWriteError(f"{target}: cannot write in {folder} ({exc.strerror})") from exc
    os.chmod(tmp, 0o777 & ~_umask())
    return Path(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def written_by_unet(path: str | os.PathLike) -> bool:
    """True when the Zarr group at ``path`` carries unet's mark (an output unet may replace)."""
    attrs = _node_attrs(Path(path))[0]
    return isinstance(attrs.get("unet"), dict)


def check_output(path: str | os.PathLike, kind: str, inputs: Sequence[str] = ()) -> None:
    """Refuse, before any work, a Zarr output that cannot or may not be written (ImageWriteError or
    ConfigError): a folder that is not a Zarr store; ``IMAGE/labels/NAME`` for probabilities, of another
    image than the one predicted, of a bad name, or over a label image unet did not write."""
    target = Path(path)
    text = str(path)
    require_zarr(text)                       # before any work: the package is there
    lab = labels_target(path)
    if lab is not None:
        image, name = lab
        if kind == "probs":
            raise ConfigError(f"{text}: probabilities are not a label image",
                              hint="write labels or a mask into an image's labels group, "
                                   "or probabilities to NAME.zarr")
        if not LABEL_NAME.fullmatch(name) or name.endswith(".part"):
            raise ConfigError(f"{text}: {name!r} is not a label name unet writes",
                              hint="use letters, digits, '_', '-' and '.', not starting with '.'")
        sources = [image_group(i) for i in inputs if i != "-" and is_zarr_path(i)]
        if len(inputs) != 1 or sources != [image]:
            shown = Path(text).parent.parent
            raise ConfigError(f"{text}: labels go into the labels group of the image they were predicted from",
                              hint=f"predict {shown} alone to write into its labels group, or write to NAME.zarr")
        if target.exists() and not written_by_unet(target):
            raise ConfigError(f"{text}: a label image unet did not write exists under this name",
                              hint="give another name; unet replaces only label images it wrote")
        if not os.access(target.parent if target.parent.is_dir() else image, os.W_OK | os.X_OK):
            raise ImageWriteError(f"{text}: cannot write in {target.parent if target.parent.is_dir() else image} "
                                  "(permission denied)")
        return
    if not is_zarr_name(path):
        raise ImageWriteError(f"{text}: an OME-Zarr output is named NAME.zarr", hint="name the output NAME.zarr")
    if target.exists() and not _is_store(target):
        raise ImageWriteError(f"{text}: exists and is not a Zarr store, so it is not replaced",
                              hint="give another name, or remove it first")


def check_inputs_outputs(inputs: Iterable, outputs: Iterable) -> None:
    """The Zarr side of ``guards.check_outputs``: no output inside a Zarr store (an input's image
    arrays, metadata, other levels, or any other store's), except a label image in ``labels/`` of an
    input image; no Zarr output that would replace a folder holding an input. Raises ConfigError naming
    the paths. Called with no inputs, it checks only where the outputs land (before folders are made).
    Linear in the number of paths (batch jobs of many thousand files)."""
    zarr_roots: dict[Path, str] = {}         # the image group (or array) of each Zarr input
    holders: dict[Path, str] = {}            # every folder above an input
    for given in inputs:
        if given is None or str(given) == "-":
            continue
        real = Path(os.path.realpath(str(given)))
        if is_zarr_path(real):
            zarr_roots.setdefault(image_group(real) or real, str(given))
        if real.parent not in holders:       # inputs of one folder share their folders
            for parent in real.parents:
                holders.setdefault(parent, str(given))
    above: dict[Path, tuple[Path | None, Path | None]] = {}   # folder -> (Zarr store, Zarr input) above
    for given in outputs:
        if given is None or str(given) == "-":
            continue
        out = Path(os.path.realpath(str(given)))
        if out.parent not in above:          # outputs of one folder share the answer
            chain = (out.parent, *out.parent.parents)
            above[out.parent] = (next((d for d in chain if _is_store(d) or is_zarr_name(d)), None),
                                 next((d for d in chain if d in zarr_roots), None))
        holder, root = above[out.parent]
        if holder is not None and labels_target(out) is None:
            shown = Path(str(given))                         # the store as the user spelled it
            for _ in range(len(out.parts) - len(holder.parts)):
                shown = shown.parent
            raise ConfigError(f"{given}: output would land inside the Zarr store {shown}",
                              hint="only IMAGE.zarr/labels/NAME is written inside an OME-Zarr image; "
                                   "write the output beside it")
        if out in holders and is_zarr_output(out):          # replaced whole by the rename
            raise ConfigError(f"{given}: output would replace the folder holding the input {holders[out]}",
                              hint="write the output somewhere else")
        root = out if out in zarr_roots else root
        if root is not None:
            lab = labels_target(out)
            if lab is None or lab[0] != root:
                shown = zarr_roots[root]
                raise ConfigError(f"{given}: output would land inside the input image {shown}",
                                  hint=f"write beside it, or labels into {os.path.join(shown, 'labels', 'NAME')}")


class ZarrOutput:
    """An OME-Zarr result being written: rows in, chunks out, metadata and the rename at the end.

    Usage (a mask of a stack; probabilities: ``channels=K`` and blocks (K, h, W))::

        with ZarrOutput("mask.zarr", geometry, np.uint8) as out:
            for page, y0, block in blocks:          # rows in order, page after page
                out.add_rows(page, y0, block)

    The block ends by :meth:`finish` (the pyramid, the metadata, the rename onto the target) or, on an
    exception, by :meth:`abort` (the temporary folder removed). ``array`` is the full-resolution zarr
    array while it is being written, for writers that fill regions themselves (:meth:`write_region`).

    ``kind``: 'mask', 'labels' or 'probs'; integer results get ``image-label`` metadata (a label image)
    and stride-2 pyramid levels, probabilities 2x2 means and one OMERO channel per class
    (``channel_names``). ``attrs``: more attributes for the image group (unet's own record).
    """

    def __init__(self, path: str | os.PathLike, geometry: Geometry, dtype, *, kind: str = "mask",
                 channels: int | None = None, channel_names: Sequence[str] | None = None,
                 attrs: dict | None = None, pyramid: bool = True, name: str | None = None):
        self.path = Path(path)
        self.text = str(path)
        self.geometry = geometry
        self.dtype = np.dtype(dtype)
        self.kind = kind
        self.channels = channels
        self.channel_names = list(channel_names) if channel_names else None
        self.attrs = dict(attrs or {})
        self.pyramid = pyramid
        self.label = labels_target(path)
        self.image_name = name or self.path.name
        self.axes = geometry.output_axes(channels is not None)
        shape = list(geometry.shape)
        if channels is not None:
            shape.insert(self.axes.index("c"), channels)
        self.shape = tuple(int(s) for s in shape)
        per_pixel = self.dtype.itemsize * (channels or 1)
        self.rows_per_chunk = min(geometry.shape[-2], chunk_rows(geometry.shape[-1], per_pixel))
        self.chunks = tuple(1 if a in "tcz" else (self.rows_per_chunk if a == "y" else min(s, CHUNK))
                            for a, s in zip(self.axes, self.shape))
        if self.label is not None:
            image_attrs, fmt, _ = _node_attrs(self.label[0])
            self.version = _version(_multiscale(image_attrs) or {}, image_attrs) or WRITE_VERSION
            self.zarr_format = fmt or 2
        else:
            self.version = geometry.version if geometry.version in ("0.4", "0.5") else WRITE_VERSION
            self.zarr_format = 3 if self.version == "0.5" else 2
        self.tmp: Path | None = None
        self.root: Path | None = None          # the image group inside the temporary folder
        self.array = None
        self._zarr = None
        self._buffer: np.ndarray | None = None
        self._page: int | None = None       # the page rows are arriving for, the rows written and buffered
        self._start = 0
        self._filled = 0

    # -- opening -------------------------------------------------------------------------------

    def open(self) -> "ZarrOutput":
        zarr = self._zarr = require_zarr(self.text)
        if self.label is not None:
            image, name = self.label
            self.tmp = _temp_folder(image, "labels", self.text)
            self.root = self.tmp / name
        else:
            folder = self.path.parent if str(self.path.parent) else Path(".")
            if not folder.is_dir():
                raise ImageWriteError(f"{self.text}: folder {folder} does not exist", hint="create it first")
            self.tmp = _temp_folder(folder, self.path.name, self.text)
            self.root = self.tmp
        try:
            with _quiet():
                group = zarr.open_group(str(self.root), mode="w", zarr_format=self.zarr_format)
                self.array = self._create(group, "0", self.shape, self.chunks)
        except Exception as exc:
            self.abort()
            raise ImageWriteError(f"{self.text}: cannot create the Zarr image ({_why(exc)})") from exc
        return self

    def _create(self, group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...]):
        """One level: Blosc-zstd (bit-shuffled bytes), fill 0; '/' chunk keys in Zarr v2 as NGFF asks."""
        if self.zarr_format == 3:
            from zarr.codecs import BloscCodec

            comp = BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle" if self.dtype.itemsize == 1 else "shuffle")
            return group.create_array(name, shape=shape, chunks=chunks, dtype=self.dtype, compressors=comp,
                                      fill_value=0, dimension_names=list(self.axes))
        import numcodecs

        shuffle = numcodecs.Blosc.BITSHUFFLE if self.dtype.itemsize == 1 else numcodecs.Blosc.SHUFFLE
        return group.create_array(name, shape=shape, chunks=chunks, dtype=self.dtype,
                                  compressors=numcodecs.Blosc(cname="zstd", clevel=5, shuffle=shuffle),
                                  fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"})

    def __enter__(self) -> "ZarrOutput":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()

    # -- rows in -------------------------------------------------------------------------------

    def _selection(self, page: int, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> tuple:
        where = dict(zip(self.geometry.page_axes, np.unravel_index(page, self.geometry.page_shape))) \
            if self.geometry.page_axes else {}
        span = {"y": slice(y0, y1), "x": slice(x0, x1)}
        return tuple(int(where[a]) if a in where else span.get(a, slice(None)) for a in self.axes)

    def write_region(self, page: int, y0: int, block: np.ndarray, x0: int = 0) -> None:
        """Write a block of canonical ``page`` now, its top left corner at row ``y0``, column ``x0``:
        ``block`` (h, w) or, with channels, (K, h, w). Safe from several threads for blocks of
        different chunks. A block that does not cover whole chunks makes zarr read and rewrite those
        chunks: align blocks to :attr:`chunks`, or use :meth:`add_rows`, which buffers whole chunk rows."""
        block = np.asarray(block)
        h, w = block.shape[-2:]
        try:
            with _quiet():
                self.array[self._selection(page, y0, y0 + h, x0, x0 + w)] = block.astype(self.dtype, copy=False)
        except OSError as exc:
            raise ImageWriteError(f"{self.text}: cannot write ({exc.strerror})") from exc

    def add_rows(self, page: int, y0: int, block: np.ndarray) -> None:
        """Rows ``y0..y0+h`` of canonical ``page``: (h, W), or (K, h, W) with channels. Rows come in
        order, each page whole before the next; whole chunk rows are written as soon as they are full."""
        block = np.asarray(block)
        height = self.geometry.shape[-2]
        if self._buffer is None:
            shape = ((self.channels,) if self.channels is not None else ()) + (self.rows_per_chunk,
                                                                                 self.geometry.shape[-1])
            self._buffer = np.zeros(shape, self.dtype)
        at = self._start + self._filled
        if self._page is None or (page != self._page and at == height):
            if y0 != 0 or not 0 <= page < self.geometry.pages:
                raise ValueError(f"rows out of order: page {page} starts at row {y0}")
            self._page, self._start, self._filled = page, 0, 0
        elif page != self._page or y0 != at:
            raise ValueError(f"rows out of order: page {page} row {y0} after page {self._page} row {at}")
        pos, h = 0, block.shape[-2]
        while pos < h:
            take = min(self.rows_per_chunk - self._filled, h - pos)
            self._buffer[..., self._filled:self._filled + take, :] = block[..., pos:pos + take, :]
            self._filled += take
            pos += take
            if self._filled == self.rows_per_chunk or self._start + self._filled == height:
                self._flush()

    def _flush(self) -> None:
        if not self._filled:
            return
        self.write_region(self._page, self._start, self._buffer[..., :self._filled, :])
        self._start += self._filled
        self._filled = 0

    # -- the end -------------------------------------------------------------------------------

    def finish(self) -> None:
        """Write what is buffered, the pyramid and the metadata, then rename onto the target."""
        try:
            self._flush()
            self._buffer = None
            levels = self._build_pyramid() if self.pyramid else [self.shape]
            self._write_metadata(levels)
            self._publish()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Remove the temporary folder (nothing reaches the target)."""
        self._buffer = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def _build_pyramid(self) -> list[tuple[int, ...]]:
        """Levels 1.. from level 0 on disk, each read a band of rows at a time."""
        shapes = [self.shape]
        src = self.array
        yi, xi = self.axes.index("y"), self.axes.index("x")
        group = self._zarr.open_group(str(self.root), mode="r+")
        while len(shapes) < MAX_LEVELS and max(shapes[-1][yi], shapes[-1][xi]) > PYRAMID_SIDE:
            prev = shapes[-1]
            shape = list(prev)
            shape[yi], shape[xi] = (prev[yi] + 1) // 2, (prev[xi] + 1) // 2
            chunks = list(self.chunks)
            chunks[yi] = min(self.rows_per_chunk, shape[yi])
            chunks[xi] = min(CHUNK, shape[xi])
            with _quiet():
                dst = self._create(group, str(len(shapes)), tuple(shape), tuple(chunks))
            band = 2 * chunks[yi]                   # source rows per step: one destination chunk row
            outer = [range(s) if a in "tcz" else [None] for a, s in zip(self.axes, prev)]
            for index in np.ndindex(*[len(r) for r in outer]):
                for y0 in range(0, prev[yi], band):
                    sel = tuple(slice(y0, y0 + band) if a == "y" else (slice(None) if a == "x" else int(i))
                                for a, i in zip(self.axes, index))
                    with _quiet():
                        part = np.asarray(src[sel])
                        dsel = tuple(slice(y0 // 2, y0 // 2 + (part.shape[0] + 1) // 2) if a == "y"
                                     else (slice(None) if a == "x" else int(i)) for a, i in zip(self.axes, index))
                        dst[dsel] = self._halve(part)
            shapes.append(tuple(shape))
            src = dst
        return shapes

    def _halve(self, part: np.ndarray) -> np.ndarray:
        """(h, w) -> (ceil(h/2), ceil(w/2)): every other pixel for integer maps, 2x2 means for floats."""
        if self.dtype.kind != "f":
            return part[::2, ::2]
        h, w = part.shape
        if h % 2 or w % 2:
            part = np.pad(part, ((0, h % 2), (0, w % 2)), mode="edge")
        return (part[0::2, 0::2] + part[1::2, 0::2] + part[0::2, 1::2] + part[1::2, 1::2]) / np.float32(4)

    def _multiscales(self, levels: list[tuple[int, ...]]) -> dict:
        geo = self.geometry
        axes = []
        for a in self.axes:
            rec = {"name": a, "type": "channel" if a == "c" else ("time" if a == "t" else "space")}
            if a != "c" and geo.units.get(a):
                rec["unit"] = geo.units[a]
            axes.append(rec)
        base = [1.0 if a == "c" else float(geo.scale.get(a, 1.0)) for a in self.axes]
        datasets = []
        for level, _shape in enumerate(levels):
            factor = 2 ** level
            scale = [s * factor if a in "yx" else s for a, s in zip(self.axes, base)]
            transforms: list[dict] = [{"type": "scale", "scale": scale}]
            if level and self.dtype.kind == "f":        # a mean of 2^L pixels is centred between them
                transforms.append({"type": "translation",
                                   "translation": [(factor - 1) / 2 * s if a in "yx" else 0.0
                                                   for a, s in zip(self.axes, base)]})
            datasets.append({"path": str(level), "coordinateTransformations": transforms})
        ms = {"name": self.image_name, "axes": axes, "datasets": datasets,
              "type": "mean" if self.dtype.kind == "f" else "nearest",
              "metadata": {"description": "unet: 2x2 means" if self.dtype.kind == "f"
                           else "unet: every other pixel (labels keep their values)"}}
        if self.version != "0.5":
            ms = {"version": self.version, **ms}
        return ms

    def _write_metadata(self, levels: list[tuple[int, ...]]) -> None:
        ngff: dict = {"multiscales": [self._multiscales(levels)]}
        if self.kind in ("mask", "labels"):
            label = {"version": self.version}
            if self.label is not None:
                label["source"] = {"image": "../../"}
            ngff["image-label"] = label
        if self.channels is not None:
            names = self.channel_names or [f"class{i}" for i in range(self.channels)]
            ngff["omero"] = {"channels": [{"label": str(n), "color": "FFFFFF", "active": True,
                                           "window": {"start": 0.0, "end": 1.0, "min": 0.0, "max": 1.0}}
                                          for n in names], "rdefs": {"model": "greyscale"}}
        attrs = {"ome": {"version": "0.5", **ngff}} if self.version == "0.5" else dict(ngff)
        attrs["unet"] = dict(self.attrs, output=self.kind)
        with _quiet():
            group = self._zarr.open_group(str(self.root), mode="r+")
            group.attrs.update(attrs)

    def _publish(self) -> None:
        """Rename the finished folder onto its target (moving a previous output aside first)."""
        if self.label is not None:
            self._publish_label()
            return
        target = self.path
        old = None
        if target.exists():
            if not _is_store(target):
                raise ImageWriteError(f"{self.text}: exists and is not a Zarr store, so it is not replaced")
            old = _temp_folder(target.parent if str(target.parent) else Path("."), target.name, self.text)
            os.replace(target, old / "old")
        try:
            os.replace(self.tmp, target)
        except OSError as exc:
            if old is not None:
                os.replace(old / "old", target)
                shutil.rmtree(old, ignore_errors=True)
            raise ImageWriteError(f"{self.text}: cannot write ({exc.strerror})") from exc
        self.tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _publish_label(self) -> None:
        image, name = self.label
        labels = image / "labels"
        if not labels.exists():
            self._write_group(self.tmp, {"labels": [name]})
            os.replace(self.tmp, labels)
            self.tmp = None
            return
        target = labels / name
        old = None
        if target.exists():
            if not written_by_unet(target):
                raise ConfigError(f"{self.text}: a label image unet did not write exists under this name",
                                  hint="give another name; unet replaces only label images it wrote")
            old = self.tmp / ".old"
            os.replace(target, old)
        os.replace(self.root, target)
        self._list_label(labels, name)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None

    def _write_group(self, folder: Path, ngff: dict) -> None:
        """The metadata files of a group holding ``ngff`` attributes, in this output's Zarr format."""
        if self.zarr_format == 3:
            attrs = {"ome": {"version": self.version, **ngff}}
            (folder / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                          "attributes": attrs}, indent=2))
        else:
            (folder / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
            (folder / ".zattrs").write_text(json.dumps(ngff, indent=2))

    def _list_label(self, labels: Path, name: str) -> None:
        """Add ``name`` to the labels group's list (one atomic rewrite of its metadata file)."""
        from unetcli.atomic import write_bytes_atomic

        v3 = labels / "zarr.json"
        if v3.is_file():
            meta = _read_json(v3)
            attrs = meta.setdefault("attributes", {})
            ome = attrs.setdefault("ome", {})
            ome.setdefault("version", self.version)
            listed = ome.get("labels") if isinstance(ome.get("labels"), list) else []
            if name not in listed:
                ome["labels"] = listed + [name]
            write_bytes_atomic(v3, json.dumps(meta, indent=2).encode())
            return
        if not (labels / ".zgroup").is_file():
            write_bytes_atomic(labels / ".zgroup", json.dumps({"zarr_format": 2}).encode())
        attrs = _read_json(labels / ".zattrs")
        listed = attrs.get("labels") if isinstance(attrs.get("labels"), list) else []
        if name not in listed:
            attrs["labels"] = listed + [name]
            write_bytes_atomic(labels / ".zattrs", json.dumps(attrs, indent=2).encode())


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split())[:160] or type(exc).__name__


def write_array(path: str | os.PathLike, data: np.ndarray, geometry: Geometry, *, kind: str,
                channels: int | None = None, channel_names: Sequence[str] | None = None,
                attrs: dict | None = None) -> None:
    """Write a whole result atomically as OME-Zarr: ``data`` (N, H, W), or (N, K, H, W) with
    ``channels`` K, pages in canonical order (see :class:`ZarrOutput`)."""
    arr = np.asarray(data)
    n = geometry.pages
    h, w = geometry.shape[-2:]
    arr = arr.reshape((n, channels, h, w) if channels is not None else (n, h, w))
    with ZarrOutput(path, geometry, arr.dtype, kind=kind, channels=channels, channel_names=channel_names,
                    attrs=attrs) as out:
        for page in range(n):
            out.add_rows(page, 0, arr[page])
