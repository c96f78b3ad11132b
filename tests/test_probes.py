"""Issue 16's probe list, typed as a user types it: every numbered case of the issue is a shell command
line run by bash in a folder of small, honestly made files (a tiny model, images, labels, damaged
model files, a declared-65000-pixel JPEG, a 4 GB sparse model file, a run folder).

Each probe checks what the issue asks of it: the exit code (non-zero where the input is bad, 130, 141,
143 for the signals), one line on stderr in the ``unet: error:`` form, nothing on stdout, no
temporary file left anywhere, every file that was there before unchanged (SHA-256 before and after),
and, where a resource was asked for, the peak memory and process count of the whole command.

``python tests/test_probes.py`` runs the same list outside pytest and prints one line per probe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from conftest import bomb_jpeg, join_safetensors, split_safetensors

ROOT = Path(__file__).resolve().parents[1]

LONG = "n" * 246 + ".png"   # 250 bytes: the temporary name must still fit in 255


@dataclass
class Probe:
    case: int
    line: str
    expect: str = "refused"          # refused | ok | bounded (exit 0 or a one-line refusal)
    words: tuple[str, ...] = ()      # fragments the error line must hold
    code: int | None = None          # an exact exit code
    creates: tuple[str, ...] = ()    # files an ok probe must have written
    absent: tuple[str, ...] = ()     # paths that must not exist afterwards
    rss_mb: int = 1500               # bound on the peak resident memory of any process of the line
    procs: int | None = None         # bound on the processes alive at once (sampled)
    seconds: float = 120.0
    warnings: int = 0                # "unet: warning:" lines allowed on stderr

    @property
    def id(self) -> str:
        return f"{self.case:02d}:{self.line[:70]}"


TRAIN = "unet train --images imgs/ --labels labs/ --base 4 --depth 2 --tile 44 --batch 1 --no-augment"

PROBES = [
    # 1-4: no output over an input
    Probe(1, "unet evaluate pred.tif --truth truth.png -o truth.png", words=("truth.png",)),
    Probe(1, "unet evaluate pred.tif --truth truth.png -o pred.tif", words=("pred.tif",)),
    Probe(1, "unet evaluate pred.tif --truth truth.png -o ./sub/../truth-link.png"),
    Probe(2, "unet augment image.png --labels labels.png --preview image.png", words=("image.png",)),
    Probe(2, "unet augment image.png --labels labels.png --preview labels.png", words=("labels.png",)),
    Probe(3, "unet weights labels/ -o w/ --mask-out labels/", words=("labels",)),
    Probe(3, "mkdir -p w && unet weights stack.tif -o w/ --mask-out w/", words=("two outputs",)),
    Probe(3, "unet weights stack.tif -o both.tif --mask-out both.tif", words=("two outputs",)),
    Probe(4, f"{TRAIN} --iterations 2 --out imgs/", words=("imgs",)),
    Probe(4, f"{TRAIN} --iterations 2 --out labs/", words=("labs",)),
    # 6: stacks whose pages differ
    Probe(6, "unet predict mixed.tif -m tiny.unet -o m6.tif", words=("mixed.tif",)),
    Probe(6, "unet weights mixed.tif -o w6.tif", words=("mixed.tif",)),
    Probe(6, "unet evaluate mixed.tif --truth mixed.tif", words=("mixed.tif",)),
    # 7: zero or non-finite normalisation, overflow of a finite input
    Probe(7, "unet predict image.png -m std0.unet -o m7.tif", words=("damaged model file",)),
    Probe(7, "unet predict image.png -m nan.unet -o m7.tif", words=("damaged model file",)),
    Probe(7, "unet predict huge.tif -m tiny.unet -o m7.tif", words=("huge.tif",)),
    Probe(7, "unet augment huge.tif -o a7/", words=("huge.tif",)),
    # 8, 9: workers and threads
    Probe(8, f"{TRAIN} --iterations 2 --workers 100000 --out r8", expect="bounded", procs=12,
          seconds=90, warnings=1, rss_mb=3000),
    Probe(9, "unet predict image.png -m tiny.unet -o m9.png --threads 100000", expect="bounded",
          warnings=1),
    Probe(9, "unet predict image.png -m tiny.unet -o m9b.png --threads 20000", expect="bounded",
          warnings=1),
    # 10: a 300-byte JPEG declaring 65000 x 65000 pixels
    Probe(10, "unet weights bomb.jpg -o w10.tif", words=("bomb.jpg",), rss_mb=800),
    Probe(10, "unet predict bomb.jpg -m tiny.unet -o m10.tif", words=("bomb.jpg",), rss_mb=800),
    Probe(10, "unet augment bomb.jpg -o a10/", words=("bomb.jpg",), rss_mb=800),
    Probe(10, "unet evaluate bomb.jpg --truth truth.png", words=("bomb.jpg",), rss_mb=800),
    # 11: model headers checked before anything is allocated or read
    Probe(11, "unet predict image.png -m depth8.unet -o m11.tif", words=("damaged model file",),
          rss_mb=800),
    Probe(11, "unet predict image.png -m base-huge.unet -o m11.tif", words=("damaged model file",),
          rss_mb=800),
    Probe(11, "unet predict image.png -m sparse.unet -o m11.tif", words=("sparse.unet", "damaged"),
          rss_mb=800, seconds=15),
    # 12: sizes a user may ask for
    Probe(12, "unet predict image.png -m tiny.unet -o m12.tif --tile 100000", expect="bounded"),
    Probe(12, "unet augment image.png -o a12/ --grid 100000", expect="bounded"),
    Probe(12, "unet augment image.png -o a12b/ --sigma 1e9", expect="bounded"),
    Probe(12, "unet weights labels.png -o w12.tif --sigma 1e9", expect="bounded"),
    # 13: a run that fails at the start leaves nothing that blocks the corrected rerun
    Probe(13, f"{TRAIN} --iterations 2 --init garbage.unet --out r13", words=("garbage.unet",),
          absent=("r13",)),
    Probe(13, f"{TRAIN} --iterations 2 --device cuda --out r13", absent=("r13",)),
    Probe(13, f"{TRAIN} --iterations 2 --out r13", expect="ok", creates=("r13/last.unet",)),
    # 15: exit codes of pipes and closed streams
    Probe(15, "unet predict mid.png -m tiny.unet --output-type probs -o - --format tiff | head -c 10"
              " >/dev/null; exit ${PIPESTATUS[0]}", expect="quiet", code=141),
    Probe(15, "unet predict image.png -m tiny.unet -o - --format tiff >&-", words=("stdout",)),
    # 16: damaged fields of model files, training states and run configurations
    *[Probe(16, f"unet predict image.png -m bad-{name}.unet -o m16.tif", words=("damaged model file",))
      for name in ("noshape", "offsets", "deep", "provenance", "classnames", "normtext", "negdim")],
    Probe(16, "unet train --resume r16-state", words=("r16-state", "damaged training state")),
    Probe(16, "unet train --resume r16-list", words=("r16-list", "damaged run configuration")),
    Probe(16, "unet train --resume r16-base", words=("r16-base", "damaged run configuration")),
    # 17: long names, memory budgets in words
    Probe(17, f"unet predict image.png -m tiny.unet -o {LONG}", expect="ok", creates=(LONG,)),
    Probe(17, "unet predict image.png -m tiny.unet -o m17.png --memory-budget 1k",
          words=("--memory-budget 1024 bytes",)),
]


# ------------------------------------------------------------------------------------- the files

def _instances(seed: int = 0, size: int = 64, count: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros((size, size), np.uint16)
    for k in range(1, count + 1):
        y, x = rng.integers(0, size - 14, 2)
        lab[y:y + 12, x:x + 12] = k
    return lab


def _damaged_models(folder: Path, raw: bytes) -> None:
    """Model files a broken tool or an attacker could write, each damaged in one field."""
    header, data = split_safetensors(raw)
    meta = header["__metadata__"]
    first = next(k for k in header if k != "__metadata__")
    entry = header[first]
    config = json.loads(meta["config"])

    def meta_with(**changes):
        return join_safetensors(dict(header, __metadata__=dict(meta, **changes)), data)

    def entry_with(**changes):
        return join_safetensors(dict(header, **{first: dict(entry, **changes)}), data)

    no_shape = {k: v for k, v in entry.items() if k != "shape"}
    files = {
        "std0": meta_with(normalization=json.dumps({"mean": [127.0], "std": [0.0]})),
        "nan": meta_with(normalization='{"mean": [NaN], "std": [1.0]}'),
        "depth8": meta_with(config=json.dumps(dict(config, depth=8))),
        "base-huge": meta_with(config=json.dumps(dict(config, base=2 ** 20))),
        "bad-noshape": join_safetensors(dict(header, **{first: no_shape}), data),
        "bad-offsets": entry_with(data_offsets=[0.5, "x"]),
        "bad-deep": join_safetensors(json.dumps(header)[:-1].encode() + b', "x": ' + b"[" * 200000
                          + b"]" * 200000 + b"}", data),
        "bad-provenance": meta_with(provenance="[1, 2]"),
        "bad-classnames": meta_with(class_names='{"a": 1}'),
        "bad-normtext": meta_with(normalization='{"mean": ["a"], "std": ["b"]}'),
        "bad-negdim": entry_with(shape=[-4] + entry["shape"][1:]),
    }
    for name, payload in files.items():
        (folder / f"{name}.unet").write_bytes(payload)
    (folder / "garbage.unet").write_bytes(b"this is not a model file\n" * 40)
    with open(folder / "sparse.unet", "wb") as fh:   # 4 GB, nearly all of it a hole
        fh.write(raw[:8 + struct.unpack("<Q", raw[:8])[0]])
        fh.truncate(4 * 2 ** 30)


def _damaged_runs(folder: Path, run: Path) -> None:
    """Copies of a real run folder with train-state.bin or config.json damaged."""
    state = folder / "r16-state"
    shutil.copytree(run, state)
    raw = (state / "train-state.bin").read_bytes()
    header, data = split_safetensors(raw)
    meta = dict(header["__metadata__"])
    provenance = json.loads(meta["provenance"])
    provenance["train_state"]["optimizer_state"] = [1, 2, 3]
    meta["provenance"] = json.dumps(provenance)
    (state / "train-state.bin").write_bytes(join_safetensors(dict(header, __metadata__=meta), data))
    as_list = folder / "r16-list"
    shutil.copytree(run, as_list)
    (as_list / "config.json").write_text("[1, 2, 3]\n")
    base = folder / "r16-base"
    shutil.copytree(run, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["options"]["base"] = 64          # the options a resumed run is rebuilt from
    (base / "config.json").write_text(json.dumps(cfg))


def build(folder: Path, unet: list[str]) -> None:
    """Every file the probes read, made small and from scratch (one tiny training run included)."""
    import tifffile
    from PIL import Image

    import torch
    from unetcli.checkpoint import save_model
    from unetcli.model import UNet, UNetConfig

    folder.mkdir(parents=True, exist_ok=True)
    lab = _instances()
    mask = ((lab > 0) * 255).astype(np.uint8)
    rng = np.random.default_rng(1)
    image = (rng.normal(120, 30, lab.shape) + 60 * (lab > 0)).clip(0, 255).astype(np.uint8)
    Image.fromarray(image).save(folder / "image.png")
    Image.fromarray(mask).save(folder / "labels.png")
    Image.fromarray(mask).save(folder / "truth.png")
    (folder / "sub").mkdir()
    os.symlink("truth.png", folder / "truth-link.png")
    tifffile.imwrite(folder / "pred.tif", np.roll(mask, 2, axis=1))
    (folder / "labels").mkdir()
    tifffile.imwrite(folder / "labels" / "a.tif", lab)
    tifffile.imwrite(folder / "labels" / "b.tif", _instances(2))
    tifffile.imwrite(folder / "stack.tif", np.stack([lab, _instances(3), _instances(4)]), photometric="minisblack")
    tifffile.imwrite(folder / "mixed.tif", lab)
    tifffile.imwrite(folder / "mixed.tif", lab[:30, :30], append=True)
    huge = image.astype(np.float64)
    huge[10:20, 10:20] = 1e300
    tifffile.imwrite(folder / "huge.tif", huge)
    bomb_jpeg(folder / "bomb.jpg")
    for sub in ("imgs", "labs"):
        (folder / sub).mkdir()
    for i in range(2):
        lab_i = _instances(10 + i)
        img_i = (rng.normal(120, 30, lab_i.shape) + 60 * (lab_i > 0)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img_i).save(folder / "imgs" / f"{i}.png")
        Image.fromarray(((lab_i > 0) * 255).astype(np.uint8)).save(folder / "labs" / f"{i}.png")
    big = (rng.normal(120, 30, (2400, 2400))).clip(0, 255).astype(np.uint8)
    Image.fromarray(big).save(folder / "big.png")
    Image.fromarray(big[:600, :600]).save(folder / "mid.png")

    torch.manual_seed(0)
    config = UNetConfig(base=4, depth=3, dropout=0.0)
    save_model(folder / "tiny.unet", UNet(config).state_dict(), config,
               normalization={"mean": [127.0], "std": [60.0]}, class_names=["background", "foreground"])
    _damaged_models(folder, (folder / "tiny.unet").read_bytes())

    run = folder / ".run-source"
    proc = subprocess.run([*unet, "train", "--images", "imgs/", "--labels", "labs/", "--base", "4",
                           "--depth", "2", "--tile", "44", "--batch", "1", "--no-augment",
                           "--iterations", "2", "--checkpoint-every", "1", "--out", str(run)],
                          cwd=folder, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _damaged_runs(folder, run)
    shutil.rmtree(run)


# -------------------------------------------------------------------------------------- running

def digest(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            if p.stat().st_size > 64 * 2 ** 20:          # the sparse model: size and first bytes
                with open(p, "rb") as fh:
                    out[str(p.relative_to(folder))] = f"{p.stat().st_size}:{hashlib.sha256(fh.read(2 ** 20)).hexdigest()}"
            else:
                out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if ".part" in p.name or p.name.endswith(".tmp") or p.name.startswith("tmp"))


def _session_processes(sid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:   # after ')': state, ppid, pgrp, session
                count += 1
    return count


@dataclass
class Outcome:
    code: int
    out: bytes
    err: str
    rss_mb: float
    procs: int
    seconds: float
    lines: list[str] = field(default_factory=list)


SHIM = """\
import os, signal, sys
# `unet` for the probes: run this checkout's package in a process spawned from this small one, so that
# its peak memory (wait4) is its own, not that of the (large) test process that started the line.
signal.signal(signal.SIGINT, signal.SIG_IGN)       # the child gets the signals and answers them
signal.signal(signal.SIGTERM, signal.SIG_IGN)
pid = os.posix_spawn(sys.executable, [sys.executable, "-m", "unetcli", *sys.argv[1:]], os.environ,
                     setsigdef=(signal.SIGINT, signal.SIGTERM))
