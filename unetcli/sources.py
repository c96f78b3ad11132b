"""Image sources for prediction: an array in memory, or a striped TIFF decoded band by band.

A source has ``shape`` (N, H, W, C), ``dtype``, ``nbytes`` (what it keeps in memory), ``rows(page,
index)`` (a band of rows of one page, by slice or row numbers), ``page(n)`` and ``close()``. The
predictor cuts its tiles from row bands, so a source that decodes on demand (:class:`TiffRows`, and
``zarrio.ZarrRows`` for OME-Zarr images) lets a huge image be predicted with memory for a band of rows,
not for the image. :class:`ChannelRows` picks and adapts the channels of such a source band by band.
"""

from __future__ import annotations

import os

import numpy as np

from unetcli.errors import ImageReadError


def take(a: np.ndarray, index: slice | np.ndarray, axis: int) -> np.ndarray:
    """``a``'s entries ``index`` (a slice: a view; row numbers: a copy) along ``axis`` 0 or 1."""
    if isinstance(index, slice):
        return a[index] if axis == 0 else a[:, index]
    return np.take(a, index, axis=axis)


class ArraySource:
    """An image or stack in memory, (H, W, C) or (N, H, W, C), handed out row band by row band."""

    def __init__(self, array: np.ndarray):
        arr = np.asarray(array)
        self.array = arr[None] if arr.ndim == 3 else arr
        self.shape = self.array.shape
        self.dtype = self.array.dtype

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def rows(self, page: int, index: slice | np.ndarray) -> np.ndarray:
        """Rows ``index`` (a slice or row numbers) of ``page`` as (rows, W, C)."""
        return take(self.array[page], index, 0)

    def page(self, n: int) -> np.ndarray:
        return self.array[n]

    def close(self) -> None:
        pass


class TiffRows:
    """The pages of a striped TIFF file, decoded a few strips at a time, as an image source.

    Only the strips that the current band of rows needs are decoded, and only the last two bands'
    strips are kept, so predicting a huge TIFF needs memory for a band of rows, not for the image.
    :meth:`open` returns None for layouts it does not stream (tiled TIFFs, planar RGB, channels stored
    as pages, damaged files); read those whole with ``images.read_image``, which also reports errors.
    """

    def __init__(self, tf, pages: list, shape: tuple[int, int, int, int], name: str):
        self._tf, self._pages, self.shape, self.name = tf, pages, shape, name
        self.dtype = pages[0].dtype
        self._rps = int(pages[0].rowsperstrip or shape[1])
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self._order: list[tuple[int, int]] = []
        self._limit = 0

    @classmethod
    def open(cls, path, *, min_bytes: int = 0) -> "TiffRows | None":
        """A row source for ``path`` if it is a plain striped TIFF of at least ``min_bytes`` decoded."""
        import tifffile

        name = str(path)
        try:
            size = os.path.getsize(path)
            tf = tifffile.TiffFile(path)
        except Exception:  # not a TIFF, unreadable: read_image will say what is wrong
            return None
        try:
            if len(tf.series) != 1:
                raise ValueError("several series")
            series = tf.series[0]
            axes = series.axes
            core = axes[1:] if len(axes) in (3, 4) and axes[0] not in "CSYX" else axes   # a page axis
            if core not in ("YX", "YXS"):
                raise ValueError(f"axes {axes}")
            pages = list(series.pages)
            first = pages[0]
            if any(not hasattr(p, "decode") or p.is_tiled or p.shape != first.shape or p.dtype != first.dtype
                   for p in pages):
                raise ValueError("pages")
            if first.samplesperpixel > 1 and first.planarconfig != 1:
                raise ValueError("planar")
            if first.dtype is None or first.dtype.kind not in "uif":
                raise ValueError("dtype")
            if any(o + c > size for p in pages for o, c in zip(p.dataoffsets, p.databytecounts)):
                raise ValueError("truncated")
            h, w = first.shape[:2]
            c = first.shape[2] if len(first.shape) == 3 else 1
            shape = (len(pages), h, w, c)
            if np.prod(shape, dtype=np.float64) * first.dtype.itemsize < min_bytes:
                raise ValueError("small")
            src = cls(tf, pages, shape, name)
            src._strip(0, 0)                       # the codec works on this file
            return src
        except Exception:
            tf.close()
            return None

    @property
    def nbytes(self) -> int:
        """About what the decoded strips kept at once take: two bands of a tile's height."""
        _n, h, w, c = self.shape
        return int(2 * min(h, 1600) * w * c * self.dtype.itemsize)

    def _strip(self, page: int, k: int) -> np.ndarray:
        key = (page, k)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        pg = self._pages[page]
        fh = self._tf.filehandle
        fh.seek(pg.dataoffsets[k])
        data = fh.read(pg.databytecounts[k])
        try:
            seg = pg.decode(data, k)[0]
        except Exception as exc:
            raise ImageReadError(f"{self.name}: damaged TIFF strip {k} of page {page + 1} ({exc})") from exc
        _n, h, w, c = self.shape
        rows = min(self._rps, h - k * self._rps)
        arr = np.asarray(seg).reshape(-1, w, c)[:rows]
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ImageReadError(f"{self.name}: contains NaN or infinite pixel values",
                                 hint="replace them (e.g. with 0) before using the image")
        self._cache[key] = arr
        self._order.append(key)
        return arr

    def rows(self, page: int, index: slice | np.ndarray) -> np.ndarray:
        """Rows ``index`` (a slice or row numbers) of ``page`` as (rows, W, C), decoding as needed."""
        _n, h, w, c = self.shape
        idx = np.arange(h)[index] if isinstance(index, slice) else np.asarray(index)
        out = np.empty((len(idx), w, c), self.dtype)
        strips = idx // self._rps
        needed = set()
        for k in np.unique(strips):
            sel = strips == k
            out[sel] = self._strip(page, int(k))[idx[sel] - int(k) * self._rps]
            needed.add((page, int(k)))
        # keep this band's strips and the previous band's; forget older ones
        self._limit = max(self._limit, 2 * out.nbytes)
        held = sum(a.nbytes for a in self._cache.values())
        while held > self._limit and self._order:
            key = self._order[0]
            if key in needed:
                break
            self._order.pop(0)
            held -= self._cache.pop(key).nbytes
        return out

    def page(self, n: int) -> np.ndarray:
        return self.rows(n, slice(0, self.shape[1]))

    def close(self) -> None:
        self._cache.clear()
        self._tf.close()


