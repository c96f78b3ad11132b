"""Every image and model error path, through the real command line: exit 1, one line on stderr,
nothing on stdout, no output file."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import tifffile

from conftest import assert_one_line_error
from unetcli import images


def _huge_tiff(path):
    """Tags declare 200000 x 200000 float32 pixels (160 GB); the file holds 4 bytes of data."""
    entries = [(256, 4, 1, 200_000), (257, 4, 1, 200_000), (258, 3, 1, 32), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, 200_000), (279, 4, 1, 4), (339, 3, 1, 3)]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        ifd += struct.pack("<HHI", tag, typ, count) + (struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value))
    path.write_bytes(b"II*\x00" + struct.pack("<I", 12) + b"\0\0\0\0" + ifd + struct.pack("<I", 0))


def _bad_inputs(tmp_path):
    good = np.zeros((32, 32), np.uint8)
    good[4:12, 4:12] = 1
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, good)
    raw = full.read_bytes()
    cases = {}
    cases["missing"] = (tmp_path / "missing.png", "no such file")
    (tmp_path / "notes.png").write_text("not an image at all")
    cases["foreign"] = (tmp_path / "notes.png", "not an image")
    (tmp_path / "empty.tif").write_bytes(b"")
    cases["empty"] = (tmp_path / "empty.tif", "empty")
    (tmp_path / "cut.tif").write_bytes(raw[: len(raw) - 300])
    cases["truncated"] = (tmp_path / "cut.tif", "truncated")
    nan = np.zeros((8, 8), np.float32)
    nan[2, 2] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    cases["nan"] = (tmp_path / "nan.tif", "NaN")
    _huge_tiff(tmp_path / "huge.tif")
    cases["huge"] = (tmp_path / "huge.tif", "memory")
    tifffile.imwrite(tmp_path / "zero.tif", np.zeros((0, 5), np.uint8))
    cases["shape"] = (tmp_path / "zero.tif", "zero.tif")
    return cases


@pytest.mark.parametrize("case", ["missing", "foreign", "empty", "truncated", "nan", "huge", "shape"])
def test_bad_images_give_one_line_errors(tmp_path, unet, case):
    path, fragment = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out.tif"
    result = unet("weights", path, "-o", out)
    assert_one_line_error(result, path.name, fragment)
    assert result.code == 1
    assert not out.exists()


def test_bad_image_on_stdin(unet):
    result = unet("weights", "-", "-o", "-", "--format", "tiff", stdin=b"plain text, no image")
    assert_one_line_error(result, "<stdin>", "not an image")


def test_unwritable_output_folder(tmp_path, unet):
    lab = np.zeros((16, 16), np.uint8)
    lab[2:6, 2:6] = 1
    images.write_image(tmp_path / "lab.png", lab)
    result = unet("weights", tmp_path / "lab.png", "-o", tmp_path / "no" / "such" / "dir" / "w.tif")
    assert_one_line_error(result, "does not exist")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_carrying_model_file_is_refused_by_predict(tmp_path, unet):
    marker = tmp_path / "ran-code"
    model = tmp_path / "evil.unet"
    model.write_bytes(pickle.dumps({"weights": _Evil(marker)}))
    img = tmp_path / "in.png"
    images.write_image(img, np.zeros((20, 20), np.uint8))
    out = tmp_path / "mask.png"
    result = unet("predict", img, "-o", out, "--model", model)
    assert_one_line_error(result, "evil.unet", "pickle")
    assert not marker.exists() and not out.exists()


def _model_cases(tmp_path) -> dict[str, tuple[object, str]]:
    """A small valid model file and damaged, foreign, newer and hostile variants of it."""
    import json

    import safetensors.numpy
    import torch

    from unetcli import checkpoint
    from unetcli.model import UNet, UNetConfig

    cfg = UNetConfig(depth=2, base=4, padding="same")
    good = tmp_path / "good.unet"
    checkpoint.save_model(good, UNet(cfg).state_dict(), cfg)
    raw = good.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]

    def rewrite(name, **meta):
        text = json.dumps(dict(header, __metadata__=dict(header["__metadata__"], **meta))).encode()
        (tmp_path / name).write_bytes(struct.pack("<Q", len(text)) + text + data)
        return tmp_path / name

    (tmp_path / "cut.unet").write_bytes(raw[:-1000])
    safetensors.numpy.save_file({"w": np.zeros(3, np.float32)}, tmp_path / "other.unet")
    torch.save({"w": torch.zeros(3)}, tmp_path / "weights.pt")
    (tmp_path / "huge.unet").write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    return {"truncated": (tmp_path / "cut.unet", "truncated model file"),
            "foreign": (tmp_path / "other.unet", "without unet's records"),
            "torch": (tmp_path / "weights.pt", "zip archive"),
            "newer": (rewrite("new.unet", format_version="9"), "newer unet"),
            "hostile": (tmp_path / "huge.unet", "damaged model file"),
            "config": (rewrite("cfg.unet", config=json.dumps(dict(cfg.to_dict(), depth="deep"))), "config depth"),
            "deep": (rewrite("deep.unet", provenance="[" * 5000 + "]" * 5000), "nested too deeply")}


@pytest.mark.parametrize("case", ["truncated", "foreign", "torch", "newer", "hostile", "config", "deep"])
def test_bad_model_files_give_one_line_errors(tmp_path, unet, case):
    model, fragment = _model_cases(tmp_path)[case]
    img = tmp_path / "in.png"
    images.write_image(img, np.zeros((20, 20), np.uint8))
    out = tmp_path / "mask.png"
    result = unet("predict", img, "-o", out, "--model", model)
    assert_one_line_error(result, model.name, fragment)
    assert result.code == 1 and not out.exists()
