"""The training loop: the paper's recipe by default, checkpoints, exact resume, validation, DDP.

The loss is the paper's pixel-wise softmax with weighted cross-entropy, averaged over the output pixels:

    E = (1 / N) * sum_x w(x) * -log p_{l(x)}(x)

(``N`` the number of output pixels in the batch, ``w`` the weight map, uniform 1 without one). With
``loss='ce+dice'`` the soft Dice loss ``1 - mean_c (2 sum p_c g_c + 1) / (sum p_c + sum g_c + 1)`` over
every class ``c`` of the batch is added to it.

Randomness is a function of ``(seed, rank, step)``: the tiles of step ``s`` come from generators seeded
with the sample numbers of that step (see ``data.TileSampler``), and torch's generator (dropout, GPU
augmentation) is re-seeded at every step. A run resumed at step ``s`` therefore continues exactly as
the uninterrupted run would have (bit for bit on the same device and thread count), with no random
state to carry but the step.

The resumable state (weights, optimiser moments, step, elapsed time, best score) is written to
``RUN_DIR/train-state.bin`` in the container of ``.unet`` model files (JSON header + raw arrays): it is
not a pickle, so reading it runs no code. The model files ``last.unet`` and ``best.unet`` are written
with ``checkpoint.save_model``. Both are written atomically, every ``checkpoint_every`` steps, at the
end, and when ``stop`` is set (the command sets it on Ctrl-C or SIGTERM).

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel
(NCCL on CUDA, gloo on CPU); every process draws its own tiles (its rank is in the seed), and only
rank 0 validates and writes files. The stop decision (step budget, time budget, a signal on any
process) is agreed on by all processes at every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unetcli import checkpoint
from unetcli.errors import ConfigError, ModelFileError, RunFolderError
from unetcli.model import UNet, UNetConfig, check_tile

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "poly", "onecycle")
LOSSES = ("ce", "ce+dice")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
METRICS = ("auto", "loss", "iou", "dice", "vrand", "vinfo", "pixel_error", "f1", "ap")
OBJECT_METRICS = ("f1", "ap")
LOWER_IS_BETTER = {"loss", "pixel_error"}
STATE_FILE = "train-state.bin"
STATE_FORMAT = 1


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run except the network (``UNetConfig``) and the data."""

    tile: int = 572
    batch: int = 1
    iterations: int | None = None       # optimiser steps; None: from epochs or the time budget
    epochs: float | None = None         # one epoch = as many output pixels as the training set has
    max_time: float | None = None       # seconds of wall clock for the whole run (validation included)
    optimizer: str = "sgd"
    lr: float | None = None             # None: 0.01 for SGD, 1e-3 for Adam/AdamW
    momentum: float = 0.99
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: float = 0.02                # fraction of the run with a linear warm-up
    loss: str = "ce"
    val_every: int | None = None        # steps; None: about 10 validations per run
    checkpoint_every: int = 200
    log_every: int = 10
    metric: str = "auto"
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None   # None: on CUDA
    workers: int | None = None          # None: 0 on a CPU with 2 cores or fewer, else up to 4
    compile: bool = False
    gpu_augment: bool | None = None     # None: on when training on CUDA
    val_tile: int | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.metric not in METRICS:
            raise ConfigError(f"--val-metric must be one of {', '.join(METRICS)}, not {self.metric!r}")
        if self.batch < 1:
            raise ConfigError(f"--batch must be at least 1, not {self.batch}")
        if self.iterations is not None and self.iterations < 1:
            raise ConfigError(f"--iterations must be at least 1, not {self.iterations}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"--epochs must be positive, not {self.epochs}")
        if self.max_time is not None and self.max_time <= 0:
            raise ConfigError("--max-time must be positive")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be positive, not {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), not {self.momentum}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"--warmup must be in [0, 1), not {self.warmup}")
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.val_every is not None and self.val_every < 1:
            raise ConfigError("--val-every must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise ConfigError("--workers must be 0 or more")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (0.01 if self.optimizer == "sgd" else 1e-3)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def parse_duration(text: str) -> float:
    """'30m', '1h', '1h30m', '90s', '45' (seconds) -> seconds."""
    t = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        value = float(t)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*(h|m|min|s|sec)", t)
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*(h|min|m|sec|s)", "", t).strip():
            raise ConfigError(f"--max-time {text!r}: not a duration", hint="write e.g. 30m, 1h30m or 90s")
        value = sum(float(n) * {"h": 3600, "m": 60, "min": 60, "s": 1, "sec": 1}[u] for n, u in parts)
    if value <= 0:
        raise ConfigError(f"--max-time {text!r}: must be positive")
    return value


# ---------------------------------------------------------------------------------------------- loss

def weighted_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None,
                  kind: str = "ce") -> torch.Tensor:
    """The paper's weighted softmax cross-entropy, mean over pixels; optionally plus soft Dice.

    logits (B, K, H, W), target (B, H, W) int64 class indices, weights (B, H, W) or None.
    """
    logits = logits.float()
    ce = F.cross_entropy(logits, target, reduction="none")        # (B, H, W): -log p_{l(x)}(x)
    loss = (ce * weights).mean() if weights is not None else ce.mean()
    if kind == "ce+dice":
        prob = logits.softmax(1)                                   # (B, K, H, W)
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(prob.dtype)
        inter = (prob * onehot).sum((0, 2, 3))                     # (K,)
        total = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
        loss = loss + (1.0 - ((2 * inter + 1.0) / (total + 1.0)).mean())
    return loss


