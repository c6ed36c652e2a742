"""ONE epoch loop over a list of runs: a solo run is a list of one, a pack (hydra/launcher=pack) several.

    fit(cfg, run_dir)                    # one run: config -> data, model, optimizer -> epochs -> run directory
    fit_pack([(cfg, run_dir), ...])      # several runs of one shape trained together (engine/grid.py)

A `Run` is everything of one run but the step: its config, locked run directory, data, model,
optimizer, schedule, checkpoint and log. The `Trainer` resumes every run, trains the runs that are
at the same point together (one step for all of them), evaluates them, and writes each run's
checkpoint and log rows.

Reliability: every file is written atomically (sam_repro/rundir.py), with a checkpoint at every
evaluation (every epoch by default) that `resume=auto` continues from; each epoch's random draws
(data order, augmentation, dropout/ShakeDrop) are a pure function of (seed, epoch), so a resumed run
ends exactly where an uninterrupted one does. A run whose training loss becomes non-finite stops
with status `diverged`, keeping its last good checkpoint (in a pack: it is frozen, the others go on).
Ctrl-C, SIGTERM (errors.sigterm_interrupts) and a preemption record status `interrupted`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from sam_repro.config import RESUME_FREE, TrainConfig, flatten, has_role
from sam_repro.data import fit_to_model, load_data, make_eval_loader, make_train_loader
from sam_repro.engine import distributed
from sam_repro.engine.grid import GridStep
from sam_repro.engine.packing import pack_pays
from sam_repro.engine.runtime import Runtime, resolve_runtime, seed_everything, set_determinism
from sam_repro.engine.schedule import LrSetter
from sam_repro.engine.passes import Member, StepConfig, StepStats, to_layout
from sam_repro.engine.step import TrainStep
from sam_repro.errors import EXIT_FAILED, EXIT_OK, Terminated, UserError
from sam_repro.models import create_model_from_config, pretrained_input
from sam_repro.optim.factory import build_optimizer
from sam_repro.optim.methods import MethodOptimizer
from sam_repro.rundir import DiskFull, RunDirLock, load_checkpoint, save_checkpoint
from sam_repro.runlog import RunLog, environment, summary_config
from sam_repro.trackers import Trackers

log = logging.getLogger("sam_repro")

LOG_EVERY = 50  # steps between progress updates: the only host syncs of the training loop
EXIT_DIVERGED = EXIT_FAILED


class RunDirError(UserError):
    """The run directory holds something this run cannot continue."""


INTERRUPTIONS = (KeyboardInterrupt, SystemExit, Terminated)  # resumable: Ctrl-C, a preemption (submitit), SIGTERM


@dataclass
class Progress:
    """What a checkpoint carries besides the model and optimizer."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    wall_s: float = 0.0
    history: list[dict[str, Any]] | None = None
    started_at: Optional[str] = None


