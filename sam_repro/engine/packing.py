"""Whether training runs as one pack pays on this machine, measured when a pack starts.

A pack (engine/grid.py) turns each member's convolutions into one batched (grouped) convolution.
On a GPU that removes P-1 of every P kernel launches; on a CPU its worth depends on how the CPU's
kernels handle grouped convolutions and on what else the machine runs: faster than the solo runs on
some CPUs, slower on others (the figures per CPU: docs/packing.md). So with
`engine.pack_execution=auto` the pack times one packed step against its runs' solo steps, on copies
of the members (nothing of the runs is touched), and packs only where that is faster; otherwise the
runs train one after another, each exactly its solo run. The choice and its figures go to the log.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from sam_repro.engine.grid import GridStep
from sam_repro.engine.passes import Member
from sam_repro.engine.step import TrainStep
from sam_repro.optim.factory import build_optimizer

if TYPE_CHECKING:
    from sam_repro.engine.loop import Run

PACK_EXECUTIONS = ("auto", "pack", "alone")
ROUNDS = 2  # timed rounds after one warm-up round: a pack of 8 ResNet-32 runs spends ~1 min here on 2 CPU cores


def _copy(run: "Run") -> Member:
    model = copy.deepcopy(run.model)
    optimizer, sam = build_optimizer(model, run.cfg.optim)
    return Member(model, optimizer, sam, run.cfg.optim.grad_clip)


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def step_seconds(runs: Sequence["Run"], epoch: int) -> tuple[float, float]:
    """(seconds of one packed step of all runs, seconds of their solo steps one after another), medians
    over ROUNDS rounds that alternate the two, on one batch of each run and copies of its model."""
    device = runs[0].runtime.device
    batches = []
    for run in runs:
        run.train_loader.set_epoch(epoch)
        x, y = next(iter(run.train_loader))
        batches.append((x.to(run.runtime.dtype) if x.is_floating_point() else x, y))
    solo = [TrainStep(m.module, m.optimizer, m.sam, run.step_config)
            for m, run in zip((_copy(run) for run in runs), runs)]
    packed = GridStep([_copy(run) for run in runs], runs[0].step_config)
    x, y = torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])
    for module in [packed.passes.module, *(step.member.module for step in solo)]:
        module.train()
    times: dict[str, list[float]] = {"pack": [], "solo": []}
    for round_ in range(ROUNDS + 1):
        pack_s = _seconds(lambda: packed(x, y), device)
        solo_s = _seconds(lambda: [step(*batch) for step, batch in zip(solo, batches)], device)
        if round_:  # the first round warms up (allocations, kernel selection)
            times["pack"].append(pack_s)
            times["solo"].append(solo_s)
    return statistics.median(times["pack"]), statistics.median(times["solo"])


def pack_pays(runs: Sequence["Run"], epoch: int) -> tuple[bool, str]:
    """(whether to train `runs` as one pack, the log line that says why), by `engine.pack_execution`."""
    execution = runs[0].cfg.engine.pack_execution
    if any(not p.requires_grad for p in runs[0].model.parameters()):
        # the pack calls one copy of the module; a frozen parameter would be that copy's, not each member's
        return False, "the model has frozen parameters, which a pack does not stack: the runs train one after another"
    if execution != "auto":
        return execution == "pack", f"engine.pack_execution={execution}"
    pack_s, solo_s = step_seconds(runs, epoch)
    ratio = solo_s / pack_s
    verdict = ("packed" if ratio >= 1.0 else
               "packing does not pay on this machine: the runs train one after another, each as it would alone")
    return ratio >= 1.0, (f"a packed step of the {len(runs)} runs took {pack_s:.3g} s, their solo steps "
                          f"{solo_s:.3g} s ({ratio:.2f}x the solo throughput): {verdict}")
