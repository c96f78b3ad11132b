"""Instance outlines for Fiji and QuPath: tracing label borders (``outlines``), the ImageJ ROI set and
the GeoJSON file (``roifiles``), and ``unet predict --output-type labels -o cells.zip|cells.geojson``."""

from __future__ import annotations

import io
import json
import math
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import assert_one_line_error
from unetcli import roifiles
from unetcli.checkpoint import save_model
from unetcli.errors import LabelError, TooLargeError
from unetcli.images import read_image, write_image
from unetcli.model import UNet, UNetConfig
from unetcli.outlines import Outline, count_edges, ring_area, trace

FOUR = ndimage.generate_binary_structure(2, 1)


# ------------------------------------------------------------------------------------------ helpers

def fill(rings, shape) -> np.ndarray:
    """Even-odd fill of closed or open rings of (x, y) pixel corners, sampled at pixel centres: a
    pixel is inside when a ray from its centre to the left crosses the rings an odd number of times."""
    h, w = shape
    out = np.zeros(shape, bool)
    centres = np.arange(h) + 0.5
    for ring in rings:
        ring = np.asarray(ring, np.float64)
        x0, y0 = ring[:, 0], ring[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        for xa, ya, xb, yb in zip(x0, y0, x1, y1):
            if ya == yb:
                continue                                  # horizontal edges never cross a centre's row
            assert xa == xb, "pixel-edge outlines have only horizontal and vertical edges"
            rows = (centres > min(ya, yb)) & (centres < max(ya, yb))
            out[rows, :int(xa)] ^= True                   # centres left of the edge see it on their right
    return out


def skimage_fill(rings, shape) -> np.ndarray:
    """The same by scikit-image, whose polygon takes pixel centres at integers: shift by half a pixel."""
    draw = pytest.importorskip("skimage.draw", reason="scikit-image (the test extra) rasterises polygons")
    out = np.zeros(shape, bool)
    for ring in rings:
        ring = np.asarray(ring, np.float64)
        rr, cc = draw.polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape)
        mask = np.zeros(shape, bool)
        mask[rr, cc] = True
        out ^= mask
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_geojson(doc) -> None:
    """A structural check against RFC 7946: a FeatureCollection of Features whose geometries are
    Polygons or MultiPolygons of linear rings (closed, four positions or more, finite numbers),
    exteriors counter-clockwise and holes clockwise (the right-hand rule, section 3.1.6)."""
    assert isinstance(doc, dict) and doc.get("type") == "FeatureCollection", "not a FeatureCollection"
    assert isinstance(doc.get("features"), list), "features is not an array"
    for f in doc["features"]:
        assert f.get("type") == "Feature" and isinstance(f.get("properties"), dict)
        g = f.get("geometry")
        assert isinstance(g, dict) and g.get("type") in ("Polygon", "MultiPolygon")
        polygons = [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]
        assert isinstance(polygons, list) and polygons
        for polygon in polygons:
            assert isinstance(polygon, list) and polygon, "a polygon holds one ring at least"
            for k, ring in enumerate(polygon):
                assert isinstance(ring, list) and len(ring) >= 4, "a linear ring has four positions or more"
                for pos in ring:
                    assert isinstance(pos, list) and len(pos) in (2, 3) and all(map(_finite_number, pos))
                assert ring[0] == ring[-1], "a linear ring is closed"
                area = ring_area(np.asarray(ring[:-1], np.float64))
                assert (area > 0) if k == 0 else (area < 0), "exterior counter-clockwise, holes clockwise"


