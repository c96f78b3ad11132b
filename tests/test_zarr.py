"""OME-Zarr and OME-TIFF: images read lazily, results written chunk by chunk with NGFF metadata, labels
into an image's labels group, pixel sizes and channel names kept, Zarr in evaluate and weights, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from conftest import assert_one_line_error, run_unet
from unetcli.checkpoint import save_model
from unetcli.images import read_image
from unetcli.model import UNet, UNetConfig

zarr = pytest.importorskip("zarr", minversion="3", reason="OME-Zarr needs zarr 3 (the interop extra)")
ome_writer = pytest.importorskip("ome_zarr.writer", reason="the round trips are checked with ome-zarr-py")
from ome_zarr.format import FormatV04, FormatV05  # noqa: E402
from ome_zarr.io import parse_url  # noqa: E402
from ome_zarr.reader import Reader  # noqa: E402

from unetcli import zarrio  # noqa: E402

NET = UNetConfig(base=4, depth=2, dropout=0.0)
CLASSES = ["background", "nucleus"]


@pytest.fixture
def model(tmp_path) -> Path:
    """A small two-class network with random weights and biases (its maps are far from constant)."""
    torch.manual_seed(0)
    net = UNet(NET)
    with torch.no_grad():
        for m in net.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0, 0.1)
    path = tmp_path / "tiny.unet"
    save_model(path, net.state_dict(), NET, normalization={"mean": [127.0], "std": [60.0]}, class_names=CLASSES)
    return path




def pixels(shape, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    """Blobs over a gradient with noise: a grey image with structure at several scales."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[-2], 0:shape[-1]]
    base = (np.sin(yy / 6.0) * np.cos(xx / 9.0) + 1) * 90 + rng.normal(0, 12, shape)
    return np.clip(base, 0, 255).astype(dtype)


def ome_image(path: Path, data: np.ndarray, axes: str, version: str = "0.4", scale: dict | None = None,
              units: str = "micrometer", levels: int = 2) -> Path:
    """An OME-Zarr image written by ome-zarr-py itself (the writer other tools use)."""
    fmt = FormatV04() if version == "0.4" else FormatV05()
    root = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
    spatial = [a for a in axes if a in "zyx"]
    ome_writer.write_image(data, root, axes=axes, fmt=fmt, scale=scale,
                           axes_units={a: units for a in spatial} if units else None,
                           scale_factors=tuple(2 ** k for k in range(1, levels)))
    return path


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".part" in p.name)


def read_ngff(path: Path):
    """The node of ``path`` as ome-zarr's own Reader finds it: (full-resolution array, metadata, specs).
    (For a label image the Reader yields its parent image first: the image-label source link works.)"""
    node = next(n for n in Reader(parse_url(str(path)))() if node_path(n) == Path(path).resolve())
    return np.asarray(node.data[0]), node.metadata, [type(s).__name__ for s in node.specs]


def node_path(node) -> Path:
    return Path(os.path.normpath(node.zarr.path)).resolve()


def first_scale(meta: dict) -> list[float]:
    return next(t["scale"] for t in meta["coordinateTransformations"][0] if t["type"] == "scale")


# ------------------------------------------------------------------------------ round trips

