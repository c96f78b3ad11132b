"""The overlap-tile engine: tile-size invariance, any image size, TTA, blending, streaming, stacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unetcli.errors import ConfigError, ImageShapeError, TileSizeError
from conftest import random_net
from unetcli.inference import Predictor, predict_image, predict_proba, probs_to_mask
from unetcli.model import UNet, UNetConfig, margin, output_size, valid_input_sizes
from unetcli.tiling import blend_window, mirror_index
from unetcli import postprocess

@pytest.fixture(autouse=True)
def _one_thread():
    """The hand-made references below call tiny networks directly: one thread is far faster there."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


VALID = UNetConfig(base=4, depth=2, dropout=0.0)           # margin 20, inputs 44, 48, 52, ...
SAME = UNetConfig(base=4, depth=2, dropout=0.0, padding="same")


_net = random_net


def _image(h: int, w: int, c: int = 1, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(h, w, c)).astype(np.float32)


def _one_tile_reference(net: UNet, config: UNetConfig, image: np.ndarray) -> np.ndarray:
    """The paper's strategy done by hand: mirror the whole image, one tile covering all of it."""
    h, w, _ = image.shape
    m = margin(config)
    side = next(s for s in valid_input_sizes(config, 1, 4096) if output_size(config, s) >= max(h, w))
    pad = ((m, side - m - h), (m, side - m - w), (0, 0))
    big = np.pad(image, pad, mode="reflect") if min(h, w) > 1 else None
    if big is None:  # np.pad cannot reflect a 1-pixel axis; mirroring it gives a constant
        big = image[mirror_index(np.arange(-m, side - m), h)][:, mirror_index(np.arange(-m, side - m), w)]
    x = torch.from_numpy(np.ascontiguousarray(big.transpose(2, 0, 1)[None]))
    with torch.no_grad():
        return torch.softmax(net(x), 1)[0, :, :h, :w].numpy()


# ------------------------------------------------------------------------------ valid-padding tiling

def test_equals_one_mirrored_tile_covering_the_image():
    net = _net(VALID)
    image = _image(75, 58)
    ref = _one_tile_reference(net, VALID, image)
    got = predict_proba(net, image, config=VALID, tile=44)       # 4 x 4 px output, many tiles
    assert got.shape == (2, 75, 58)
    assert np.abs(got - ref).max() <= 1e-5


@pytest.mark.parametrize("shape", [(519, 253), (97, 61), (61, 97)])
def test_tile_size_invariance(shape):
    net = _net(VALID)
    image = _image(*shape)
    results = [predict_proba(net, image, config=VALID, tile=t) for t in (52, 100, 148)]
    for r in results[1:]:
        assert np.abs(r - results[0]).max() <= 1e-5
    assert np.abs(results[0] - results[0].mean()).max() > 1e-2   # not a constant map


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (519, 253), (1000, 37)])
def test_any_image_size(shape):
    net = _net(VALID)
    image = _image(*shape)
    auto = predict_proba(net, image, config=VALID)
    fixed = predict_proba(net, image, config=VALID, tile=60)
    assert auto.shape == (2, *shape) and auto.dtype == np.float32
    assert np.allclose(auto.sum(0), 1.0, atol=1e-5)
    assert np.abs(auto - fixed).max() <= 1e-5
    if min(shape) >= 3:
        assert np.abs(auto - _one_tile_reference(net, VALID, image)).max() <= 1e-5


def test_image_smaller_than_the_margin_is_mirrored_repeatedly():
    net = _net(VALID)
    image = _image(3, 5)                       # margin is 20: the context is mirrored several times
    ref = _one_tile_reference(net, VALID, image)
    assert np.abs(predict_proba(net, image, config=VALID, tile=44) - ref).max() <= 1e-5


def test_batch_does_not_change_results():
    net = _net(VALID)
    image = _image(130, 90)
    a = predict_proba(net, image, config=VALID, tile=52, batch=1)
    b = predict_proba(net, image, config=VALID, tile=52, batch=5)
    assert np.abs(a - b).max() <= 1e-5


def test_deeper_network_and_rectangular_tiles():
    config = UNetConfig(base=4, depth=3, dropout=0.0)
    net = _net(config)
    image = _image(150, 71)
    a = predict_proba(net, image, config=config, tile=None)
    pred = Predictor(net, config, tile=(100, 140))
    b = pred.predict(image)
    assert np.abs(a - b).max() <= 1e-5


# ------------------------------------------------------------------------------- borrowing a network

