"""Prediction on a Dask cluster (issue 19): blocks equal the whole image, labels merge across block
borders, files spread over workers, and nothing is left behind on failure.

The command-line tests share one ``LocalCluster`` of two single-threaded worker processes (started once
for this module, reached with ``--cluster tcp://...``); one test starts its own with ``local:2``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, random_net
from unetcli.checkpoint import save_model
from unetcli.chunked import BlockGrid, block_grid, predict_block
from unetcli.chunkmerge import label_image_blocks
from unetcli.inference import Predictor
from unetcli.instances import DecodeParams, decode
from unetcli.model import UNetConfig
from unetcli.tiling import plan_tiles

TINY = UNetConfig(base=4, depth=2, dropout=0.0)          # margin 20; tile 180 -> 140 output pixels


def _zarr():
    return pytest.importorskip("zarr", reason="the cluster extra (zarr) is not installed")


def _distributed():
    return pytest.importorskip("distributed", reason="the cluster extra (dask distributed) is not installed")


# ------------------------------------------------------------------------------------------- helpers

def _random_model(path: Path, config: UNetConfig = TINY, seed: int = 0) -> Path:
    net = random_net(config, seed)
    save_model(path, net.state_dict(), config, normalization={"mean": [127.0] * config.in_channels,
                                                               "std": [60.0] * config.in_channels})
    return path


def _identity_model(path: Path) -> Path:
    """A valid U-Net (base 4, depth 2) whose object probability is sigmoid(20 x - 10) of its input pixel
    x (0..1 after normalisation): a disc of 255s comes out as a disc, exactly."""
    from unetcli.model import UNet

    net = UNet(TINY).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        first = net.down[0]
        first[0].weight[0, 0, 1, 1] = 1.0                 # conv, ReLU, conv, ReLU: channel 0 carries x
        first[2].weight[0, 0, 1, 1] = 1.0
        top = net.up[-1].conv                             # the top level's skip channel 0, passed on
        top[0].weight[0, 0, 1, 1] = 1.0
        top[2].weight[0, 0, 1, 1] = 1.0
        net.head.weight[1, 0, 0, 0] = 20.0
        net.head.bias[1] = -10.0
    save_model(path, net.state_dict(), TINY, normalization={"mean": [0.0], "std": [255.0]})
    return path


def _write_ome_zarr(path: Path, image: np.ndarray, chunks: tuple[int, int]) -> Path:
    """A 2-D image as an OME-Zarr (NGFF 0.4, Zarr v2) image with the given chunks."""
    zarr = _zarr()
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", data=image, chunks=chunks)
    group.attrs["multiscales"] = [{"version": "0.4", "name": "image",
                                   "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                                   "datasets": [{"path": "0", "coordinateTransformations": [
                                       {"type": "scale", "scale": [1.0, 1.0]}]}]}]
    return path


def _read_zarr(path: Path) -> np.ndarray:
    zarr = _zarr()
    return np.asarray(zarr.open_array(str(path / "0"), mode="r")[:])


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part") or ".part" in p.name)


@pytest.fixture(scope="module")
def address():
    """A LocalCluster of two single-threaded worker processes for this module's commands."""
    _distributed()
    _zarr()
    from unetcli.cluster import Cluster, parse_cluster

    with Cluster(parse_cluster("local:2")) as cluster:
        yield cluster._local.scheduler_address




# ------------------------------------------------------------------- blocks equal the whole image

@pytest.mark.parametrize("config,tile,tta", [
    (TINY, 92, False),
    (TINY, (92, 112), True),                                  # a rectangle, the 8 frames
    (UNetConfig(base=4, depth=3, dropout=0.0), 140, False),    # alignment to 2^3
    (UNetConfig(base=4, depth=2, dropout=0.0, padding="same"), 64, True),   # blended overlaps
])
def test_blocks_equal_the_whole_image_bit_for_bit(config, tile, tta):
    """Each block computes exactly the tiles the whole image's plan gives it, so the pixels are equal."""
    net = random_net(config, 1)
    image = (np.random.default_rng(0).random((190, 263, 1)) * 255).astype(np.uint8)
    pred = Predictor(net, config, tile=tile, tta=tta, backend="torch", threads=1, mean=[120.0], std=[70.0])
    whole = pred.predict(image)
    plan = plan_tiles(config, 190, 263, tile=pred.tile, overlap=pred.overlap, blend=pred.blend)

    def read(page, rows, cols):
        return image[rows][:, cols]

    for chunk in (40, 100):
        grid = block_grid(plan, chunk)
        assert grid.count > 1
        out = np.full_like(whole, np.nan)
        for _by, _bx, (y0, y1, x0, x1) in grid.rects():
            out[:, y0:y1, x0:x1] = predict_block(pred, read, 0, 190, 263, (y0, y1, x0, x1))
        assert np.array_equal(out, whole), (chunk, float(np.nanmax(np.abs(out - whole))))


