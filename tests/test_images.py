"""Image files: exact round trips, stdin/stdout, atomic writes, and every refusal."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from unetcli import images
from unetcli.errors import ImageReadError, ImageShapeError, ImageWriteError, TooLargeError

rng = np.random.default_rng(0)


def _random(shape, dtype):
    if np.dtype(dtype).kind == "f":
        return rng.normal(size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int16, np.float32, np.float64])
@pytest.mark.parametrize("layout,shape", [("YX", (13, 17)), ("YXC", (13, 17, 3)), ("ZYX", (4, 13, 17)),
                                          ("ZYXC", (2, 13, 17, 2))])
def test_tiff_round_trip_is_exact(tmp_path, dtype, layout, shape):
    data = _random(shape, dtype)
    path = tmp_path / "x.tif"
    images.write_image(path, data, layout)
    back = images.read_image(path)
    assert back.dtype == data.dtype
    expected = {"YX": data[None, ..., None], "YXC": data[None], "ZYX": data[..., None], "ZYXC": data}[layout]
    np.testing.assert_array_equal(back, expected)
    with tifffile.TiffFile(path) as tf:  # written compressed, as promised
        assert tf.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png_round_trip_is_exact(tmp_path, dtype, channels):
    data = _random((11, 9, channels), dtype)
    path = tmp_path / "x.png"
    images.write_image(path, data, "YXC")
    back = images.read_image(path)
    assert back.dtype == dtype and back.shape == (1, 11, 9, channels)
    np.testing.assert_array_equal(back[0], data)


def test_png_reader_matches_pillow_on_all_row_filters(tmp_path):
    # Pillow's encoder picks filters adaptively; a smooth ramp plus noise uses Sub, Up, Average, Paeth.
    y, x = np.mgrid[0:40, 0:37]
    data = np.stack([(x * 3 + y) % 256, (y * 5) % 256, rng.integers(0, 256, (40, 37))], -1).astype(np.uint8)
    Image.fromarray(data).save(tmp_path / "x.png", optimize=True)
    np.testing.assert_array_equal(images.read_image(tmp_path / "x.png")[0], data)


@pytest.mark.parametrize("filt", ["NONE", "SUB", "UP", "AVG", "PAETH"])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_png_is_exact_under_every_row_filter(tmp_path, filt, channels):
    import imagecodecs

    y, x = np.mgrid[0:33, 0:29]
    ramp = (x * 1031 + y * 257)[..., None] + np.arange(channels) * 4099
    data = ((ramp + rng.integers(0, 64, ramp.shape)) % 65536).astype(np.uint16)
    raw = imagecodecs.png_encode(data, filter=getattr(imagecodecs.PNG.FILTER, filt))
    (tmp_path / "x.png").write_bytes(raw)
    back = images.read_image(tmp_path / "x.png")
    assert back.dtype == np.uint16 and back.shape == (1, 33, 29, channels)
    np.testing.assert_array_equal(back[0], data)


def test_interlaced_16_bit_colour_png_is_exact(tmp_path):
    data = _random((21, 18, 3), np.uint16)
    raw = _png(data, interlace=True)
    np.testing.assert_array_equal(images.read_image(_save(tmp_path / "i.png", raw))[0], data)


def _png(data: np.ndarray, interlace: bool = False, extra: bytes = b"") -> bytes:
    """A PNG written independently of the code under test: zlib and struct, filter 0 rows (Adam7 when
    ``interlace``), ``extra`` chunks before the image data."""
    import zlib

    h, w, c = data.shape
    ctype, depth = {1: 0, 2: 4, 3: 2, 4: 6}[c], data.dtype.itemsize * 8
    be = data.astype(f">u{data.dtype.itemsize}")
    passes = ([(0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1)]
              if interlace else [(0, 0, 1, 1)])
    scan = b""
    for y0, x0, dy, dx in passes:       # (first row, first column, row step, column step)
        sub = be[y0::dy, x0::dx]
        if sub.size:
            for row in sub:
                scan += b"\0" + row.tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, int(interlace))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", zlib.compress(scan))
            + chunk(b"IEND", b""))


def test_png_colour_key_adds_no_channel_and_one_bit_masks_read_as_0_1(tmp_path):
    data = _random((9, 7, 3), np.uint8)
    Image.fromarray(data).save(tmp_path / "key.png", transparency=tuple(int(v) for v in data[0, 0]))
    np.testing.assert_array_equal(images.read_image(tmp_path / "key.png")[0], data)
    mask = rng.random((9, 7)) > 0.5
    Image.fromarray(mask).convert("1").save(tmp_path / "bits.png")
    back = images.read_image(tmp_path / "bits.png")
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back[0, :, :, 0], mask.astype(np.uint8))


def test_palette_png_with_transparency_and_repeated_colours_keeps_indices(tmp_path):
    idx = rng.integers(0, 4, (12, 10), dtype=np.uint8)
    img = Image.fromarray(idx, mode="P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)   # entries 4..255 repeat black
    img.save(tmp_path / "p.png", transparency=bytes([0, 128, 255]))
    np.testing.assert_array_equal(images.read_image(tmp_path / "p.png")[0, :, :, 0], idx)


def test_damaged_png_is_refused_in_one_line(tmp_path):
    raw = _png(_random((30, 30, 3), np.uint16))
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageReadError, match="damaged or truncated PNG") as info:
        images.read_image(tmp_path / "cut.png")
    assert "\n" not in info.value.one_line()


def test_compressed_multipage_tiff_with_channels(tmp_path):
    data = _random((3, 20, 30, 3), np.uint8)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, photometric="rgb", compression="lzw")
    np.testing.assert_array_equal(images.read_image(path), data)


def test_jpeg_and_bmp_are_read(tmp_path):
    data = _random((16, 24, 3), np.uint8)
    Image.fromarray(data).save(tmp_path / "x.bmp")
    np.testing.assert_array_equal(images.read_image(tmp_path / "x.bmp")[0], data)
    smooth = np.tile(np.linspace(0, 255, 24, dtype=np.uint8), (16, 1))
    Image.fromarray(smooth).save(tmp_path / "x.jpg", quality=95)
    back = images.read_image(tmp_path / "x.jpg")
    assert back.shape == (1, 16, 24, 1) and back.dtype == np.uint8
    assert np.abs(back[0, :, :, 0].astype(int) - smooth).max() <= 8


def test_palette_png_keeps_indices(tmp_path):
    idx = rng.integers(0, 5, (10, 10), dtype=np.uint8)
    img = Image.fromarray(idx, mode="P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0] + [0] * 753)
    img.save(tmp_path / "p.png")
    np.testing.assert_array_equal(images.read_image(tmp_path / "p.png")[0, :, :, 0], idx)


def test_format_sniffing_and_stdin_stdout(tmp_path):
    data = _random((5, 6), np.uint16)
    for fmt in ("tiff", "png"):
        payload = images.encode_image(data, fmt)
        assert images.sniff_format(payload[:16]) == fmt
        script = ("import sys; from unetcli import images; "
                  "a = images.read_image('-', stdin_bytes=sys.stdin.buffer.read()); "
                  f"images.write_image('-', a, fmt='{fmt}', stream=sys.stdout.buffer)")
        out = subprocess.run([sys.executable, "-c", script], input=payload, capture_output=True, check=True)
        back = images.read_image(_save(tmp_path / f"o.{fmt}", out.stdout))
        np.testing.assert_array_equal(back[0, :, :, 0], data)


def _save(path: Path, payload: bytes) -> Path:
    path.write_bytes(payload)
    return path


def test_stdout_needs_a_format():
    with pytest.raises(ImageWriteError, match="format"):
        images.write_image("-", np.zeros((2, 2), np.uint8))


def test_interrupted_write_leaves_no_output(tmp_path, monkeypatch):
    target = tmp_path / "out.tif"
    written = []

    def half_then_interrupt(self, payload):
        with open(self, "wb") as fh:
            fh.write(payload[: len(payload) // 2])
        written.append(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        images.write_image(target, np.ones((64, 64), np.float32))
    assert written and not target.exists()
    assert list(tmp_path.iterdir()) == []  # the partial temporary file is gone too


def test_failed_write_keeps_previous_file(tmp_path):
    target = tmp_path / "out.png"
    images.write_image(target, np.full((4, 4), 7, np.uint8))
    with pytest.raises(ImageWriteError):
        images.write_image(target, np.zeros((4, 4), np.float32))  # PNG cannot hold float
    assert images.read_image(target)[0, 0, 0, 0] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_killed_writer_leaves_no_output(tmp_path):
    """A process killed mid-way leaves at most a hidden .part file, never a truncated target."""
    target = tmp_path / "big.tif"
    script = ("import os, signal, numpy as np; from pathlib import Path; from unetcli import images\n"
              "orig = Path.write_bytes\n"
              "def die(self, payload):\n"
              "    with open(self, 'wb') as fh: fh.write(payload[:100])\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "Path.write_bytes = die\n"
              f"images.write_image({str(target)!r}, np.ones((256, 256), np.float32))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode != 0
    assert not target.exists()


def test_errors_name_the_file_and_problem(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        images.read_image(tmp_path / "missing.tif")
    (tmp_path / "text.tif").write_text("hello, not an image")
    with pytest.raises(ImageReadError, match="not an image"):
        images.read_image(tmp_path / "text.tif")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        images.read_image(tmp_path / "empty.png")
    nan = np.zeros((8, 8), np.float32)
    nan[3, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    with pytest.raises(ImageReadError, match="NaN"):
        images.read_image(tmp_path / "nan.tif")
    inf = np.zeros((8, 8), np.float64)
    inf[0, 0] = np.inf
    tifffile.imwrite(tmp_path / "inf.tif", inf)
    with pytest.raises(ImageReadError, match="infinite"):
        images.read_image(tmp_path / "inf.tif")


@pytest.mark.parametrize("suffix", ["tif", "png"])
def test_truncated_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"full.{suffix}"
    if suffix == "tif":
        tifffile.imwrite(path, _random((64, 64), np.uint16))  # uncompressed: truncation is in the data
    else:
        images.write_image(path, _random((64, 64, 3), np.uint8), "YXC")
    raw = path.read_bytes()
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageReadError, match="truncated|damaged"):
        images.read_image(cut)


def _tiff_header_only(width: int, height: int) -> bytes:
    """A classic TIFF whose tags declare a huge float32 image but carry 4 bytes of data."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 32), (259, 3, 1, 1),
               (262, 3, 1, 1), (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height),
               (279, 4, 1, 4), (339, 3, 1, 3)]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        packed = struct.pack("<HI", value, 0)[:4] if typ == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, typ, count) + packed
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 12) + b"\x00\x00\x00\x00" + ifd