def test_predict_proba_borrows_the_network():
    config = UNetConfig(base=4, depth=2, dropout=0.5)
    net = _net(config).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    image = _image(40, 40)
    a = predict_proba(net, image, config=config)
    b = predict_proba(net, image, config=config)
    assert np.array_equal(a, b)                     # dropout was off during prediction
    assert net.training                             # and the mode is restored
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_predict_proba_precision_fallback():
    net = _net(VALID)
    image = _image(30, 30)
    ref = predict_proba(net, image, config=VALID)
    # auto on a CPU: bf16 where it computes bf16 in hardware, else fp32
    from unetcli.devices import cpu_native_bf16
    auto = "bf16" if cpu_native_bf16() else "fp32"
    assert np.array_equal(predict_proba(net, image, config=VALID, precision="auto"),
                          predict_proba(net, image, config=VALID, precision=auto))
    if not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        assert np.array_equal(predict_proba(net, image, config=VALID, precision="fp16"), ref)
        with pytest.raises(ConfigError, match="fp16"):
            Predictor(net, VALID, precision="fp16")                     # strict outside predict_proba
    with pytest.raises(ConfigError):
        predict_proba(net, image, config=VALID, precision="fp64")


def test_wrong_channel_count():
    net = _net(VALID)
    with pytest.raises(ImageShapeError, match="3 channel"):
        predict_proba(net, _image(20, 20, 3), config=VALID)


def test_invalid_tile():
    with pytest.raises(TileSizeError):
        predict_proba(_net(VALID), _image(20, 20), config=VALID, tile=45)


# ----------------------------------------------------------------------------------------------- TTA

def test_tta_is_the_mean_of_the_eight_transformed_predictions():
    net = _net(VALID)
    image = _image(37, 53)
    got = predict_proba(net, image, config=VALID, tta=True, tile=60)
    acc = np.zeros_like(got)
    for k in range(4):
        for flip in (False, True):
            view = np.rot90(image, k, axes=(0, 1))
            view = view[:, ::-1] if flip else view
            p = predict_proba(net, np.ascontiguousarray(view), config=VALID, tile=44)
            p = p[:, :, ::-1] if flip else p
            acc += np.rot90(p, -k, axes=(1, 2))
    acc /= 8
    assert np.abs(got - acc).max() <= 1e-5
    plain = predict_proba(net, image, config=VALID)
    assert np.abs(got - plain).max() > 1e-3         # TTA does change a random network's output


# ------------------------------------------------------------------------------ same-padding blending

def _sliding_reference(net, image, tile, overlap, window):
    """Blended sliding windows written out plainly: positions i*stride, the last one at the end."""
    h, w, _ = image.shape

    def starts(length):
        if tile >= length:
            return [0]
        stride = int(tile * (1 - overlap))
        n = int(np.ceil((length - tile) / stride)) + 1
        return [min(i * stride, length - tile) for i in range(n)]

    acc = np.zeros((2, h, w))
    wsum = np.zeros((h, w))
    for y in starts(h):
        for x in starts(w):
            patch = image[y:y + tile, x:x + tile]
            t = torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1)[None]))
            with torch.no_grad():
                p = torch.softmax(net(t), 1)[0].numpy()
            acc[:, y:y + tile, x:x + tile] += p * window
            wsum[y:y + tile, x:x + tile] += window
    return acc / wsum


@pytest.mark.parametrize("blend", ["gaussian", "mean"])
def test_same_padding_tiles_overlap_and_blend(blend):
    net = _net(SAME)
    image = _image(90, 70)
    pred = Predictor(net, SAME, tile=32, overlap=0.25, blend=blend)
    got = pred.predict(image)
    plan = pred.plan(90, 70)
    assert plan.y.count == 4 and plan.x.count == 3 and plan.y.starts[-1] == 90 - 32
    window = blend_window(plan)
    ref = _sliding_reference(net, image, 32, 0.25, window)
    assert np.abs(got - ref).max() <= 1e-5
    assert np.allclose(got.sum(0), 1.0, atol=1e-5)


def test_same_padding_small_image_is_mirrored_to_the_tile():
    net = _net(SAME)
    image = _image(5, 9)
    got = Predictor(net, SAME, tile=16).predict(image)
    big = image[mirror_index(np.arange(16), 5)][:, mirror_index(np.arange(16), 9)]
    with torch.no_grad():
        ref = torch.softmax(net(torch.from_numpy(np.ascontiguousarray(big.transpose(2, 0, 1)[None]))), 1)
    assert np.abs(got - ref[0, :, :5, :9].numpy()).max() <= 1e-5


# -------------------------------------------------------------------------------- streaming & stacks