_, status, usage = os.wait4(pid, 0)
if os.environ.get("UNET_PROBE_RSS"):
    with open(os.environ["UNET_PROBE_RSS"], "a") as fh:
        fh.write(f"{usage.ru_maxrss}\\n")
code = os.waitstatus_to_exitcode(status)
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def shim(folder: Path) -> Path:
    """A ``unet`` on PATH that runs this checkout's package with this Python (see SHIM)."""
    bin_dir = folder / ".bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "unet"
    exe.write_text(f"#!{sys.executable} -S\n" + SHIM)
    exe.chmod(0o755)
    return bin_dir


def run_line(line: str, folder: Path, bin_dir: Path, *, timeout: float = 120.0,
             count_processes: bool = False, after=None) -> Outcome:
    """Run ``line`` with bash in ``folder``; ``after(proc)`` may act on the running command.

    The peak memory is the largest resident set of the ``unet`` processes of the line (each measured
    by the shim that spawned it)."""
    rss_file = bin_dir / f"rss-{time.monotonic_ns()}"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "NO_COLOR": "1", "UNET_MODELS": str(folder / ".no-user-models"), "PYTHONPATH": str(ROOT),
           "UNET_PROBE_RSS": str(rss_file)}
    env.pop("UNET_DEBUG", None)
    start = time.monotonic()
    proc = subprocess.Popen(["bash", "-c", line], cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    chunks: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda n=n, s=s: chunks.__setitem__(n, s.read()), daemon=True)
               for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    most = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            most[0] = max(most[0], _session_processes(proc.pid))
            time.sleep(0.05)

    def overtime():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    watchdog = threading.Timer(timeout, overtime)
    for t in readers + ([threading.Thread(target=sample, daemon=True)] if count_processes else []):
        t.start()
    watchdog.start()
    if after is not None:
        after(proc)
    _, status, _usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    watchdog.cancel()
    done.set()
    for t in readers:
        t.join()
    seconds = time.monotonic() - start
    if seconds >= timeout:
        raise AssertionError(f"{line!r} ran past {timeout} s")
    text = chunks.get("err", b"").decode("utf-8", "replace")
    peaks = [int(v) for v in rss_file.read_text().split()] if rss_file.exists() else [0]
    rss_file.unlink(missing_ok=True)
    return Outcome(proc.returncode, chunks.get("out", b""), text, max(peaks) / 1024, most[0],
                   seconds, [ln for ln in text.splitlines() if ln.strip()])