def test_oversized_declared_image_is_refused_before_allocation(tmp_path):
    path = tmp_path / "huge.tif"
    path.write_bytes(_tiff_header_only(200_000, 200_000))  # 160 GB of float32
    with pytest.raises(TooLargeError, match="huge.tif"):
        images.read_image(path)
    with pytest.raises(TooLargeError):  # an explicit budget applies the same way
        images.read_image(_save(tmp_path / "small.tif", images.encode_image(np.zeros((100, 100), np.uint8), "tiff")),
                          memory_budget=1000)


def test_unsupported_shapes(tmp_path):
    with pytest.raises(ImageWriteError, match="stack"):
        images.write_image(tmp_path / "s.png", np.zeros((2, 4, 4), np.uint8), "ZYX")
    tifffile.imwrite(tmp_path / "line.tif", np.zeros((1, 0), np.uint8))
    with pytest.raises((ImageShapeError, ImageReadError)):
        images.read_image(tmp_path / "line.tif")
    with pytest.raises(ImageReadError, match="folder"):
        images.read_image(tmp_path)


def test_outputs_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        images.write_image(tmp_path / "x.png", np.zeros((2, 2), np.uint8))
    finally:
        os.umask(old)
    assert (tmp_path / "x.png").stat().st_mode & 0o777 == 0o644


def test_missing_output_folder(tmp_path):
    with pytest.raises(ImageWriteError, match="does not exist"):
        images.write_image(tmp_path / "nope" / "x.tif", np.zeros((2, 2), np.uint8))


def test_outputs_with_names_near_the_length_limit_are_written(tmp_path):
    """A 255-byte file name is legal; the temporary name beside it must fit the limit too (issue 16)."""
    for length in (242, 250, 255):
        name = "a" * (length - 4) + ".tif"
        images.write_image(tmp_path / name, np.zeros((4, 5), np.uint8), "YX")
        assert (tmp_path / name).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
