"""The training library: loss, schedules, data checks, the loop, checkpoints, resume, fine-tuning.

Tiny networks (base 4, depth 2) on small synthetic images: every test trains for a few steps only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from unetcli import checkpoint, devices, recipe, runconfig, training
from unetcli.errors import ConfigError, LabelError, TileSizeError
from unetcli.images import write_image
from unetcli.model import UNetConfig


# ------------------------------------------------------------------------------------ synthetic data

def disks(rng: np.random.Generator, size: int = 64, count: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A noisy grey image of bright disks and its instance labels (touching disks possible)."""
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.uint16)
    for i in range(1, count + 1):
        cy, cx = rng.integers(8, size - 8, 2)
        r = rng.integers(5, 10)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    image = np.where(labels > 0, 170, 60).astype(np.float64) + rng.normal(0, 20, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8), labels


def make_folder(root: Path, n: int = 4, size: int = 64, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        img, lab = disks(rng, size)
        write_image(root / "images" / f"s{i}.png", img, "YX")
        write_image(root / "labels" / f"s{i}.png", lab, "YX")
    return root / "images", root / "labels"


def options(images: Path, labels: Path, **extra) -> dict:
    base = {"images": str(images), "labels": str(labels), "base": 4, "depth": 2, "padding": "same",
            "tile": 32, "optimizer": "adam", "lr": 0.01, "iterations": 6, "log_every": 1,
            "checkpoint_every": 100, "workers": 0, "device": "cpu"}
    base.update(extra)
    return base


def run(opts: dict, run_dir: Path, **kw) -> training.TrainResult:
    tc, net, tr, val, norm, names, aug, note = runconfig.prepare(opts, cache_dir=run_dir / "weights")
    return training.train(tc, net, tr, val, run_dir, normalization=norm, class_names=names, augment=aug,
                          provenance={"data": note}, init=opts.get("init"), **kw)


def model_tensors(path: Path) -> dict[str, np.ndarray]:
    return checkpoint.load_model(path).tensors


# ------------------------------------------------------------------------------------------- the loss

def test_weighted_loss_equals_hand_computed_value():
    # two pixels, two classes: logits (2, 0) with truth 0, and (0, 1) with truth 0; weights 3 and 0.5
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])       # (1, 2, 1, 2)
    target = torch.tensor([[[0, 0]]])
    weights = torch.tensor([[[3.0, 0.5]]])
    p1 = math.exp(2) / (math.exp(2) + 1)                           # softmax of the truth class
    p2 = 1 / (1 + math.e)
    expected = (3.0 * -math.log(p1) + 0.5 * -math.log(p2)) / 2     # mean over the 2 pixels
    got = recipe.weighted_loss(logits, target, weights, "ce")
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # no weights: the plain mean cross-entropy
    plain = recipe.weighted_loss(logits, target, None, "ce")
    assert plain.item() == pytest.approx((-math.log(p1) - math.log(p2)) / 2, rel=1e-6)


def test_ce_plus_dice_adds_the_soft_dice_loss():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])
    target = torch.tensor([[[0, 1]]])
    p = torch.softmax(logits, 1)[0, :, 0]                          # (K=2, 2 pixels)
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    dice = ((2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)).mean()
    ce = recipe.weighted_loss(logits, target, None, "ce")
    both = recipe.weighted_loss(logits, target, None, "ce+dice")
    assert both.item() == pytest.approx(ce.item() + 1 - dice.item(), rel=1e-6)


# ------------------------------------------------------------------------------- schedules, options

def test_schedules_start_end_and_warm_up():
    assert recipe.lr_factor("constant", 0.5, 0.0) == 1.0
    assert recipe.lr_factor("cosine", 0.0, 0.0) == pytest.approx(1.0)
    assert recipe.lr_factor("cosine", 1.0, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert recipe.lr_factor("cosine", 0.5, 0.0) == pytest.approx(0.5)
    assert recipe.lr_factor("poly", 1.0, 0.1) == pytest.approx(0.0, abs=1e-12)
    assert recipe.lr_factor("cosine", 0.05, 0.1) < recipe.lr_factor("cosine", 0.09, 0.1) <= 1.0
    assert recipe.lr_factor("onecycle", 0.3, 0.02) == pytest.approx(1.0)


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("1h30m", 5400), ("90s", 90), ("45", 45),
                                           ("2h", 7200), ("1.5m", 90)])