def test_ome_zarr_labels_round_trip_beside_and_into_the_image(run, tmp_path, model):
    """Issue 18's acceptance: image in, labels out (a file of their own and the image's labels group),
    read back by ome-zarr's Reader, pixel sizes kept, values those of the same pixels as a TIFF."""
    img = pixels((150, 130))
    ome_image(tmp_path / "img.zarr", img, "yx", scale={"y": 0.4, "x": 0.25})
    tifffile.imwrite(tmp_path / "img.tif", img, imagej=True, resolution=(1 / 0.25, 1 / 0.4),
                     metadata={"unit": "micron"})
    image_arrays = tree_digest(tmp_path / "img.zarr")

    assert run("predict", "img.tif", "-o", "ref.tif", "-m", model, "--output-type", "labels").code == 0
    assert run("predict", "img.zarr", "-o", "labels.zarr", "-m", model, "--output-type", "labels").code == 0
    done = run("predict", "img.zarr", "-o", "img.zarr/labels/nuclei", "-m", model, "--output-type", "labels")
    assert done.code == 0, done
    assert done.stdout.splitlines() == [str(Path("img.zarr/labels/nuclei"))]
    ref = read_image(tmp_path / "ref.tif")[0, ..., 0]
    assert ref.max() >= 1                                     # some objects were found

    data, meta, specs = read_ngff(tmp_path / "labels.zarr")
    assert np.array_equal(data, ref) and data.dtype == ref.dtype
    assert [a["name"] for a in meta["axes"]] == ["y", "x"]
    assert first_scale(meta) == pytest.approx([0.4, 0.25])
    assert all(a.get("unit") == "micrometer" for a in meta["axes"])

    nodes = [node_path(n) for n in Reader(parse_url(str(tmp_path / "img.zarr" / "labels" / "nuclei")))()]
    assert nodes[0] == (tmp_path / "img.zarr").resolve()      # the label finds its image
    data, meta, specs = read_ngff(tmp_path / "img.zarr" / "labels" / "nuclei")
    assert "Label" in specs and np.array_equal(data, ref)
    assert first_scale(meta) == pytest.approx([0.4, 0.25])
    found = [node_path(n) for n in Reader(parse_url(str(tmp_path / "img.zarr")))()]
    assert (tmp_path / "img.zarr" / "labels" / "nuclei").resolve() in found   # through its labels group
    attrs = json.loads((tmp_path / "img.zarr" / "labels" / ".zattrs").read_text())
    assert attrs["labels"] == ["nuclei"]
    label_attrs = json.loads((tmp_path / "img.zarr" / "labels" / "nuclei" / ".zattrs").read_text())
    assert label_attrs["image-label"]["source"] == {"image": "../../"}
    # the image itself was not written: every file it had is unchanged
    after = tree_digest(tmp_path / "img.zarr")
    assert {k: v for k, v in after.items() if not k.startswith("labels")} == image_arrays
    assert temporaries(tmp_path) == []

    # a second run replaces the label image unet wrote, and lists it once
    again = run("predict", "img.zarr", "-o", "img.zarr/labels/nuclei", "-m", model, "--output-type", "labels",
                "--min-size", "40")
    assert again.code == 0, again
    assert json.loads((tmp_path / "img.zarr" / "labels" / ".zattrs").read_text())["labels"] == ["nuclei"]
    smaller = read_image(tmp_path / "img.zarr" / "labels" / "nuclei")[0, ..., 0]
    assert smaller.max() <= ref.max() and temporaries(tmp_path) == []