def check(probe: Probe, folder: Path, bin_dir: Path) -> Outcome:
    before = digest(folder)
    outcome = run_line(probe.line, folder, bin_dir, timeout=probe.seconds,
                       count_processes=probe.procs is not None)
    show = f"{probe.line!r} -> exit {outcome.code}, stderr {outcome.err[-600:]!r}"
    errors = [ln for ln in outcome.lines if ln.startswith("unet: error: ")]
    warns = [ln for ln in outcome.lines if ln.startswith("unet: warning: ")]
    if probe.expect == "bounded" and outcome.code == 0:
        kind = "ok"
    elif probe.expect == "bounded":
        kind = "refused"
    else:
        kind = probe.expect
    if kind == "refused":
        assert outcome.code not in (0, None) and outcome.code < 128, show
        assert outcome.out == b"", show
        assert len(errors) == 1 and len(outcome.lines) == 1 + len(warns), show
        assert len(warns) <= probe.warnings, show
        for word in probe.words:
            assert word in errors[0], (word, show)
        assert digest(folder) == before, show          # nothing changed, nothing added
    elif kind == "ok":
        assert outcome.code == 0, show
        assert errors == [] and len(warns) <= probe.warnings, show
        assert all(ln.startswith("unet: warning: ") or not ln.startswith("unet:") for ln in outcome.lines), show
        now = digest(folder)
        assert {k: now.get(k) for k in before} == before, show   # inputs unchanged
    else:   # "quiet": an exact code, nothing on stderr
        assert outcome.lines == [], show
    if probe.code is not None:
        assert outcome.code == probe.code, show
    for name in probe.creates:
        assert (folder / name).is_file(), (name, show)
    for name in probe.absent:
        assert not (folder / name).exists(), (name, show)
    assert temporaries(folder) == [], show
    assert outcome.rss_mb <= probe.rss_mb, (f"{outcome.rss_mb:.0f} MiB", show)
    if probe.procs is not None:
        assert outcome.procs <= probe.procs, (outcome.procs, show)
    assert outcome.seconds <= probe.seconds, show
    return outcome