def test_parse_duration(text, seconds):
    assert runconfig.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5m", "0", "10 parsecs", "5m later"])
def test_parse_duration_refuses_nonsense(text):
    with pytest.raises(ConfigError):
        runconfig.parse_duration(text)


def test_bad_training_settings_are_config_errors():
    for bad in ({"optimizer": "rmsprop"}, {"batch": 0}, {"schedule": "zigzag"}, {"loss": "l2"},
                {"momentum": 1.0}, {"precision": "fp8"}, {"metric": "accuracy?"}):
        with pytest.raises(ConfigError):
            runconfig.TrainConfig(**bad)


# ----------------------------------------------------------------------------------- data, pairing

def test_unpaired_files_name_the_missing_partner(tmp_path):
    images, labels = make_folder(tmp_path, n=2)
    (labels / "s1.png").unlink()
    with pytest.raises(LabelError, match="s1"):
        runconfig.prepare(options(images, labels))


def test_label_of_the_wrong_size_is_refused(tmp_path):
    images, labels = make_folder(tmp_path, n=2)
    write_image(labels / "s0.png", np.zeros((40, 64), np.uint8), "YX")
    with pytest.raises(LabelError, match="s0.png"):
        runconfig.prepare(options(images, labels))


def test_unknown_class_value_is_refused(tmp_path):
    images, labels = make_folder(tmp_path, n=2)
    lab = np.zeros((64, 64), np.uint8)
    lab[10:20, 10:20] = 7
    write_image(labels / "s1.png", lab, "YX")
    with pytest.raises(LabelError, match="7"):
        runconfig.prepare(options(images, labels, classes="0,1,2,3,4"))


def test_invalid_tile_names_the_nearest_sizes(tmp_path):
    images, labels = make_folder(tmp_path, n=2)
    with pytest.raises(TileSizeError, match="tile size 33"):
        runconfig.prepare(options(images, labels, tile=33))


def test_normalisation_is_computed_from_the_training_images_only(tmp_path):
    images, labels = make_folder(tmp_path, n=4)
    *_, norm, _names, _aug, note = runconfig.prepare(options(images, labels, val_index="3",
                                                                   normalize="dataset"))
    from unetcli.images import read_image

    raw = np.concatenate([read_image(images / f"s{i}.png").ravel() for i in range(3)]).astype(np.float64)
    assert norm["mean"][0] == pytest.approx(raw.mean(), rel=1e-6)
    assert norm["std"][0] == pytest.approx(raw.std(), rel=1e-6)
    assert note["validation"] == ["s3"] and len(note["train"]) == 3


def test_auto_weights_are_the_shared_weight_map_and_are_cached(tmp_path):
    from unetcli import labels as labelmod
    from unetcli import weightmap

    images, labels = make_folder(tmp_path / "d", n=2)
    cache = tmp_path / "cache"
    _tc, _net, samples, *_ = runconfig.prepare(options(images, labels, balance="none"), cache_dir=cache)
    from unetcli.images import read_image

    lab = read_image(labels / "s0.png")[0, ..., 0]
    target, inst = labelmod.training_target(lab)
    expected = weightmap.weight_map(target, inst, w0=10.0, sigma=5.0)
    assert np.array_equal(samples[0].target, target)
    np.testing.assert_array_equal(samples[0].weights, expected)
    assert len(list(cache.glob("*.tif"))) == 2
    # a second preparation reads the cache and gets the same maps
    _tc, _net, again, *_ = runconfig.prepare(options(images, labels, balance="none"), cache_dir=cache)
    np.testing.assert_array_equal(again[0].weights, expected)


def test_tiles_depend_only_on_seed_rank_and_number(tmp_path):
    from unetcli import data as datamod
    from unetcli import transforms

    images, labels = make_folder(tmp_path, n=3)
    _tc, _net, samples, _v, norm, *_ = runconfig.prepare(options(images, labels, normalize="dataset"))
    a = datamod.TileSampler(samples, 32, 32, transforms.AugmentConfig(), seed=1, mean=norm["mean"],
                            std=norm["std"])
    b = datamod.TileSampler(samples, 32, 32, transforms.AugmentConfig(), seed=1, mean=norm["mean"],
                            std=norm["std"])
    other_rank = datamod.TileSampler(samples, 32, 32, transforms.AugmentConfig(), seed=1, rank=1,
                                     mean=norm["mean"], std=norm["std"])
    for i in (0, 5, 17):
        for x, y in zip(a[i], b[i]):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[5][0], other_rank[5][0])
    x, y, w, _scale = a[3]
    assert x.shape == (1, 32, 32) and y.shape == (32, 32) and w.shape == (32, 32)
    assert set(np.unique(y)) <= {0, 1}


