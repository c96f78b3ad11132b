"""Instance labels as outline files that other tools open: ImageJ/Fiji ROI sets and QuPath GeoJSON.

- ``.zip``: an ImageJ ROI set (Fiji: drag it onto the image, or ROI Manager > More > Open), one ``.roi``
  entry per object, named by the object's id (``17``; ``0003-17`` on page 3 of a stack, whose ROIs also
  carry that page as their position). An object in one piece without holes is a traced polygon, the
  ROI that Fiji's wand makes; an object with holes, or in several pieces, is a composite ROI (a
  ``ShapeRoi``) holding all its rings, so the ROI covers exactly the object's pixels.
- ``.geojson``: a GeoJSON FeatureCollection (RFC 7946) as QuPath imports it (File > Import objects, or
  drag it onto the image): one Feature per object, a Polygon (a MultiPolygon for an object in several
  pieces) with its holes as interior rings, properties ``objectType`` (``detection`` by default),
  ``name`` (the object's id) and ``classification``; on a stack, the geometry's ``plane`` member (QuPath's
  own) holds the page as ``z``. Coordinates are pixels, origin at the top-left corner of the image, as
  QuPath writes them: pixel size is not applied.

Outlines run along the pixels' edges (``outlines.trace``). An image without objects gives an empty
ROI set (a valid zip without entries) and an empty FeatureCollection. Files are written atomically.
``roifile`` (the ``interop`` extra) is needed for ``.zip`` only, and imported when one is written.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from unetcli import guards
from unetcli.errors import ConfigError, ImageWriteError
from unetcli.outlines import EDGE_BYTES, Outline, count_edges, trace

ROI_ZIP, GEOJSON = "zip", "geojson"
FORMATS = (ROI_ZIP, GEOJSON)
_EXTENSIONS = {".zip": ROI_ZIP, ".geojson": GEOJSON}
OBJECT_TYPES = ("detection", "annotation")
COLOR = (255, 0, 0)                      # the classification's colour: red, as in --preview
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)         # fixed entry times: the same labels give the same bytes
_IJ_MAX = 60535                          # ImageJ's largest integer coordinate (beyond: float coordinates)


def outline_format(path: str | os.PathLike) -> str | None:
    """'zip' or 'geojson' when the file name's extension names an outline format, else None."""
    return _EXTENSIONS.get(Path(str(path)).suffix.lower())


def check_available(fmt: str, name: str) -> None:
    """Refuse, before any work, an ROI set when ``roifile`` (the ``interop`` extra) is missing."""
    import importlib.util

    if fmt == ROI_ZIP and importlib.util.find_spec("roifile") is None:
        raise ConfigError(f"{name}: writing ImageJ ROI sets (.zip) needs the roifile package",
                          hint="install 'unet[interop]' (pip install roifile), or write .geojson")


def encode(labels: np.ndarray, fmt: str, *, name: str = "output", classification: str | None = None,
           object_type: str = "detection", memory_budget: int | None = None) -> bytes:
    """The bytes of an ROI set (``fmt`` 'zip') or a GeoJSON file ('geojson') of a label image
    ``(H, W)`` or stack ``(N, H, W)``. ``classification``: the objects' class name (GeoJSON)."""
    if fmt not in FORMATS:
        raise ConfigError(f"{name}: unknown outline format {fmt!r}", hint="use zip or geojson")
    check_available(fmt, name)
    if object_type not in OBJECT_TYPES:
        raise ConfigError(f"{name}: QuPath objects are a detection or an annotation, not {object_type!r}")
    arr = np.asarray(labels)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ImageWriteError(f"{name}: outlines come from a label image or stack, not an array of shape "
                              f"{arr.shape}")
    pages = [_page_outlines(page, name, memory_budget) for page in arr]
    stack = len(pages) > 1
    if fmt == ROI_ZIP:
        return roi_zip(pages, stack=stack)
    return geojson(pages, stack=stack, classification=classification, object_type=object_type)


def write(path: str | os.PathLike, labels: np.ndarray, fmt: str | None = None, **options) -> None:
    """Write the outlines of ``labels`` atomically to ``path`` (format from ``fmt`` or the name)."""
    from unetcli.atomic import atomic_output

    fmt = fmt or outline_format(path)
    if fmt is None:
        raise ImageWriteError(f"{path}: not an outline file name", hint="name it .zip or .geojson")
    payload = encode(labels, fmt, name=str(path), **options)
    try:
        with atomic_output(path) as tmp:
            tmp.write_bytes(payload)
    except OSError as exc:
        raise ImageWriteError(f"{path}: cannot write ({exc.strerror})") from exc