def test_blocks_are_whole_tile_strides():
    plan = plan_tiles(TINY, 2000, 3000, tile=180)
    grid = block_grid(plan, 700)
    assert grid.block == (700, 700) and grid.shape == (3, 5)
    assert block_grid(plan, 650).block == (700, 700)           # rounded to 5 strides of 140
    assert block_grid(plan, 10).block == (140, 140)            # at least one tile
    assert grid.rect(2, 4) == (1400, 2000, 2800, 3000)         # cut by the image border


# -------------------------------------------------------------------------- labels across borders

def _blobs(h: int, w: int, seed: int) -> np.ndarray:
    from scipy import ndimage

    f = ndimage.gaussian_filter(np.random.default_rng(seed).random((h, w)), 4)
    p1 = ((f - f.min()) / (f.max() - f.min())).astype(np.float32)
    return np.stack([1 - p1, p1])


@pytest.mark.parametrize("params,largest", [(DecodeParams(), False), (DecodeParams(min_size=30), False),
                                            (DecodeParams(threshold=0.6), True), (DecodeParams(grow=2), False)])
def test_block_labels_equal_single_process_labels(params, largest):
    """Two-class decoding block by block: the same objects and ids as decoding the whole image."""
    from unetcli.instances import largest_object

    probs = _blobs(203, 317, 1)
    whole = decode(probs, params)
    assert whole.max() > 20
    if largest:
        whole = largest_object(whole)
    for block in ((37, 50), (64, 64), (128, 100)):
        got = label_image_blocks(probs, BlockGrid(203, 317, block).rects(), params, min_size=params.min_size,
                                 largest=largest)
        assert got.dtype == whole.dtype
        assert np.array_equal(got, whole), block


def test_three_class_blocks_keep_separate_objects_apart():
    """Three-class decoding block by block (exact only up to what the margin sees): discs cut by block
    borders, some touching, come out as one object each, as decoding the whole image gives them."""
    from unetcli.instances import border_target

    h, w = 160, 200
    yy, xx = np.mgrid[:h, :w]
    inst = np.zeros((h, w), np.int32)
    centres = [(40, 40), (40, 100), (100, 40), (100, 100), (40, 160), (120, 160), (120, 131)]   # the last two touch
    for i, (cy, cx) in enumerate(centres, 1):
        inst[((yy - cy) ** 2 + (xx - cx) ** 2 <= 14 ** 2) & (inst == 0)] = i
    t3 = border_target(inst)
    # background, interior and border probabilities; border pixels keep some interior probability
    table = np.array([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.55, 0.40]], np.float32)
    probs = np.moveaxis(table[t3], -1, 0).copy()
    params = DecodeParams(seed=0.7)
    whole = decode(probs, params)
    got = label_image_blocks(probs, BlockGrid(h, w, (50, 50)).rects(), params)
    assert whole.max() == got.max() == len(centres)
    pairs = set(zip(whole.ravel().tolist(), got.ravel().tolist()))
    assert len(pairs) == len(centres) + 1                      # the same objects, renumbered at most
    for i in range(1, len(centres) + 1):                      # each disc's interior: one object
        assert np.unique(got[(inst == i) & (t3 == 1)]).size == 1


# ------------------------------------------------------------------------------ the command line

