"""The parts of the paper's training recipe, as plain functions: the loss, the schedule, the optimiser.

The loss is the paper's pixel-wise softmax with weighted cross-entropy, averaged over the output pixels:

    E = (1 / N) * sum_x w(x) * -log p_{l(x)}(x)

(``N`` the number of output pixels in the batch, ``w`` the weight map, uniform 1 without one). With
``loss='ce+dice'`` the soft Dice loss ``1 - mean_c (2 sum p_c g_c + 1) / (sum p_c + sum g_c + 1)`` over
every class ``c`` of the batch is added to it.

The run's length is counted in optimiser steps: ``--iterations``, or ``--epochs`` (an epoch is as many
output pixels as the training images hold), or ten epochs; with only ``--max-time`` the schedule
follows the clock instead. Validation comes every tenth of the run, but not more often than every
``VAL_MIN_EVERY`` steps, so that a short run validates at its end only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from unetcli.runconfig import TrainConfig

VAL_MIN_EVERY = 50        # without --val-every: validate every tenth of the run, but not more often
VAL_EVERY_TIMED = 200     # ... and every this many steps when only a time budget bounds the run


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


# ------------------------------------------------------------------------------ schedules, optimiser

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


def schedule_length(cfg: TrainConfig, samples, out_size: int, world: int) -> tuple[int, int | None]:
    """``(steps per epoch, total steps)``; the total is None when only the time budget ends the run."""
    pixels = sum(int(s.target.size) for s in samples)
    steps_per_epoch = max(1, math.ceil(pixels / (out_size * out_size * cfg.batch * world)))
    total = cfg.iterations
    if total is None and cfg.epochs is not None:
        total = max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
    if total is None and cfg.max_time is None:
        total = 10 * steps_per_epoch
    return steps_per_epoch, total


def validation_interval(val_every: int | None, total: int | None) -> int:
    """Steps between validations: ``--val-every``, else a tenth of the run but at least
    ``VAL_MIN_EVERY`` steps (so a short run validates at its end only)."""
    if val_every:
        return val_every
    return max(total // 10, VAL_MIN_EVERY) if total is not None else VAL_EVERY_TIMED


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's), Adam or AdamW (weight decay 0.01 unless given)."""
    lr = cfg.learning_rate
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay or 0.01)