class Period:
    """One run's training sums since its last evaluation (on the device: read once, at the evaluation)."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen, self.steps, self.epochs, self.train_s, self.eval_s, self.lr = 0, 0, 0, 0.0, 0.0, 0.0
        self.images = 0  # the batches' examples (`seen`: those the training sums are over; ESAM's subsets)
        # SAM: sums of the per-step gradient norm at w and perturbation norm ||e|| (steps that had them)
        self.grad_norm_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.e_norm_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.norm_steps = 0

    def add(self, stats: StepStats) -> None:
        """One step's sums, on the device (no host sync)."""
        self.loss_sum += stats.loss_sum
        self.correct += stats.correct
        self.seen += stats.count
        self.images += stats.images or stats.count
        self.steps += 1
        if stats.grad_norm is not None:
            self.grad_norm_sum += stats.grad_norm
            self.e_norm_sum += stats.perturbation_norm
            self.norm_steps += 1


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of the model's random draws in one epoch (dropout, ShakeDrop, Shake-Shake)."""
    return seed * 1_000_003 + epoch


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """Train mode; with freeze_bn (finetuning, as in the paper) BatchNorm stays in eval mode."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, runtime: Runtime, members: int,
             top5: bool) -> list[dict[str, float]]:
    """Each member's mean cross-entropy, error % and top-5 error % over a whole split, from
    `forward(x)`: the members' logits (P, n, C). One host sync (and one all-reduce under DDP)."""
    device = runtime.device
    loss_sum = torch.zeros(members, device=device, dtype=torch.float64)
    wrong = torch.zeros(members, device=device, dtype=torch.long)
    wrong5 = torch.zeros(members, device=device, dtype=torch.long)
    count = 0
    for x, y in loader:
        logits = forward(x.to(runtime.dtype) if x.is_floating_point() else x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least (fp64 stays)
        ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(members), reduction="none")
        loss_sum += ce.view(members, -1).sum(dim=1).double()
        wrong += (logits.argmax(dim=-1) != y).sum(dim=1)
        if top5:
            wrong5 += (~(logits.topk(5, dim=-1).indices == y[None, :, None]).any(dim=-1)).sum(dim=1)
        count += y.shape[0]
    totals = torch.stack([loss_sum, wrong.double(), wrong5.double(),
                          torch.full_like(loss_sum, float(count))])
    if runtime.distributed:
        torch.distributed.all_reduce(totals)
    out = []
    for loss, w, w5, n in totals.T.tolist():
        row = {"loss": loss / n, "err": 100.0 * w / n}
        if top5:
            row["top5_err"] = 100.0 * w5 / n
        out.append(row)
    return out


SCHEMA_DEFAULTS = flatten(OmegaConf.to_container(OmegaConf.structured(TrainConfig), resolve=False))


def check_same_config(saved: dict[str, Any], current: dict[str, Any], run_dir: Path) -> None:
    """A checkpoint continues only the run it came from: refuse a changed config."""
    a, b = flatten(saved), flatten(current)
    # a key the schema gained since the run started holds its default: what the run was trained with
    added = {k for k in set(b) - set(a) if b[k] == SCHEMA_DEFAULTS.get(k, object())}
    changed = sorted(k for k in (set(a) | set(b)) - added if a.get(k) != b.get(k) and not has_role(k, RESUME_FREE))
    if changed:
        detail = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:5])
        raise RunDirError(f"{run_dir} holds a run with another config ({detail}); "
                          f"use another hydra.run.dir, or resume=never to start it over")