@pytest.mark.slow
def test_chunked_2000x3000_equals_single_process(tmp_path, run, address):
    """Acceptance: a 2000x3000 OME-Zarr image in chunks of 700 through two workers equals `unet predict`
    without a cluster: probabilities bit for bit (within 1e-6 asked), masks identical."""
    model = _random_model(tmp_path / "tiny.unet")
    image = (np.random.default_rng(7).random((2000, 3000)) * 255).astype(np.uint8)
    src = _write_ome_zarr(tmp_path / "in.zarr", image, (700, 700))
    common = ["--model", model, "--tile", "180"]
    single = run("predict", src, "-o", "single.tif", "--output-type", "probs", *common)
    assert single.code == 0, single
    t0 = time.perf_counter()
    chunked = run("predict", src, "-o", "probs.zarr", "--output-type", "probs", "--cluster", address, *common)
    seconds = time.perf_counter() - t0
    assert chunked.code == 0, chunked
    assert chunked.stdout.strip() == "probs.zarr"
    import tifffile

    want = tifffile.imread(tmp_path / "single.tif")
    got = _read_zarr(tmp_path / "probs.zarr")
    assert got.shape == want.shape == (2, 2000, 3000)
    assert float(np.abs(got - want).max()) <= 1e-6
    assert np.array_equal(got, want)                       # in fact bit for bit
    zarr = _zarr()
    assert zarr.open_array(str(tmp_path / "probs.zarr" / "0"), mode="r").chunks == (1, 700, 700)
    masks = run("predict", src, "-o", "mask.zarr", "--cluster", address, *common)
    assert masks.code == 0, masks
    single_mask = run("predict", src, "-o", "single-mask.tif", *common)
    assert single_mask.code == 0, single_mask
    assert np.array_equal(_read_zarr(tmp_path / "mask.zarr"), tifffile.imread(tmp_path / "single-mask.tif"))
    assert _leftovers(tmp_path) == []
    print(f"2000x3000 probabilities on 2 workers: {seconds:.1f} s")


def test_discs_on_block_borders_are_one_object_each(tmp_path, run, address):
    """Acceptance: discs on block borders and corners, a bar across three blocks and a U whose arms
    cross a border, each one object; the labels equal single-process labels, ids included."""
    import tifffile

    model = _identity_model(tmp_path / "identity.unet")
    h, w = 600, 820
    plan = plan_tiles(TINY, h, w, tile=180)
    grid = block_grid(plan, 280)
    assert grid.block == (280, 280)
    yy, xx = np.mgrid[:h, :w]
    image = np.zeros((h, w), np.uint8)
    discs = [(280, 100), (150, 280), (280, 280), (560, 560), (280, 560), (420, 560), (560, 700),
             (0, 280), (599, 560), (280, 819), (100, 100)]
    for cy, cx in discs:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= 15 ** 2] = 255
    image[440:450, 60:700] = 255                        # a bar over three blocks
    image[470:560, 20:30] = 255                         # a U: its arms cross the border at y = 560
    image[470:560, 60:70] = 255
    image[460:470, 20:70] = 255
    image[540:600, 20:30] = 255
    image[540:600, 60:70] = 255
    tifffile.imwrite(tmp_path / "discs.tif", image)
    common = ["--model", model, "--tile", "180", "--output-type", "labels"]
    single = run("predict", "discs.tif", "-o", "single.tif", *common)
    assert single.code == 0, single
    chunked = run("predict", "discs.tif", "-o", "labels.zarr", "--chunk", "280", "--cluster", address,
                  "--provenance", *common)
    assert chunked.code == 0, chunked
    import json

    record = json.loads((tmp_path / "labels.zarr.json").read_text())
    assert record["parameters"]["blocks"] == 9 and record["parameters"]["objects"] == [len(discs) + 2]
    assert record["output"]["type"] == "labels" and len(record["output"]["sha256"]) == 64
    want = tifffile.imread(tmp_path / "single.tif")
    got = _read_zarr(tmp_path / "labels.zarr")
    assert want.max() == len(discs) + 2                  # the discs, the bar, the U
    assert got.dtype == want.dtype and np.array_equal(got, want)
    for cy, cx in discs:
        ids = np.unique(got[(yy - cy) ** 2 + (xx - cx) ** 2 <= 15 ** 2])
        assert ids.size == 1 and ids[0] > 0
    assert np.unique(got[440:450, 60:700]).size == 1
    assert np.unique(got[(image > 0) & (xx < 75) & (yy > 455)]).size == 1   # the U
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    node = list(Reader(parse_url(str(tmp_path / "labels.zarr")))())[0]
    assert node.data[0].shape == (h, w)