# -------------------------------------------------------------------------------------- schedules

def lr_factor(schedule: str, progress: float, warmup: float) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1] of the run."""
    p = min(max(progress, 0.0), 1.0)
    if schedule == "onecycle":
        peak = max(warmup, 0.3)
        if p < peak:
            return 0.04 + 0.96 * p / peak
        q = (p - peak) / (1 - peak)
        return 0.5 * (1 + math.cos(math.pi * q))
    if warmup > 0 and p < warmup:
        return (p + 1e-3) / warmup
    if schedule == "constant":
        return 1.0
    q = (p - warmup) / (1 - warmup) if warmup < 1 else 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * q))
    return (1 - q) ** 0.9   # poly


# -------------------------------------------------------------------------------- devices, ranks

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); NCCL on CUDA, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_kind in ("auto", "cuda") or device_kind.startswith("cuda")
    backend = "nccl" if use_cuda and torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, local_rank=local, backend=backend)


def select_device(name: str, dist: Dist | None = None) -> torch.device:
    """'auto' -> CUDA (the local rank's GPU), then MPS, then CPU; else the named device, checked."""
    dist = dist or Dist()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r}: not a device", hint="use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine",
                              hint="use --device cpu or auto")
        if dev.index is None:
            dev = torch.device("cuda", dist.local_rank % torch.cuda.device_count())
        elif dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {name}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name!r}: not supported", hint="use auto, cpu, cuda, cuda:N or mps")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on a CUDA GPU that supports it, else fp32; fp16/bf16 refused where unsupported."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type not in ("cuda", "mps"):
        raise ConfigError(f"--precision fp16 needs a GPU; {device} trains in fp32 or bf16")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16",
                          hint="use --precision fp16")
    return precision


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for torch's generator at one step of one process."""
    return int(np.random.SeedSequence([seed, rank, step, 0x7A11]).generate_state(2, np.uint32)
               .astype(np.uint64).dot([1, 2**32])) & (2**63 - 1)


# --------------------------------------------------------------------------------------- the model

def build_network(net_config: UNetConfig, *, seed: int, init: str | None = None,
                  class_names: Sequence[str] | None = None) -> tuple[UNet, dict]:
    """A fresh U-Net (He initialisation with ``seed``), or one started from a model file.

    With ``init``, every tensor is copied from the model file; if ``net_config`` asks for another number
    of classes, the 1x1 head is new (He initialisation) and the rest is copied: the usual way to adapt
    a trained network to one's own classes. Returns the network and a note for the provenance.
    """
    torch.manual_seed(seed)
    if init is None:
        return UNet(net_config), {}
    mf = checkpoint.load_model(init)
    base = mf.config
    if base.in_channels != net_config.in_channels:
        raise ConfigError(f"{mf.path}: the model takes {base.in_channels} input channel(s), the training "
                          f"images have {net_config.in_channels}",
                          hint="convert the images, or start from another model")
    cfg = dataclasses.replace(base, num_classes=net_config.num_classes)
    net = UNet(cfg)
    state = net.state_dict()
    new_head = base.num_classes != cfg.num_classes
    copied = 0
    for key, value in mf.tensors.items():
        if key not in state:
            raise ModelFileError(f"{mf.path}: weights do not match its config (unexpected {key})")
        if new_head and key.startswith("head."):
            continue
        if tuple(state[key].shape) != tuple(value.shape):
            raise ModelFileError(f"{mf.path}: tensor {key} has shape {value.shape}, its config needs "
                                 f"{tuple(state[key].shape)}")
        state[key] = torch.from_numpy(np.ascontiguousarray(value)).to(state[key].dtype)
        copied += 1
    net.load_state_dict(state)
    note = {"init": {"model": str(mf.path), "sha256": mf.sha256, "tensors_copied": copied,
                     "new_head": new_head, "classes_before": base.num_classes,
                     "class_names_before": mf.class_names}}
    return net, note


# ------------------------------------------------------------------------------- the resume state