def check_outlines(lab: np.ndarray, outlines: list[Outline]) -> None:
    """Every object traced: filled it is exactly its pixels; each part is one 4-connected piece (its
    holes inside it); rings are simple and oriented; the area is the pixel count."""
    ids = sorted(int(v) for v in np.unique(lab) if v != 0)
    assert [o.label for o in outlines] == ids
    for o in outlines:
        obj = lab == o.label
        assert np.array_equal(fill([r for part in o.parts for r in part], lab.shape), obj), o.label
        assert o.area == np.count_nonzero(obj)
        pieces, n = ndimage.label(obj, FOUR)
        assert len(o.parts) == n
        wanted = [pieces == i for i in range(1, n + 1)]
        for part in o.parts:
            assert any(np.array_equal(fill(part, lab.shape), piece) for piece in wanted)
            assert ring_area(part[0]) > 0 and all(ring_area(hole) < 0 for hole in part[1:])
            for ring in part:
                assert len({tuple(p) for p in ring.tolist()}) == len(ring), "a ring passes a corner twice"


def _grid(text: str) -> np.ndarray:
    """A label image drawn as text: '.' background, digits and letters ids."""
    rows = [r.strip() for r in text.strip().splitlines()]
    return np.array([[0 if ch == "." else int(ch, 36) for ch in row] for row in rows], np.uint16)


CASES = {
    "touching": """
        1122
        1122
        3344
        3344""",
    "border": """
        11..
        1...
        ...2
        ..22""",
    "hole": """
        11111
        1...1
        1.2.1
        1...1
        11111""",
    "one-pixel": """
        1.2.3
        .....
        4.5.6""",
    "diagonal-only": """
        1...
        .1..
        ..1.
        ...1""",
    "hole-touching-outside-at-a-corner": """
        1111
        1..1
        1.1.
        11..""",
    "two-holes-meeting-at-a-corner": """
        11111
        1.111
        11.11
        11111""",
    "ring-with-a-pinch": """
        .111.
        1...1
        1.1.1
        1...1
        .111.""",
    "checkerboard": """
        1212
        2121
        1212""",
}


# -------------------------------------------------------------------------------------------- tracing

@pytest.mark.parametrize("name", sorted(CASES))
def test_trace_gives_back_each_object(name):
    lab = _grid(CASES[name])
    check_outlines(lab, trace(lab))


def test_trace_shapes_of_the_cases():
    hole = {o.label: o for o in trace(_grid(CASES["hole"]))}
    assert len(hole[1].parts) == 1 and hole[1].holes == 1 and hole[2].holes == 0
    assert hole[1].parts[0][0].tolist() == [[0, 0], [5, 0], [5, 5], [0, 5]]     # corners only
    diagonal = trace(_grid(CASES["diagonal-only"]))[0]
    assert len(diagonal.parts) == 4 and diagonal.holes == 0                   # 4-connected: four pieces
    one = {o.label: o for o in trace(_grid(CASES["one-pixel"]))}
    assert one[5].parts[0][0].tolist() == [[2, 2], [3, 2], [3, 3], [2, 3]] and one[5].area == 1
    # a notch that reaches the outside through a corner is no hole: background is 8-connected
    notch = trace(_grid(CASES["hole-touching-outside-at-a-corner"]))[0]
    assert len(notch.parts) == 2
    two = trace(_grid(CASES["two-holes-meeting-at-a-corner"]))[0]
    assert len(two.parts) == 1 and two.holes == 2


def test_trace_random_labels():
    rng = np.random.default_rng(7)
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(1, 28, 2))
        lab = rng.integers(0, 5, (h, w)) * (rng.random((h, w)) < rng.uniform(0.2, 0.9))
        if trial % 2:
            lab = ndimage.label(lab > 0, FOUR)[0]        # unet's own labels: 4-connected components
        check_outlines(lab.astype(np.uint32), trace(lab.astype(np.uint32)))


def test_no_objects():
    assert trace(np.zeros((5, 7), np.uint16)) == []
    assert trace(np.zeros((0, 4), np.uint16)) == []
    assert json.loads(roifiles.encode(np.zeros((0, 4), np.uint16), "geojson"))["features"] == []
    doc = json.loads(roifiles.encode(np.zeros((5, 7), np.uint16), "geojson"))
    assert doc == {"type": "FeatureCollection", "features": []}
    validate_geojson(doc)
    with zipfile.ZipFile(io.BytesIO(roifiles.encode(np.zeros((5, 7), np.uint16), "zip"))) as zf:
        assert zf.testzip() is None and zf.namelist() == []