def test_folder_through_the_cluster_equals_single_process(tmp_path, run, address):
    """Acceptance: a folder of files through the cluster (one file per task) gives the single-process
    outputs; --skip-existing resumes an interrupted run."""
    import tifffile

    model = _random_model(tmp_path / "tiny.unet")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        tifffile.imwrite(folder / f"img{i}.tif", (rng.random((150 + 20 * i, 170)) * 255).astype(np.uint8))
    single = run("predict", folder, "-o", "single/", "--model", model)
    assert single.code == 0, single
    spread = run("predict", folder, "-o", "spread/", "--model", model, "--cluster", address)
    assert spread.code == 0, spread
    assert sorted(spread.stdout.split()) == sorted(f"spread/img{i}.tif" for i in range(4))
    for i in range(4):
        assert np.array_equal(tifffile.imread(tmp_path / "spread" / f"img{i}.tif"),
                              tifffile.imread(tmp_path / "single" / f"img{i}.tif"))
    os.unlink(tmp_path / "spread" / "img2.tif")
    before = (tmp_path / "spread" / "img0.tif").stat().st_mtime_ns
    again = run("predict", folder, "-o", "spread/", "--model", model, "--cluster", address, "--skip-existing")
    assert again.code == 0, again
    assert again.stdout.split() == ["spread/img2.tif"]
    assert (tmp_path / "spread" / "img0.tif").stat().st_mtime_ns == before
    assert np.array_equal(tifffile.imread(tmp_path / "spread" / "img2.tif"),
                          tifffile.imread(tmp_path / "single" / "img2.tif"))
    assert _leftovers(tmp_path / "spread") == []


@pytest.mark.slow
def test_local_cluster_flag_and_damaged_input_leave_nothing(tmp_path, run):
    """`--cluster local:2` starts its own workers; a damaged chunk of the input fails the run with one
    line, cancels the other blocks and leaves neither the output nor a temporary folder."""
    _distributed()
    _zarr()
    model = _random_model(tmp_path / "tiny.unet")
    image = (np.random.default_rng(5).random((400, 500)) * 255).astype(np.uint8)
    src = _write_ome_zarr(tmp_path / "in.zarr", image, (128, 128))
    ok = run("predict", src, "-o", "mask.zarr", "--model", model, "--tile", "92", "--chunk", "160",
             "--cluster", "local:2")
    assert ok.code == 0, ok
    single = run("predict", src, "-o", "mask.tif", "--model", model, "--tile", "92")
    assert single.code == 0, single
    import tifffile

    assert np.array_equal(_read_zarr(tmp_path / "mask.zarr"), tifffile.imread(tmp_path / "mask.tif"))
    chunk = next(p for p in (src / "0").rglob("*") if p.is_file() and not p.name.startswith("."))
    chunk.write_bytes(b"not a compressed chunk")
    bad = run("predict", src, "-o", "again.zarr", "--model", model, "--tile", "92", "--chunk", "160",
              "--cluster", "local:2")
    assert_one_line_error(bad, "in.zarr")
    assert not (tmp_path / "again.zarr").exists()
    assert _leftovers(tmp_path) == []


def test_cluster_refusals(tmp_path, run):
    model = _random_model(tmp_path / "tiny.unet")
    import tifffile

    tifffile.imwrite(tmp_path / "a.tif", np.zeros((64, 64), np.uint8))
    cases = [
        (["a.tif", "-o", "a.zarr", "--cluster", "nowhere"], "not a cluster"),
        (["a.tif", "-o", "a.zarr", "--cluster", "local:0"], "from 1"),
        (["a.tif", "-o", "a.zarr", "--cluster", f"local:{os.cpu_count() * 64}"], "more worker processes"),
        (["a.tif", "-o", "a.zarr", "--cluster", "tcp://host"], "not a cluster"),
        (["a.tif", "-o", "a.zarr", "--chunk", "512"], "--chunk"),
        (["-", "-o", "a.zarr", "--cluster", "local:1"], "stdin"),
        (["a.tif", "-o", "a.zarr", "--cluster", "local:1", "--preview", "p.png"], "--preview"),
    ]
    for args, fragment in cases:
        result = run("predict", *args, "--model", model)
        assert_one_line_error(result, fragment)
    assert not (tmp_path / "a.zarr").exists()


def test_unsupported_post_processing_is_refused(tmp_path):
    from unetcli.cluster import check_chunked
    from unetcli.errors import ConfigError
    from unetcli.pipeline import Output

    with pytest.raises(ConfigError, match="whole mask"):
        check_chunked("in.tif", "out.zarr", Output(kind="mask", min_size=10))
    with pytest.raises(ConfigError, match="fill-holes"):
        check_chunked("in.tif", "out.zarr", Output(kind="labels", fill_holes=True, decode=DecodeParams()))