# ------------------------------------------------------------------------------------------ the loop

def test_loss_decreases_on_a_learnable_task(tmp_path):
    images, labels = make_folder(tmp_path / "d", n=4)
    opts = options(images, labels, iterations=60, batch=4, weights="none", augment=False, lr=0.02)
    result = run(opts, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 60
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.5 * first, (first, last)
    assert result.step == 60 and result.interrupted is None


def test_run_folder_holds_everything(tmp_path):
    images, labels = make_folder(tmp_path / "d", n=3)
    run_dir = tmp_path / "run"
    result = run(options(images, labels, iterations=4, checkpoint_every=2), run_dir)
    names = {p.name for p in run_dir.iterdir()}
    assert {"last.unet", "best.unet", "metrics.jsonl", "curves.png", checkpoint.STATE_FILE,
            "weights"} <= names
    model = checkpoint.load_model(run_dir / "last.unet")
    assert model.config.base == 4 and model.class_names == ["background", "foreground"]
    assert model.provenance["training"]["step"] == 4
    assert model.provenance["data"]["train"] == ["s0", "s1", "s2"]
    assert model.normalization == {"kind": "percentile", "low": 1.0, "high": 99.8}   # the new default
    # the resumable state is not a pickle: the model-file container (safetensors with unet's records)
    from safetensors import safe_open

    with safe_open(str(run_dir / checkpoint.STATE_FILE), framework="numpy") as f:
        assert f.metadata()["format"] == checkpoint.FORMAT
    from unetcli.images import read_image

    curves = read_image(run_dir / "curves.png")
    assert curves.shape[1:] == (420, 800, 3) and curves.std() > 0
    assert result.best == run_dir / "best.unet"


def _equal_states(a: Path, b: Path) -> None:
    ta, tb = model_tensors(a), model_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert np.array_equal(ta[key], tb[key]), key


def test_resume_continues_bit_for_bit(tmp_path):
    images, labels = make_folder(tmp_path / "d", n=3)
    # SGD with momentum, dropout, augmentation and weight maps all on: every piece of state matters
    opts = options(images, labels, iterations=6, optimizer="sgd", lr=0.01, dropout=0.5, log_every=1)
    straight = run(opts, tmp_path / "a")
    stopped = run(opts, tmp_path / "b", stop_at=3)
    assert stopped.interrupted and stopped.step == 3
    resumed = run(opts, tmp_path / "b", resume=True)
    assert resumed.step == 6
    _equal_states(tmp_path / "a" / checkpoint.STATE_FILE, tmp_path / "b" / checkpoint.STATE_FILE)
    _equal_states(tmp_path / "a" / "last.unet", tmp_path / "b" / "last.unet")
    rows_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]


def test_stop_flag_leaves_a_loadable_checkpoint(tmp_path):
    images, labels = make_folder(tmp_path / "d", n=2)
    stop = training.StopFlag()

    def progress(ev):
        if ev["step"] == 2:
            stop.set("SIGINT")

    result = run(options(images, labels, iterations=50), tmp_path / "run", stop=stop, progress=progress)
    assert result.interrupted == "SIGINT" and result.step == 2
    model = checkpoint.load_model(tmp_path / "run" / "last.unet")
    net = model.network()
    assert net(torch.zeros(1, 1, 32, 32)).shape == (1, 2, 32, 32)
    _m, _o, info = checkpoint.load_state(tmp_path / "run" / checkpoint.STATE_FILE)
    assert info["step"] == 2