def test_ngff_05_five_dimensions_and_channels(run, tmp_path, model):
    """NGFF 0.5 (Zarr v3), t and z as pages, the channel picked: outputs keep the axes and the scale,
    in the input's version, and equal the prediction of the same pages as a TIFF stack."""
    rng = np.random.default_rng(3)
    stack = np.stack([pixels((2, 3, 60, 70), seed=s) for s in range(2)], axis=1)      # t c z y x
    stack[:, 0] = rng.integers(0, 255, stack[:, 0].shape)                             # channel 1: noise
    ome_image(tmp_path / "t.zarr", stack, "tczyx", version="0.5",
              scale={"t": 1.0, "c": 1.0, "z": 2.0, "y": 0.5, "x": 0.5})
    tifffile.imwrite(tmp_path / "pages.tif", stack[:, 1].reshape(6, 60, 70))

    assert run("predict", "pages.tif", "-o", "ref.tif", "-m", model).code == 0
    assert run("predict", "pages.tif", "-o", "ref-p.tif", "-m", model, "--output-type", "probs").code == 0
    assert run("predict", "t.zarr", "-o", "mask.zarr", "-m", model, "--channels", "2").code == 0
    assert run("predict", "t.zarr", "-o", "probs.zarr", "-m", model, "--channels", "2",
               "--output-type", "probs").code == 0
    unpicked = run("predict", "t.zarr", "-o", "x.zarr", "-m", model)
    assert_one_line_error(unpicked, "t.zarr", "2 channels", "--channels")

    mask, meta, _ = read_ngff(tmp_path / "mask.zarr")
    assert mask.shape == (2, 3, 60, 70) and [a["name"] for a in meta["axes"]] == list("tzyx")
    assert np.array_equal(mask.reshape(6, 60, 70), read_image(tmp_path / "ref.tif")[..., 0])
    assert first_scale(meta) == pytest.approx([1.0, 2.0, 0.5, 0.5])
    assert json.loads((tmp_path / "mask.zarr" / "zarr.json").read_text())["attributes"]["ome"]["version"] == "0.5"

    probs, meta, _ = read_ngff(tmp_path / "probs.zarr")
    assert probs.shape == (2, 2, 3, 60, 70) and [a["name"] for a in meta["axes"]] == list("tczyx")
    assert meta["channel_names"] == CLASSES                   # OMERO channel labels: the class names
    ref = read_image(tmp_path / "ref-p.tif")                 # ImageJ hyperstack: slice-major pages of classes
    ref = ref[..., 0].reshape(6, 2, 60, 70) if ref.shape[-1] == 1 else np.moveaxis(ref, -1, 1)
    got = np.moveaxis(probs, 1, 2).reshape(6, 2, 60, 70)
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_pyramid_levels_and_metadata(run, tmp_path, model, monkeypatch):
    """Lower levels: every other pixel of a label image, 2x2 means of probabilities, scale doubled."""
    monkeypatch.setattr(zarrio, "PYRAMID_SIDE", 40)
    img = pixels((130, 90))
    ome_image(tmp_path / "img.zarr", img, "yx", scale={"y": 0.3, "x": 0.3})
    assert run("predict", "img.zarr", "-o", "lab.zarr", "-m", model, "--output-type", "labels").code == 0
    assert run("predict", "img.zarr", "-o", "p.zarr", "-m", model, "--output-type", "probs").code == 0
    node = next(iter(Reader(parse_url(str(tmp_path / "lab.zarr")))()))
    levels = [np.asarray(d) for d in node.data]
    assert [lv.shape for lv in levels] == [(130, 90), (65, 45), (33, 23)]
    assert np.array_equal(levels[1], levels[0][::2, ::2]) and np.array_equal(levels[2], levels[1][::2, ::2])
    scales = [next(t["scale"] for t in ts if t["type"] == "scale")
              for ts in node.metadata["coordinateTransformations"]]
    assert scales == [pytest.approx([0.3, 0.3]), pytest.approx([0.6, 0.6]), pytest.approx([1.2, 1.2])]
    probs = [np.asarray(zarr.open_array(str(tmp_path / "p.zarr" / str(k)), mode="r")) for k in range(3)]
    top = probs[0]                                           # (classes, 130, 90): even sides
    means = (top[:, 0::2, 0::2] + top[:, 1::2, 0::2] + top[:, 0::2, 1::2] + top[:, 1::2, 1::2]) / 4
    np.testing.assert_allclose(probs[1], means, atol=1e-6)
    assert probs[2].shape == (2, 33, 23)                     # an odd side: the edge pixel counted twice
    np.testing.assert_allclose(probs[2][:, -1, -1], probs[1][:, -1, -1], atol=1e-6)


# ------------------------------------------------------------------------------ lazy, bounded