class Run:
    """One run: everything but the step. Holds its run directory's lock (the main process) until closed."""

    def __init__(self, cfg: DictConfig, run_dir: Path, data_cache: Optional[dict] = None) -> None:
        """`data_cache`: shared by the runs of a pack, which read their source once."""
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.runtime = rt = resolve_runtime(cfg.engine)
        distributed.init(rt)
        self.lock = RunDirLock(self.run_dir).acquire(cfg.wait_for_lock) if rt.is_main else None
        try:
            self._build(data_cache)
        except BaseException:
            self.close()
            raise

    def _build(self, data_cache: Optional[dict]) -> None:
        cfg, rt = self.cfg, self.runtime
        set_determinism(cfg.engine.deterministic, rt.device.type == "cuda")
        seed_everything(cfg.seed)
        bundle = load_data(cfg.dataset, cache=data_cache)
        self.model = create_model_from_config(cfg.model, num_classes=bundle.num_classes, in_chans=bundle.in_chans)
        self.model = self.model.to(rt.device, rt.dtype)
        if rt.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # finetuning: the pretrained model's input size and normalization replace the dataset's
        self.bundle = bundle = fit_to_model(bundle, pretrained_input(self.model, cfg.model), cfg.dataset.input_size)
        self.optimizer, self.sam = build_optimizer(self.model, cfg.optim)
        kind = cfg.engine.loader if cfg.engine.loader != "auto" else bundle.auto_loader
        workers, eval_batch = cfg.engine.num_workers, cfg.engine.eval_batch_size
        self.train_loader = make_train_loader(bundle.train, bundle, cfg.augment, cfg.batch_size // rt.world_size,
                                              rt.device, seed=cfg.seed, kind=kind, num_workers=workers,
                                              rank=rt.rank, world_size=rt.world_size)
        self.eval_loaders = {split: make_eval_loader(data, bundle, eval_batch, rt.device, rt.rank, rt.world_size,
                                                     num_workers=workers)
                             for split, data in (("val", bundle.val), ("test", bundle.test)) if data is not None}
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size={cfg.batch_size} is larger than the training set "
                             f"({bundle.train.labels.shape[0]} examples): no full batch to train on")
        self.total_steps = cfg.train_steps or cfg.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.lr = LrSetter(self.optimizer, cfg.sched, self.total_steps, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(rt.device.type) if rt.precision == "fp16" else None
        self.top5 = bundle.num_classes > 10
        self.step_config = StepConfig.of(cfg.optim, cfg.device_batch, rt.autocast_dtype, rt.channels_last)
        self.forward_model = self._compiled(self.model)  # evaluation, and training in a single process
        self.runlog = (RunLog(self.run_dir, cfg.name, summary_config(cfg, rt.precision, rt.world_size),
                              environment(rt.device), bundle.info, trackers=Trackers(cfg, self.run_dir))
                       if rt.is_main else None)

    def _compiled(self, model: nn.Module) -> nn.Module:
        engine = self.cfg.engine
        if engine.cuda_graphs:
            return torch.compile(model, mode="reduce-overhead")
        if engine.compile:
            return torch.compile(model)
        return model

    @property
    def member(self) -> Member:
        """What the step needs of this run."""
        return Member(self.model, self.optimizer, self.sam, self.cfg.optim.grad_clip)

    def solo_step(self) -> TrainStep:
        """The step of this run trained alone (DDP-wrapped and compiled as the engine config asks)."""
        rt, train_model, first_pass = self.runtime, self.forward_model, contextlib.nullcontext
        if rt.distributed:
            ddp = distributed.wrap(self.model, rt)
            train_model = self._compiled(ddp)
            # per-replica perturbation: no all-reduce in the first forward/backward (docs/semantics.md)
            first_pass = contextlib.nullcontext if self.cfg.optim.sync_perturbation else ddp.no_sync
        return TrainStep(train_model, self.optimizer, self.sam, self.step_config, scaler=self.scaler,
                         first_pass_context=first_pass, module=self.model,
                         grad_reduce=distributed.average_gradients if rt.distributed else None,
                         rank=rt.rank, world_size=rt.world_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This run's logits for one evaluation batch, as (1, n, C) (the engine's autocast and layout)."""
        rt = self.runtime
        with torch.autocast(rt.device.type, dtype=rt.autocast_dtype or torch.float32, enabled=rt.autocast_dtype is not None):
            return self.forward_model(to_layout(x, rt.channels_last)).unsqueeze(0)

    # -- checkpoints ------------------------------------------------------------------------------
    def state(self, progress: Progress) -> dict[str, Any]:
        """The checkpoint. A packed member's tensors are views of the pack's stacks: copied out, since
        torch.save would otherwise write every member's rows (a view saves its whole storage)."""
        model = {k: (v.clone() if v.untyped_storage().nbytes() > v.numel() * v.element_size() else v)
                 for k, v in self.model.state_dict().items()}
        return {
            "model": model,
            "optimizer": self.optimizer.state_dict(),
            # a SAM-family method's own state: running means, stored components, counters, generators
            "method": self.sam.method_state_dict() if isinstance(self.sam, MethodOptimizer) else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "progress": progress.__dict__,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "data_fingerprint": self.bundle.info["fingerprint"],
        }

    def resume(self) -> Progress:
        """Continue from the run directory's checkpoint when `resume` allows it."""
        mode = self.cfg.resume
        distributed.barrier()  # every rank reads the checkpoint rank 0 finished writing
        state = load_checkpoint(self.run_dir, map_location=self.runtime.device) if mode != "never" else None
        if state is None:
            if mode == "must":
                raise RunDirError(f"resume=must but {self.run_dir} holds no checkpoint")
            return Progress(history=[])
        check_same_config(state["config"], OmegaConf.to_container(self.cfg, resolve=True), self.run_dir)
        if state["data_fingerprint"] != self.bundle.info["fingerprint"]:
            raise RunDirError(f"{self.run_dir} was trained on other data (fingerprint {state['data_fingerprint']}, "
                              f"now {self.bundle.info['fingerprint']}); use resume=never to start it over")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.sam is not None:  # SAM (or a method) shares the base optimizer's groups, which loading replaced:
            self.sam.param_groups = self.optimizer.param_groups  # a method reading the lr (GSAM, WSAM) must see the new ones
        if isinstance(self.sam, MethodOptimizer) and state.get("method") is not None:
            self.sam.load_method_state_dict(state["method"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        progress = Progress(**state["progress"])
        log.info("resuming %s after epoch %d (step %d)", self.run_dir, progress.epoch, progress.step)
        return progress

    def begin(self) -> Progress:
        """Resume (or start) and write the run directory's config and first summary."""
        progress = self.resume()
        if self.runlog:
            self.runlog.write_config(self.cfg)
            self.runlog.restore(progress.history, progress.started_at, progress.wall_s)
            progress.started_at = self.runlog.summary["started_at"]
            self.runlog.write_summary()
        return progress

    def record_exit(self, err: BaseException, progress: Progress) -> None:
        """What metrics.json says when training stops on an exception (a full disk may refuse even that)."""
        if not self.runlog:
            return
        if isinstance(err, INTERRUPTIONS + (DiskFull,)):  # resumable: not a failure
            why = str(err) if isinstance(err, DiskFull) else f"interrupted ({type(err).__name__})"
            status, error = "interrupted", f"{why} after epoch {progress.epoch}; re-run the same command to resume"
        else:
            status, error = "failed", f"{type(err).__name__}: {err}"
        try:
            self.runlog.finish(status, error)
        except DiskFull:
            log.error("%s: metrics.json could not record %s: the disk is full", self.run_dir, status)

    def row(self, epoch: int, period: Period, progress: Progress, measured: dict[str, dict[str, float]]) -> dict[str, Any]:
        """The metrics.jsonl row of the epochs in `period`: training sums and the evaluations `measured`."""
        rt = self.runtime
        start = time.perf_counter()
        counts = torch.tensor([float(period.seen), float(period.images)], device=rt.device, dtype=torch.float64)
        totals = torch.cat([torch.stack([period.loss_sum, period.correct.double()]), counts,
                            torch.stack([period.grad_norm_sum, period.e_norm_sum])])
        if rt.distributed:
            torch.distributed.all_reduce(totals)
        loss_total, correct_total, seen_total, images_total, grad_norm_total, e_norm_total = totals.tolist()  # one sync
        row: dict[str, Any] = {"epoch": epoch, "lr": period.lr, "train_loss": loss_total / seen_total,
                               "train_err": 100.0 - 100.0 * correct_total / seen_total}
        if period.norm_steps:  # SAM: means over the interval's steps (and replicas)
            norm_count = period.norm_steps * rt.world_size
            row.update(grad_norm=grad_norm_total / norm_count, perturbation_norm=e_norm_total / norm_count)
        if "val" in measured:
            row.update(val_loss=measured["val"]["loss"], val_err=measured["val"]["err"])
        row.update(test_loss=measured["test"]["loss"], test_err=measured["test"]["err"])
        if self.top5:
            row["test_top5_err"] = measured["test"]["top5_err"]
        elapsed = period.train_s + period.eval_s + time.perf_counter() - start
        progress.wall_s += elapsed
        row.update(epoch_s=round(elapsed / period.epochs, 3), images_per_s=round(images_total / period.train_s, 1))
        return row

    def close(self) -> None:
        """Let the next writer into the run directory."""
        if self.lock is not None:
            self.lock.release()


class Trainer:
    """Trains `runs` (one, or several that agree on the pack planner's key) to their ends."""

    def __init__(self, runs: Sequence[Run]) -> None:
        self.runs = list(runs)

    def fit(self) -> list[int]:
        """Every run's exit code, in order. Runs at the same point train together (a pack killed between
        two members' checkpoints resumes as two packs, each ending where it would have)."""
        try:
            progresses = [run.begin() for run in self.runs]
            codes = [EXIT_OK] * len(self.runs)
            together: dict[int, list[int]] = defaultdict(list)
            for i, progress in enumerate(progresses):
                together[progress.step].append(i)
            for indices in together.values():
                results = self._fit_together([self.runs[i] for i in indices], [progresses[i] for i in indices])
                for i, code in zip(indices, results):
                    codes[i] = code
            return codes
        finally:
            for run in self.runs:
                run.close()

    def _fit_together(self, runs: list[Run], progresses: list[Progress]) -> list[int]:
        first = runs[0]
        if len(runs) == 1:
            solo = first.solo_step()
            step: Callable = lambda x, y: [solo(x[0], y[0])]  # noqa: E731
            module, forward, active = first.model, first.forward, [True]
            counted = solo.counts_statistics
        else:
            packed, why = pack_pays(runs, progresses[0].epoch + 1)
            log.info("pack of %d runs from epoch %d: %s", len(runs), progresses[0].epoch + 1, why)
            if not packed:
                return [self._fit_together([run], [progress])[0] for run, progress in zip(runs, progresses)]
            grid = GridStep([run.member for run in runs], first.step_config)
            step, module, forward, active = grid, grid.passes.module, grid.forward_members, grid.active
            counted = grid.counts_statistics
            log.info("packed: %s", ", ".join(str(run.run_dir) for run in runs))
        codes = [EXIT_OK] * len(runs)
        every, every_steps = first.cfg.engine.eval_every, first.cfg.engine.eval_every_steps
        periods = [Period(first.runtime.device) for _ in runs]
        try:
            for epoch in range(progresses[0].epoch + 1, first.epochs + 1):
                self._train_epoch(step, module, runs, progresses, periods, epoch, active, codes)
                if not any(active):
                    break
                due = periods[0].steps >= every_steps if every_steps else epoch % every == 0
                if not due and epoch != first.epochs:
                    continue  # evaluate, log and checkpoint every eval_every epochs (or steps) and at the end
                self._evaluate(forward, module, runs, progresses, periods, epoch, active, counted)
                periods = [Period(first.runtime.device) for _ in runs]
        except BaseException as err:
            for run, progress, is_active in zip(runs, progresses, active):
                if is_active:
                    run.record_exit(err, progress)
            raise
        for run, is_active in zip(runs, active):
            if is_active and run.runlog:
                run.runlog.finish("completed")
        return codes

    def _train_epoch(self, step: Callable, module: nn.Module, runs: list[Run], progresses: list[Progress], periods: list[Period],
                     epoch: int, active: list[bool], codes: list[int]) -> None:
        """One pass over the runs' training loaders (or what is left of `train_steps`), summed into `periods`."""
        first = runs[0]
        rt = first.runtime
        # each replica draws its own dropout/ShakeDrop masks (rank 0 draws what a single process does);
        # a pack draws its members' masks from the first member's seed
        torch.manual_seed(epoch_seed(first.cfg.seed, epoch) + 7919 * rt.rank)
        for run in runs:
            run.train_loader.set_epoch(epoch)
        set_train_mode(module, first.cfg.model.freeze_bn)  # the module the step calls
        steps = min(first.steps_per_epoch, first.total_steps - progresses[0].step)
        bar = tqdm(zip(*(run.train_loader for run in runs)), total=steps, desc=f"epoch {epoch}/{first.epochs}",
                   disable=not (first.cfg.engine.progress and rt.is_main), leave=False, dynamic_ncols=True)
        start = time.perf_counter()
        for index, batches in enumerate(bar):
            if index >= steps:
                break
            for run, period, progress in zip(runs, periods, progresses):
                period.lr = run.lr(progress.step)
            xs, ys = zip(*batches)
            x = torch.stack(xs) if len(xs) > 1 else xs[0].unsqueeze(0)
            y = torch.stack(ys) if len(ys) > 1 else ys[0].unsqueeze(0)
            for period, progress, stats in zip(periods, progresses, step(x.to(rt.dtype) if x.is_floating_point() else x, y)):
                period.add(stats)
                progress.step += 1
            if (index + 1) % LOG_EVERY == 0:
                self._stop_diverged(runs, progresses, periods, epoch, active, codes)
                if not any(active):
                    break
                seen = sum(p.seen for p in periods)
                bar.set_postfix(loss=f"{float(sum(p.loss_sum for p in periods)) / seen:.3f}",
                                err=f"{100 - 100 * int(sum(p.correct for p in periods)) / seen:.2f}")
        bar.close()
        self._stop_diverged(runs, progresses, periods, epoch, active, codes)
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        elapsed = time.perf_counter() - start
        for period in periods:
            period.train_s += elapsed
            period.epochs += 1

    @staticmethod
    def _stop_diverged(runs: list[Run], progresses: list[Progress], periods: list[Period], epoch: int,
                       active: list[bool], codes: list[int]) -> None:
        """A run whose training loss is NaN or inf is marked diverged (its last good checkpoint kept) and
        frozen; the others go on. One host sync for all runs; summed over the ranks of a distributed run,
        so that every rank stops at the same step (a lone rank would hang the others)."""
        sums = distributed.summed(torch.stack([p.loss_sum for p in periods]))
        for i, finite in enumerate(torch.isfinite(sums).tolist()):
            if finite or not active[i]:
                continue
            active[i], codes[i] = False, EXIT_DIVERGED
            why = f"non-finite training loss in epoch {epoch} (by step {progresses[i].step})"
            log.error("%s diverged: %s; the last good checkpoint is kept", runs[i].run_dir, why)
            if runs[i].runlog:
                runs[i].runlog.finish("diverged", why)

    def _evaluate(self, forward: Callable, module: nn.Module, runs: list[Run], progresses: list[Progress], periods: list[Period],
                  epoch: int, active: list[bool], counted: bool = True) -> None:
        """Evaluate every run at once, then each active run's row, checkpoint and log line. `counted`: whether
        this process's BatchNorm statistics enter the mean over processes (RWP's noisy ranks' do not)."""
        first = runs[0]
        rt = first.runtime
        start = time.perf_counter()
        if rt.distributed:  # per-replica BatchNorm: evaluate and checkpoint the ranks' mean statistics
            distributed.average_batchnorm_stats(first.model, counted)
        module.eval()
        measured: list[dict[str, dict[str, float]]] = [{} for _ in runs]
        for split, loader in first.eval_loaders.items():
            for m, result in zip(measured, evaluate(forward, loader, rt, len(runs), first.top5)):
                m[split] = result
        eval_s = time.perf_counter() - start
        for i, (run, progress, period) in enumerate(zip(runs, progresses, periods)):
            if not active[i]:
                continue
            period.eval_s = eval_s
            row = run.row(epoch, period, progress, measured[i])
            progress.history.append(row)
            progress.epoch = epoch
            if run.runlog:
                save_checkpoint(run.run_dir, run.state(progress))
                run.runlog.log_epoch(row, progress.history, progress.wall_s)
            member = f"[member {i + 1}/{len(runs)} {run.cfg.name}] " if len(runs) > 1 else ""
            log.info("%sepoch %d/%d %s", member, epoch, run.epochs,
                     " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))


def open_runs(jobs: Sequence[tuple[DictConfig, Path]]) -> list[Run]:
    """A Run per (config, run directory), the data read once; none is left locked if one fails."""
    data_cache: dict = {}
    runs: list[Run] = []
    try:
        for cfg, run_dir in jobs:
            runs.append(Run(cfg, run_dir, data_cache=data_cache))
    except BaseException:
        for run in runs:
            run.close()
        raise
    return runs


def fit(cfg: DictConfig, run_dir: Path) -> int:
    """Train the run described by `cfg` into `run_dir`; returns the process exit code."""
    try:
        return Trainer(open_runs([(cfg, run_dir)])).fit()[0]
    finally:
        distributed.shutdown()


def fit_pack(jobs: Sequence[tuple[DictConfig, Path]]) -> list[int]:
    """Train `jobs` (config, run directory), which agree on the pack planner's key, as one pack; each
    job's exit code."""
    return Trainer(open_runs(jobs)).fit()