def test_fine_tuning_with_a_new_class_count_gets_a_new_head(tmp_path):
    images, labels = make_folder(tmp_path / "d", n=2)
    run(options(images, labels, iterations=2), tmp_path / "base")
    base_model = checkpoint.load_model(tmp_path / "base" / "last.unet")
    # three classes: background, disk interior, and an extra class value 2 painted on one image
    lab = np.asarray(checkpoint.np.zeros((64, 64)), np.uint8)
    lab[5:15, 5:15] = 1
    lab[30:40, 30:40] = 2
    write_image(labels / "s0.png", lab, "YX")
    lab1 = np.zeros((64, 64), np.uint8)
    lab1[20:30, 20:30] = 1
    write_image(labels / "s1.png", lab1, "YX")
    net_cfg = UNetConfig(in_channels=1, num_classes=3, base=4, depth=2, padding="same")
    net, note = training.build_network(net_cfg, seed=0, init=str(tmp_path / "base" / "last.unet"))
    assert note["init"]["new_head"] and net.head.weight.shape[0] == 3
    state = net.state_dict()
    for key, value in base_model.tensors.items():
        if not key.startswith("head."):
            assert np.array_equal(state[key].numpy(), value), key
    opts = options(images, labels, iterations=2, classes="0,1,2", init=str(tmp_path / "base" / "last.unet"),
                   base=None, depth=None, padding=None)
    opts = {k: v for k, v in opts.items() if v is not None}
    run(opts, tmp_path / "tuned")
    tuned = checkpoint.load_model(tmp_path / "tuned" / "last.unet")
    assert tuned.config.num_classes == 3 and tuned.config.base == 4
    assert tuned.class_names == ["class0", "class1", "class2"]
    assert tuned.provenance["init"]["classes_before"] == 2


def test_fine_tuning_refuses_another_channel_count(tmp_path):
    images, labels = make_folder(tmp_path / "d", n=2)
    rgb = tmp_path / "rgb.unet"
    cfg = UNetConfig(in_channels=3, base=4, depth=2, padding="same")
    from unetcli.model import UNet

    checkpoint.save_model(rgb, UNet(cfg).state_dict(), cfg, normalization={"mean": [0.0] * 3, "std": [1.0] * 3})
    with pytest.raises(ConfigError, match="3 input channel"):
        runconfig.prepare(options(images, labels, init=str(rgb)))