def save_state(path: Path, net: nn.Module, optimizer: torch.optim.Optimizer, config: UNetConfig,
               normalization: dict, info: dict, scaler=None) -> None:
    """Weights, optimiser moments and counters in the ``.unet`` container (no pickle), atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for k, v in net.state_dict().items():
        tensors[f"model/{k}"] = v
    opt = optimizer.state_dict()
    layout = {}
    for idx, st in opt["state"].items():
        keys = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt/{idx}/{k}"] = v
                keys[k] = "tensor"
            else:
                keys[k] = v
        layout[str(idx)] = keys
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
    meta = dict(info)
    meta.update({"format": STATE_FORMAT, "optimizer_state": layout, "param_groups": groups,
                 "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None})
    checkpoint.save_model(path, tensors, config, normalization=normalization,
                          provenance={"train_state": meta})


def load_state(path: Path) -> tuple[dict, dict, dict]:
    """(model state, optimiser state dict, info) from a ``train-state.bin``."""
    try:
        mf = checkpoint.load_model(path)
    except ModelFileError as exc:
        raise RunFolderError(f"{path}: cannot resume from it ({exc.message})",
                             hint="the run folder's state is damaged; start a new run") from exc
    meta = mf.provenance.get("train_state")
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise RunFolderError(f"{path}: not a unet training state")
    model = {k[len("model/"):]: torch.from_numpy(np.ascontiguousarray(v))
             for k, v in mf.tensors.items() if k.startswith("model/")}
    state = {}
    for idx, keys in meta["optimizer_state"].items():
        entry = {}
        for k, v in keys.items():
            entry[k] = torch.from_numpy(np.ascontiguousarray(mf.tensors[f"opt/{idx}/{k}"])) if v == "tensor" else v
        state[int(idx)] = entry
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return model, {"state": state, "param_groups": groups}, meta


# ------------------------------------------------------------------------------------- validation

def validate(net: nn.Module, samples, *, normalization: dict, config: UNetConfig, device: torch.device,
             precision: str, tile: int | None, membrane: bool, objects: str | None = None) -> dict:
    """Whole-image overlap-tile prediction of every validation image; mean scores over the images.

    Keys: ``loss`` (unweighted cross-entropy), the pixel scores of ``metrics.pixel_scores`` (iou, dice,
    per class, pixel_error) and, for membrane-type data, ``vrand`` and ``vinfo`` (thinned). With
    ``objects`` ('f1' or 'ap'), the instance decoding is tuned on these images for that metric
    (``instances.tune``): ``f1``, ``ap`` of the tuned decoding and its parameters as ``decode_*`` keys.
    """
    from unetcli import inference, instances, metrics
    from unetcli import data as datamod

    mean, std = datamod.tile_mean_std(normalization, config.in_channels)
    rows, probs, truths = [], [], []
    was_training = net.training
    net.eval()
    try:
        for s in samples:
            x = (s.image * np.float32(s.scale) - mean) / std
            prob = np.asarray(inference.predict_proba(net, x, config=config, tile=tile, batch=1,
                                                      device=str(device), precision=precision))
            k = prob.shape[0]
            pt = np.take_along_axis(prob, s.target[None].astype(np.int64), 0)[0]
            row = {"loss": float(-np.log(np.clip(pt, 1e-7, 1.0)).mean())}
            pred = prob.argmax(0).astype(np.uint8)
            row.update({key: float(v) for key, v in metrics.pixel_scores(pred, s.target, k).items()})
            if membrane:
                truth = s.instances if s.instances is not None else s.target
                scores = metrics.isbi_scores(prob[0], truth)
                row.update({key: float(scores[key]) for key in ("vrand", "vinfo") if key in scores})
            if objects and s.instances is not None and k in (2, 3):
                probs.append(prob)
                whole = k == 2 and s.label is not None and len(np.unique(s.label)) > 2   # not the carved copy
                truths.append(s.label if whole else s.instances)
            rows.append(row)
    finally:
        net.train(was_training)
    keys = sorted(set().union(*rows)) if rows else []
    out = {key: float(np.mean([r[key] for r in rows if key in r])) for key in keys}
    if probs:
        params, _ = instances.tune(probs, truths, metric=objects)
        scored = [metrics.object_scores(instances.decode(p, params), t) for p, t in zip(probs, truths)]
        for key in ("f1", "ap", "precision", "recall"):
            out[key if key in ("f1", "ap") else f"object_{key}"] = float(np.mean([r[key] for r in scored]))
        out.update({f"decode_{k}": float(v) for k, v in params.to_dict().items()})
    return out


def decode_params_of(val: dict | None) -> dict:
    """The tuned instance decoding recorded by :func:`validate` (``decode_*`` keys), as a model file's
    ``postprocess`` record; empty when there is none."""
    from unetcli import instances

    got = {k.removeprefix("decode_"): v for k, v in (val or {}).items() if k.startswith("decode_")}
    if not got:
        return {}
    ints = {"min_seed", "min_size", "grow"}
    return instances.DecodeParams(**{k: int(round(v)) if k in ints else float(v) for k, v in got.items()}).to_dict()


# ------------------------------------------------------------------------------------ run folder

def read_metrics(path: Path, upto_step: int | None = None) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if upto_step is None or row.get("step", 0) <= upto_step:
                    rows.append(row)
    return rows


def draw_curves(path: Path, rows: Sequence[dict], metric: str) -> None:
    """A PNG of the training loss and validation loss (left axis, log) and validation metric (right)."""
    from PIL import Image, ImageDraw

    W, H, L, R, T, B = 800, 420, 70, 70, 30, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    score = [(r["step"], r[f"val_{metric}"]) for r in rows if f"val_{metric}" in r]
    steps = [s for s, _ in train + val] or [0, 1]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    losses = [v for _, v in train + val if v > 0] or [1.0]
    lo, hi = math.log10(min(losses)), math.log10(max(losses))
    if hi - lo < 1e-3:
        lo, hi = lo - 0.5, hi + 0.5
    svals = [v for _, v in score] or [0.0, 1.0]
    s_lo, s_hi = min(svals), max(svals)
    if s_hi - s_lo < 1e-6:
        s_lo, s_hi = s_lo - 0.01, s_hi + 0.01

    def px(step):
        return L + (step - x0) / (x1 - x0) * (W - L - R)

    def py_loss(v):
        return T + (hi - math.log10(max(v, 1e-12))) / (hi - lo) * (H - T - B)

    def py_score(v):
        return T + (s_hi - v) / (s_hi - s_lo) * (H - T - B)

    d.rectangle([L, T, W - R, H - B], outline="black")
    for i in range(5):
        y = T + i * (H - T - B) / 4
        d.line([L, y, W - R, y], fill=(225, 225, 225))
        d.text((4, y - 6), f"{10 ** (hi - i * (hi - lo) / 4):.3g}", fill=(31, 119, 180))
        if score:
            d.text((W - R + 6, y - 6), f"{s_hi - i * (s_hi - s_lo) / 4:.4g}", fill=(214, 39, 40))
    for i in range(5):
        st = x0 + i * (x1 - x0) / 4
        d.text((px(st) - 10, H - B + 6), f"{int(st)}", fill="black")
    d.text((W // 2 - 20, H - 22), "step", fill="black")
    d.text((L, 8), "training loss", fill=(31, 119, 180))
    d.text((L + 130, 8), "validation loss", fill=(255, 127, 14))
    if score:
        d.text((L + 280, 8), f"validation {metric}", fill=(214, 39, 40))
    for pts, colour, fn in ((train, (31, 119, 180), py_loss), (val, (255, 127, 14), py_loss),
                            (score, (214, 39, 40), py_score)):
        xy = [(px(s), fn(v)) for s, v in pts]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=2)
        for x, y in xy[-1:] if len(xy) == 1 or pts is not train else []:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    from unetcli.images import write_image

    write_image(path, np.asarray(img), "YXC")


def write_json(path: Path, data: dict) -> None:
    from unetcli.images import write_bytes_atomic

    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode())


# ---------------------------------------------------------------------------------- the training

@dataclass
class StopFlag:
    """Set by a signal handler (or a test) to end training after the current step, checkpointing."""

    reason: str | None = None

    def set(self, reason: str = "stop") -> None:
        self.reason = self.reason or reason

    def __bool__(self) -> bool:
        return self.reason is not None


@dataclass
class TrainResult:
    run_dir: Path
    last: Path | None
    best: Path | None
    step: int
    elapsed: float
    best_metric: str | None
    best_value: float | None
    best_step: int | None
    final_loss: float | None
    interrupted: str | None = None
    validation: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def _dataloader(sampler_ds, start: int, stop: int, batch: int, workers: int):
    from torch.utils.data import DataLoader

    def init(_worker):
        torch.set_num_threads(1)

    indices = range(start * batch, stop * batch)
    kwargs = {}
    if workers > 0:
        kwargs = {"worker_init_fn": init, "prefetch_factor": 2, "persistent_workers": False}
    return DataLoader(sampler_ds, batch_size=batch, sampler=indices, num_workers=workers,
                      drop_last=False, **kwargs)


def default_workers(device: torch.device) -> int:
    cores = os.cpu_count() or 1
    if device.type == "cpu":
        return 0 if cores <= 2 else min(4, cores // 4)
    return min(4, max(cores // 2, 1))


def train(cfg: TrainConfig, net_config: UNetConfig, train_samples, val_samples, run_dir: Path, *,
          normalization: dict, class_names: Sequence[str], augment, provenance: dict | None = None,
          init: str | None = None, resume: bool = False, dist: Dist | None = None,
          progress: Callable[[dict], None] | None = None, stop: StopFlag | None = None,
          stop_at: int | None = None) -> TrainResult:
    """Train a U-Net on ``train_samples`` and write ``run_dir``; return the summary.

    ``augment`` is a ``transforms.AugmentConfig``. ``resume`` continues from ``run_dir``'s state.
    ``stop_at`` ends (with a checkpoint) after that step, as a signal would; the schedule still
    spans the whole run, which is what an interruption looks like.
    """
    from unetcli import data as datamod

    dist = dist or Dist()
    stop = stop if stop is not None else StopFlag()
    run_dir = Path(run_dir)
    device = select_device(cfg.device, dist)
    precision = resolve_precision(cfg.precision, device)
    out_size = check_tile(net_config, cfg.tile)
    if cfg.val_tile is not None:
        check_tile(net_config, cfg.val_tile)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # ---- schedule length
    pixels = sum(int(s.target.size) for s in train_samples)
    steps_per_epoch = max(1, math.ceil(pixels / (out_size * out_size * cfg.batch * dist.world)))
    total = cfg.iterations
    if total is None and cfg.epochs is not None:
        total = max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
    if total is None and cfg.max_time is None:
        total = 10 * steps_per_epoch
    cap = total if total is not None else 10**12
    val_every = cfg.val_every or (max(1, total // 10) if total is not None else 200)

    # ---- network, optimiser
    net, init_note = build_network(net_config, seed=cfg.seed, init=init)
    net_config = net.config
    model_state, opt_state, info = None, None, {}
    if resume:
        model_state, opt_state, info = load_state(run_dir / STATE_FILE)
        net.load_state_dict(model_state)
    net.to(device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    lr0 = cfg.learning_rate
    params = net.parameters()
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=lr0, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr0, weight_decay=cfg.weight_decay or 0.01)
    scaler = torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
        if info.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(info["scaler"])
    model = net
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    fwd = torch.compile(model) if cfg.compile else model
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision in ("bf16", "fp16") else contextlib.nullcontext())

    # ---- data
    gpu_aug = cfg.gpu_augment if cfg.gpu_augment is not None else device.type == "cuda"
    mean, std = datamod.tile_mean_std(normalization, net_config.in_channels)
    sampler = datamod.TileSampler(train_samples, cfg.tile, out_size, augment, seed=cfg.seed,
                                  rank=dist.rank, mean=mean, std=std, raw_crops=gpu_aug)
    workers = cfg.workers if cfg.workers is not None else default_workers(device)
    start = int(info.get("step", 0))
    elapsed0 = float(info.get("elapsed", 0.0))
    best_metric = cfg.metric
    membrane = bool(info.get("membrane", False))
    if val_samples and not resume:
        bg = np.mean([float((s.target == 0).mean()) for s in val_samples])
        membrane = bool(net_config.num_classes == 2 and bg < 0.5 and
                        all(len(np.unique(s.label)) <= 2 for s in val_samples))
    objects_known = bool(val_samples) and all(s.instances is not None for s in val_samples) \
        and net_config.num_classes in (2, 3)
    if best_metric == "auto":
        best_metric = ("vrand" if membrane else ("f1" if objects_known else "iou")) if val_samples else "loss"
    if best_metric in OBJECT_METRICS and not objects_known:
        raise ConfigError(f"--val-metric {best_metric} needs instance labels or binary masks to validate on")
    objects = best_metric if best_metric in OBJECT_METRICS else ("f1" if objects_known and not membrane else None)
    if best_metric in ("vrand", "vinfo"):
        membrane = True
    best_value = info.get("best_value")
    best_step = info.get("best_step")
    metrics_path = run_dir / "metrics.jsonl"
    history = read_metrics(metrics_path, upto_step=start) if resume else []

    prov = dict(provenance or {})
    prov.update(init_note)
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(metrics_path, "w", encoding="utf-8") as fh:   # drop rows written after the state
            for row in history:
                fh.write(json.dumps(row) + "\n")

    def model_files(step: int, elapsed: float, val: dict | None, *, best: bool) -> None:
        state = {k: v for k, v in net.state_dict().items()}
        p = dict(prov)
        p["training"] = {"step": step, "elapsed_s": round(elapsed, 1), "steps_per_epoch": steps_per_epoch,
                         "device": str(device), "precision": precision, "world_size": dist.world}
        if val:
            p["metrics"] = {k: round(v, 6) for k, v in val.items()}
        extra = {"postprocess": decode_params_of(val), "inputs": (prov.get("data") or {}).get("inputs")}
        checkpoint.save_model(run_dir / "last.unet", state, net_config, normalization=normalization,
                              class_names=list(class_names), provenance=p, **extra)
        if best:
            checkpoint.save_model(run_dir / "best.unet", state, net_config, normalization=normalization,
                                  class_names=list(class_names), provenance=p, **extra)

    def save_all(step: int, elapsed: float, val: dict | None, best: bool) -> None:
        if not dist.main:
            return
        save_state(run_dir / STATE_FILE, net, optimizer, net_config, normalization,
                   {"step": step, "elapsed": elapsed, "best_value": best_value, "best_step": best_step,
                    "best_metric": best_metric, "membrane": membrane, "total": total}, scaler)
        model_files(step, elapsed, val, best=best)
        with contextlib.suppress(Exception):   # a picture must never cost a run
            draw_curves(run_dir / "curves.png", history, best_metric)

    def log(row: dict) -> None:
        history.append(row)
        if dist.main:
            with open(metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    def better(v: float) -> bool:
        if best_value is None:
            return True
        return v < best_value if best_metric in LOWER_IS_BETTER else v > best_value

    # ---- the loop
    t_start = time.perf_counter() - elapsed0
    step = start
    loss_window: list[float] = []
    last_val: dict = {}
    last_loss = None
    interrupted = None
    saved_best_file = (run_dir / "best.unet").is_file()
    rate_t, rate_step = time.perf_counter(), step
    steps_per_s = 0.0
    gen = torch.Generator(device=device) if gpu_aug else None
    model.train()
    loader = iter(_dataloader(sampler, start, cap, cfg.batch, workers)) if step < cap else iter(())
    try:
        while True:
            elapsed = time.perf_counter() - t_start
            finished = step >= cap or (cfg.max_time is not None and elapsed >= cfg.max_time)
            halt = bool(stop) or (stop_at is not None and step >= stop_at)
            if dist.world > 1:
                import torch.distributed as tdist

                flags = torch.tensor([float(finished), float(halt), elapsed], dtype=torch.float64,
                                     device=device if dist.backend == "nccl" else "cpu")
                tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
                finished, halt, elapsed = bool(flags[0]), bool(flags[1]), float(flags[2])
            if finished or halt:
                if halt and not finished:
                    interrupted = stop.reason or "stopped"
                break
            progress_frac = step / total if total is not None else 0.0
            if cfg.max_time is not None:
                progress_frac = max(progress_frac, elapsed / cfg.max_time)
            lr = lr0 * lr_factor(cfg.schedule, progress_frac, cfg.warmup)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y, w, scale = next(loader)
            torch.manual_seed(step_seed(cfg.seed, dist.rank, step))
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            w = w.to(device, non_blocking=True)
            if gpu_aug:
                from unetcli import transforms

                gen.manual_seed(step_seed(cfg.seed, dist.rank, step) ^ 0x5EED)
                x, y, w = transforms.augment_batch_torch(x, y, w, augment, gen, out_size)
                m = torch.as_tensor(mean, dtype=x.dtype, device=device).view(1, -1, 1, 1)
                sd = torch.as_tensor(std, dtype=x.dtype, device=device).view(1, -1, 1, 1)
                x = (x * scale.to(device, x.dtype).view(-1, 1, 1, 1) - m) / sd
                y = y.long()
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = fwd(x)
            loss = weighted_loss(logits, y, w, cfg.loss)
            optimizer.zero_grad(set_to_none=True)
            if scaler.is_enabled():
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ConfigError(f"training diverged at step {step + 1} (loss {value})",
                                  hint="lower --lr, or use --optimizer adam")
            step += 1
            loss_window.append(value)
            elapsed = time.perf_counter() - t_start
            if step % cfg.log_every == 0 or step == cap:
                now = time.perf_counter()
                steps_per_s = (step - rate_step) / max(now - rate_t, 1e-9)
                rate_t, rate_step = now, step
                last_loss = float(np.mean(loss_window))
                loss_window = []
                log({"kind": "train", "step": step, "epoch": round(step / steps_per_epoch, 3),
                     "elapsed_s": round(elapsed, 2), "lr": lr, "loss": last_loss,
                     "steps_per_s": round(steps_per_s, 4)})
            val_now = bool(val_samples) and (step % val_every == 0)
            is_best = False
            if val_now and dist.main:
                last_val = validate(net, val_samples, normalization=normalization, config=net_config,
                                    device=device, precision=precision, tile=cfg.val_tile,
                                    membrane=membrane, objects=objects)
                elapsed = time.perf_counter() - t_start
                log({"kind": "val", "step": step, "elapsed_s": round(elapsed, 2),
                     **{f"val_{k}": v for k, v in last_val.items()}})
                if best_metric in last_val and better(last_val[best_metric]):
                    best_value, best_step, is_best = last_val[best_metric], step, True
            if dist.main and (step % cfg.checkpoint_every == 0 or is_best):
                save_all(step, elapsed, last_val or None, best=is_best or not val_samples)
                saved_best_file = saved_best_file or is_best or not val_samples
            if progress is not None and dist.main:
                remaining = None
                if total is not None and steps_per_s > 0:
                    remaining = (total - step) / steps_per_s
                if cfg.max_time is not None:
                    left = max(cfg.max_time - elapsed, 0.0)
                    remaining = left if remaining is None else min(remaining, left)
                progress({"step": step, "total": total, "loss": value, "lr": lr,
                          "steps_per_s": steps_per_s, "elapsed": elapsed, "remaining": remaining,
                          "val": {best_metric: last_val[best_metric]} if best_metric in last_val else {}})
    finally:
        del loader

    # ---- the end: a last validation, the files
    elapsed = time.perf_counter() - t_start
    if loss_window:
        last_loss = float(np.mean(loss_window))
        log({"kind": "train", "step": step, "epoch": round(step / steps_per_epoch, 3),
             "elapsed_s": round(elapsed, 2), "lr": optimizer.param_groups[0]["lr"], "loss": last_loss,
             "steps_per_s": round(steps_per_s, 4)})
    is_best = False
    if dist.main and val_samples and interrupted is None and \
            not any(r.get("kind") == "val" and r.get("step") == step for r in history[-3:]):
        last_val = validate(net, val_samples, normalization=normalization, config=net_config,
                            device=device, precision=precision, tile=cfg.val_tile, membrane=membrane,
                            objects=objects)
        log({"kind": "val", "step": step, "elapsed_s": round(time.perf_counter() - t_start, 2),
             **{f"val_{k}": v for k, v in last_val.items()}})
        if best_metric in last_val and better(last_val[best_metric]):
            best_value, best_step, is_best = last_val[best_metric], step, True
    if not val_samples and interrupted is None:
        best_value, best_step, is_best = last_loss, step, True
        best_metric = "loss"
    save_all(step, elapsed, last_val or None, best=is_best or not saved_best_file)
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()
    return TrainResult(run_dir=run_dir, last=run_dir / "last.unet", best=run_dir / "best.unet",
                       step=step, elapsed=elapsed, best_metric=best_metric,
                       best_value=best_value, best_step=best_step, final_loss=last_loss,
                       interrupted=interrupted, validation=last_val)


# ------------------------------------------------------------------------ a run from its options

# The options of a run as `unet train` takes them; saved in RUN_DIR/config.json so that --resume can
# rebuild exactly the same run. Keys not here are refused, so a typo cannot pass silently.
RUN_DEFAULTS: dict = {
    "images": None, "labels": None, "weights": "auto", "val_images": None, "val_labels": None,
    "val_split": None, "val_index": None, "foreground": None, "classes": None, "border_width": None,
    "w0": 10.0, "sigma": 5.0, "balance": "dataset", "init": None,
    "base": 64, "depth": 4, "padding": "valid", "batchnorm": False, "dropout": 0.5,
    "augment": True, "augmentations": None, "elastic_sigma": None, "elastic_grid": None, "scale_range": None,
    "normalize": "percentile", "target": "two-class", "channels": None,
    **{f.name: f.default for f in dataclasses.fields(TrainConfig)},
}
# Options that may differ when a run is resumed (where it runs, not what it computes).
RESUME_OVERRIDES = ("device", "workers")


def augment_config(opts: dict):
    """The ``transforms.AugmentConfig`` of the options: the module's training defaults, only the
    steps named in ``augmentations`` (comma-separated, of ``transforms.ORDER``), or none."""
    from unetcli import transforms

    if not opts.get("augment", True):
        return transforms.AugmentConfig.none()
    names = opts.get("augmentations")
    if names is not None:
        steps = [n.strip() for n in str(names).split(",") if n.strip()]
        cfg = transforms.AugmentConfig.only(*steps) if steps else transforms.AugmentConfig.none()
    else:
        cfg = transforms.AugmentConfig()
    changes = {}
    fields = {f.name for f in dataclasses.fields(cfg)}
    if opts.get("elastic_sigma") is not None:
        key = next((k for k in ("elastic_sigma", "sigma") if k in fields), None)
        if key:
            changes[key] = float(opts["elastic_sigma"])
    if opts.get("scale_range") is not None:
        text = opts["scale_range"]
        try:
            lo, hi = (float(v) for v in str(text).split(","))
        except ValueError:
            raise ConfigError(f"--scale-range {text!r}: expected LOW,HIGH zoom factors, e.g. 0.7,1.4") from None
        changes["scale_range"] = (lo, hi)
    if opts.get("elastic_grid") is not None:
        key = next((k for k in ("grid", "elastic_grid") if k in fields), None)
        if key:
            changes[key] = int(opts["elastic_grid"])
    return dataclasses.replace(cfg, **changes) if changes else cfg


def default_tile(net_config: UNetConfig, samples) -> int:
    """572 for the paper's network (388 output), else the valid tile whose output is nearest 388;
    smaller when every training image is smaller than that output."""
    from unetcli.model import valid_input_sizes

    side = max(max(s.target.shape) for s in samples)
    want = min(388, side)
    sizes = valid_input_sizes(net_config, 1, 2048)
    for size in sizes:
        from unetcli.model import output_size

        if output_size(net_config, size) >= want:
            return size
    return sizes[-1]


def prepare(opts: dict, *, dist: Dist | None = None, cache_dir: Path | None = None):
    """Read and check the data of a run and build its configs; no training yet.

    Returns ``(train_config, net_config, train_samples, val_samples, normalization, class_names,
    augment, data_note)``. Every input problem is raised here, before any training step.
    """
    from unetcli import data as datamod
    from unetcli import labels as labelmod

    unknown = set(opts) - set(RUN_DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown training options: {', '.join(sorted(unknown))}")
    o = {**RUN_DEFAULTS, **opts}
    if o["images"] is None or o["labels"] is None:
        raise ConfigError("give --images and --labels (or --resume RUN_DIR)")
    foreground = labelmod.parse_values(o["foreground"], option="--foreground") \
        if isinstance(o["foreground"], str) else o["foreground"]
    classes = labelmod.parse_values(o["classes"], option="--classes") \
        if isinstance(o["classes"], str) else o["classes"]
    if foreground is not None and classes is not None:
        raise ConfigError("--foreground and --classes exclude each other")
    if o["balance"] not in ("image", "dataset", "none"):
        raise ConfigError(f"--balance must be image, dataset or none, not {o['balance']!r}")
    weights_opt = o["weights"]
    weights_dir = None if weights_opt in (None, "auto", "none") else weights_opt
    selectors = [k for k in ("val_images", "val_split", "val_index") if o[k] is not None]
    if len(selectors) > 1:
        raise ConfigError(f"--{selectors[0].replace('_', '-')} and --{selectors[1].replace('_', '-')} "
                          "exclude each other: choose one way to pick validation images")
    if (o["val_images"] is None) != (o["val_labels"] is None):
        raise ConfigError("--val-images and --val-labels go together")
    tc = TrainConfig.from_dict(o)           # checks the training settings first: cheap and early
    pairs = datamod.pair_files(o["images"], o["labels"], weights_dir)
    from unetcli import normalize

    if o["init"] is not None and "normalize" not in opts:
        norm_rule = None                     # fine-tuning keeps the rule of the model it starts from
    else:
        norm_rule = normalize.parse(o["normalize"]) if isinstance(o["normalize"], str) else o["normalize"]
        if norm_rule is not None and normalize.kind(norm_rule) == "dataset" and "mean" not in norm_rule:
            norm_rule = None                 # computed from the training images below
    if o["init"] is not None and norm_rule is None:
        init_norm = checkpoint.load_model(o["init"]).normalization
        norm_rule = init_norm if normalize.kind(init_norm) != "dataset" else None
    picked = normalize.parse_channels(o["channels"]) if isinstance(o["channels"], str) else o["channels"]
    if o["target"] == "three-class" and classes is not None:
        raise ConfigError("--target three-class needs instance labels or binary masks, not --classes")
    kw = {"foreground": foreground, "classes": classes, "border_width": o["border_width"],
          "norm": norm_rule, "channels": picked, "target": o["target"]}
    val_pick: set[int] = set()
    if o["val_index"] is not None or o["val_split"] is not None:
        count = datamod.count_pages(pairs)
        if o["val_index"] is not None:
            val_pick = set(datamod.parse_index(str(o["val_index"]), count))
        else:
            val_pick = set(datamod.split_validation(count, float(o["val_split"]), tc.seed))
        if len(val_pick) >= count:
            raise ConfigError(f"--val-index {o['val_index']}: leaves no training images out of {count}")
    samples = datamod.load_pairs(pairs, **kw)
    train_samples = [s for i, s in enumerate(samples) if i not in val_pick]
    val_samples = [s for i, s in enumerate(samples) if i in val_pick]
    if o["val_images"] is not None:
        val_samples = datamod.load_pairs(datamod.pair_files(o["val_images"], o["val_labels"]), **kw)
    k = 3 if o["target"] == "three-class" else labelmod.num_classes(classes)
    channels = datamod.check_samples(train_samples, k, "training")
    if val_samples:
        vc = datamod.check_samples(val_samples, k, "validation")
        if vc != channels:
            raise ConfigError(f"validation images have {vc} channel(s), training images {channels}")
    net_config = UNetConfig(in_channels=channels, num_classes=k, depth=int(o["depth"]), base=int(o["base"]),
                            padding=o["padding"], batchnorm=bool(o["batchnorm"]), dropout=float(o["dropout"]))
    if o["init"] is not None:                # the network's shape comes from the model file
        mf = checkpoint.load_model(o["init"])
        net_config = dataclasses.replace(mf.config, num_classes=k)
        if mf.config.in_channels != channels:
            raise ConfigError(f"{mf.path}: the model takes {mf.config.in_channels} input channel(s), the "
                              f"training images have {channels}")
    if opts.get("tile") is None:
        tc = dataclasses.replace(tc, tile=default_tile(net_config, train_samples))
    check_tile(net_config, tc.tile)
    if tc.val_tile is not None:
        check_tile(net_config, tc.val_tile)
    if weights_opt == "auto":
        datamod.auto_weights(train_samples, w0=float(o["w0"]), sigma=float(o["sigma"]),
                             balance=o["balance"], cache_dir=cache_dir)
    augment = augment_config(o)
    norm = norm_rule if norm_rule is not None else datamod.normalization(train_samples)
    if classes is not None:
        class_names = [f"class{v}" for v in classes]
    elif o["target"] == "three-class":
        class_names = ["background", "interior", "border"]
    else:
        class_names = ["background", "foreground"]
    data_note = {"images": str(o["images"]), "labels": str(o["labels"]),
                 "inputs": {"channels": [i + 1 for i in picked] if picked else None,
                            "dtype": train_samples[0].dtype or None},
                 "weights": str(weights_opt), "train": [s.name for s in train_samples],
                 "validation": [s.name for s in val_samples],
                 "fingerprint": datamod.fingerprint(train_samples)}
    return tc, net_config, train_samples, val_samples, norm, class_names, augment, data_note