def test_zarr_rows_read_only_what_is_asked(tmp_path):
    """Bands by slice, mirrored row numbers and sparse samples equal the array's rows; a band read
    decodes only the chunks of its rows."""
    data = pixels((3, 200, 90), seed=1, dtype=np.uint16)
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=2)
    root.create_array("0", data=data, chunks=(1, 32, 45))
    root.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a, "type": "space"} for a in "zyx"],
                                  "datasets": [{"path": "0"}]}]
    src = zarrio.ZarrRows.open(tmp_path / "s.zarr")
    assert src.shape == (3, 200, 90, 1) and src.dtype == np.uint16
    assert np.array_equal(src.rows(1, slice(40, 90)), data[1, 40:90, :, None])
    mirrored = np.array([3, 2, 1, 0, 0, 1, 2, 3, 4])
    assert np.array_equal(src.rows(2, mirrored), data[2][mirrored][..., None])
    sample = np.array([0, 50, 120, 199])
    assert np.array_equal(src.rows(0, sample), data[0][sample][..., None])

    touched = []
    store = src.image.array.store
    original = store.get

    async def counting_get(key, *args, **kwargs):
        touched.append(key)
        return await original(key, *args, **kwargs)

    store.get = counting_get
    try:
        src.rows(1, slice(70, 100))                          # rows 70..99: chunk rows 2 and 3, 2 columns
    finally:
        store.get = original
    chunks = sorted({tuple(int(v) for v in k.replace("/", ".").split(".")[-3:]) for k in touched
                     if not k.endswith((".zarray", ".zattrs", ".zgroup", "zarr.json"))})
    assert chunks == [(1, 2, 0), (1, 2, 1), (1, 3, 0), (1, 3, 1)]


def _tall(path: Path, height: int, width: int = 512) -> Path:
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    arr = root.create_array("0", shape=(height, width), chunks=(256, 256), dtype="float32", fill_value=0)
    for y0 in range(0, height, 1000):
        arr[y0:y0 + 1000] = pixels((min(1000, height - y0), width), seed=y0).astype(np.float32)
    root.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}],
                                  "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]}]
    return path


def test_a_zarr_image_larger_than_the_budget_is_predicted_a_band_at_a_time(run, tmp_path, model):
    """The memory of the arrays (tracemalloc: the image, the result, the bands, the chunk buffers) does
    not grow with the image's height: a 3x taller image (3.9 MiB -> 11.7 MiB of float32 pixels, over
    the 8 MiB budget) peaks at the same few MiB (measured: 4.9 MiB for masks, 9.3-9.8 MiB for streamed
    probabilities), well under its image and result held whole; its mask equals the prediction
    of the same pixels read whole from a TIFF."""
    _tall(tmp_path / "short.zarr", 2000)
    _tall(tmp_path / "tall.zarr", 6000)
    common = ["-m", model, "--tile", "256", "--memory-budget", "8M", "--backend", "torch"]
    assert run("predict", "short.zarr", "-o", "warm.zarr", *common).code == 0        # imports, caches
    assert run("predict", "short.zarr", "-o", "warm-p.zarr", *common, "--output-type", "probs").code == 0
    peaks = {}
    for kind in ("mask", "probs"):
        for name in ("short", "tall"):
            tracemalloc.start()
            try:
                done = run("predict", f"{name}.zarr", "-o", f"{name}-{kind}.zarr", *common, "--output-type", kind)
                peaks[kind, name] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert done.code == 0, done
    whole = {kind: 6000 * 512 * (4 + per) for kind, per in (("mask", 1), ("probs", 8))}   # image + result
    for kind in ("mask", "probs"):
        assert peaks[kind, "tall"] < peaks[kind, "short"] + 2**20, peaks
        assert peaks[kind, "tall"] < whole[kind] / 2, peaks
    assert peaks["mask", "tall"] < 8 * 2**20, peaks         # within the budget given
    tifffile.imwrite(tmp_path / "tall.tif", read_image(tmp_path / "tall.zarr")[0, ..., 0])
    assert run("predict", "tall.tif", "-o", "tall-ref.tif", *common).code == 0
    assert np.array_equal(read_image(tmp_path / "tall-mask.zarr"), read_image(tmp_path / "tall-ref.tif"))


# ------------------------------------------------------------------------------ OME-TIFF

