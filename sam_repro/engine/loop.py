"""fit(): config -> (data, model, optimizer) -> epochs of TrainStep + evaluation -> run directory.

Reliability: the run directory is written atomically; a checkpoint at every evaluation (every
epoch by default) lets `resume=auto` continue a killed run; each epoch's random draws (data order, augmentation,
dropout/ShakeDrop) are a pure function of (seed, epoch), so a resumed run ends exactly where an
uninterrupted one does. A non-finite training loss stops the run with status `diverged`,
keeping the last good checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from sam_repro.data import DataBundle, fit_to_model, load_data, make_eval_loader, make_train_loader
from sam_repro.engine import distributed
from sam_repro.engine.checkpoint import load_checkpoint, save_checkpoint
from sam_repro.engine.runtime import Runtime, resolve_runtime, seed_everything, set_determinism
from sam_repro.engine.schedule import LrSetter
from sam_repro.engine.step import StepConfig, StepStats, TrainStep
from sam_repro.models import create_model_from_config, pretrained_input
from sam_repro.optim.factory import build_optimizer
from sam_repro.runlog import RunLog, environment, flat_config
from sam_repro.trackers import Trackers

log = logging.getLogger("sam_repro")

LOG_EVERY = 50  # steps between progress updates: the only host syncs of the training loop
EXIT_OK, EXIT_DIVERGED, EXIT_FAILED = 0, 1, 1
# Keys that may change between a killed run and its resumption: where things are, not what they
# are (the data fingerprint guards the data itself), and how progress is shown.
RESUME_FREE_KEYS = ("resume", "runs_root", "data_root", "dataset.root", "dataset.cache_dir", "dataset.download",
                    "dataset.decode_workers", "model.checkpoint", "engine.progress", "engine.num_workers",
                    "engine.eval_batch_size", "logger")


class Diverged(Exception):
    """The training loss became NaN or inf."""


class RunDirError(Exception):
    """The run directory holds something this run cannot continue (one line, for the CLI)."""


@dataclass
class Progress:
    """What a checkpoint carries besides the model and optimizer."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    wall_s: float = 0.0
    history: list[dict[str, Any]] | None = None
    started_at: Optional[str] = None


class Period:
    """Training sums since the last evaluation (on the device: read once, at the evaluation)."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen, self.steps, self.epochs, self.train_s, self.lr = 0, 0, 0, 0.0, 0.0
        self.eval_s = 0.0  # evaluation time spent before `_evaluate` (a pack evaluates its members at once)
        # SAM: sums of the per-step gradient norm at w and perturbation norm ||e|| (steps that had them)
        self.grad_norm_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.e_norm_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.norm_steps = 0

    def add(self, stats: StepStats) -> None:
        """One step's sums, on the device (no host sync)."""
        self.loss_sum += stats.loss_sum
        self.correct += stats.correct
        self.seen += stats.count
        self.steps += 1
        if stats.grad_norm is not None:
            self.grad_norm_sum += stats.grad_norm
            self.e_norm_sum += stats.perturbation_norm
            self.norm_steps += 1


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of the model's random draws in one epoch (dropout, ShakeDrop, Shake-Shake)."""
    return seed * 1_000_003 + epoch