def test_sparse_and_large_ids_and_bool():
    lab = np.zeros((6, 6), np.uint32)
    lab[1:3, 1:3] = 4_000_000_000
    lab[4, 4] = 7
    assert [o.label for o in trace(lab)] == [7, 4_000_000_000]
    assert [o.label for o in trace(lab > 0)] == [1]


def test_labels_that_are_not_labels_are_refused():
    with pytest.raises(LabelError, match="whole numbers"):
        trace(np.full((3, 3), 1.5))
    with pytest.raises(LabelError, match="negative"):
        trace(np.array([[0, -1]]))
    with pytest.raises(LabelError, match="2-D"):
        trace(np.zeros((2, 2, 2), np.uint8))


def _blobs(n: int, side: int, seed: int = 0) -> np.ndarray:
    """``n`` ellipses of radius 5 to 16 at random places (later ones over earlier ones, so many touch or
    are cut in pieces), drawn without a loop over pixels."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((side, side), np.uint16)
    yy, xx = np.mgrid[-16:17, -16:17]
    for i in range(1, n + 1):
        ry, rx = rng.uniform(5, 16), rng.uniform(4, 16)
        cy, cx = (int(v) for v in rng.integers(16, side - 16, 2))
        disk = (yy / ry) ** 2 + (xx / rx) ** 2 < 1
        lab[cy - 16:cy + 17, cx - 16:cx + 17][disk] = i
    return lab


def test_many_objects_take_time_in_proportion_to_the_image():
    lab = _blobs(2000, 1024)
    start = time.perf_counter()
    outlines = trace(lab)
    seconds = time.perf_counter() - start
    assert len(outlines) == len(np.unique(lab)) - 1 > 1500
    # a loop over objects x pixels would be 2000 x 1M steps; the tracing takes a fraction of a second
    assert seconds < 20, seconds
    sample = lab[:256, :256]
    check_outlines(sample, trace(sample))


# --------------------------------------------------------------------------------- ImageJ ROI sets

def _read_rois(payload: bytes):
    roifile = pytest.importorskip("roifile", reason="reading ROI sets back needs roifile (the interop extra)")
    with zipfile.ZipFile(io.BytesIO(payload)) as zf:
        names = zf.namelist()
        return names, [roifile.ImagejRoi.frombytes(zf.read(n)) for n in names]


def _roi_rings(roi) -> list[np.ndarray]:
    return [np.asarray(c, np.float64) for c in roi.coordinates(multi=True)]


def test_roi_zip_read_back_with_roifile(tmp_path):
    roifile = pytest.importorskip("roifile", reason="the ROI set is written and read with roifile")
    lab = _grid("""
        1112233.
        1.12233.
        111..4..
        5...4.4.
        .6..44..
        ......77""")
    roifiles.write(tmp_path / "cells.zip", lab)
    rois = roifile.roiread(tmp_path / "cells.zip")
    assert [r.name for r in rois] == ["1", "2", "3", "4", "5", "6", "7"]   # ids kept as names
    kinds = {r.name: (r.roitype, r.composite) for r in rois}
    assert kinds["1"] == (roifile.ROI_TYPE.RECT, True)                      # a hole: composite ROI
    assert kinds["4"] == (roifile.ROI_TYPE.RECT, True)                      # pieces touching at corners
    assert kinds["2"] == (roifile.ROI_TYPE.TRACED, False)
    for roi in rois:
        obj = lab == int(roi.name)
        rings = _roi_rings(roi)
        assert iou(skimage_fill(rings, lab.shape), obj) >= 0.95
        assert np.array_equal(fill(rings, lab.shape), obj)                 # in fact exactly its pixels
        assert roi.position == 0
        x0, y0 = np.argwhere(obj)[:, ::-1].min(0)
        assert (roi.left, roi.top) == (x0, y0)


def test_roi_zip_of_a_stack_names_and_positions():
    pages = np.stack([_grid(CASES["touching"]), _grid(CASES["hole"])[:4, :4], np.zeros((4, 4), np.uint16)])
    names, rois = _read_rois(roifiles.encode(pages, "zip"))
    assert names == [f"0001-{i}.roi" for i in (1, 2, 3, 4)] + ["0002-1.roi", "0002-2.roi"]
    assert [r.position for r in rois] == [1, 1, 1, 1, 2, 2]
    assert [r.name for r in rois] == [n[:-4] for n in names]
    for roi in rois:
        page, label = (int(v) for v in roi.name.split("-"))
        assert np.array_equal(fill(_roi_rings(roi), (4, 4)), pages[page - 1] == label)


def test_roi_zip_is_the_same_bytes_each_time():
    lab = _blobs(40, 128, seed=3)
    assert roifiles.encode(lab, "zip") == roifiles.encode(lab.copy(), "zip")


def test_roi_beyond_imagejs_integer_range_has_float_coordinates():
    pytest.importorskip("roifile", reason="ROIs are built with roifile")
    ring = np.array([[70000, 5], [70002, 5], [70002, 6], [70000, 6]], np.int64)
    roi = roifiles.imagej_roi(Outline(9, ((ring,),), 2))
    import roifile

    back = roifile.ImagejRoi.frombytes(roi.tobytes())
    assert np.array_equal(back.coordinates(), ring.astype(np.float32))


# ---------------------------------------------------------------------------------------- GeoJSON

def _geometry_rings(feature) -> list[list]:
    g = feature["geometry"]
    polygons = [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]
    return [ring for polygon in polygons for ring in polygon]


def test_geojson_validates_and_holds_one_feature_per_object():
    lab = np.zeros((40, 50), np.uint16)
    for name, text in CASES.items():
        g = _grid(text)
        k = sorted(CASES).index(name)
        y, x = 8 * (k // 5), 10 * (k % 5)
        lab[y:y + g.shape[0], x:x + g.shape[1]] = np.where(g > 0, g + 10 * k, 0)
    doc = json.loads(roifiles.encode(lab, "geojson", classification="nucleus"))
    validate_geojson(doc)
    ids = [int(v) for v in np.unique(lab) if v]
    assert [f["properties"]["name"] for f in doc["features"]] == [str(i) for i in ids]
    for f in doc["features"]:
        props = f["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"] == {"name": "nucleus", "color": [255, 0, 0]}
        assert "plane" not in f["geometry"]
        obj = lab == int(props["name"])
        assert np.array_equal(fill([r[:-1] for r in _geometry_rings(f)], lab.shape), obj)
        pieces = ndimage.label(obj, FOUR)[1]
        assert f["geometry"]["type"] == ("Polygon" if pieces == 1 else "MultiPolygon")
    holed = next(f for f in doc["features"] if f["properties"]["name"] == str(1 + 10 * sorted(CASES).index("hole")))
    assert len(holed["geometry"]["coordinates"]) == 2                   # exterior + one interior ring


def test_geojson_of_a_stack_carries_the_plane_and_annotations_on_request():
    one = _grid(CASES["one-pixel"])
    pages = np.stack([one, np.zeros_like(one), one])
    doc = json.loads(roifiles.encode(pages, "geojson", object_type="annotation"))
    validate_geojson(doc)
    assert len(doc["features"]) == 12
    assert [f["geometry"]["plane"]["z"] for f in doc["features"]] == [0] * 6 + [2] * 6
    assert all(f["geometry"]["plane"] == {"c": -1, "z": f["geometry"]["plane"]["z"], "t": 0}
               for f in doc["features"])
    assert {f["properties"]["objectType"] for f in doc["features"]} == {"annotation"}
    assert "classification" not in doc["features"][0]["properties"]


def test_outline_guards():
    lab = _blobs(30, 96)
    with pytest.raises(TooLargeError, match="border edges"):
        roifiles.encode(lab, "geojson", name="x.geojson", memory_budget=1000)
    assert count_edges(lab) * 1 > 1000
    with pytest.raises(Exception, match="detection or an annotation"):
        roifiles.encode(lab, "geojson", object_type="cell")
    with pytest.raises(Exception, match="integer instance labels"):
        roifiles.encode(lab.astype(np.float32), "zip")


def test_write_is_atomic_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "cells.geojson"
    target.write_text("old")
    with pytest.raises(TooLargeError):
        roifiles.write(target, _blobs(30, 96), memory_budget=1000)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.geojson"]


# -------------------------------------------------------------------------------------- the command

GREY = UNetConfig(base=4, depth=2, dropout=0.0)




@pytest.fixture
def tiny(tmp_path) -> Path:
    """A tiny two-class model with random weights (its objects are random blobs, a good many)."""
    torch.manual_seed(2)
    net = UNet(GREY)
    with torch.no_grad():
        for m in net.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0, 0.1)
    path = tmp_path / "tiny.unet"
    save_model(path, net.state_dict(), GREY, normalization={"mean": [127.0], "std": [60.0]},
               class_names=["background", "cell"])
    return path


def _image(tmp_path: Path, name: str = "in.png", seed: int = 4, shape=(90, 77)) -> Path:
    rng = np.random.default_rng(seed)
    path = tmp_path / name
    img = ndimage.uniform_filter(rng.random(shape), 3)
    write_image(path, ((img - img.min()) / (img.max() - img.min()) * 255).astype(np.uint8))
    return path


def test_predict_writes_roi_sets_and_geojson_that_match_its_labels(run, tmp_path, tiny):
    _image(tmp_path)
    for out in ("labels.tif", "cells.zip", "cells.geojson"):
        result = run("predict", "in.png", "-o", out, "-m", tiny, "--output-type", "labels")
        assert result.code == 0, result
        assert result.stdout.split() == [out]
    labels = read_image(tmp_path / "labels.tif")[0, ..., 0]
    ids = [int(v) for v in np.unique(labels) if v]
    assert len(ids) > 3
    names, rois = _read_rois((tmp_path / "cells.zip").read_bytes())
    assert [r.name for r in rois] == [str(i) for i in ids]
    for roi in rois:
        obj = labels == int(roi.name)
        assert iou(skimage_fill(_roi_rings(roi), labels.shape), obj) >= 0.95
        assert np.array_equal(fill(_roi_rings(roi), labels.shape), obj)
    doc = json.loads((tmp_path / "cells.geojson").read_text())
    validate_geojson(doc)
    assert [f["properties"]["name"] for f in doc["features"]] == [str(i) for i in ids]
    assert doc["features"][0]["properties"]["classification"]["name"] == "cell"
    for f in doc["features"]:
        obj = labels == int(f["properties"]["name"])
        assert np.array_equal(fill([r[:-1] for r in _geometry_rings(f)], labels.shape), obj)


def test_predict_outlines_for_a_folder_a_stack_stdout_and_provenance(run, tmp_path, tiny):
    (tmp_path / "imgs").mkdir()
    _image(tmp_path / "imgs", "a.png", seed=1)
    _image(tmp_path / "imgs", "b.png", seed=2)
    result = run("predict", "imgs", "-o", "rois", "-m", tiny, "--output-type", "labels", "--format", "zip")
    assert result.code == 0, result
    assert result.stdout.split() == [str(Path("rois") / "a.zip"), str(Path("rois") / "b.zip")]
    result = run("predict", "imgs", "-o", "qp/", "-m", tiny, "--output-type", "labels", "--format", "geojson",
                 "--provenance")
    assert result.code == 0, result
    assert sorted(p.name for p in (tmp_path / "qp").iterdir()) == ["a.geojson", "a.geojson.json",
                                                                     "b.geojson", "b.geojson.json"]
    record = json.loads((tmp_path / "qp" / "a.geojson.json").read_text())
    assert record["output"]["format"] == "geojson" and record["output"]["type"] == "labels"
    validate_geojson(json.loads((tmp_path / "qp" / "a.geojson").read_text()))

    stack = np.stack([read_image(tmp_path / "imgs" / n)[0, ..., 0] for n in ("a.png", "b.png")])
    write_image(tmp_path / "stack.tif", stack, "ZYX")
    assert run("predict", "stack.tif", "-o", "stack-labels.tif", "-m", tiny, "--output-type", "labels").code == 0
    assert run("predict", "stack.tif", "-o", "stack.zip", "-m", tiny, "--output-type", "labels").code == 0
    labels = read_image(tmp_path / "stack-labels.tif")[..., 0]
    names, rois = _read_rois((tmp_path / "stack.zip").read_bytes())
    assert {r.position for r in rois} == {1, 2}
    for roi in rois:
        page, label = (int(v) for v in roi.name.split("-"))
        assert roi.position == page
        assert np.array_equal(fill(_roi_rings(roi), labels.shape[1:]), labels[page - 1] == label)

    result = run("predict", "imgs/a.png", "-o", "-", "-m", tiny, "--output-type", "labels", "--format", "geojson")
    assert result.code == 0, result
    assert result.out == (tmp_path / "qp" / "a.geojson").read_bytes()


@pytest.mark.parametrize("args, fragments", [
    (("-o", "cells.zip"), ("cells.zip", "ImageJ ROI set", "not a class map", "--output-type labels")),
    (("-o", "cells.geojson", "--output-type", "probs"), ("cells.geojson", "GeoJSON", "not probabilities")),
    (("-o", "out/", "--format", "geojson"), ("--format geojson", "instance labels", "--output-type labels")),
    (("-o", "cells.zip", "--output-type", "labels", "--preview", "p.png"), ("--preview", "cells.zip")),
    (("-o", "-", "--output-type", "labels", "--format", "shp"), ("unknown format", "zip or geojson")),
])
def test_predict_refuses_outlines_it_cannot_write(run, tmp_path, tiny, args, fragments):
    _image(tmp_path)
    result = run("predict", "in.png", "-m", tiny, *args)
    assert_one_line_error(result, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "tiny.unet"]


def test_predict_nuclei_outlines_on_real_data(run, tmp_path, nuclei_dir):
    image = sorted((nuclei_dir / "images").glob("*.png"))[0]
    for out in ("l.tif", "n.zip"):
        assert run("predict", image, "-o", out, "-m", "nuclei", "--output-type", "labels", "--backend", "torch").code == 0
    labels = read_image(tmp_path / "l.tif")[0, ..., 0]
    names, rois = _read_rois((tmp_path / "n.zip").read_bytes())
    assert len(rois) == len(np.unique(labels)) - 1 > 10
    for roi in rois:
        obj = labels == int(roi.name)
        assert iou(skimage_fill(_roi_rings(roi), labels.shape), obj) >= 0.95


def test_roi_sets_without_roifile_are_refused_before_any_work(run, tmp_path, tiny, monkeypatch):
    import sys

    _image(tmp_path)
    monkeypatch.setitem(sys.modules, "roifile", None)          # as if the interop extra were missing
    result = run("predict", "in.png", "-o", "cells.zip", "-m", tiny, "--output-type", "labels")
    assert_one_line_error(result, "cells.zip", "roifile", "unet[interop]", ".geojson")
    assert not (tmp_path / "cells.zip").exists()
    with pytest.raises(Exception, match="roifile"):
        roifiles.encode(_grid(CASES["hole"]), "zip")
    result = run("predict", "in.png", "-o", "cells.geojson", "-m", tiny, "--output-type", "labels")
    assert result.code == 0, result                            # GeoJSON needs no extra package


def test_ids_scattered_in_many_pieces_are_split_all_at_once():
    """Random ids (nearly every pixel a piece of an id found all over the image): every piece is its own
    part, and the pieces are found in one pass over the pixels (each id's bounding box labelled apart
    took hours on 1024 x 1024: here the whole image is every id's box)."""
    lab = np.random.default_rng(5).integers(0, 600, (64, 64)).astype(np.uint32)
    start = time.perf_counter()
    outlines = trace(lab)
    assert time.perf_counter() - start < 20
    check_outlines(lab, outlines)