class ChannelRows:
    """A row source whose channels are picked (``--channels``) and adapted to a model's count band by
    band, by the one rule of ``normalize.adapt_channels`` (grey replicated, colour to luminance).
    ``note`` says what was done (or None). Other attributes (a Zarr source's ``geometry``,
    ``pixel_size``) are the source's."""

    def __init__(self, source, wanted: int, channels=None, name: str = "image"):
        from unetcli.normalize import adapt_channels

        self.source, self.wanted, self.channels, self.name = source, wanted, channels, name
        self._adapt = adapt_channels
        probe, self.note = adapt_channels(source.rows(0, slice(0, 1)), wanted, channels, name)
        self.shape = tuple(source.shape[:3]) + (int(probe.shape[-1]),)
        self.dtype = probe.dtype

    @property
    def nbytes(self) -> int:
        """The source's, and one adapted band (a tile's height, at most 1600 rows)."""
        _n, h, w, c = self.shape
        return int(self.source.nbytes + min(h, 1600) * w * c * self.dtype.itemsize)

    def rows(self, page: int, index: slice | np.ndarray) -> np.ndarray:
        return self._adapt(self.source.rows(page, index), self.wanted, self.channels, self.name)[0]

    def page(self, n: int) -> np.ndarray:
        return self._adapt(self.source.page(n), self.wanted, self.channels, self.name)[0]

    def close(self) -> None:
        self.source.close()

    def __getattr__(self, attr: str):
        if attr.startswith("_") or attr == "source":
            raise AttributeError(attr)
        return getattr(self.source, attr)


def as_source(image) -> "ArraySource | TiffRows":
    """An image source from an array ((H, W, C) or (N, H, W, C)) or a source (returned as it is)."""
    return image if hasattr(image, "rows") and hasattr(image, "shape") else ArraySource(image)
