"""ONE training step for SGD and SAM (sam=None is SGD), with the official code's semantics.

    step = TrainStep(model, optimizer, sam, StepConfig(device_batch=32, grad_clip=5.0))
    stats = step(x, y)   # updates the model in place; StepStats of device tensors (no host sync)

The step of one run has two backends that share everything before the forward and after the
backward (engine/passes.py): a batch that is one device (`device_batch=null`, what one real GPU of
a DDP run does) takes the eager backend (engine/eager.py: DDP overlap, torch.compile, CUDA graphs,
fp16, SAM.first_step); emulated devices (the paper's 8 x 32 on one GPU, or SAM's m-sharpness) take
the grid backend with one member (engine/grid.py: torch.func over the devices), which is also what
trains a pack of runs. A SAM-family method takes the eager backend on one device of one process too
(not RWP, whose step is two devices; under DDP the grid's). Training metrics come from the applied pass (the perturbed one for SAM), as
in the official code.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional

import torch
from torch import Tensor, nn

from sam_repro.engine.eager import EagerStep, runs_eagerly
from sam_repro.engine.grid import GridStep
from sam_repro.engine.passes import BN_STATS, SHAKEDROP_MASKS, Member, StepConfig, StepStats, device_size
from sam_repro.optim.methods import MethodOptimizer
from sam_repro.optim.sam import SAM

__all__ = ["BN_STATS", "SHAKEDROP_MASKS", "StepConfig", "StepStats", "TrainStep"]


class TrainStep:
    """The step of one run: callable (x, y) -> StepStats that updates the model in place. A batch that
    is one device takes the eager backend; emulated devices (`device_batch`, SAM's `m`) the grid
    backend with one member."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sam: Optional[SAM | MethodOptimizer],
        cfg: StepConfig,
        scaler: Optional[torch.amp.GradScaler] = None,
        first_pass_context: Callable[[], ContextManager] = contextlib.nullcontext,
        module: Optional[nn.Module] = None,
        grad_reduce: Optional[Callable[[list[Tensor]], None]] = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """`model` runs the eager backend (a DDP wrapper and/or torch.compile'd); `module` is the plain
        nn.Module under it, which the grid backend calls functionally (default: `model`).
        `grad_reduce` averages the grid backend's gradients over processes (DDP's own hooks only run
        on the eager backend); `rank` and `world_size` place this process among them (RWP's clean and noisy
        ranks)."""
        self.member = Member(module if module is not None else model, optimizer, sam, cfg.grad_clip)
        self.cfg = cfg
        # SAM's follow-ups (optim/methods/) take the eager backend on one device in one process; under DDP,
        # or when the method's step is two batches (RWP), the grid's, with one device too
        eager = runs_eagerly(sam, world_size)
        self.eager = EagerStep(model, self.member, cfg, scaler, first_pass_context) if eager else None
        emulates_devices = cfg.device_batch or (sam is not None and cfg.m) or not eager
        self.grid = (GridStep([self.member], cfg, scaler=scaler, grad_reduce=grad_reduce, rank=rank, world_size=world_size)
                     if emulates_devices else None)

    @property
    def counts_statistics(self) -> bool:
        """Whether this process's BatchNorm statistics enter their mean over the processes (GridStep's)."""
        return self.grid is None or self.grid.counts_statistics

    def __call__(self, x: Tensor, y: Tensor) -> StepStats:
        if self.eager is not None and device_size(x.shape[0], self.cfg, self.member.sam is not None) == x.shape[0]:
            return self.eager(x, y)
        assert self.grid is not None, "a batch of several devices needs device_batch or m"
        return self.grid(x.unsqueeze(0), y.unsqueeze(0))[0]
