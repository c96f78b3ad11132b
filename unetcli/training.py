"""The training loop: the paper's recipe by default, checkpoints, exact resume, validation, DDP.

The recipe's parts (the weighted loss, the learning-rate schedules, the optimisers, the run's length)
are plain functions in :mod:`unetcli.recipe`.

Randomness is a function of ``(seed, rank, step)``: the tiles of step ``s`` come from generators seeded
with the sample numbers of that step (see ``data.TileSampler``), and torch's generator (dropout, GPU
augmentation) is re-seeded at every step. A run resumed at step ``s`` therefore continues exactly as
the uninterrupted run would have (bit for bit on the same device and thread count), with no random
state to carry but the step.

:func:`train` is the set-up (a :class:`Trainer`: network, optimiser, precision, data) and then the
loop: step, log, validate, checkpoint. What changes as it runs is a :class:`RunState`. The resumable
state (weights, optimiser moments, step, elapsed time, best score) is written to
``RUN_DIR/train-state.bin`` by ``checkpoint.save_state`` (a model file: reading it runs no code); the
model files ``last.unet`` and ``best.unet`` by ``checkpoint.save_model``; the metrics and curves by
``runlog``. All are written atomically, every ``checkpoint_every`` steps, when the validation score
improves, at the end, and when ``stop`` is set (the command sets it on Ctrl-C or SIGTERM).

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel
(NCCL on CUDA, gloo on CPU); every process draws its own tiles (its rank is in the seed), and only
rank 0 validates and writes files. The stop decision (step budget, time budget, a signal on any
process) is agreed on by all processes at every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from unetcli import checkpoint, devices, guards, runlog, validation
from unetcli.errors import ConfigError, RunFolderError
from unetcli.model import UNet, UNetConfig, check_tile
from unetcli.recipe import lr_factor, make_optimizer, schedule_length, validation_interval, weighted_loss
from unetcli.runconfig import TrainConfig


# ------------------------------------------------------------------------------ processes, workers

@dataclass
class Dist:
    """This process's place in a distributed run (rank 0 of 1 when not distributed)."""

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


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for torch's generator at one step of one process."""
    return int(np.random.SeedSequence([seed, rank, step, 0x7A11]).generate_state(2, np.uint32)
               .astype(np.uint64).dot([1, 2**32])) & (2**63 - 1)


