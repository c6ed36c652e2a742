"""Packed runs: several runs of the same shape trained together as ONE vectorized model.

A small network (ResNet-32: 0.46M parameters) leaves a GPU idle between its kernel launches; P
runs stacked along a leading "member" axis cost about the launches of one. Every member is a full
`Trainer` (engine/loop.py): its own seed (initialization, data order, augmentation), its own
label noise, its own optimizer with its lr, weight decay, momentum and schedule, its own SAM rho and
gradient clipping norm, its own run directory, metrics and checkpoint. The pack only owns the step:

- the members' parameters live in one stacked tensor per parameter name, (P, *shape); each
  member's nn.Parameter is re-pointed at its row (`p.data = stacked[i]`) and its `.grad` at the
  row of a stacked gradient, so the member's own optimizer steps its own row in place and its
  checkpoint is an ordinary state_dict (copied out of the stack before saving);
- the forward is torch.func.vmap over members of the per-device forward of engine/step.py (vmap
  over each member's device groups), on a private copy of the module; BatchNorm running statistics
  are stacked the same way, one copy per member and device group;
- SAM: each member's per-group gradients at w (vmap of grad), then that member's own SAM object
  turns them into e (SAM.grouped_perturbation: its rho, its global norm per group), then one
  vmapped forward/backward at the P x k perturbed weight sets. The loss summed over members has,
  for each member's rows, exactly that member's gradient (members never mix).

What differs from running the members alone: dropout/ShakeDrop masks are drawn by the pack
(vmap's "different" randomness, seeded per epoch), so a stochastic-depth member is statistically,
not bitwise, the run it would have been alone; float32 sums may be ordered differently.
Everything else (initialization, data, augmentation, noise, hyperparameters) is the solo run's.
SGD and SAM runs are packed apart: an SGD member in a SAM pack would pay SAM's second pass.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.func import grad, vmap

from sam_repro.engine.checkpoint import save_checkpoint
from sam_repro.engine.loop import (EXIT_DIVERGED, EXIT_OK, LOG_EVERY, Period, Progress, Trainer, epoch_seed,
                                   flat_dict, set_train_mode)
from sam_repro.engine.step import FunctionalPasses, StepConfig, StepStats, batchnorm_buffers, group_size, running_stats_frozen
from sam_repro.optim.factory import METHODS

log = logging.getLogger("sam_repro")

# Keys in which the members of one pack may differ; every other key must agree (it fixes tensor
# shapes, the data pipeline or the step). Prefixes: "sched." covers the whole schedule.
MEMBER_KEYS = (
    "seed", "name", "resume", "logger", "runs_root", "method_rho",
    "dataset.label_noise", "dataset.noise_kind", "dataset.noise_seed",
    "optim.lr", "optim.weight_decay", "optim.momentum", "optim.nesterov", "optim.rho", "optim.eta",
    "optim.grad_clip", "sched.",
)


def _file_backed(dataset: str) -> bool:
    from sam_repro.data import DATASETS

    return dataset in DATASETS and DATASETS[dataset].files


def _why_solo(cfg: DictConfig) -> Optional[str]:
    """Why this run cannot be packed at all (None: it can)."""
    engine = cfg.engine
    reasons = {
        "engine.ddp=true: a multi-GPU run is a pack of its own": engine.ddp,
        "precision=fp16: its loss scaling is per run": engine.precision == "fp16",
        "optim.sync_perturbation=true: one perturbation over all devices is not a per-member step":
            cfg.optim.sync_perturbation,
        "file-backed data (ImageNet, the finetuning sets): each member would decode its own JPEGs":
            cfg.engine.loader == "files" or (cfg.dataset.source != "synthetic" and _file_backed(cfg.dataset.name)),
    }
    return next((why for why, applies in reasons.items() if applies), None)


def pack_key(cfg: DictConfig) -> tuple[Optional[str], Optional[str]]:
    """(key, None): runs with equal keys can be trained as one pack; (None, why) for a run that
    must run alone. The key is every config value outside MEMBER_KEYS (plus SGD vs SAM)."""
    why = _why_solo(cfg)
    if why:
        return None, why
    values = flat_dict(OmegaConf.to_container(cfg, resolve=True))
    shape = {k: v for k, v in values.items() if not k.startswith(MEMBER_KEYS) and not k.startswith("hydra")}
    shape["perturbs"] = METHODS[cfg.optim.name].uses_sam  # SGD and SAM packed apart (module docstring)
    return repr(sorted(shape.items())), None


def differing_keys(a: DictConfig, b: DictConfig) -> list[str]:
    """The config keys (outside MEMBER_KEYS) in which two runs differ: why they are not one pack."""
    fa, fb = (flat_dict(OmegaConf.to_container(c, resolve=True)) for c in (a, b))
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k) and not k.startswith(MEMBER_KEYS))


def _set_buffer(model: nn.Module, name: str, value: Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    model.get_submodule(owner)._buffers[leaf] = value


class PackedStep(FunctionalPasses):
    """Callable (x, y) of shape (P, B, ...) and (P, B) -> one StepStats per member; steps every
    active member's optimizer. Built on the members' Trainers (after they resumed)."""

    def __init__(self, trainers: list[Trainer], cfg: StepConfig) -> None:
        self.trainers = trainers
        models = [t.model for t in trainers]
        device = next(models[0].parameters()).device
        self._init_passes(copy.deepcopy(models[0]), cfg, device)  # the module vmap calls; no member's own
        self.sams = [t.sam for t in trainers]
        self.uses_sam = self.sams[0] is not None
        self.active = [True] * len(trainers)
        members = [dict(m.named_parameters()) for m in models]
        self.names = list(members[0])
        self.member_params = [[m[n] for n in self.names] for m in members]
        # one stacked tensor per parameter (and gradient); each member's Parameter becomes a view of its row
        self.weights = {n: torch.stack([m[n].detach() for m in members]) for n in self.names}
        self.grads = {n: torch.zeros_like(w) for n, w in self.weights.items()}
        for i, m in enumerate(members):
            for n in self.names:
                m[n].data = self.weights[n][i]
                m[n].grad = self.grads[n][i]
        member_stats = [batchnorm_buffers(m) for m in models]
        self.buffers = {n: torch.stack([s[n] for s in member_stats]) for n in member_stats[0]}
        for i, model in enumerate(models):
            for n, stacked in self.buffers.items():
                _set_buffer(model, n, stacked[i])
        # per-member hyperparameters that act inside the step, as (P, 1, ...) tensors
        self.l2 = {}
        for n, w in self.weights.items():
            l2 = [next(g.get("l2", 0.0) for g in t.optimizer.param_groups if any(p is m[n] for p in g["params"]))
                  for t, m in zip(trainers, members)]
            if any(l2):
                self.l2[n] = torch.tensor(l2, dtype=w.dtype, device=device).view(-1, *[1] * (w.dim() - 1))
        clips = [t.step.cfg.grad_clip or float("inf") for t in trainers]
        self.clip = torch.tensor(clips, dtype=torch.float64, device=device) if any(c < float("inf") for c in clips) else None

    # -- the vectorized forward ----------------------------------------------------------------
    def _logits_of(self, weights: dict[str, Tensor], stats: dict[str, Tensor], x: Tensor) -> Tensor:
        return self._group_logits({**weights, **stats}, x)

    def _forward(self, weights: dict[str, Tensor], stats: dict[str, Tensor], xg: Tensor, per_group: bool) -> Tensor:
        """Logits (P, k, size, C): members x device groups; `per_group` = weights (P, k, ...) (SAM's
        perturbed pass) rather than (P, ...) shared by a member's groups."""
        weights, xg = self._low_precision(weights, xg)
        over_groups = vmap(self._logits_of, in_dims=(0 if per_group else None, 0, 0), randomness="different")
        return vmap(over_groups, in_dims=(0, 0, 0), randomness="different")(weights, stats, xg)

    def _member_losses(self, logits: Tensor, y: Tensor) -> Tensor:
        """Each member's mean cross-entropy over its batch, (P,) (the loss in fp32 under autocast)."""
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        per_example = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none",
                                      label_smoothing=self.cfg.label_smoothing)
        return per_example.view(logits.shape[0], -1).mean(dim=1)

    def _backward(self, losses: Tensor, weights: dict[str, Tensor]) -> None:
        """The members' gradients into the stacked .grad rows (the sum's gradient, row i, is member i's)."""
        grads = torch.autograd.grad(losses.sum(), list(weights.values()), allow_unused=True)
        for n, g in zip(weights, grads):
            if g is None:
                self.grads[n].zero_()
            else:
                self.grads[n].copy_(g)

    # -- the step -------------------------------------------------------------------------------
    def __call__(self, x: Tensor, y: Tensor) -> list[StepStats]:
        members, batch = y.shape
        size = group_size(batch, self.cfg, self.uses_sam)
        if batch % size:
            raise ValueError(f"a batch of {batch} examples cannot be split into groups of {size}")
        k = batch // size
        xg, yg = x.view(members, k, size, *x.shape[2:]), y.view(members, k, size)
        # one copy of the running statistics per member and device group, averaged after the step
        stats = {n: b.unsqueeze(1).expand(members, k, *b.shape[1:]).clone() for n, b in self.buffers.items()}
        self.draws.capture()
        losses, logits = self._sam(xg, yg, stats) if self.uses_sam else self._sgd(xg, yg, stats)
        with torch.no_grad():
            for n, buffer in self.buffers.items():
                value = stats[n]
                if buffer.is_floating_point():
                    buffer.copy_(value.mean(1, dtype=torch.promote_types(value.dtype, torch.float32)))
                else:  # num_batches_tracked: every group counted the same steps
                    buffer.copy_(value[:, 0])
            self._clip()
            for trainer, active in zip(self.trainers, self.active):
                if active:  # a diverged member is frozen: its optimizer no longer steps
                    trainer.optimizer.step()
            torch._foreach_zero_(list(self.grads.values()))
        loss_sums = losses.detach() * batch
        correct = (logits.argmax(dim=-1) == yg).view(members, -1).sum(dim=1)
        out = []
        for i, sam in enumerate(self.sams):
            norms = (sam.last_grad_norm, sam.last_perturbation_norm) if sam is not None else (None, None)
            out.append(StepStats(loss_sum=loss_sums[i], correct=correct[i], count=batch,
                                 grad_norm=norms[0], perturbation_norm=norms[1]))
        return out

    def _sgd(self, xg: Tensor, yg: Tensor, stats: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        weights = {n: w.detach().requires_grad_() for n, w in self.weights.items()}
        logits = self._forward(weights, stats, xg, per_group=False)
        losses = self._member_losses(logits, yg)
        self._backward(losses, weights)
        with torch.no_grad():  # L2 in the loss (wd_mode=loss): + l2 * w, each member its own l2
            for n, l2 in self.l2.items():
                self.grads[n].add_(l2 * self.weights[n])
        return losses.detach(), logits.detach()

    def _sam(self, xg: Tensor, yg: Tensor, stats: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        def loss_of(weights: dict[str, Tensor], st: dict[str, Tensor], x: Tensor, y: Tensor):
            weights, x = self._low_precision(weights, x)  # inside: the gradient is the fp32 weights'
            logits = self._group_logits({**weights, **st}, x)
            loss = self._loss(logits, y)
            return loss, loss.detach()

        # 1. every member's per-group gradients at w (P, k, ...), L2 term included
        self._set_true_gradient(self.cfg.true_gradient)
        over_groups = vmap(grad(loss_of, has_aux=True), in_dims=(None, 0, 0, 0), randomness="different")
        e, _ = vmap(over_groups, in_dims=(0, 0, 0, 0), randomness="different")(
            {n: w.detach() for n, w in self.weights.items()}, stats, xg, yg)
        self._set_true_gradient(False)
        with torch.no_grad():
            for n, l2 in self.l2.items():
                e[n].add_(l2.unsqueeze(1) * self.weights[n].unsqueeze(1))
            # 2. each member's own SAM turns its rows into e (its rho, its norm per group), in place
            for i, sam in enumerate(self.sams):
                sam.grouped_perturbation(self.member_params[i], [e[n][i] for n in self.names])
        # 3. one forward/backward at the P x k perturbed weight sets
        weights = {n: w.detach().requires_grad_() for n, w in self.weights.items()}
        perturbed = {n: weights[n].unsqueeze(1) + e[n] for n in self.names}
        self.draws.replay()
        self._set_perturbed_pass(True)
        try:
            frozen = running_stats_frozen(self._batchnorms) if self.cfg.bn_stats == "first_pass" else contextlib.nullcontext()
            with frozen:
                logits = self._forward(perturbed, stats, xg, per_group=True)
            losses = self._member_losses(logits, yg)
            self._backward(losses, weights)
        finally:
            self._set_perturbed_pass(False)
        with torch.no_grad():  # the L2 gradient at w + e_g, averaged over the groups: l2 * (w + mean_g e_g)
            for n, l2 in self.l2.items():
                self.grads[n].add_(l2 * (self.weights[n] + e[n].mean(1)))
        return losses.detach(), logits.detach()

    def _clip(self) -> None:
        """Each member's gradient clipped at its own global norm (torch's clip_grad_norm_ formula)."""
        if self.clip is None:
            return
        grads = list(self.grads.values())
        per_tensor = torch.stack([g.flatten(1).norm(dim=1).double() for g in grads])  # (tensors, P)
        total = per_tensor.norm(dim=0)
        coef = (self.clip / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype).view(-1, *[1] * (g.dim() - 1)))

    @torch.no_grad()
    def evaluate(self, loader: Any, dtype: torch.dtype, top5: bool) -> list[dict[str, float]]:
        """Every member's mean cross-entropy, error % (and top-5 error %) over a split: each batch goes
        through all members at once."""
        self.module.eval()
        n_members = len(self.trainers)
        device = self.device
        loss_sum = torch.zeros(n_members, device=device, dtype=torch.float64)
        wrong = torch.zeros(n_members, device=device, dtype=torch.long)
        wrong5 = torch.zeros(n_members, device=device, dtype=torch.long)
        count = 0
        for x, y in loader:
            x = x.to(dtype) if x.is_floating_point() else x
            weights, x = self._low_precision(dict(self.weights), x)
            logits = vmap(self._logits_of, in_dims=(0, 0, None))(weights, self.buffers, x)  # (P, n, C)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(n_members), reduction="none")
            loss_sum += ce.view(n_members, -1).sum(dim=1).double()
            wrong += (logits.argmax(dim=-1) != y).sum(dim=1)
            if top5:
                wrong5 += (~(logits.topk(5, dim=-1).indices == y[None, :, None]).any(dim=-1)).sum(dim=1)
            count += y.shape[0]
        out = []
        for loss, w, w5 in zip(loss_sum.tolist(), wrong.tolist(), wrong5.tolist()):
            row = {"loss": loss / count, "err": 100.0 * w / count}
            if top5:
                row["top5_err"] = 100.0 * w5 / count
            out.append(row)
        return out


def _own_storage(state: dict[str, Any]) -> dict[str, Any]:
    """A member's checkpoint state with its model tensors copied out of the stack: torch.save would
    otherwise write every member's rows (a view saves its whole storage)."""
    state["model"] = {k: v.clone() for k, v in state["model"].items()}
    return state


class PackTrainer:
    """Trains the runs `jobs` (config, run directory), which agree on `pack_key`, as one pack."""

    def __init__(self, jobs: list[tuple[DictConfig, Path]]) -> None:
        data_cache: dict = {}  # the source is read once; each member draws its own label noise
        self.trainers = [Trainer(cfg, run_dir, data_cache=data_cache) for cfg, run_dir in jobs]

    def fit(self) -> list[int]:
        """Train every member to its end; returns each member's exit code (in the order of `jobs`)."""
        codes = [EXIT_OK] * len(self.trainers)
        progresses = [trainer.begin() for trainer in self.trainers]
        # members at the same point train together (a pack killed between two members' checkpoints
        # resumes as two packs, each ending where it would have)
        together: dict[int, list[int]] = defaultdict(list)
        for i, progress in enumerate(progresses):
            together[progress.step].append(i)
        for indices in together.values():
            for i, code in zip(indices, self._fit_together([self.trainers[i] for i in indices],
                                                           [progresses[i] for i in indices])):
                codes[i] = code
        return codes

    def _fit_together(self, trainers: list[Trainer], progresses: list[Progress]) -> list[int]:
        first = trainers[0]
        step = PackedStep(trainers, first.step.cfg)
        codes = [EXIT_OK] * len(trainers)
        names = ", ".join(str(t.run_dir) for t in trainers)
        log.info("pack of %d runs from epoch %d: %s", len(trainers), progresses[0].epoch + 1, names)
        every, every_steps = first.cfg.engine.eval_every, first.cfg.engine.eval_every_steps
        periods = [Period(first.runtime.device) for _ in trainers]
        try:
            for epoch in range(progresses[0].epoch + 1, first.epochs + 1):
                self._train_epoch(step, trainers, progresses, periods, epoch, codes)
                if not any(step.active):
                    break
                due = periods[0].steps >= every_steps if every_steps else epoch % every == 0
                if not due and epoch != first.epochs:
                    continue
                self._evaluate(step, trainers, progresses, periods, epoch)
                periods = [Period(first.runtime.device) for _ in trainers]
        except BaseException as err:
            for trainer, active in zip(trainers, step.active):
                if active:
                    trainer.record_exit(err)
            raise
        for trainer, active in zip(trainers, step.active):
            if active:
                trainer.runlog.finish("completed")
        return codes

    def _train_epoch(self, step: PackedStep, trainers: list[Trainer], progresses: list[Progress],
                     periods: list[Period], epoch: int, codes: list[int]) -> None:
        first = trainers[0]
        rt = first.runtime
        torch.manual_seed(epoch_seed(first.cfg.seed, epoch))  # the pack's dropout/ShakeDrop draws
        for trainer in trainers:
            trainer.train_loader.set_epoch(epoch)
        set_train_mode(step.module, first.cfg.model.freeze_bn)
        steps = min(first.steps_per_epoch, first.total_steps - progresses[0].step)
        batches = zip(*(iter(t.train_loader) for t in trainers))
        start = time.perf_counter()
        for index in range(steps):
            xs, ys = zip(*next(batches))
            for trainer, period, progress in zip(trainers, periods, progresses):
                period.lr = trainer.lr(progress.step)
            stats = step(torch.stack([x.to(rt.dtype) if x.is_floating_point() else x for x in xs]), torch.stack(ys))
            for period, progress, member_stats in zip(periods, progresses, stats):
                period.add(member_stats)
                progress.step += 1
            if (index + 1) % LOG_EVERY == 0:
                self._freeze_diverged(step, trainers, periods, epoch, progresses, codes)
        self._freeze_diverged(step, trainers, periods, epoch, progresses, codes)
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        elapsed = time.perf_counter() - start
        for period in periods:
            period.train_s += elapsed
            period.epochs += 1

    @staticmethod
    def _freeze_diverged(step: PackedStep, trainers: list[Trainer], periods: list[Period], epoch: int,
                         progresses: list[Progress], codes: list[int]) -> None:
        """A member whose training loss is NaN or inf is marked diverged (its last good checkpoint kept)
        and frozen; the others go on. One host sync for the whole pack."""
        finite = torch.isfinite(torch.stack([p.loss_sum for p in periods])).tolist()
        for i, ok in enumerate(finite):
            if not ok and step.active[i]:
                step.active[i] = False
                codes[i] = EXIT_DIVERGED
                why = f"non-finite training loss in epoch {epoch} (by step {progresses[i].step})"
                log.error("%s diverged: %s; frozen, the last good checkpoint is kept", trainers[i].run_dir, why)
                trainers[i].runlog.finish("diverged", why)

    def _evaluate(self, step: PackedStep, trainers: list[Trainer], progresses: list[Progress],
                  periods: list[Period], epoch: int) -> None:
        first = trainers[0]
        start = time.perf_counter()
        dtype = first.runtime.dtype
        measured = [{"test": r} for r in step.evaluate(first.test_loader, dtype, first.top5)]
        if first.val_loader is not None:
            for m, r in zip(measured, step.evaluate(first.val_loader, dtype, first.top5)):
                m["val"] = r
        eval_s = time.perf_counter() - start
        for i, (trainer, progress, period) in enumerate(zip(trainers, progresses, periods)):
            if not step.active[i]:
                continue
            period.eval_s = eval_s
            row = trainer._evaluate(epoch, period, progress, measured[i])
            progress.history.append(row)
            progress.epoch = epoch
            save_checkpoint(trainer.run_dir, _own_storage(trainer._state(progress)))
            trainer.runlog.log_epoch(row, progress.history, progress.wall_s)
            log.info("[member %d/%d %s] epoch %d/%d %s", i + 1, len(trainers), trainer.cfg.name, epoch, trainer.epochs,
                     " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))


def fit_pack(jobs: list[tuple[DictConfig, Path]]) -> list[int]:
    """Train `jobs` (config, run directory) as one pack; each member's exit code."""
    return PackTrainer(jobs).fit()


def plan_packs(configs: list[Optional[DictConfig]], size: int) -> list[tuple[list[int], Optional[str]]]:
    """Group a sweep's jobs (their task configs; None for one that is not to be packed) into packs of at
    most `size` whose members agree on `pack_key`, in sweep order. Returns (job indices, why) pairs:
    why is None for a pack, else the one line saying why that job runs alone."""
    keys: dict[str, list[int]] = defaultdict(list)
    alone: dict[int, str] = {}
    for i, cfg in enumerate(configs):
        if cfg is None:
            alone[i] = "not packable (see its error)"
            continue
        key, why = pack_key(cfg)
        if key is None:
            alone[i] = why
        else:
            keys[key].append(i)
    plan: list[tuple[list[int], Optional[str]]] = []
    largest = max(keys.values(), key=len, default=[])
    for members in keys.values():
        n_chunks = -(-len(members) // max(size, 1))  # balanced: 9 jobs at size 8 are packs of 5 and 4
        bounds = [round(j * len(members) / n_chunks) for j in range(n_chunks + 1)]
        chunks = [members[a:b] for a, b in zip(bounds, bounds[1:])]
        for chunk in chunks:
            if len(chunk) > 1:
                plan.append((chunk, None))
            elif len(members) == 1 and largest and largest is not members:
                diff = differing_keys(configs[chunk[0]], configs[largest[0]])
                alone[chunk[0]] = f"no other job agrees with it on {', '.join(diff[:4])}"
            else:
                alone[chunk[0]] = ("left over after packs of hydra.launcher.size" if len(members) > 1
                                   else "the only job of the sweep")
    plan += [([i], why) for i, why in alone.items()]
    return sorted(plan, key=lambda entry: entry[0][0])
