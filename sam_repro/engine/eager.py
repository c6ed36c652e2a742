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
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional

import torch
from torch import Tensor, nn

from sam_repro.engine.passes import (Member, Passes, StepConfig, StepStats, add_l2_, apply_gradients, clip_norms,
                                     member_stats, to_layout)


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

    def loss_scale(self) -> Optional[Tensor]:
        """fp16: the scale the gradients carry (the L2 term must carry it too); None otherwise."""
        if self.scaler is None:
            return None
        if self.scaler._scale is None:  # the scaler creates its scale at its first scale() call
            self.scaler.scale(torch.ones((), device=self.params[0].device))
        return self.scaler._scale

    def _forward_backward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with self.passes.autocast():
            logits = self.model(x)
            loss = self.passes.loss(logits, y)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach(), logits.detach()

    def __call__(self, x: Tensor, y: Tensor) -> StepStats:
        x = to_layout(x, self.cfg.channels_last)
        sam, passes = self.member.sam, self.passes
        passes.draws.capture()
        with self.first_pass_context() if sam is not None else contextlib.nullcontext(), passes.first_pass(sam is not None):
            loss, logits = self._forward_backward(x, y)
            add_l2_([p.grad for p in self.params], self.params, self.l2, self.loss_scale())
        if sam is not None:
            sam.first_step(zero_grad=True)
            # The L2 gradient at w + e goes in BEFORE the backward, which accumulates onto it: under
            # DDP the all-reduce then averages it with the loss gradient (each replica has its own e);
            # added afterwards, each replica would step with its own l2 * (w + e) and drift apart.
            add_l2_([p.grad for p in self.params], self.params, self.l2, self.loss_scale())
            with passes.perturbed_pass():
                loss, logits = self._forward_backward(x, y)
            sam.unperturb()
        scale = self.loss_scale()
        apply_gradients([self.member], [p.grad.unsqueeze(0) for p in self.params], self.max_norm, [True], self.scaler)
        correct = (logits.argmax(dim=1) == y).sum()
        return member_stats(loss * y.shape[0], correct, int(y.shape[0]), sam, scale)