def default_workers(device: torch.device) -> int:
    """Data-loading processes: none on a CPU of 2 cores or fewer, else up to 4."""
    cores = guards.cpu_cores()
    if device.type == "cpu":
        return 0 if cores <= 2 else min(4, cores // 4)
    return min(4, max(cores // 2, 1))


# --------------------------------------------------------------------------------------- the model

def build_network(net_config: UNetConfig, *, seed: int, init: str | None = None) -> tuple[UNet, dict]:
    """A fresh U-Net (He initialisation with ``seed``), or one started from a model file.

    With ``init``, every tensor is copied from the model file (checked by ``ModelFile.network``); if
    ``net_config`` asks for another number of classes, the 1x1 head is new (He initialisation) and the
    rest is copied: the usual way to adapt a trained network to one's own classes. Returns the network
    and a note for the provenance.
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
    trained = mf.network().state_dict()
    torch.manual_seed(seed)                     # the new head's initialisation depends on the seed alone
    net = UNet(dataclasses.replace(base, num_classes=net_config.num_classes))
    new_head = base.num_classes != net.config.num_classes
    copied = {k: v for k, v in trained.items() if not (new_head and k.startswith("head."))}
    net.load_state_dict({**net.state_dict(), **copied})
    note = {"init": {"model": str(mf.path), "sha256": mf.sha256, "tensors_copied": len(copied),
                     "new_head": new_head, "classes_before": base.num_classes,
                     "class_names_before": mf.class_names}}
    return net, note


def _set_determinism(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _dataloader(sampler_ds, start: int, stop: int, batch: int, workers: int):
    from torch.utils.data import DataLoader

    indices = range(start * batch, stop * batch)
    kwargs = {}
    if workers > 0:
        kwargs = {"worker_init_fn": _one_thread, "prefetch_factor": 2, "persistent_workers": False}
    return DataLoader(sampler_ds, batch_size=batch, sampler=indices, num_workers=workers,
                      drop_last=False, **kwargs)


def _one_thread(_worker) -> None:
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------- the run's state

@dataclass
class StopFlag:
    """Set by a signal handler (or a test) to end training after the current step, checkpointing."""

    reason: str | None = None

    def set(self, reason: str = "stop") -> None:
        self.reason = self.reason or reason

    def __bool__(self) -> bool:
        return self.reason is not None


@dataclass
class RunState:
    """What changes as a run goes: the step, the losses since the last log row, the scores, the best."""

    step: int
    best_metric: str
    best_value: float | None = None
    best_step: int | None = None
    window: list[float] = field(default_factory=list)   # losses of the steps since the last log row
    last_loss: float | None = None                       # the last logged loss (a window's mean)
    last_val: dict = field(default_factory=dict)         # the last validation's scores
    steps_per_s: float = 0.0                             # over the last log window
    rate_mark: tuple[float, int] = (0.0, 0)              # (clock, step) of the last log row
    best_written: bool = False                           # best.unet exists
    interrupted: str | None = None

    def scored(self, scores: dict) -> bool:
        """Record a validation; True when it beats the best so far."""
        self.last_val = scores
        value = scores.get(self.best_metric)
        if value is None or not validation.better(self.best_metric, value, self.best_value):
            return False
        self.best_value, self.best_step = value, self.step
        return True


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


# ----------------------------------------------------------------------------------------- the set-up

class Trainer:
    """The fixed parts of a run (network, optimiser, precision, data, run folder) and the actions of its
    loop; the loop itself is :func:`train`, and what changes as it runs is a :class:`RunState`."""

    def __init__(self, cfg: TrainConfig, net_config: UNetConfig, train_samples, val_samples, run_dir: Path,
                 *, normalization: dict, class_names: Sequence[str], augment, provenance: dict | None,
                 init: str | None, resume: bool, dist: Dist):
        from unetcli import data as datamod

        self.cfg, self.dist, self.run_dir = cfg, dist, Path(run_dir)
        self.val_samples, self.normalization, self.class_names = list(val_samples), normalization, list(class_names)
        self.device = devices.resolve_device(cfg.device, dist.local_rank)
        self.precision = devices.resolve_precision(cfg.precision, self.device)
        self.out_size = check_tile(net_config, cfg.tile)
        if cfg.val_tile is not None:
            check_tile(net_config, cfg.val_tile)
        _set_determinism(cfg.deterministic, self.device)
        self.steps_per_epoch, self.total = schedule_length(cfg, train_samples, self.out_size, dist.world)
        self.cap = self.total if self.total is not None else 10**12
        self.val_every = validation_interval(cfg.val_every, self.total)
        self.info = checkpoint.load_state(self.run_dir / checkpoint.STATE_FILE) if resume else ({}, None, {})
        self._network(net_config, init, provenance)
        self.gpu_aug = cfg.gpu_augment if cfg.gpu_augment is not None else self.device.type == "cuda"
        self.mean, self.std = datamod.tile_mean_std(normalization, self.net_config.in_channels)
        self.augment = augment
        self.sampler = datamod.TileSampler(train_samples, cfg.tile, self.out_size, augment, seed=cfg.seed,
                                           rank=dist.rank, mean=self.mean, std=self.std, raw_crops=self.gpu_aug)
        self.workers = guards.cap_workers(cfg.workers) if cfg.workers is not None else default_workers(self.device)
        info = self.info[2]
        self.best_metric, self.membrane, self.objects = validation.plan(
            cfg.metric, self.val_samples, self.net_config.num_classes,
            membrane=info.get("membrane", False) if resume else None)
        if dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = runlog.RunLog(self.run_dir, write=dist.main, resume_at=int(info.get("step", 0)) if resume else None)
        self.gen = torch.Generator(device=self.device) if self.gpu_aug else None
        self.t_start = time.perf_counter()

    def _network(self, net_config: UNetConfig, init: str | None, provenance: dict | None) -> None:
        """The network (fresh, from ``init``, or resumed), its optimiser, loss scaler and autocast."""
        net, init_note = build_network(net_config, seed=self.cfg.seed, init=init)
        self.net_config = net.config
        model_state, opt_state, info = self.info
        if model_state:
            own = net.state_dict()
            odd = sorted(k for k in set(own) | set(model_state)
                         if k not in own or k not in model_state or own[k].shape != model_state[k].shape)
            if odd:
                raise RunFolderError(f"{self.run_dir / 'config.json'}: damaged run configuration (its network "
                                     f"does not fit the weights of {checkpoint.STATE_FILE}: {odd[0]})",
                                     hint="restore the run's config.json, or start a new run")
            net.load_state_dict(model_state)
        net.to(self.device)
        self.channels_last = self.cfg.channels_last if self.cfg.channels_last is not None \
            else self.device.type in ("cuda", "cpu")
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.optimizer = make_optimizer(self.cfg, net.parameters())
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(self.precision == "fp16"))
        if opt_state is not None:
            self.optimizer.load_state_dict(opt_state)
            if info.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(info["scaler"])
        model = net
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model = model
        self.forward = torch.compile(model) if self.cfg.compile else model
        self.autocast = (torch.autocast(self.device.type,
                                        dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)
                         if self.precision in ("bf16", "fp16") else contextlib.nullcontext())
        self.provenance = {k: v for k, v in (provenance or {}).items() if v is not None}
        self.provenance.update(init_note)

    def start(self) -> tuple[RunState, object]:
        """The state to continue from (step 0, or the resumed one) and the batches from there on."""
        info = self.info[2]
        now = time.perf_counter()
        step = int(info.get("step", 0))
        self.t_start = now - float(info.get("elapsed", 0.0))
        self.session = (now, step)
        st = RunState(step=step, best_metric=self.best_metric, best_value=info.get("best_value"),
                      best_step=info.get("best_step"), rate_mark=(now, step),
                      best_written=(self.run_dir / "best.unet").is_file())
        self.model.train()
        batches = iter(_dataloader(self.sampler, step, self.cap, self.cfg.batch, self.workers)) \
            if step < self.cap else iter(())
        return st, batches

    # ------------------------------------------------------------------------------- the loop's actions

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def agree(self, finished: bool, halt: bool, elapsed: float) -> tuple[bool, bool, float]:
        """The stop decision and the clock, the same on every process (the most advanced one's)."""
        if self.dist.world == 1:
            return finished, halt, elapsed
        import torch.distributed as tdist

        flags = torch.tensor([float(finished), float(halt), elapsed], dtype=torch.float64,
                             device=self.device if self.dist.backend == "nccl" else "cpu")
        tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1]), float(flags[2])

    def set_lr(self, step: int, elapsed: float) -> float:
        """The schedule's learning rate at this point of the run (by steps, or by the time budget)."""
        progress = step / self.total if self.total is not None else 0.0
        if self.cfg.max_time is not None:
            progress = max(progress, elapsed / self.cfg.max_time)
        lr = self.cfg.learning_rate * lr_factor(self.cfg.schedule, progress, self.cfg.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def to_device(self, batch, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch on the device, augmented there when ``gpu_augment``; torch's generator seeded for the step."""
        x, y, w, scale = batch
        torch.manual_seed(step_seed(self.cfg.seed, self.dist.rank, step))
        x, y, w = (t.to(self.device, non_blocking=True) for t in (x, y, w))
        if self.gpu_aug:
            from unetcli import transforms

            self.gen.manual_seed(step_seed(self.cfg.seed, self.dist.rank, step) ^ 0x5EED)
            x, y, w = transforms.augment_batch_torch(x, y, w, self.augment, self.gen, self.out_size)
            m = torch.as_tensor(self.mean, dtype=x.dtype, device=self.device).view(1, -1, 1, 1)
            sd = torch.as_tensor(self.std, dtype=x.dtype, device=self.device).view(1, -1, 1, 1)
            x = (x * scale.to(self.device, x.dtype).view(-1, 1, 1, 1) - m) / sd
            y = y.long()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y, w

    def update(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` and take one optimiser step (through the loss scaler for fp16)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def log_train(self, st: RunState, lr: float) -> None:
        """A training row: the mean loss of the steps since the last row, and the speed over them."""
        now = time.perf_counter()
        mark_t, mark_step = st.rate_mark
        st.steps_per_s = (st.step - mark_step) / max(now - mark_t, 1e-9)
        st.rate_mark = (now, st.step)
        st.last_loss, st.window = float(np.mean(st.window)), []
        self.log.append({"kind": "train", "step": st.step, "epoch": round(st.step / self.steps_per_epoch, 3),
                         "elapsed_s": round(self.elapsed(), 2), "lr": lr, "loss": st.last_loss,
                         "steps_per_s": round(st.steps_per_s, 4)})

    def validate(self, st: RunState) -> bool:
        """Score the network on the validation images, log the scores; True when they are the best yet."""
        scores = validation.validate(self.net, self.val_samples, normalization=self.normalization,
                                     config=self.net_config, device=self.device, precision=self.precision,
                                     tile=self.cfg.val_tile, membrane=self.membrane, objects=self.objects)
        self.log.append({"kind": "val", "step": st.step, "elapsed_s": round(self.elapsed(), 2),
                         **{f"val_{k}": v for k, v in scores.items()}})
        return st.scored(scores)

    def save(self, st: RunState, *, best: bool) -> None:
        """The checkpoint: the resumable state, ``last.unet`` (and ``best.unet``), the curves."""
        if not self.dist.main:
            return
        elapsed = self.elapsed()
        checkpoint.save_state(self.run_dir / checkpoint.STATE_FILE, self.net, self.optimizer, self.net_config,
                              self.normalization,
                              {"step": st.step, "elapsed": elapsed, "best_value": st.best_value,
                               "best_step": st.best_step, "best_metric": st.best_metric,
                               "membrane": self.membrane, "total": self.total}, self.scaler)
        prov = dict(self.provenance)
        prov["training"] = {"step": st.step, "elapsed_s": round(elapsed, 1), "steps_per_epoch": self.steps_per_epoch,
                            "device": str(self.device), "precision": self.precision, "world_size": self.dist.world}
        if st.last_val:
            prov["metrics"] = {k: round(v, 6) for k, v in st.last_val.items()}
        state = self.net.state_dict()
        for name in ("last.unet", "best.unet") if best else ("last.unet",):
            checkpoint.save_model(self.run_dir / name, state, self.net_config, normalization=self.normalization,
                                  class_names=self.class_names, provenance=prov,
                                  postprocess=validation.decode_params_of(st.last_val),
                                  inputs=(prov.get("data") or {}).get("inputs"))
        st.best_written = st.best_written or best
        self.log.draw(st.best_metric)

    def event(self, st: RunState, lr: float) -> dict:
        """What a progress display shows: the logged loss, the speed of this session, the time left."""
        now = time.perf_counter()
        rate = (st.step - self.session[1]) / max(now - self.session[0], 1e-9)
        elapsed = self.elapsed()
        remaining = (self.total - st.step) / rate if self.total is not None and rate > 0 else None
        if self.cfg.max_time is not None:
            left = max(self.cfg.max_time - elapsed, 0.0)
            remaining = left if remaining is None else min(remaining, left)
        loss = st.last_loss if st.last_loss is not None else float(np.mean(st.window))
        val = {st.best_metric: st.last_val[st.best_metric]} if st.best_metric in st.last_val else {}
        return {"step": st.step, "total": self.total, "loss": loss, "lr": lr, "steps_per_s": rate,
                "elapsed": elapsed, "remaining": remaining, "val": val}

    def finish(self, st: RunState) -> TrainResult:
        """The end: the last log row, a last validation, the files; the summary."""
        if st.window:
            self.log_train(st, self.optimizer.param_groups[0]["lr"])
        is_best = False
        if self.dist.main and self.val_samples and st.interrupted is None and not self.log.validated_at(st.step):
            is_best = self.validate(st)
        if not self.val_samples and st.interrupted is None:
            st.best_metric, st.best_value, st.best_step, is_best = "loss", st.last_loss, st.step, True
        self.save(st, best=is_best or not st.best_written)
        if self.dist.world > 1:
            import torch.distributed as tdist

            tdist.barrier()
            tdist.destroy_process_group()
        return TrainResult(run_dir=self.run_dir, last=self.run_dir / "last.unet", best=self.run_dir / "best.unet",
                           step=st.step, elapsed=self.elapsed(), best_metric=st.best_metric,
                           best_value=st.best_value, best_step=st.best_step, final_loss=st.last_loss,
                           interrupted=st.interrupted, validation=st.last_val)


# ----------------------------------------------------------------------------------------- the loop

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
    dist = dist or Dist()
    stop = stop if stop is not None else StopFlag()
    run = Trainer(cfg, net_config, train_samples, val_samples, run_dir, normalization=normalization,
                  class_names=class_names, augment=augment, provenance=provenance, init=init,
                  resume=resume, dist=dist)
    st, batches = run.start()
    try:
        while True:
            # stop at the step budget, the time budget, a signal or stop_at; every process together
            finished, halt, elapsed = run.agree(
                st.step >= run.cap or (cfg.max_time is not None and run.elapsed() >= cfg.max_time),
                bool(stop) or (stop_at is not None and st.step >= stop_at), run.elapsed())
            if finished or halt:
                st.interrupted = None if finished else (stop.reason or "stopped")
                break

            # one step of the recipe: a batch of augmented tiles, the weighted loss, one update
            lr = run.set_lr(st.step, elapsed)
            x, y, w = run.to_device(next(batches), st.step)
            with run.autocast:
                logits = run.forward(x)
            loss = weighted_loss(logits, y, w, cfg.loss)
            run.update(loss)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ConfigError(f"training diverged at step {st.step + 1} (loss {value})",
                                  hint="lower --lr, or use --optimizer adam")
            st.step += 1
            st.window.append(value)

            # log, validate, checkpoint
            if st.step % cfg.log_every == 0 or st.step == run.cap:
                run.log_train(st, lr)
            is_best = False
            if run.val_samples and dist.main and st.step % run.val_every == 0:
                is_best = run.validate(st)
            if dist.main and (st.step % cfg.checkpoint_every == 0 or is_best):
                run.save(st, best=is_best or not run.val_samples)
            if progress is not None and dist.main:
                progress(run.event(st, lr))
    finally:
        del batches
    return run.finish(st)