def build_model(cfg: DictConfig, bundle: DataBundle, runtime: Runtime) -> nn.Module:
    """The model on its device, in channels_last where that is the fast layout (a pretrained backbone
    with a new head when finetuning)."""
    model = create_model_from_config(cfg.model, num_classes=bundle.num_classes, in_chans=bundle.in_chans)
    model = model.to(runtime.device, runtime.dtype)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """Train mode; with freeze_bn (finetuning, as in the paper) BatchNorm stays in eval mode."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, runtime: Runtime, top5: bool) -> dict[str, float]:
    """Mean cross-entropy, error % and top-5 error % over a whole split (one host sync)."""
    model.eval()
    device = runtime.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    wrong = torch.zeros((), device=device, dtype=torch.long)
    wrong5 = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    for x, y in loader:
        x = x.to(runtime.dtype) if x.is_floating_point() else x
        if runtime.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=runtime.autocast_dtype or torch.float32,
                            enabled=runtime.autocast_dtype is not None):
            logits = model(x)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least (fp64 stays)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        wrong += (logits.argmax(dim=1) != y).sum()
        if top5:
            wrong5 += (~(logits.topk(5, dim=1).indices == y[:, None]).any(dim=1)).sum()
        count += y.shape[0]
    totals = torch.stack([loss_sum, wrong.double(), wrong5.double()])
    if runtime.distributed:
        torch.distributed.all_reduce(totals)
        count_t = torch.tensor(count, device=device)
        torch.distributed.all_reduce(count_t)
        count = int(count_t)
    loss, wrong_n, wrong5_n = totals.tolist()
    out = {"loss": loss / count, "err": 100.0 * wrong_n / count}
    if top5:
        out["top5_err"] = 100.0 * wrong5_n / count
    return out


class Trainer:
    """Holds everything a run needs; `fit()` runs the epochs."""

    def __init__(self, cfg: DictConfig, run_dir: Path, data_cache: Optional[dict] = None) -> None:
        """`data_cache`: shared by the members of a pack (engine/pack.py), which read their source once."""
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.runtime = resolve_runtime(cfg.engine)
        rt = self.runtime
        distributed.init(rt)
        set_determinism(cfg.engine.deterministic, rt.device.type == "cuda")
        seed_everything(cfg.seed)
        self.bundle = load_data(cfg.dataset, cache=data_cache)
        self.model = build_model(cfg, self.bundle, rt)
        # finetuning: the pretrained model's input size and normalization replace the dataset's
        self.bundle = fit_to_model(self.bundle, pretrained_input(self.model, cfg.model), cfg.dataset.input_size)
        self.optimizer, self.sam = build_optimizer(self.model, cfg.optim)
        per_device_batch = cfg.batch_size // rt.world_size
        kind = cfg.engine.loader if cfg.engine.loader != "auto" else self.bundle.auto_loader
        workers = cfg.engine.num_workers
        self.train_loader = make_train_loader(self.bundle.train, self.bundle, cfg.augment, per_device_batch, rt.device,
                                              seed=cfg.seed, kind=kind, num_workers=workers,
                                              rank=rt.rank, world_size=rt.world_size)
        eval_batch = cfg.engine.eval_batch_size
        self.test_loader = make_eval_loader(self.bundle.test, self.bundle, eval_batch, rt.device, rt.rank, rt.world_size,
                                            num_workers=workers)
        self.val_loader = (make_eval_loader(self.bundle.val, self.bundle, eval_batch, rt.device, rt.rank, rt.world_size,
                                            num_workers=workers)
                           if self.bundle.val is not None else None)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size={cfg.batch_size} is larger than the training set "
                             f"({self.bundle.train.labels.shape[0]} examples): no full batch to train on")
        self.total_steps = cfg.train_steps or cfg.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.lr = LrSetter(self.optimizer, cfg.sched, self.total_steps, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(rt.device.type) if rt.precision == "fp16" else None
        self.forward_model = self._compiled(self.model)  # evaluation, and training in a single process
        train_model, first_pass = self.forward_model, contextlib.nullcontext
        if rt.distributed:
            ddp = distributed.wrap(self.model, rt)
            train_model = self._compiled(ddp)
            # per-replica perturbation: no all-reduce in the first forward/backward (DESIGN.md)
            first_pass = contextlib.nullcontext if cfg.optim.sync_perturbation else ddp.no_sync
        self.step = TrainStep(
            train_model, self.optimizer, self.sam,
            StepConfig(m=cfg.optim.m, device_batch=cfg.device_batch, bn_stats=cfg.optim.bn_stats,
                       grad_clip=cfg.optim.grad_clip, label_smoothing=cfg.optim.label_smoothing,
                       true_gradient=cfg.optim.true_gradient, shakedrop_mask=cfg.optim.shakedrop_mask,
                       autocast_dtype=rt.autocast_dtype, channels_last=rt.channels_last),
            scaler=self.scaler, first_pass_context=first_pass, module=self.model,
            grad_reduce=distributed.average_gradients if rt.distributed else None,
        )
        self.top5 = self.bundle.num_classes > 10
        self.runlog = RunLog(self.run_dir, cfg.name, flat_config(cfg, rt.precision, rt.world_size), environment(rt.device),
                             self.bundle.info, trackers=Trackers(cfg, self.run_dir)) if rt.is_main else None

    def _compiled(self, model: nn.Module) -> nn.Module:
        engine = self.cfg.engine
        if engine.cuda_graphs:
            return torch.compile(model, mode="reduce-overhead")
        if engine.compile:
            return torch.compile(model)
        return model

    # -- checkpoints ------------------------------------------------------------------------------
    def _state(self, progress: Progress) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "progress": progress.__dict__,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "data_fingerprint": self.bundle.info["fingerprint"],
        }

    def _resume(self) -> Progress:
        """Continue from the run directory's checkpoint when `resume` allows it."""
        mode = self.cfg.resume
        state = load_checkpoint(self.run_dir, map_location=self.runtime.device) if mode != "never" else None
        if state is None:
            if mode == "must":
                raise RunDirError(f"resume=must but {self.run_dir}/checkpoint.pt does not exist")
            return Progress(history=[])
        check_same_config(state["config"], OmegaConf.to_container(self.cfg, resolve=True), self.run_dir)
        if state["data_fingerprint"] != self.bundle.info["fingerprint"]:
            raise RunDirError(f"{self.run_dir} was trained on other data (fingerprint {state['data_fingerprint']}, "
                              f"now {self.bundle.info['fingerprint']}); use resume=never to start it over")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        progress = Progress(**state["progress"])
        log.info("resuming %s after epoch %d (step %d)", self.run_dir, progress.epoch, progress.step)
        return progress

    # -- the run ----------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to the end (or from the last checkpoint); returns the process exit code."""
        progress = self.begin()
        every, every_steps = self.cfg.engine.eval_every, self.cfg.engine.eval_every_steps
        try:
            period = Period(self.runtime.device)
            for epoch in range(progress.epoch + 1, self.epochs + 1):
                self._train_epoch(epoch, progress, period)
                due = period.steps >= every_steps if every_steps else epoch % every == 0
                if not due and epoch != self.epochs:
                    continue  # evaluate, log and checkpoint every eval_every epochs (or steps) and at the end
                row = self._evaluate(epoch, period, progress)
                period = Period(self.runtime.device)
                progress.history.append(row)
                progress.epoch = epoch
                if self.runtime.is_main:
                    save_checkpoint(self.run_dir, self._state(progress))
                    self.runlog.log_epoch(row, progress.history, progress.wall_s)
                log.info("epoch %d/%d %s", epoch, self.epochs,
                         " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        except Diverged as err:
            log.error("diverged: %s; the last good checkpoint is kept", err)
            if self.runlog:
                self.runlog.finish("diverged", str(err))
            return EXIT_DIVERGED
        except BaseException as err:
            self.record_exit(err)
            raise
        if self.runlog:
            self.runlog.finish("completed")
        return EXIT_OK

    def begin(self) -> Progress:
        """Resume (or start) and write the run directory's config and first summary."""
        progress = self._resume()
        if self.runlog:
            self.runlog.write_config(self.cfg)
            self.runlog.restore(progress.history, progress.started_at, progress.wall_s)
            progress.started_at = self.runlog.summary["started_at"]
            self.runlog.write_summary()
        return progress

    def record_exit(self, err: BaseException) -> None:
        """What metrics.json says when training stops on an exception."""
        if not self.runlog:
            return
        if isinstance(err, (KeyboardInterrupt, SystemExit)):  # Ctrl-C, or a preemption signal (SLURM/submitit):
            # not a failure, the run resumes from its last checkpoint when re-run
            self.runlog.finish("running", f"interrupted ({type(err).__name__}); re-run the same command to resume")
        else:  # a crash
            self.runlog.finish("failed", f"{type(err).__name__}: {err}")

    def _train_epoch(self, epoch: int, progress: Progress, period: "Period") -> None:
        """One pass over the training loader (or what is left of `train_steps`), summed into `period`."""
        rt, cfg = self.runtime, self.cfg
        # each replica draws its own dropout/ShakeDrop masks (rank 0 draws what a single process does)
        torch.manual_seed(epoch_seed(cfg.seed, epoch) + 7919 * rt.rank)
        self.train_loader.set_epoch(epoch)
        set_train_mode(self.model, cfg.model.freeze_bn)
        steps_left = self.total_steps - progress.step
        bar = tqdm(self.train_loader, total=min(self.steps_per_epoch, steps_left), desc=f"epoch {epoch}/{self.epochs}",
                   disable=not (cfg.engine.progress and rt.is_main), leave=False, dynamic_ncols=True)
        start = time.perf_counter()
        for index, (x, y) in enumerate(bar):
            if index >= steps_left:
                break
            period.lr = self.lr(progress.step)
            period.add(self.step(x.to(rt.dtype) if x.is_floating_point() else x, y))
            progress.step += 1
            if (index + 1) % LOG_EVERY == 0:
                self._check_finite(period.loss_sum, epoch, progress.step)
                bar.set_postfix(loss=f"{float(period.loss_sum) / period.seen:.3f}",
                                err=f"{100 - 100 * int(period.correct) / period.seen:.2f}")
        bar.close()
        self._check_finite(period.loss_sum, epoch, progress.step)
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        period.train_s += time.perf_counter() - start
        period.epochs += 1

    def _evaluate(self, epoch: int, period: "Period", progress: Progress,
                  measured: Optional[dict[str, dict[str, float]]] = None) -> dict[str, Any]:
        """The metrics.jsonl row of the epochs in `period`: training sums and a test evaluation
        (`measured`: the "test" and "val" evaluations already done, by a pack for all its members)."""
        rt = self.runtime
        start = time.perf_counter()
        if rt.distributed:  # per-replica BatchNorm: evaluate and checkpoint the ranks' mean statistics
            distributed.average_batchnorm_stats(self.model)
        totals = torch.stack([period.loss_sum, period.correct.double(),
                              torch.tensor(float(period.seen), device=rt.device, dtype=torch.float64),
                              period.grad_norm_sum, period.e_norm_sum])
        if rt.distributed:
            torch.distributed.all_reduce(totals)
        loss_total, correct_total, seen_total, grad_norm_total, e_norm_total = totals.tolist()  # the interval's one sync
        row: dict[str, Any] = {"epoch": epoch, "lr": period.lr, "train_loss": loss_total / seen_total,
                               "train_err": 100.0 - 100.0 * correct_total / seen_total}
        if period.norm_steps:  # SAM: means over the interval's steps (and replicas)
            norm_count = period.norm_steps * rt.world_size
            row.update(grad_norm=grad_norm_total / norm_count, perturbation_norm=e_norm_total / norm_count)
        if self.val_loader is not None:
            val = measured["val"] if measured else evaluate(self.forward_model, self.val_loader, rt, self.top5)
            row.update(val_loss=val["loss"], val_err=val["err"])
        test = measured["test"] if measured else evaluate(self.forward_model, self.test_loader, rt, self.top5)
        row.update(test_loss=test["loss"], test_err=test["err"])
        if self.top5:
            row["test_top5_err"] = test["top5_err"]
        elapsed = period.train_s + period.eval_s + time.perf_counter() - start
        progress.wall_s += elapsed
        row.update(epoch_s=round(elapsed / period.epochs, 3), images_per_s=round(seen_total / period.train_s, 1))
        return row

    def _check_finite(self, loss_sum: torch.Tensor, epoch: int, step: int) -> None:
        # summed over ranks, so that every rank stops at the same step (a lone rank would hang the others)
        if not torch.isfinite(distributed.summed(loss_sum)):
            raise Diverged(f"non-finite training loss in epoch {epoch} (by step {step})")


def flat_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A resolved config as {"optim.lr": 0.1, ...} (a model's `kwargs` stay one value)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "kwargs":
            out.update(flat_dict(value, name + "."))
        else:
            out[name] = value
    return out


def check_same_config(saved: dict[str, Any], current: dict[str, Any], run_dir: Path) -> None:
    """A checkpoint continues only the run it came from: refuse a changed config."""

    a, b = flat_dict(saved), flat_dict(current)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(RESUME_FREE_KEYS))
    if changed:
        detail = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:5])
        raise RunDirError(f"{run_dir} holds a run with another config ({detail}); "
                         f"use another hydra.run.dir, or resume=never to start it over")


def fit(cfg: DictConfig, run_dir: Path) -> int:
    """Train the run described by `cfg` into `run_dir`; returns the process exit code."""
    try:
        return Trainer(cfg, run_dir).fit()
    finally:
        distributed.shutdown()