def test_ome_tiff_physical_sizes_and_channel_names_read_and_written(run, tmp_path, model):
    from unetcli import tiffmeta

    img = pixels((2, 80, 70))
    tifffile.imwrite(tmp_path / "in.ome.tif", img[:, None], ome=True, photometric="minisblack",
                     metadata={"axes": "ZCYX", "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.8, "PhysicalSizeXUnit": "µm",
                               "PhysicalSizeYUnit": "µm", "PhysicalSizeZ": 2.5, "Channel": {"Name": ["DAPI"]}})
    assert tiffmeta.pixel_size(tmp_path / "in.ome.tif") == {"x": pytest.approx(0.65), "y": pytest.approx(0.8),
                                                            "unit": "um", "z": pytest.approx(2.5)}
    assert tiffmeta.channel_names(tmp_path / "in.ome.tif") == ["DAPI"]

    assert run("predict", "in.ome.tif", "-o", "p.ome.tif", "-m", model, "--output-type", "probs").code == 0
    assert run("predict", "in.ome.tif", "-o", "m.ome.tif", "-m", model).code == 0        # streamed strips
    assert run("predict", "in.ome.tif", "-o", "m.tif", "-m", model, "--provenance").code == 0
    assert json.loads((tmp_path / "m.tif.json").read_text())["input"]["channel_names"] == ["DAPI"]
    with tifffile.TiffFile(tmp_path / "p.ome.tif") as tf:
        assert tf.is_ome and tf.series[0].axes == "ZCYX" and tf.series[0].shape == (2, 2, 80, 70)
        probs = tf.series[0].asarray()
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert tiffmeta.channel_names(tmp_path / "p.ome.tif") == CLASSES
    for name in ("p.ome.tif", "m.ome.tif"):
        size = tiffmeta.pixel_size(tmp_path / name)
        assert size["x"] == pytest.approx(0.65) and size["y"] == pytest.approx(0.8) and size["z"] == pytest.approx(2.5)
    assert np.array_equal(read_image(tmp_path / "m.ome.tif"), read_image(tmp_path / "m.tif"))
    assert np.array_equal(np.argmax(probs, axis=1), read_image(tmp_path / "m.tif")[..., 0])
    # an OME-Zarr output of an OME-TIFF input carries its physical size
    assert run("predict", "in.ome.tif", "-o", "m.zarr", "-m", model).code == 0
    _data, meta, _ = read_ngff(tmp_path / "m.zarr")
    assert first_scale(meta) == pytest.approx([2.5, 0.8, 0.65])


# ------------------------------------------------------------------------------ evaluate and weights

def test_evaluate_and_weights_read_zarr(run, tmp_path):
    rng = np.random.default_rng(4)
    labels = np.zeros((60, 70), np.uint16)
    for k in range(1, 6):
        y, x = rng.integers(5, 50, 2)
        labels[y:y + 8, x:x + 9] = k
    root = zarr.open_group(str(tmp_path / "truth.zarr"), mode="w", zarr_format=2)
    ome_writer.write_image(labels, root, axes="yx", fmt=FormatV04(), scale_factors=())
    tifffile.imwrite(tmp_path / "truth.tif", labels)
    (tmp_path / "preds").mkdir()
    pred = labels.copy()
    pred[pred == 5] = 0                                      # one object missed
    zroot = zarr.open_group(str(tmp_path / "preds" / "a.zarr"), mode="w", zarr_format=2)
    ome_writer.write_image(pred, zroot, axes="yx", fmt=FormatV04(), scale_factors=())
    tifffile.imwrite(tmp_path / "preds" / "b.tif", labels)
    (tmp_path / "truths").mkdir()
    tifffile.imwrite(tmp_path / "truths" / "a.tif", labels)
    tifffile.imwrite(tmp_path / "truths" / "b.tif", labels)

    one = run("evaluate", "truth.zarr", "--truth", "truth.tif", "--metrics", "f1", "--json")
    assert one.code == 0, one
    assert json.loads(one.stdout)["images"][0]["metrics"]["f1"] == 1.0
    both = run("evaluate", "preds", "--truth", "truths", "--metrics", "f1", "--json")
    assert both.code == 0, both
    scores = {im["name"]: im["metrics"]["f1"] for im in json.loads(both.stdout)["images"]}
    assert scores == {"a.zarr": pytest.approx(8 / 9), "b.tif": 1.0}     # the .zarr folder is one image

    assert run("weights", "truth.zarr", "-o", "wz.tif").code == 0
    assert run("weights", "truth.tif", "-o", "wt.tif").code == 0
    assert np.array_equal(read_image(tmp_path / "wz.tif"), read_image(tmp_path / "wt.tif"))
    assert run("weights", "preds", "-o", "wf/").code == 0
    assert sorted(p.name for p in (tmp_path / "wf").iterdir()) == ["a.tif", "b.tif"]


