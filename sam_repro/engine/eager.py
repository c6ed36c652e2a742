"""The eager backend of the step: one member whose batch is one device, plain autograd.

It runs the module as the user built it, so that what only works there works: DDP with its
all-reduce overlapped with the backward, torch.compile, CUDA graphs, fp16 loss scaling, SAM's fused
`first_step`. Per step:
1. forward/backward at w (random draws captured first; shake layers in "true gradient" mode when
   `optim.true_gradient`; under DDP in `no_sync`, so that each replica perturbs with its own
   gradient), the L2 gradient added in `wd_mode=loss`;
2. SAM only: w -> w + e(w) (SAM.first_step); the same random draws replayed (ShakeDrop's mask
   fresh, as the official code); the L2 gradient at w + e, then forward/backward at w + e(w)
   accumulating onto it (BatchNorm running statistics untouched when `bn_stats=first_pass`); w
   restored exactly;
3. engine/passes.py's `apply_gradients`: clipping, the base optimizer's step.

A SAM-family method (optim/methods/) runs here too when it trains in one process and its step is
one batch (every method but RWP, whose clean and noisy halves are two devices): its rule sees the
one device as k = 1 rows, and its `Needs` say what else the step does, as on the grid backend: no
perturbed pass on some steps (`rule.plain`), the gradient at w + e combined with the one at w
(`rule.combine`), ESAM's first pass over its kept tensors only and its perturbed pass over the
examples its no-grad forward at w + e selects.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional

import torch
from torch import Tensor, nn

from sam_repro.engine.passes import (Member, Passes, StepConfig, StepStats, add_l2_, apply_gradients, clip_norms,
                                     loss_scale, member_stats, per_example_losses, running_stats_frozen, to_layout)
from sam_repro.optim.methods import MethodOptimizer
from sam_repro.optim.methods.base import COMBINE_NONE, Needs


def runs_eagerly(sam: object, world_size: int) -> bool:
    """Whether a step with this optimizer can take the eager backend on a batch of one device: SGD and
    SAM always; a SAM-family method in one process (under DDP the grid averages what each method says
    must be averaged, docs/methods.md), unless its step runs on two batches (RWP)."""
    if not isinstance(sam, MethodOptimizer):
        return True
    return world_size == 1 and not sam.rule.needs.two_batches


class EagerStep:
    """The eager backend: callable (x, y) -> StepStats for one member whose batch is one device."""

    def __init__(self, model: nn.Module, member: Member, cfg: StepConfig,
                 scaler: Optional[torch.amp.GradScaler] = None,
                 first_pass_context: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
        """`model` is what runs the passes (the member's module, or its DDP wrapper and/or
        torch.compile'd); `first_pass_context` wraps SAM's first forward AND backward (DDP's `no_sync`)."""
        self.model, self.member, self.cfg, self.scaler = model, member, cfg, scaler
        self.first_pass_context = first_pass_context
        groups = member.optimizer.param_groups
        self.params = [p for g in groups for p in g["params"]]
        self.l2 = [g.get("l2", 0.0) for g in groups for _ in g["params"]]
        for p in self.params:  # every parameter has a gradient, so that L2 (in the loss) reaches it too
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.passes = Passes(member.module, cfg, self.params[0].device)
        self.max_norm = clip_norms([member], self.params[0].device)
        self.method = member.sam if isinstance(member.sam, MethodOptimizer) else None
        self.needs = self.method.rule.needs if self.method is not None else Needs()

    def _forward_backward(self, x: Tensor, y: Tensor, per_example: bool = False) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(loss, logits, each example's loss when `per_example`), detached, after the backward."""
        losses = None
        with self.passes.autocast():
            logits = self.model(x)
            if per_example:
                losses = per_example_losses(logits, y, self.cfg.label_smoothing)
                loss = losses.mean()
            else:
                loss = self.passes.loss(logits, y)
        if loss.requires_grad:  # not when a method's first pass keeps no tensor (ESAM's draw)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach(), logits.detach(), None if losses is None else losses.detach()

    def _add_l2(self) -> None:
        add_l2_([p.grad for p in self.params], self.params, self.l2, loss_scale(self.scaler, self.params[0].device))

    def _method_grads(self) -> list[Tensor]:
        """The method's parameters' gradients as its rule's (1, *shape) rows."""
        return [p.grad.unsqueeze(0) for p in self.method.params]

    def _kept_tensors_only(self, perturbs: bool) -> ContextManager:
        """The method's first pass (ESAM: the tensors it does not keep get no gradient at w). Not on a
        compiled model, which would recompile for every draw of the mask."""
        if perturbs and self.method is not None and self.model is self.member.module:
            return self.method.first_pass()
        return contextlib.nullcontext()

    def _selected(self, x: Tensor, y: Tensor, loss_at_w: Tensor) -> tuple[Tensor, Tensor]:
        """ESAM's sharpness-sensitive selection (`needs.selects_examples`): a no-grad forward at w + e
        (BatchNorm statistics moved as the method says) and the examples whose loss rose most."""
        rule = self.method.rule
        frozen = running_stats_frozen(self.passes.batchnorms) if rule.sharpness_bn == "frozen" else contextlib.nullcontext()
        with torch.no_grad(), frozen, self.passes.autocast():
            loss_at_e = per_example_losses(self.model(x), y, self.cfg.label_smoothing)
        mask = rule.select(loss_at_w.unsqueeze(0), loss_at_e.unsqueeze(0))[0]
        return x[mask], y[mask]

    def __call__(self, x: Tensor, y: Tensor) -> StepStats:
        x = to_layout(x, self.cfg.channels_last)
        sam, method, passes, images = self.member.sam, self.method, self.passes, int(y.shape[0])
        perturbs = sam is not None and (method is None or method.perturbs_now())
        selects = perturbs and self.needs.selects_examples and not method.rule.selects_all()
        passes.draws.capture()
        with (self.first_pass_context() if perturbs else contextlib.nullcontext()), passes.first_pass(perturbs), \
                self._kept_tensors_only(perturbs):
            loss, logits, loss_at_w = self._forward_backward(x, y, per_example=selects)
            self._add_l2()
        if perturbs:
            sam.first_step(zero_grad=True)
            if selects:
                x, y = self._selected(x, y, loss_at_w)
            # The L2 gradient at w + e goes in BEFORE the backward, which accumulates onto it: under
            # DDP the all-reduce then averages it with the loss gradient (each replica has its own e);
            # added afterwards, each replica would step with its own l2 * (w + e) and drift apart.
            self._add_l2()
            with passes.perturbed_pass():
                loss, logits, _ = self._forward_backward(x, y)
            sam.unperturb()
            if self.needs.combine != COMBINE_NONE:  # one device: its own gradient is the mean over devices
                method.device_combine(method.params, self._method_grads())
        elif method is not None:  # a method's step without a perturbed pass (interval SAM, LookSAM)
            method.device_plain(method.params, self._method_grads())
        scale = loss_scale(self.scaler, self.params[0].device)
        apply_gradients([self.member], [p.grad.unsqueeze(0) for p in self.params], self.max_norm, [True], self.scaler)
        if method is not None:
            method.finish_step()  # after the base step: WSAM's own move, counters, next draws
        correct = (logits.argmax(dim=1) == y).sum()
        return member_stats(loss * y.shape[0], correct, int(y.shape[0]), sam if perturbs else None, scale, images)