@pytest.fixture(scope="module")
def probe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("probes")
    bin_dir = shim(folder)
    build(folder, [str(bin_dir / "unet")])
    return folder, bin_dir


@pytest.mark.parametrize("probe", PROBES, ids=[p.id for p in PROBES])
def test_probe(probe, probe_folder):
    folder, bin_dir = probe_folder
    check(probe, folder, bin_dir)


# --------------------------------------------- the cases that need a second command or a signal

def _wait_for(folder: Path, pattern: str, seconds: float = 60.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if any(folder.glob(pattern)):
            return True
        time.sleep(0.05)
    return False


def _signal_when(folder: Path, pattern: str, sig: int, seen: list):
    def act(proc):
        seen.append(_wait_for(folder, pattern))
        os.killpg(proc.pid, sig)
    return act


# torch on one thread: slow enough that the signal always lands while the output is being written
PREDICT_BIG = "unet predict big.png -m tiny.unet --backend torch --threads 1 --tile 572 -o {out}"


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_14_15_a_signal_ends_predict_with_one_line_and_no_temporary(probe_folder, sig, code, word):
    """Cases 14 and 15: SIGTERM and Ctrl-C (SIGINT to the whole process group, as a terminal sends it)
    while the output is being written."""
    folder, bin_dir = probe_folder
    out = f"sig{code}.tif"
    before, seen = digest(folder), []
    outcome = run_line(PREDICT_BIG.format(out=out), folder, bin_dir,
                       after=_signal_when(folder, f".{out}.*.part*", sig, seen))
    assert seen == [True], "the temporary output never appeared"
    assert outcome.code == code, outcome
    assert outcome.out == b"" and len(outcome.lines) == 1 and word in outcome.lines[0], outcome
    assert temporaries(folder) == [] and not (folder / out).exists()
    assert digest(folder) == before


def test_14_a_killed_predict_leaves_a_temporary_that_the_rerun_removes(probe_folder):
    """Case 14: SIGKILL cannot be caught; the next run for the same output removes what it left."""
    folder, bin_dir = probe_folder
    seen = []
    outcome = run_line(PREDICT_BIG.format(out="killed.tif"), folder, bin_dir,
                       after=_signal_when(folder, ".killed.tif.*.part*", signal.SIGKILL, seen))
    assert seen == [True] and outcome.code == -signal.SIGKILL
    assert len(temporaries(folder)) == 1
    rerun = run_line(PREDICT_BIG.format(out="killed.tif") + " --skip-existing", folder, bin_dir)
    assert rerun.code == 0, rerun
    assert temporaries(folder) == [] and (folder / "killed.tif").is_file()


def test_05_two_trainings_into_one_folder(probe_folder):
    """Case 5: the second `train --out` (and `--resume`) on a folder in use is refused in one line;
    the first run finishes whole."""
    folder, bin_dir = probe_folder
    first_seen = []

    def second(proc):
        first_seen.append(_wait_for(folder, "r5/.unet-lock", 90))
        for line in (f"{TRAIN} --iterations 2 --out r5", f"{TRAIN} --resume r5"):
            other = run_line(line, folder, bin_dir)
            assert other.code not in (0, None) and len(other.lines) == 1, other
            assert other.lines[0].startswith("unet: error: ") and "r5" in other.lines[0], other

    outcome = run_line(f"{TRAIN} --iterations 300 --checkpoint-every 100 --out r5", folder, bin_dir,
                       after=second)
    assert first_seen == [True]
    assert outcome.code == 0, outcome
    config = json.loads((folder / "r5" / "config.json").read_text())
    assert "300" in json.dumps(config), "the folder's configuration is not the first run's"
    assert temporaries(folder) == []


if __name__ == "__main__":      # the probe list as a user would run it, one line per probe
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "probes"
        folder.mkdir()
        bin_dir = shim(folder)
        build(folder, [str(bin_dir / "unet")])
        failed = 0
        for probe in PROBES:
            try:
                got = check(probe, folder, bin_dir)
                status = f"ok    exit {got.code:>3}  {got.rss_mb:6.0f} MiB  {got.seconds:5.1f} s"
                said = got.lines[-1] if got.lines else ""
            except AssertionError as exc:
                failed += 1
                status, said = "FAILED", str(exc)[:300]
            print(f"{probe.case:>2}  {status}  {probe.line}\n      {said}")
        sys.exit(1 if failed else 0)
