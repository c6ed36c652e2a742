"""ONE training step for SGD and SAM (sam=None is SGD), with the official code's semantics.

Per step, for each perturbation chunk (the whole device batch, or chunks of `optim.m` examples):
  1. forward/backward at w (the random draws captured first; shake layers in "true gradient"
     mode when `optim.true_gradient`), L2 gradient added in `wd_mode=loss`;
  2. SAM only: w -> w + e(w); the same random draws replayed; L2 gradient at w + e, then
     forward/backward at w + e(w) accumulating onto it (BatchNorm running statistics untouched
     when `bn_stats=first_pass`); w restored exactly.
Then the gradients of the chunks are averaged, clipped by global norm (`grad_clip`: the applied
gradient only), and the base optimizer steps. Training metrics come from the applied pass (the
perturbed one for SAM), as in the official code.

Nothing here synchronizes with the host: the step returns device tensors that the loop sums and
reads once per logging interval.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Optional

import torch
from torch import Tensor, nn

from sam_repro.models.stochastic import RandomDraws, StochasticLayer
from sam_repro.optim.sam import SAM

BN_STATS = ("first_pass", "both")


@dataclass
class StepConfig:
    """The switches of one step (from `optim.*` and `engine.*`)."""

    m: Optional[int] = None
    bn_stats: str = "first_pass"
    grad_clip: Optional[float] = None
    label_smoothing: float = 0.0
    true_gradient: bool = True
    autocast_dtype: Optional[torch.dtype] = None  # None = fp32
    channels_last: bool = False


@dataclass
class StepStats:
    """Sums over the examples of one step, on the device (no host sync)."""

    loss_sum: Tensor
    correct: Tensor
    count: int
    # SAM only (None for SGD), means over the step's perturbation chunks: the norm of the gradient at w
    # (unscaled, L2 term included) and the perturbation norm ||e||, both from SAM.first_step
    grad_norm: Optional[Tensor] = None
    perturbation_norm: Optional[Tensor] = None


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


@contextlib.contextmanager
def running_stats_frozen(layers: list[nn.Module]) -> Iterator[None]:
    """BatchNorm in train mode normalizes with batch statistics but updates nothing.

    With track_running_stats=False, PyTorch's BatchNorm neither updates running_mean/var nor
    counts num_batches_tracked, and still uses the batch's statistics in train mode.
    """
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


class TrainStep:
    """Callable (x, y) -> StepStats that updates the model in place."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sam: Optional[SAM],
        cfg: StepConfig,
        scaler: Optional[torch.amp.GradScaler] = None,
        first_pass_context: Callable[[], ContextManager] = contextlib.nullcontext,
    ) -> None:
        """`first_pass_context` wraps the first (unperturbed) forward AND backward: DDP passes
        `model.no_sync` there so that each replica perturbs with its own gradient."""
        self.model, self.optimizer, self.sam, self.cfg, self.scaler = model, optimizer, sam, cfg, scaler
        self.first_pass_context = first_pass_context
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.device = self.params[0].device
        self.draws = RandomDraws(self.device)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self._accumulated: Optional[list[Tensor]] = None  # m-sharpness: sum of chunk gradients
        # Found once: the step toggles these twice per step.
        self._batchnorms = batchnorm_layers(model)
        self._stochastic = [m for m in model.modules() if isinstance(m, StochasticLayer)]

    # -- pieces ---------------------------------------------------------------------------------
    def _set_true_gradient(self, enabled: bool) -> None:
        for layer in self._stochastic:
            layer.true_gradient = enabled

    def _forward_backward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(self.device.type, dtype=self.cfg.autocast_dtype or torch.float32,
                            enabled=self.cfg.autocast_dtype is not None):
            logits = self.model(x)
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()  # the loss in fp32 under autocast
            loss = self.criterion(logits, y)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach(), logits.detach()

    @torch.no_grad()
    def _add_l2_gradient(self) -> None:
        """grad += l2 * w for `wd_mode=loss` (the gradient of 0.5 * l2 * ||w||^2 at the current w)."""
        for group in self.optimizer.param_groups:
            l2 = group.get("l2", 0.0)
            pairs = [(p, p.grad) for p in group["params"] if p.grad is not None]
            if not l2 or not pairs:
                continue
            params, grads = (list(t) for t in zip(*pairs))
            if self.scaler is None:
                torch._foreach_add_(grads, params, alpha=l2)
            else:  # gradients carry the loss scale; the L2 term must too
                torch._foreach_add_(grads, torch._foreach_mul(params, self.scaler._scale * l2))

    def _chunks(self, x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
        m = self.cfg.m
        if self.sam is None or m is None or m >= x.shape[0]:
            return [(x, y)]
        return list(zip(x.split(m), y.split(m)))

    @torch.no_grad()
    def _accumulate(self, index: int) -> None:
        """Add this chunk's applied gradient to the sum, then zero the gradients in place for the next."""
        for p in self.params:
            if p.grad is None:  # unused by this chunk: contributes zeros
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        if self._accumulated is None:
            self._accumulated = [torch.zeros_like(g) for g in grads]  # allocated once
        if index == 0:
            torch._foreach_copy_(self._accumulated, grads)
        else:
            torch._foreach_add_(self._accumulated, grads)
        torch._foreach_zero_(grads)

    @torch.no_grad()
    def _use_accumulated(self, chunks: int) -> None:
        """The applied gradient: the mean over chunks, copied into the (kept) gradient buffers."""
        torch._foreach_mul_(self._accumulated, 1.0 / chunks)
        torch._foreach_copy_([p.grad for p in self.params], self._accumulated)

    # -- the step -------------------------------------------------------------------------------
    def __call__(self, x: Tensor, y: Tensor) -> StepStats:
        if self.cfg.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        chunks = self._chunks(x, y)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        grad_norm = e_norm = None
        for index, (xc, yc) in enumerate(chunks):
            self.draws.capture()
            first_context = self.first_pass_context() if self.sam is not None else contextlib.nullcontext()
            with first_context:
                if self.sam is not None:
                    self._set_true_gradient(self.cfg.true_gradient)
                loss, logits = self._forward_backward(xc, yc)
                self._add_l2_gradient()
            if self.sam is not None:
                self._set_true_gradient(False)
                self.sam.first_step(zero_grad=True)
                if self.sam.last_grad_norm is not None:
                    g, e = self.sam.last_grad_norm, self.sam.last_perturbation_norm
                    if self.scaler is not None:  # the gradients carry the loss scale (e does not)
                        g = g / self.scaler._scale.to(g.device)
                    grad_norm, e_norm = (g, e) if grad_norm is None else (grad_norm + g, e_norm + e)
                self.draws.replay()
                # The L2 gradient at w + e goes in BEFORE the backward, which accumulates onto it: under
                # DDP the all-reduce then averages it with the loss gradient (each replica has its own e);
                # added afterwards, each replica would step with its own l2 * (w + e) and drift apart.
                self._add_l2_gradient()
                frozen = running_stats_frozen(self._batchnorms) if self.cfg.bn_stats == "first_pass" else contextlib.nullcontext()
                with frozen:
                    loss, logits = self._forward_backward(xc, yc)
                self.sam.unperturb()
            if len(chunks) > 1:
                self._accumulate(index)
            loss_sum += loss * yc.shape[0]
            correct += (logits.argmax(dim=1) == yc).sum()
        if len(chunks) > 1:
            self._use_accumulated(len(chunks))
        self._apply()
        if grad_norm is not None and len(chunks) > 1:
            grad_norm, e_norm = grad_norm / len(chunks), e_norm / len(chunks)
        return StepStats(loss_sum=loss_sum, correct=correct, count=int(y.shape[0]),
                         grad_norm=grad_norm, perturbation_norm=e_norm)

    def _apply(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