def membranes(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """An ISBI-like slice: cells (255) separated by a grid of dark membrane lines (0)."""
    label = np.full((size, size), 255, np.uint8)
    for pos in range(0, size, 16):
        off = int(rng.integers(0, 4))
        label[max(pos + off - 1, 0):pos + off + 1, :] = 0
        label[:, max(pos + off - 1, 0):pos + off + 1] = 0
    image = np.where(label == 0, 40, 200) + rng.normal(0, 15, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8), label


def test_validation_scores_and_best_follow_the_metric(tmp_path):
    rng = np.random.default_rng(3)
    stack_img, stack_lab = zip(*(membranes(rng) for _ in range(4)))
    write_image(tmp_path / "vol.tif", np.stack(stack_img), "ZYX")
    write_image(tmp_path / "lab.tif", np.stack(stack_lab), "ZYX")
    opts = options(tmp_path / "vol.tif", tmp_path / "lab.tif", iterations=6, val_index="3", val_every=3)
    result = run(opts, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in rows if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [3, 6]
    for key in ("val_loss", "val_iou", "val_dice", "val_vrand", "val_vinfo", "val_pixel_error"):
        assert all(0 <= r[key] <= max(1.0, r[key]) for r in vals), key
    assert result.best_metric == "vrand"            # membrane-type labels: the ISBI score picks best
    best_row = max(vals, key=lambda r: r["val_vrand"])
    assert result.best_step == best_row["step"] and result.best_value == best_row["val_vrand"]
    best = checkpoint.load_model(tmp_path / "run" / "best.unet")
    assert best.provenance["training"]["step"] == best_row["step"]
    assert best.provenance["metrics"]["vrand"] == pytest.approx(best_row["val_vrand"], abs=1e-6)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks gain nothing from a second thread; on a busy machine it only waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_gpu_code_paths_run_on_the_cpu(tmp_path):
    """Batch-wise torch augmentation, bf16 autocast and channels-last, as on a GPU, exercised on the CPU."""
    images, labels = make_folder(tmp_path / "d", n=2)
    opts = options(images, labels, iterations=3, gpu_augment=True, precision="bf16", channels_last=True,
                   batch=2)
    a = run(opts, tmp_path / "a")
    b = run(opts, tmp_path / "b")
    assert a.step == 3 and math.isfinite(a.final_loss)
    _equal_states(tmp_path / "a" / "last.unet", tmp_path / "b" / "last.unet")   # still reproducible


def test_fp16_is_refused_on_the_cpu():
    with pytest.raises(ConfigError, match="fp16"):
        devices.resolve_precision("fp16", torch.device("cpu"))
    assert devices.resolve_precision("auto", torch.device("cpu")) == ("bf16" if devices.cpu_native_bf16() else "fp32")


def test_val_split_and_val_images(tmp_path):
    images, labels = make_folder(tmp_path / "d", n=4)
    *_, note = runconfig.prepare(options(images, labels, val_split=0.5, seed=3))
    assert len(note["validation"]) == 2 and len(note["train"]) == 2
    assert set(note["validation"]) | set(note["train"]) == {"s0", "s1", "s2", "s3"}
    *_, again = runconfig.prepare(options(images, labels, val_split=0.5, seed=3))
    assert again["validation"] == note["validation"]            # the seed chooses them
    vi, vl = make_folder(tmp_path / "v", n=2, seed=9)
    *_, note2 = runconfig.prepare(options(images, labels, val_images=str(vi), val_labels=str(vl)))
    assert note2["validation"] == ["s0", "s1"] and len(note2["train"]) == 4
    with pytest.raises(ConfigError, match="exclude each other"):
        runconfig.prepare(options(images, labels, val_split=0.5, val_index="1"))


# ------------------------------------------------------------------------ schedule, progress, curves

def test_validation_interval_scales_with_the_run():
    assert recipe.validation_interval(None, 20) == 50          # a short run validates at its end only
    assert recipe.validation_interval(None, 3000) == 300       # a tenth of a long one
    assert recipe.validation_interval(7, 20) == 7              # --val-every wins
    assert recipe.validation_interval(None, None) == 200       # only a time budget


def test_a_short_run_validates_once_at_its_end(tmp_path):
    images, labels = make_folder(tmp_path / "d", n=3)
    result = run(options(images, labels, iterations=20, val_index="2", log_every=5), tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "val"] == [20]
    assert result.best_step == 20 and (tmp_path / "run" / "best.unet").is_file()


def test_progress_shows_the_logged_loss(tmp_path):
    images, labels = make_folder(tmp_path / "d", n=2)
    events = []
    run(options(images, labels, iterations=7, log_every=3), tmp_path / "run", progress=events.append)
    rows = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}
    by_step = {e["step"]: e for e in events}
    assert by_step[3]["loss"] == rows[3] and by_step[4]["loss"] == rows[3] and by_step[6]["loss"] == rows[6]
    assert by_step[7]["loss"] == rows[7]                         # the last step is logged too
    assert all(e["steps_per_s"] > 0 for e in events)             # a speed from the first step on


def test_curves_have_a_panel_each_for_training_loss_validation_loss_and_metric(tmp_path):
    from unetcli import runlog
    from unetcli.images import read_image

    rows = [{"kind": "train", "step": s, "loss": 2.0 / s} for s in range(1, 41)]
    rows += [{"kind": "val", "step": s, "val_loss": 0.5 / s ** 0.5, "val_iou": 0.5 + s / 100} for s in (10, 20, 30, 40)]
    runlog.draw_curves(tmp_path / "curves.png", rows, "iou")
    img = read_image(tmp_path / "curves.png")[0]
    assert img.shape == (420, 800, 3)
    thirds = [img[:, i * 266:(i + 1) * 266].reshape(-1, 3) for i in range(3)]
    colours = {"train": (31, 119, 180), "val": (255, 127, 14), "metric": (214, 39, 40)}

    def has(part, rgb):
        return bool(np.all(part == rgb, axis=1).sum() > 20)

    assert [has(thirds[0], c) for c in colours.values()] == [True, False, False]
    assert [has(thirds[1], c) for c in colours.values()] == [False, True, False]
    assert [has(thirds[2], c) for c in colours.values()] == [False, False, True]


def test_init_from_a_file_whose_weights_do_not_fit_its_config_is_refused(tmp_path):
    from unetcli.errors import ModelFileError
    from unetcli.model import UNet

    cfg = UNetConfig(base=4, depth=2, padding="same")
    state = UNet(cfg).state_dict()
    state["head.weight"] = torch.zeros(2, 8, 1, 1)              # the config says 4 input channels
    checkpoint.save_model(tmp_path / "bad.unet", state, cfg)
    with pytest.raises(ModelFileError, match="head.weight"):
        training.build_network(cfg, seed=0, init=str(tmp_path / "bad.unet"))