# ------------------------------------------------------------------------------ refusals

def test_bad_zarr_inputs_are_one_line_errors(run, tmp_path, model):
    zarr.open_group(str(tmp_path / "group.zarr"), mode="w", zarr_format=2).attrs["note"] = "no image"
    (tmp_path / "empty.zarr").mkdir()
    plate = zarr.open_group(str(tmp_path / "plate.zarr"), mode="w", zarr_format=2)
    plate.attrs["plate"] = {"wells": [], "columns": [], "rows": []}
    b2r = zarr.open_group(str(tmp_path / "b2r.zarr"), mode="w", zarr_format=2)
    b2r.attrs["bioformats2raw.layout"] = 3
    for series in ("0", "1"):
        ome_image(tmp_path / "b2r.zarr" / series, pixels((40, 40)), "yx", levels=1)
    plain4 = zarr.open_group(str(tmp_path / "four.zarr"), mode="w", zarr_format=2)
    plain4.create_array("0", shape=(2, 2, 30, 30), dtype="uint8")
    before = tree_digest(tmp_path)
    cases = [("group.zarr", "without OME-Zarr multiscales"), ("empty.zarr", "not a Zarr store"),
             ("plate.zarr", "plate"), ("b2r.zarr", "2 image series"), ("four.zarr/0", "axes are not named")]
    for name, words in cases:
        result = run("predict", name, "-o", "out.zarr", "-m", model)
        assert_one_line_error(result, name, words)
    assert tree_digest(tmp_path) == before and temporaries(tmp_path) == []
    assert run("predict", "b2r.zarr/1", "-o", "one.tif", "-m", model).code == 0       # one series: fine


def test_outputs_over_the_input_image_are_refused(run, tmp_path, model):
    ome_image(tmp_path / "img.zarr", pixels((50, 60)), "yx")
    root = zarr.open_group(str(tmp_path / "img.zarr"), mode="r+")
    ome_writer.write_labels(np.ones((50, 60), np.uint8), root, name="manual", axes="yx", fmt=FormatV04(),
                            scaler=None, scale_factors=())
    before = tree_digest(tmp_path)
    cases = [(["-o", "img.zarr"], "overwrite the input"),
             (["-o", "img.zarr/s0"], "inside the Zarr store img.zarr"),
             (["-o", "img.zarr/extra.zarr"], "inside the Zarr store img.zarr"),
             (["-o", "img.zarr/labels/manual/more.tif"], "inside the Zarr store img.zarr/labels/manual"),
             (["-o", "img.zarr/labels/p", "--output-type", "probs"], "not a label image"),
             (["-o", "img.zarr/labels/manual", "--output-type", "labels"], "unet did not write"),
             (["-o", "img.zarr/labels/.hidden"], "not a label name"),
             (["-o", "-", "--format", "zarr"], "stdout")]
    for args, words in cases:
        result = run("predict", "img.zarr", *args, "-m", model)
        assert_one_line_error(result, words)
    other = tmp_path / "other.png"
    from unetcli.images import write_image
    write_image(other, pixels((50, 60)))
    before = tree_digest(tmp_path)
    result = run("predict", "other.png", "-o", "img.zarr/labels/x", "-m", model)
    assert_one_line_error(result, "labels group of the image they were predicted from")
    (tmp_path / "folder.zarr").mkdir()
    (tmp_path / "folder.zarr" / "notes.txt").write_text("mine")
    before = tree_digest(tmp_path)
    result = run("predict", "other.png", "-o", "folder.zarr", "-m", model)
    assert_one_line_error(result, "folder.zarr", "not a Zarr store")
    assert tree_digest(tmp_path) == before and temporaries(tmp_path) == []


