"""Every example printed in the help epilogs and in README's "The whole pipeline" runs (issue 15).

The examples are taken from where users read them (``unet COMMAND --help`` text, README.md) and run in
bash in a folder of tiny files named as the examples name them. Only lengths are changed (training
steps and time budgets); paths, flags and models stay as printed, so an example that stops working
fails here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unetcli.images import write_image

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("weights", "augment", "evaluate", "predict", "train", "export")


def _epilog_examples(command: str) -> list[str]:
    """The example command lines of one command's --help epilog (comment lines dropped)."""
    import importlib

    text = importlib.import_module(f"unetcli.commands.{command}").EPILOG
    lines = [ln.strip() for ln in text.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#") and ("unet " in ln or ln.startswith("torchrun"))
            and not ln.endswith(":")]


def _readme_block(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"## {title}", 1)[1]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


# --------------------------------------------------------------------------------- tiny data

def _blobs(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A grey picture of bright discs and its instance labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = rng.normal(30, 5, (h, w))
    lab = np.zeros((h, w), np.uint16)
    for k in range(1, 6):
        cy, cx, r = rng.uniform(8, h - 8), rng.uniform(8, w - 8), rng.uniform(4, 7)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[disc] += 120
        lab[disc & (lab == 0)] = k
    return np.clip(img, 0, 255).astype(np.uint8), lab


def _membranes(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An EM-like slice (dark lines between cells) and its 0/255 ISBI-style label."""
    rng = np.random.default_rng(seed)
    label = np.full((h, w), 255, np.uint8)
    for y in rng.integers(6, h - 6, 3):
        label[y:y + 2] = 0
    for x in rng.integers(6, w - 6, 3):
        label[:, x:x + 2] = 0
    img = np.where(label == 0, 40, 190) + rng.normal(0, 8, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8), label


def make_files(root: Path) -> None:
    """Every file and folder the examples name, tiny."""
    img, lab = _blobs(48, 56, 0)
    rgb = np.repeat(img[..., None], 3, -1)
    em, em_lab = _membranes(48, 56, 1)
    for name in ("in.tif", "image.tif"):
        write_image(root / name, em, "YX")
    for name in ("in.png", "slice.png", "image.png"):
        write_image(root / name, em, "YX")
    write_image(root / "nuclei.png", rgb, "YXC")
    write_image(root / "stack.tif", np.stack([em, em[::-1]]), "ZYX")
    for name in ("lab.png", "labels.png"):
        write_image(root / name, lab, "YX")
    write_image(root / "w.tif", np.ones(lab.shape, np.float32), "YX")
    write_image(root / "classes.png", np.where(lab > 0, 255, np.where(img > 28, 128, 0)).astype(np.uint8), "YX")
    stack_img = np.stack([_membranes(48, 56, s)[0] for s in range(30)])
    stack_lab = np.stack([_membranes(48, 56, s)[1] for s in range(30)])
    write_image(root / "train-volume.tif", stack_img, "ZYX")
    write_image(root / "train-labels.tif", stack_lab, "ZYX")
    (root / "isbi2012").mkdir()
    write_image(root / "isbi2012" / "train-labels.tif", stack_lab, "ZYX")
    write_image(root / "pred.tif", stack_lab, "ZYX")
    write_image(root / "probs.tif", (1 - stack_lab[0] / 255.0).astype(np.float32), "YX")   # membrane probability
    write_image(root / "labels.tif", stack_lab[0], "YX")
    write_image(root / "pred.png", lab, "YX")
    write_image(root / "truth.png", lab, "YX")
    for folder in ("images", "imgs", "mine", "new", "predictions", "nuclei-pred", "labels", "truth",
                   "mine-labels", "few", "few-labels"):
        (root / folder).mkdir()
    (root / "nuclei" / "labels").mkdir(parents=True)
    for i in range(4):
        im, lb = _blobs(48, 56, 10 + i)
        for folder in ("images", "imgs", "mine", "new"):
            write_image(root / folder / f"s{i}.png", im, "YX")
        for folder in ("labels", "truth", "predictions", "nuclei-pred"):
            write_image(root / folder / f"s{i}.png", lb, "YX")
        # the fine-tuning example's three classes: 0 background, 1 nucleus, 2 its rim
        rim = (lb > 0) & (np.pad(lb, 1, mode="edge")[:-2, 1:-1] != lb)
        write_image(root / "mine-labels" / f"s{i}.png", np.where(rim, 2, (lb > 0).astype(np.uint8)).astype(np.uint8), "YX")
        write_image(root / "nuclei" / "labels" / f"s{i}.png", lb, "YX")
        e, el = _membranes(48, 56, 20 + i)
        write_image(root / "few" / f"e{i}.png", e, "YX")
        write_image(root / "few-labels" / f"e{i}.png", el, "YX")
    write_image(root / "new" / "s0.tif", _blobs(48, 56, 10)[0], "YX")   # step 4 of the pipeline finds *.tif
    try:                                    # an OME-Zarr image (NGFF 0.4), as ome-zarr-py writes one
        import zarr
    except ImportError:
        return
    group = zarr.open_group(str(root / "img.ome.zarr"), mode="w", zarr_format=2)
    group.create_array("0", data=img, chunks=(32, 32))
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "y", "type": "space", "unit": "micrometer"},
                                                              {"name": "x", "type": "space", "unit": "micrometer"}],
                                   "datasets": [{"path": "0", "coordinateTransformations": [
                                       {"type": "scale", "scale": [0.5, 0.5]}]}]}]


def _shorter(line: str) -> str:
    """Only lengths change: a few training steps, a few seconds of budget."""
    line = re.sub(r"--max-time \S+", "--max-time 4s", line)
    line = re.sub(r"--iterations \d+", "--iterations 2", line)
    if " train " in f" {line} " and "--resume" not in line and "--iterations" not in line \
            and "--max-time" not in line:
        line += " --iterations 2"
    return line


def _bash(script: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    if shutil.which("unet") is None and not (Path(sys.executable).parent / "unet").exists():
        pytest.skip("the unet entry point is not installed (pip install -e .)")
    root = tmp_path_factory.mktemp("examples")
    make_files(root)
    return root


# ------------------------------------------------------------------------------------- tests

FAST = [(c, ex) for c in ("weights", "augment", "evaluate", "predict") for ex in _epilog_examples(c)]


@pytest.mark.parametrize("command,example", FAST, ids=[f"{c}:{i}" for i, (c, _) in enumerate(FAST)])
def test_help_examples_run(files, tmp_path, command, example):
    if ".zarr" in example:
        pytest.importorskip("zarr", reason="OME-Zarr examples need the interop extra (zarr)")
    if ".zip" in example.split("#")[0]:
        pytest.importorskip("roifile", reason="ROI set examples need the interop extra (roifile)")
    work = tmp_path / "w"
    shutil.copytree(files, work)
    r = _bash(_shorter(example), work, timeout=300)
    assert r.returncode == 0, f"{example}\n{r.stderr[-1500:]}"


TRAIN = [ex for ex in _epilog_examples("train") if not ex.startswith("torchrun")]


def test_train_help_examples_run_in_order(files, tmp_path):
    """The train examples build on each other (fine-tuning runs/em, resuming it): run them in order."""
    work = tmp_path / "w"
    shutil.copytree(files, work)
    for example in TRAIN:
        if "--resume" in example:
            continue          # a finished run has nothing to resume: tested in test_train_cli
        r = _bash(_shorter(example), work, timeout=600)
        assert r.returncode == 0, f"{example}\n{r.stderr[-1500:]}"


@pytest.mark.slow
def test_export_help_examples_run(files, tmp_path):
    """`unet export`'s examples (the shipped models, each exported and checked: about a minute and a half)."""
    pytest.importorskip("onnx", reason="ONNX export needs the export extra (onnx, onnxscript)")
    from unetcli.checkpoint import resolve_model

    work = tmp_path / "w"
    shutil.copytree(files, work)
    (work / "runs" / "nuclei").mkdir(parents=True)
    shutil.copy(resolve_model("nuclei"), work / "runs" / "nuclei" / "best.unet")
    write_image(work / "cells.png", _blobs(64, 64, 3)[0], "YX")
    for example in _epilog_examples("export"):
        r = _bash(example, work, timeout=600)
        assert r.returncode == 0, f"{example}\n{r.stderr[-1500:]}"
    assert (work / "em.zip").stat().st_size > 1 << 20 and (work / "em.onnx").stat().st_size > 1 << 20


def test_readme_pipeline_runs_as_pasted(files, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(files, work)
    block = _readme_block("The whole pipeline").replace("\\\n", " ")     # join continued lines first
    script = "\n".join(_shorter(ln) for ln in block.splitlines())
    r = _bash(script, work, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "scores.csv").read_text().count("\n") >= 2
    assert any((work / "masks").iterdir())


def test_examples_are_found():
    """The extraction itself: each command has examples, and the README block is the pipeline."""
    for command in COMMANDS:
        assert _epilog_examples(command), command
    assert "unet evaluate" in _readme_block("The whole pipeline")