def test_blocks_stream_in_order_and_masks_match():
    net = _net(VALID)
    image = _image(200, 50)
    pred = Predictor(net, VALID, tile=60)
    rows = []
    for page, y0, block in pred.iter_blocks(image):
        assert page == 0 and y0 == sum(b.shape[1] for b in rows)
        rows.append(block.copy())
    assert len(rows) > 1                            # it did stream, several tile rows
    probs = np.concatenate(rows, axis=1)
    mask = pred.predict_mask(image)
    assert mask.dtype == np.uint8 and np.array_equal(mask, np.argmax(probs, 0))


def test_stack_equals_page_by_page():
    net = _net(VALID)
    stack = np.stack([_image(40, 33, seed=s) for s in range(3)])
    pred = Predictor(net, VALID, batch=4)
    got = pred.predict(stack)
    assert got.shape == (3, 2, 40, 33)
    for n in range(3):
        assert np.abs(got[n] - pred.predict(stack[n])).max() <= 1e-5


def test_tiff_rows_stream_the_same_prediction(tmp_path):
    import tifffile

    from unetcli.sources import TiffRows

    net = _net(VALID)
    stack = (np.random.default_rng(5).random((2, 83, 61)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "s.tif", stack, rowsperstrip=7, compression="zlib", metadata=None)
    src = TiffRows.open(tmp_path / "s.tif")
    assert src is not None and src.shape == (2, 83, 61, 1)
    assert np.array_equal(src.rows(1, np.array([0, 82, 40, 3])), stack[1][[0, 82, 40, 3], :, None])
    pred = Predictor(net, VALID, tile=52, mean=[127.0], std=[60.0])
    assert np.array_equal(pred.predict(src), pred.predict(stack[..., None]))   # many strips, mirrored rows
    src.close()
    tifffile.imwrite(tmp_path / "tiled.tif", np.zeros((64, 64), np.uint8), tile=(16, 16))
    assert TiffRows.open(tmp_path / "tiled.tif") is None          # read whole instead
    assert TiffRows.open(tmp_path / "s.tif", min_bytes=10**9) is None
    (tmp_path / "bad.tif").write_bytes(b"II*\x00" + b"\x00" * 20)
    assert TiffRows.open(tmp_path / "bad.tif") is None


def test_model_file_normalisation_and_rgb(tmp_path):
    from unetcli.checkpoint import load_model, save_model

    config = UNetConfig(in_channels=3, num_classes=3, base=4, depth=2, dropout=0.0)
    net = _net(config)
    mean, std = [100.0, 120.0, 90.0], [40.0, 30.0, 50.0]
    save_model(tmp_path / "rgb.unet", net.state_dict(), config, normalization={"mean": mean, "std": std})
    raw = np.random.default_rng(3).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    got = predict_image(load_model(tmp_path / "rgb.unet"), raw, device="cpu")
    normalised = ((raw - np.array(mean)) / np.array(std)).astype(np.float32)
    ref = predict_proba(net, normalised, config=config)
    assert got.shape == (3, 45, 61) and np.abs(got - ref).max() <= 1e-5


# ------------------------------------------------------------------------------------------- masks

def test_probs_to_mask():
    p = np.array([[[0.7, 0.4]], [[0.3, 0.6]]], np.float32)
    assert probs_to_mask(p).tolist() == [[0, 1]]
    assert probs_to_mask(p, 0.25).tolist() == [[1, 1]]
    assert probs_to_mask(p, 0.65).tolist() == [[0, 0]]
    with pytest.raises(ConfigError):
        probs_to_mask(np.ones((3, 1, 1), np.float32) / 3, 0.5)


# --------------------------------------------------------------------------------- post-processing

def test_postprocessing():
    m = np.zeros((12, 12), np.uint8)
    m[1:6, 1:6] = 1
    m[3, 3] = 0                                     # a hole
    m[8, 8] = 1                                     # a small object
    m[9:11, 1:4] = 2                                # an object of another class
    filled = postprocess.fill_holes(m)
    assert filled[3, 3] == 1 and filled.sum() == m.sum() + 1
    small = postprocess.remove_small(m, 2)
    assert small[8, 8] == 0 and (small == 2).sum() == 6 and (small == 1).sum() == 24
    largest = postprocess.largest_component(m)
    assert largest[8, 8] == 0 and (largest == 1).sum() == 24 and (largest == 2).sum() == 6
    labels = postprocess.label_instances(m)
    assert labels.dtype == np.uint16 and labels.max() == 3
    assert len(np.unique(labels[m == 1])) == 2 and len(np.unique(labels[m == 2])) == 1
    diagonal = np.eye(4, dtype=np.uint8)            # corner-touching pixels are separate objects
    assert postprocess.label_instances(diagonal).max() == 4