def test_missing_zarr_package_is_one_line_with_the_install_hint(tmp_path, model):
    ome_image(tmp_path / "img.zarr", pixels((40, 50)), "yx")
    from unetcli.images import write_image
    write_image(tmp_path / "img.png", pixels((40, 50)))
    shim = tmp_path / "shim" / "zarr"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('zarr is not installed here')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "shim"), os.environ.get("PYTHONPATH", "")])}
    before = tree_digest(tmp_path)
    for args in (["predict", "img.zarr", "-o", "m.tif", "-m", str(model)],
                 ["predict", "img.png", "-o", "m.zarr", "-m", str(model)],
                 ["evaluate", "img.zarr", "--truth", "img.png"]):
        result = run_unet(*args, cwd=tmp_path, env=env, timeout=120)
        assert_one_line_error(result, "zarr", "unet[interop]")
    assert tree_digest(tmp_path) == before


# ------------------------------------------------------------------------------ atomic writes

def test_failed_write_leaves_nothing_and_stale_temporaries_are_removed(tmp_path):
    geo = zarrio.Geometry.of_pages(2, 70, 60, {"x": 0.5, "y": 0.5, "unit": "um"})
    data = pixels((2, 70, 60))
    with pytest.raises(RuntimeError):
        with zarrio.ZarrOutput(tmp_path / "m.zarr", geo, np.uint8) as out:
            out.add_rows(0, 0, data[0])
            raise RuntimeError("the prediction failed half way")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="out of order"):
        with zarrio.ZarrOutput(tmp_path / "m.zarr", geo, np.uint8) as out:
            out.add_rows(0, 10, data[0][10:])
    assert list(tmp_path.iterdir()) == []
    dead = tmp_path / ".m.zarr.999999999.abcdefgh.part"       # a writer killed by SIGKILL
    (dead / "0").mkdir(parents=True)
    zarrio.write_array(tmp_path / "m.zarr", data, geo, kind="mask")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.zarr"]
    zarrio.write_array(tmp_path / "m.zarr", data[::-1].copy(), geo, kind="mask")       # replaced whole
    assert np.array_equal(read_image(tmp_path / "m.zarr")[..., 0], data[::-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.zarr"]


def test_a_streamed_tiff_with_more_channels_is_adapted_band_by_band(run, tmp_path, model, monkeypatch):
    """``ChannelRows``: a striped TIFF read strip by strip, RGB given to a grey model, is converted to
    luminance band by band, the same mask as the image read whole; ``--channels`` picks likewise."""
    from unetcli import pipeline

    from unetcli.sources import TiffRows

    rgb = np.stack([pixels((90, 80), seed=s) for s in range(3)], axis=-1)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb", rowsperstrip=8, metadata=None)
    src = TiffRows.open(tmp_path / "rgb.tif")                # a single RGB page is streamed too
    assert src is not None and src.shape == (1, 90, 80, 3)
    src.close()
    assert run("predict", "rgb.tif", "-o", "whole.tif", "-m", model).code == 0
    assert run("predict", "rgb.tif", "-o", "whole-2.tif", "-m", model, "--channels", "2").code == 0
    monkeypatch.setattr(pipeline, "STREAM_TIFF_BYTES", 0)                 # as if it were huge
    assert run("predict", "rgb.tif", "-o", "rows.tif", "-m", model).code == 0
    assert run("predict", "rgb.tif", "-o", "rows-2.tif", "-m", model, "--channels", "2").code == 0
    assert np.array_equal(read_image(tmp_path / "rows.tif"), read_image(tmp_path / "whole.tif"))
    assert np.array_equal(read_image(tmp_path / "rows-2.tif"), read_image(tmp_path / "whole-2.tif"))
    assert not np.array_equal(read_image(tmp_path / "rows.tif"), read_image(tmp_path / "rows-2.tif"))
