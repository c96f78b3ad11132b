"""`unet train` from a shell: the summary on stdout, the run folder, one-line errors before any
training, Ctrl-C / SIGTERM, --resume, and two processes under torchrun (gloo on CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, assert_one_line_error, run_unet
from unetcli import checkpoint
from unetcli.images import write_image

# One thread per process: tiny networks gain nothing from more, and on a busy 2-core machine two
# threads per process mostly wait for each other.
ONE = {"OMP_NUM_THREADS": "1"}
TINY = ["--base", "4", "--depth", "2", "--padding", "same", "--tile", "32", "--optimizer", "adam",
        "--lr", "0.01", "--workers", "0", "--device", "cpu"]


def run1(*args):
    return run_unet(*args, env=ONE)


def make_data(root: Path, n: int = 3, size: int = 48) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        lab = np.zeros((size, size), np.uint16)
        for k in range(1, 4):
            cy, cx = rng.integers(8, size - 8, 2)
            lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = k
        img = np.clip(np.where(lab > 0, 180, 50) + rng.normal(0, 10, lab.shape), 0, 255).astype(np.uint8)
        write_image(root / "images" / f"im{i}.png", img, "YX")
        write_image(root / "labels" / f"im{i}.tif", lab, "YX")
    return root / "images", root / "labels"


def test_a_short_run_prints_its_summary_and_writes_the_run_folder(unet, tmp_path):
    images, labels = make_data(tmp_path)
    out = tmp_path / "run"
    r = run1("train", "--images", images, "--labels", labels, "--out", out, "--iterations", "3",
             "--val-index", "2", "--json", *TINY)
    assert r.code == 0, r
    summary = json.loads(r.stdout)
    # instance labels: auto selects by object F1 (the decoding tuned on the validation image)
    assert summary["step"] == 3 and summary["best_metric"] == "f1"
    assert Path(summary["best"]) == out / "best.unet" and Path(summary["last"]) == out / "last.unet"
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["iterations"] == 3 and config["seed"] == 0
    assert config["data"]["validation"] == ["im2"]
    assert "train" in config["command"]
    model = checkpoint.load_model(out / "best.unet")
    assert "iou" in model.provenance["metrics"] and "f1" in model.provenance["metrics"]
    assert set(model.postprocess) >= {"threshold", "min_size"}
    assert {"last.unet", "best.unet", "metrics.jsonl", "curves.png", "train-state.bin",
            "config.json"} <= {p.name for p in out.iterdir()}
    # plain output: the two model paths, nothing else
    r2 = run1("train", "--images", images, "--labels", labels, "--out", tmp_path / "run2",
              "--iterations", "1", *TINY)
    assert r2.code == 0, r2
    assert r2.stdout.split() == [str(tmp_path / "run2" / "best.unet"), str(tmp_path / "run2" / "last.unet")]


def _bad_cases(tmp: Path):
    images, labels = make_data(tmp / "d")
    cases = []
    unpaired = tmp / "unpaired"
    unpaired.mkdir()
    for p in labels.iterdir():
        (unpaired / p.name).write_bytes(p.read_bytes())
    (unpaired / "im1.tif").unlink()
    cases.append((["--images", images, "--labels", unpaired], ["im1"]))
    small = tmp / "small"
    small.mkdir()
    for p in labels.iterdir():
        (small / p.name).write_bytes(p.read_bytes())
    write_image(small / "im0.tif", np.zeros((20, 48), np.uint16), "YX")
    cases.append((["--images", images, "--labels", small], ["im0.tif", "48x20"]))
    cases.append((["--images", images, "--labels", labels, "--tile", "33"], ["tile size 33", "32"]))
    cases.append((["--images", images, "--labels", labels, "--classes", "0,1"], ["not in --classes"]))
    cases.append((["--images", images, "--labels", labels, "--max-time", "soon"], ["--max-time"]))
    cases.append((["--images", tmp / "nowhere", "--labels", labels], ["nowhere"]))
    cases.append((["--images", images, "--labels", labels, "--val-index", "7"], ["--val-index"]))
    cases.append((["--images", images, "--labels", labels, "--init", tmp / "missing.unet"], ["missing.unet"]))
    return cases


def test_bad_inputs_are_one_line_errors_before_training(tmp_path, capfd):
    # in-process (cli.run, as the executable calls it): the errors come before any training
    from conftest import Result
    from unetcli.cli import run

    for i, (args, fragments) in enumerate(_bad_cases(tmp_path)):
        out = tmp_path / f"run{i}"
        code = run(["train", *TINY, *map(str, args), "--out", str(out), "--iterations", "2"])
        captured = capfd.readouterr()
        assert_one_line_error(Result(code, captured.out.encode(), captured.err.encode()), *fragments)
        assert not (out / "last.unet").exists() and not (out / "config.json").exists(), args


def test_run_folder_rules(unet, tmp_path):
    images, labels = make_data(tmp_path / "d", n=2)
    assert_one_line_error(run1("train", "--images", images, "--labels", labels, *TINY), "--out")
    r = run1("train", "--resume", tmp_path / "d", "--device", "cpu")
    assert_one_line_error(r, "not a run folder")
    out = tmp_path / "runs" / "mine" / "run"              # missing parents are created, like mkdir -p
    assert run1("train", "--images", images, "--labels", labels, "--out", out, "--iterations", "1",
                *TINY).code == 0
    assert (out / "last.unet").is_file()
    assert_one_line_error(run1("train", "--images", images, "--labels", labels, "--out", out,
                               "--iterations", "1", *TINY), "already holds a training run")
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(run1("train", "--images", images, "--labels", labels, "--out",
                               tmp_path / "afile" / "run", "--iterations", "1", *TINY), "not a folder")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_leaves_a_loadable_checkpoint(tmp_path, sig, code):
    images, labels = make_data(tmp_path / "d", n=2)
    out = tmp_path / "run"
    env = {**os.environ, "NO_COLOR": "1", **ONE}
    proc = subprocess.Popen([sys.executable, "-m", "unetcli", "train", "--images", str(images),
                             "--labels", str(labels), "--out", str(out), "--iterations", "100000",
                             "--log-every", "1", *TINY], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert b"--resume" in stderr
    model = checkpoint.load_model(out / "last.unet")
    step = model.provenance["training"]["step"]
    assert step >= 2
    _m, _o, info = checkpoint.load_state(out / checkpoint.STATE_FILE)
    assert info["step"] == step


def test_resume_from_the_command_line_reaches_the_planned_step(unet, tmp_path):
    images, labels = make_data(tmp_path / "d", n=2)
    out = tmp_path / "run"
    env = {**os.environ, "NO_COLOR": "1", **ONE}
    proc = subprocess.Popen([sys.executable, "-m", "unetcli", "train", "--images", str(images),
                             "--labels", str(labels), "--out", str(out), "--iterations", "60",
                             "--log-every", "1", *TINY], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    stopped = checkpoint.load_model(out / "last.unet").provenance["training"]["step"]
    if stopped >= 60:
        pytest.skip("the run finished before the signal arrived")
    r = run1("train", "--resume", out, "--iterations", "9", "--json")
    assert r.code == 0, r
    assert "ignoring --iterations" in r.stderr
    assert json.loads(r.stdout)["step"] == 60
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 60 and len(steps) == len(set(steps))


def test_torchrun_two_cpu_processes_write_one_set_of_files(tmp_path):
    images, labels = make_data(tmp_path / "d", n=3)
    out = tmp_path / "run"
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29500 + os.getpid() % 1000), "-m", "unetcli", "train",
                           "--images", str(images), "--labels", str(labels), "--out", str(out),
                           "--iterations", "4", "--log-every", "1", "--json", *TINY],
                          capture_output=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    lines = [ln for ln in proc.stdout.decode().splitlines() if ln.strip()]
    assert len(lines) == 1                                   # only rank 0 prints the summary
    summary = json.loads(lines[0])
    assert summary["step"] == 4
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]         # one writer
    model = checkpoint.load_model(out / "last.unet")
    assert model.provenance["training"]["world_size"] == 2
    assert not list(out.glob(".*.part*"))


def test_help_shows_examples(unet):
    r = run1("train", "--help")
    assert r.code == 0
    for text in ("--images", "--resume", "--max-time", "--init", "torchrun", "Examples"):
        assert text in r.stdout


# ------------------------------------------------------------------- issue 16 and 15: the run folder

def _digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_in_process(capfd, *args):
    from conftest import Result
    from unetcli.cli import run

    code = run(["train", *map(str, args)])
    captured = capfd.readouterr()
    return Result(code, captured.out.encode(), captured.err.encode())


def test_out_on_a_training_folder_is_refused_and_nothing_is_overwritten(tmp_path, capfd):
    images, labels = make_data(tmp_path / "d", n=2)
    before = _digest(tmp_path / "d")
    for out in (images, labels, tmp_path / "d" / "images" / ".." / "labels"):
        r = _run_in_process(capfd, "--images", images, "--labels", labels, "--out", out, "--iterations", "1", *TINY)
        assert_one_line_error(r, "would overwrite the input")
    assert _digest(tmp_path / "d") == before


def test_a_failed_start_writes_nothing_and_the_corrected_rerun_works(tmp_path, capfd):
    import torch

    images, labels = make_data(tmp_path / "d", n=2)
    out = tmp_path / "runs" / "x"
    common = ["--images", images, "--labels", labels, "--out", out, "--iterations", "1", *TINY]
    cases = [(["--workers", "100000"], "--workers 100000")]
    if not torch.cuda.is_available():
        cases += [(["--device", "cuda"], "--device cuda"), (["--precision", "fp16"], "fp16")]
    for extra, fragment in cases:
        assert_one_line_error(_run_in_process(capfd, *common, *extra), fragment)
        assert not out.exists() and not out.parent.exists(), extra
    # a start that fails after its checks (diverging at step 2) removes the records it wrote
    diverging = ["1e30" if a == "0.01" else a for a in common]
    assert_one_line_error(_run_in_process(capfd, *diverging, "--iterations", "5"), "diverged")
    assert not {"config.json", "metrics.jsonl", "last.unet"} & {p.name for p in out.iterdir()}
    r = _run_in_process(capfd, *common)
    assert r.code == 0, r
    # the command line as cli.run got it, never the test runner's argv
    config = json.loads((out / "config.json").read_text())
    assert config["command"].startswith("unet train --images ") and config["created"].endswith("+00:00")
    assert checkpoint.load_model(out / "last.unet").provenance["command"] == config["command"]


def test_one_writer_per_run_folder(tmp_path, capfd):
    from unetcli import guards

    images, labels = make_data(tmp_path / "d", n=2)
    out = tmp_path / "run"
    out.mkdir()
    args = ["--images", images, "--labels", labels, "--out", out, "--iterations", "1", *TINY]
    with guards.RunLock(out, what="unet train"):
        r = run1("train", *args)                                 # another process: refused in one line
        assert_one_line_error(r, "is in use by another unet train")
        assert [p.name for p in out.iterdir()] == [guards.LOCK_NAME]
    (out / guards.LOCK_NAME).write_text("999999\n")             # left by a killed run: stale, ignored
    assert _run_in_process(capfd, *args).code == 0
    assert not (out / guards.LOCK_NAME).exists()
    with guards.RunLock(out, what="unet train"):
        assert_one_line_error(run1("train", "--resume", out), "is in use by another unet train")


def test_a_second_sigterm_ends_the_run_at_once(capfd):
    from unetcli import guards, training
    from unetcli.commands import train as train_command

    stop = training.StopFlag()
    previous = train_command._stop_on_signals(stop)
    try:
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)   # the first: stop after this step
        assert stop.reason == "SIGTERM"
        with pytest.raises(guards.Terminated):
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        with pytest.raises(KeyboardInterrupt):
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert "SIGTERM: stopping after this step" in capfd.readouterr().err


def test_each_option_is_named_once_with_its_default():
    import inspect

    from unetcli import runconfig
    from unetcli.commands import train as train_command

    params = {name.rstrip("_") for name in inspect.signature(train_command.command).parameters}
    assert params - {"ctx", "out", "resume", "json"} == set(runconfig.RUN_DEFAULTS)


def test_help_states_the_defaults_of_the_table():
    import re

    import typer

    from unetcli import runconfig
    from unetcli.cli import app

    checked = 0
    for param in typer.main.get_command(app).commands["train"].params:
        found = re.search(r"\[default: ([^\]]+)\]", param.help or "")
        default = runconfig.RUN_DEFAULTS.get(param.name.rstrip("_"))
        if found is None or default is None:
            continue
        text = found.group(1)
        if isinstance(default, bool):
            assert text == (param.opts if default else param.secondary_opts)[0].lstrip("-"), param.name
        elif isinstance(default, (int, float)):
            assert float(text) == default, param.name
        else:
            assert text == default, param.name
        checked += 1
    assert checked >= 20
