"""Pixel size and layout metadata of TIFF files: read from ImageJ, OME and plain resolution tags, written
back as ImageJ metadata so that Fiji shows the calibration and probability hyperstacks (slices x
classes) with their axes, or as OME-XML (physical sizes, channel names: the classes of probabilities)
for outputs named ``.ome.tif``/``.ome.tiff``. Channel names are read from OME-XML.

A pixel size is ``{"x": float, "y": float, "unit": "um"}`` (micrometres) or None when the file holds
none. Units other than lengths that convert to micrometres (pixels, none) count as no pixel size.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import numpy as np

_TO_UM = {"m": 1e6, "cm": 1e4, "mm": 1e3, "um": 1.0, "µm": 1.0, "μm": 1.0, "micron": 1.0, "microns": 1.0,
          "micrometer": 1.0, "micrometre": 1.0, "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
          "pm": 1e-6, "inch": 25400.0, "in": 25400.0, "\\u00b5m": 1.0}
_RESOLUTION_UNIT = {2: "inch", 3: "cm", 4: "mm", 5: "um"}


def _um(value: float, unit: str | None) -> float | None:
    factor = _TO_UM.get((unit or "").strip().lower())
    if factor is None or not np.isfinite(value) or value <= 0:
        return None
    return float(value) * factor


def _ome_pixels(xml: str):
    """The first OME ``Pixels`` element of an OME-XML text, or None (no such element, or not XML)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    return next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)


def _ome(xml: str) -> dict | None:
    el = _ome_pixels(xml)
    if el is None:
        return None
    try:
        x = float(el.get("PhysicalSizeX", "nan"))
        y = float(el.get("PhysicalSizeY", el.get("PhysicalSizeX", "nan")))
    except ValueError:
        return None
    ux = _um(x, el.get("PhysicalSizeXUnit", "µm"))
    uy = _um(y, el.get("PhysicalSizeYUnit", el.get("PhysicalSizeXUnit", "µm")))
    if not (ux and uy):
        return None
    found = {"x": ux, "y": uy, "unit": "um"}
    try:
        uz = _um(float(el.get("PhysicalSizeZ", "nan")), el.get("PhysicalSizeZUnit", "µm"))
    except ValueError:
        uz = None
    if uz:
        found["z"] = uz     # slice spacing, kept for OME outputs
    return found


def _ome_channels(xml: str) -> list[str] | None:
    el = _ome_pixels(xml)
    if el is None:
        return None
    names = [ch.get("Name") for ch in el if ch.tag.rsplit("}", 1)[-1] == "Channel"]
    return [str(n) for n in names] if names and all(n is not None for n in names) else None


def channel_names(path: str | os.PathLike) -> list[str] | None:
    """The channel names an OME-TIFF records for its first image (every channel named), else None."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            return _ome_channels(tf.ome_metadata) if tf.is_ome and tf.ome_metadata else None
    except Exception:   # not a TIFF, damaged: no names
        return None


def is_ome_name(path: str | os.PathLike) -> bool:
    """True for an output named ``.ome.tif`` or ``.ome.tiff`` (written with OME-XML metadata)."""
    return str(path).lower().endswith((".ome.tif", ".ome.tiff"))


def _rational(tag) -> float | None:
    value = tag.value if tag is not None else None
    if isinstance(value, tuple) and len(value) == 2 and value[1]:
        return value[0] / value[1]
    if isinstance(value, (int, float)) and value:
        return float(value)
    return None


def pixel_size(path: str | os.PathLike) -> dict | None:
    """The pixel size a TIFF file records (OME first, then ImageJ, then plain resolution tags), in
    micrometres; None for other files, files without one, and unreadable files."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages.first if hasattr(tf.pages, "first") else tf.pages[0]
            if tf.is_ome and tf.ome_metadata:
                found = _ome(tf.ome_metadata)
                if found:
                    return found
            xres, yres = _rational(page.tags.get("XResolution")), _rational(page.tags.get("YResolution"))
            if not xres or not yres:
                return None
            if tf.is_imagej:
                unit = (tf.imagej_metadata or {}).get("unit")   # '\\u00B5m' is a key of _TO_UM
            else:
                code = page.tags.get("ResolutionUnit")
                unit = _RESOLUTION_UNIT.get(int(code.value) if code is not None else 2)
            x, y = _um(1.0 / xres, unit), _um(1.0 / yres, unit)
            return {"x": x, "y": y, "unit": "um"} if x and y else None
    except Exception:   # not a TIFF, damaged: the image reader reports those; here simply no pixel size
        return None