def test_missing_dask_is_one_line_with_the_install_hint(monkeypatch):
    from unetcli.cluster import Cluster, parse_cluster
    from unetcli.errors import ConfigError

    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ConfigError) as info:
        Cluster(parse_cluster("local:1")).__enter__()
    assert "pip install 'unet[cluster]'" in info.value.one_line()


def test_no_scheduler_is_one_line(run, tmp_path, monkeypatch):
    _distributed()
    model = _random_model(tmp_path / "tiny.unet")
    import tifffile

    tifffile.imwrite(tmp_path / "a.tif", np.zeros((64, 64), np.uint8))
    import socket

    with socket.socket() as s:                 # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from unetcli import cluster

    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 2.0)          # not 20 s for the refusal
    result = run("predict", "a.tif", "-o", "a.zarr", "--model", model, "--cluster", f"tcp://127.0.0.1:{port}")
    assert_one_line_error(result, "no scheduler answers")


@pytest.mark.slow
def test_ctrl_c_cancels_and_leaves_no_temporary_output(tmp_path):
    """SIGINT to the command's process group (a terminal's Ctrl-C) mid-run: exit 130, no output, no
    temporary folder."""
    _distributed()
    _zarr()
    model = _random_model(tmp_path / "tiny.unet", UNetConfig(base=16, depth=2, dropout=0.0))
    image = (np.random.default_rng(5).random((2400, 2400)) * 255).astype(np.uint8)
    src = _write_ome_zarr(tmp_path / "in.zarr", image, (256, 256))
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "unetcli", "predict", str(src), "-o", "out.zarr",
                             "--model", str(model), "--output-type", "probs", "--tile", "92", "--chunk", "256",
                             "--cluster", "local:2"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(p.name.endswith(".part") for p in tmp_path.iterdir()):
            time.sleep(0.2)
        assert any(p.name.endswith(".part") for p in tmp_path.iterdir()), "never started writing"
        time.sleep(2.0)
        os.killpg(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert not (tmp_path / "out.zarr").exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_readme_cluster_examples_run(tmp_path, address):
    """The first example block of README's "Beyond one machine", as printed, with the shipped models on
    small files named as the examples name them; the cluster address `tcp://head:8786` is replaced by
    a running local scheduler's."""
    import re

    from test_examples import _bash, _readme_block

    from unetcli.images import write_image

    image = (np.random.default_rng(3).random((300, 260)) * 255).astype(np.uint8)
    _write_ome_zarr(tmp_path / "slide.ome.zarr", image, (128, 128))
    write_image(tmp_path / "volume.tif", image, "YX")
    (tmp_path / "plates").mkdir()
    for i in range(3):
        write_image(tmp_path / "plates" / f"p{i}.png", image[:200, :200 - 10 * i], "YX")
    block = _readme_block("Beyond one machine")
    script = re.sub(r"tcp://head:8786", address, block)
    r = _bash(script, tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "mask.zarr").is_dir() and (tmp_path / "labels.zarr").is_dir()
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["p0.tif", "p1.tif", "p2.tif"]


def test_blocks_are_bounded_by_the_memory_budget(tmp_path, run, address):
    """A --chunk whose blocks would not fit a worker's memory budget is refused before any task runs;
    without --chunk, blocks of the input's own (large) chunks shrink until they fit."""
    model = _random_model(tmp_path / "tiny.unet")
    image = (np.random.default_rng(2).random((1200, 1300)) * 255).astype(np.uint8)
    src = _write_ome_zarr(tmp_path / "in.zarr", image, (1200, 1300))
    common = ["--model", model, "--tile", "180", "--cluster", address, "--memory-budget", "16M"]
    refused = run("predict", src, "-o", "big.zarr", "--chunk", "1300", *common)
    assert_one_line_error(refused, "blocks of", "more than the memory budget", "--chunk")
    assert not (tmp_path / "big.zarr").exists() and _leftovers(tmp_path) == []
    fitted = run("predict", src, "-o", "fit.zarr", *common)
    assert fitted.code == 0, fitted
    chunks = _zarr().open_array(str(tmp_path / "fit.zarr" / "0"), mode="r").chunks
    assert max(chunks) < 1200
