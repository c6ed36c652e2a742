"""Learning-rate schedules, evaluated per optimizer step (as the official code does).

A schedule maps (step, total_steps, steps_per_epoch) to a factor of each group's initial lr.
The official CIFAR code uses cosine decay from lr to 0 over all steps, no warm-up.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable

import torch

from sam_repro.config import SchedConfig

Schedule = Callable[[int, int, int], float]
SCHEDULES: dict[str, Callable[[SchedConfig], Schedule]] = {}


def _with_warmup(cfg: SchedConfig, decay: Schedule) -> Schedule:
    def factor(step: int, total: int, per_epoch: int) -> float:
        warmup = cfg.warmup_epochs * per_epoch
        if step < warmup:  # capped: a fractional warm-up (0.5 epochs = 3.5 steps) must not overshoot lr
            return min(1.0, (step + 1) / warmup)
        return decay(step, total, per_epoch)

    return factor


def cosine(cfg: SchedConfig) -> Schedule:
    def decay(step: int, total: int, per_epoch: int) -> float:
        warmup = cfg.warmup_epochs * per_epoch
        progress = (step - warmup) / max(1.0, total - warmup)
        return cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return _with_warmup(cfg, decay)


def step_decay(cfg: SchedConfig) -> Schedule:
    milestones = sorted(cfg.milestones)

    def decay(step: int, total: int, per_epoch: int) -> float:
        return cfg.gamma ** bisect.bisect_right(milestones, step / per_epoch)

    return _with_warmup(cfg, decay)


def constant(cfg: SchedConfig) -> Schedule:
    return _with_warmup(cfg, lambda step, total, per_epoch: 1.0)


SCHEDULES.update(cosine=cosine, step=step_decay, constant=constant)


class LrSetter:
    """Sets every group's lr for a step: initial lr of the group x schedule factor."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: SchedConfig, total_steps: int, steps_per_epoch: int) -> None:
        self.optimizer, self.total, self.per_epoch = optimizer, total_steps, steps_per_epoch
        self.schedule = SCHEDULES[cfg.name](cfg)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def __call__(self, step: int) -> float:
        factor = self.schedule(step, self.total, self.per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return self.optimizer.param_groups[0]["lr"]