def check(size: dict | None) -> dict | None:
    """A pixel size record validated (positive finite x and y in micrometres), or None."""
    if not isinstance(size, dict):
        return None
    try:
        x, y = float(size["x"]), float(size["y"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (np.isfinite(x) and np.isfinite(y) and x > 0 and y > 0):
        return None
    return {"x": x, "y": y, "unit": "um"}


def imagej_options(data: np.ndarray, layout: str, pixel_size: dict | None, classes: int | None = None) -> dict:
    """``tifffile.imwrite`` options writing ``data`` as an ImageJ TIFF: calibration from ``pixel_size``
    and, for probabilities (``classes`` set; layout 'ZYX' of pages x classes), a hyperstack of
    slices x channels. Empty when ImageJ cannot hold the data (pixel types other than 8/16-bit
    unsigned and 32-bit float, colour) or there is nothing to record."""
    if data.dtype not in (np.uint8, np.uint16, np.float32) or layout.endswith("C"):
        return {}
    size = check(pixel_size)
    if size is None and not classes:
        return {}
    meta: dict = {}
    opts: dict = {"imagej": True}
    if classes and layout == "ZYX" and data.shape[0] % classes == 0:
        slices = data.shape[0] // classes
        meta["axes"] = "ZCYX" if slices > 1 else "CYX"
        opts["shape"] = (slices, classes) + data.shape[1:] if slices > 1 else (classes,) + data.shape[1:]
        meta["mode"] = "grayscale"
    elif layout == "ZYX":
        meta["axes"] = "ZYX"
    else:
        meta["axes"] = "YX"
    if size is not None:
        opts["resolution"] = (1.0 / size["x"], 1.0 / size["y"])
        meta["unit"] = "micron"
    opts["metadata"] = meta
    return opts


def ome_options(shape: tuple[int, ...], layout: str, pixel_size: dict | None, classes: int | None = None,
                names: list[str] | None = None) -> dict:
    """``tifffile.imwrite`` options writing an array of ``shape`` (layout 'YX' or 'ZYX') as an OME-TIFF:
    PhysicalSizeX/Y (and Z, when known) in micrometres, and channel names: for probabilities
    (``classes`` set; 'ZYX' of pages x classes) one channel per class, named by ``names``; otherwise one
    channel named ``names[0]`` where given. ``shape`` in the options is the shape to write."""
    meta: dict = {}
    opts: dict = {"ome": True, "photometric": "minisblack"}
    if classes and layout == "ZYX" and shape[0] % classes == 0:
        slices = shape[0] // classes
        meta["axes"] = "ZCYX" if slices > 1 else "CYX"
        opts["shape"] = ((slices, classes) if slices > 1 else (classes,)) + tuple(shape[1:])
        channels = classes
    else:
        meta["axes"] = "ZYX" if layout == "ZYX" else "YX"
        channels = 1
    if names and len(names) == channels:
        meta["Channel"] = {"Name": [str(n) for n in names]}
    size = check(pixel_size)
    if size is not None:
        meta.update(PhysicalSizeX=size["x"], PhysicalSizeXUnit="µm", PhysicalSizeY=size["y"],
                    PhysicalSizeYUnit="µm")
        z = pixel_size.get("z") if isinstance(pixel_size, dict) else None
        if "Z" in meta["axes"] and isinstance(z, (int, float)) and np.isfinite(z) and z > 0:
            meta.update(PhysicalSizeZ=float(z), PhysicalSizeZUnit="µm")
    opts["metadata"] = meta
    return opts
