"""Multi-GPU SAM with DistributedDataParallel: process group, wrapping, BatchNorm averaging, re-launch.

    torchrun --nproc_per_node=8 $(which sam-train) experiment=t2_imagenet_resnet50_100ep
    sam-train engine.ddp=true experiment=t2_imagenet_resnet50_100ep     # the same, over every visible GPU

Semantics (the official code's; docs/semantics.md):
- Per-replica perturbation (default): each replica computes e(w) from its own gradient, so m = the
  per-replica batch. The first forward AND backward run under DDP's `no_sync` (no all-reduce; the
  eager step's `first_pass_context`); the gradient at w + e is all-reduced (averaged) by the second
  backward. `optim.sync_perturbation=true` all-reduces the first pass too (one e for the whole batch).
- Per-replica BatchNorm: DDP does not broadcast buffers (`broadcast_buffers=False`), so each replica
  normalizes and keeps statistics over its own batch; the running statistics are averaged over the
  ranks before every evaluation and checkpoint, as the official code pmeans them.
- Rank 0 alone writes the run directory; metrics are summed over ranks (loop.evaluate, the epoch
  totals); every rank loads the checkpoint on resume.
Backends: nccl on GPUs, gloo on the CPU (tests).
"""
from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from sam_repro.engine.runtime import Runtime
from sam_repro.engine.passes import batchnorm_layers
from sam_repro.errors import UserError

log = logging.getLogger("sam_repro")
BACKENDS = {"cuda": "nccl", "cpu": "gloo"}  # device type -> process-group backend


class LaunchError(UserError):
    """engine.ddp cannot start (one line, for the CLI)."""


def under_torchrun() -> bool:
    """True in a process that torchrun (or a test harness) started as one rank of a group."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(runtime: Runtime) -> None:
    """Join the process group of a distributed run (MASTER_ADDR/PORT from torchrun); idempotent."""
    if not runtime.distributed or dist.is_initialized():
        return
    backend = BACKENDS[runtime.device.type]
    dist.init_process_group(backend, rank=runtime.rank, world_size=runtime.world_size,
                            device_id=runtime.device if runtime.device.type == "cuda" else None)
    log.info("rank %d/%d joined the %s process group", runtime.rank, runtime.world_size, backend)


def shutdown() -> None:
    """Leave the process group (the end of a distributed run, also after a failure)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, runtime: Runtime) -> nn.parallel.DistributedDataParallel:
    """DDP with per-replica BatchNorm: running statistics are not broadcast from rank 0 every step."""
    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    # newer torch deprecates broadcast_buffers for forward_sync_buffers (which still syncs once at init: harmless)
    no_sync_buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                       else {"broadcast_buffers": False})
    return ddp(model, device_ids=ids, **no_sync_buffers)


@torch.no_grad()
def average_batchnorm_stats(model: nn.Module, counted: bool = True) -> None:
    """Replace every BatchNorm running mean and variance by its mean over the ranks (one all-reduce);
    over the ranks with `counted` only (RWP: the clean ranks, whose statistics are the only ones kept)."""
    buffers = [b for m in batchnorm_layers(model) for b in (m.running_mean, m.running_var) if b is not None]
    if not buffers:
        return
    weight = 1.0 if counted else 0.0
    acc = torch.promote_types(buffers[0].dtype, torch.float32)  # an fp64 run's statistics averaged in fp64
    # the ranks that count, summed in the same all-reduce as their statistics
    flat = torch.cat([b.reshape(-1).to(acc) * weight for b in buffers] +
                     [torch.full((1,), weight, dtype=acc, device=buffers[0].device)])
    dist.all_reduce(flat)
    flat = flat[:-1] / flat[-1]
    for b, part in zip(buffers, flat.split([b.numel() for b in buffers])):
        b.copy_(part.view_as(b))


@torch.no_grad()
def average_gradients(grads: list[torch.Tensor]) -> None:
    """Replace every gradient by its mean over the ranks (one all-reduce of one flat buffer).

    The grid backend of the step calls the module functionally, so DDP's own backward hooks do
    not reduce its gradients; this does, once per step, after the perturbed pass."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def summed(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` summed over the ranks (the tensor itself in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def planned_world_size(nproc: int | None, ddp: bool) -> int:
    """Processes the run will have: torchrun's WORLD_SIZE, or what engine.ddp will launch, else 1."""
    if under_torchrun():
        return int(os.environ["WORLD_SIZE"])
    if ddp:
        return max(1, nproc or torch.cuda.device_count() or 1)
    return 1


def relaunch(nproc: int | None, overrides: Sequence[str], run_dir: Path) -> int:
    """engine.ddp=true: run this job again under torchrun, one process per GPU (or `nproc` processes),
    into the same run directory; returns torchrun's exit status."""
    n = nproc or torch.cuda.device_count()
    if n < 1:
        raise LaunchError("engine.ddp=true found no GPU; set engine.nproc=N to run N CPU processes (gloo), "
                          "or engine.ddp=false")
    script = str(Path(sys.argv[0]).resolve())  # the sam-train console script
    quoted = "'" + str(run_dir).replace("\\", "\\\\").replace("'", "\\'") + "'"  # the dir name holds '=' and ','
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", script,
           *overrides, f"hydra.run.dir={quoted}"]
    log.info("engine.ddp: re-launching under torchrun over %d processes: %s", n, " ".join(cmd))
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except BaseException:  # Ctrl-C, or submitit's SystemExit after a preemption: stop the ranks, not orphan them
        proc.terminate()  # torchrun forwards SIGTERM to its workers
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
