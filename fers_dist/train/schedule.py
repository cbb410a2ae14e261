"""Learning-rate schedule: lr decays from lr_start to lr_end over the epochs (paper: 1e-3 -> 1e-5)."""

from __future__ import annotations

import math

import torch

from fers_dist.config import ScheduleConfig


def lr_at(epoch: int, epochs: int, sched: ScheduleConfig) -> float:
    """Learning rate during ``epoch`` (0-based): lr_start at the first epoch, lr_end at the last."""
    a, b = sched.lr_start, sched.lr_end
    p = epoch / max(epochs - 1, 1)
    if sched.decay == "exponential":
        return a * (b / a) ** p
    if sched.decay == "cosine":
        return b + (a - b) * 0.5 * (1 + math.cos(math.pi * p))
    # step: step_count equal drops, the last one reached at the final epoch
    k = min(sched.step_count, math.floor(epoch * (sched.step_count + 1) / max(epochs, 1)))
    if epoch == epochs - 1:
        k = sched.step_count
    return a * (b / a) ** (k / sched.step_count)


def make_scheduler(opt: torch.optim.Optimizer, epochs: int, sched: ScheduleConfig):
    """A per-epoch ``LambdaLR`` following :func:`lr_at` (call ``.step()`` once per epoch)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_at(e, epochs, sched) / sched.lr_start)