def _page_outlines(page: np.ndarray, name: str, budget: int | None) -> list[Outline]:
    if page.dtype.kind not in "uib":
        raise ImageWriteError(f"{name}: outlines come from integer instance labels, not {page.dtype}")
    edges = count_edges(page)
    guards.check_memory(float(edges) * EDGE_BYTES, f"outlines with {edges} border edges", name, budget)
    return trace(page)


# ------------------------------------------------------------------------------------------ ImageJ

def entry_name(label: int, page: int | None) -> str:
    """An object's ROI name: its id, prefixed with its 1-based page (4 digits) in a stack."""
    return str(label) if page is None else f"{page + 1:04d}-{label}"


def roi_zip(pages: Sequence[list[Outline]], *, stack: bool) -> bytes:
    """An ImageJ ROI set: a zip of one ``NAME.roi`` per object, in page then id order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p, outlines in enumerate(pages):
            for outline in outlines:
                page = p if stack else None
                info = zipfile.ZipInfo(entry_name(outline.label, page) + ".roi", date_time=_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, imagej_roi(outline, page).tobytes())
    return buf.getvalue()


def imagej_roi(outline: Outline, page: int | None = None):
    """One object as an ``roifile.ImagejRoi``: a traced polygon (one piece, no hole) or a composite ROI
    (``page``: 0-based, stored as ImageJ's 1-based stack position)."""
    check_available(ROI_ZIP, "the ROI set")
    from roifile import ROI_OPTIONS, ROI_TYPE, ImagejRoi
    x0, y0, x1, y1 = outline.bounds
    roi = ImagejRoi()
    roi.name = entry_name(outline.label, page)
    roi.position = 0 if page is None else page + 1
    roi.left, roi.top, roi.right, roi.bottom = x0, y0, x1, y1
    if len(outline.parts) == 1 and len(outline.parts[0]) == 1:
        ring = outline.parts[0][0]
        roi.roitype = ROI_TYPE.TRACED
        roi.n_coordinates = len(ring)
        roi.integer_coordinates = (ring - [x0, y0]).astype(np.int32)
        if x1 > _IJ_MAX or y1 > _IJ_MAX:                  # beyond ImageJ's integers: floats as well
            roi.options |= ROI_OPTIONS.SUB_PIXEL_RESOLUTION
            roi.subpixel_coordinates = ring.astype(np.float32)
        return roi
    path = []                                             # java.awt.geom path: 0 moveto, 1 lineto, 4 close
    for part in outline.parts:
        for ring in part:
            ops = np.empty((len(ring), 3), np.float32)
            ops[:, 0] = 1
            ops[0, 0] = 0
            ops[:, 1:] = ring
            path.append(ops.ravel())
            path.append(np.array([4], np.float32))
    roi.roitype = ROI_TYPE.RECT
    roi.multi_coordinates = np.concatenate(path)
    roi.shape_roi_size = roi.multi_coordinates.size
    return roi


# ----------------------------------------------------------------------------------------- GeoJSON

def _closed(ring: np.ndarray) -> list:
    pts = ring.tolist()
    pts.append(pts[0])
    return pts


def feature(outline: Outline, *, page: int | None = None, classification: str | None = None,
            object_type: str = "detection") -> dict:
    """One object as a GeoJSON Feature in QuPath's form."""
    polygons = [[_closed(ring) for ring in part] for part in outline.parts]
    if len(polygons) == 1:
        geometry: dict = {"type": "Polygon", "coordinates": polygons[0]}
    else:
        geometry = {"type": "MultiPolygon", "coordinates": polygons}
    if page is not None:
        geometry["plane"] = {"c": -1, "z": page, "t": 0}  # QuPath's ImagePlane; c -1: all channels
    props: dict = {"objectType": object_type, "name": str(outline.label)}
    if classification:
        props["classification"] = {"name": classification, "color": list(COLOR)}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def geojson(pages: Sequence[list[Outline]], *, stack: bool, classification: str | None = None,
            object_type: str = "detection") -> bytes:
    """A FeatureCollection of every object of every page, one Feature a line."""
    lines = [json.dumps(feature(o, page=p if stack else None, classification=classification,
                                object_type=object_type), separators=(",", ":"))
             for p, outlines in enumerate(pages) for o in outlines]
    if not lines:
        return b'{"type":"FeatureCollection","features":[]}\n'
    return ('{"type":"FeatureCollection","features":[\n' + ",\n".join(lines) + "\n]}\n").encode("utf-8")
