"""What the two backends of the step share: everything before the forward and after the backward.

The step (engine/step.py) splits a run's batch into devices: sets of `device_batch` examples
(SAM: `m` when it is smaller) that each behave like one of the paper's devices: BatchNorm normalizes
each device's examples alone, and SAM perturbs each device with its own gradient. Its backends, the
eager one (engine/eager.py) and the grid one (engine/grid.py), share from here:
- before the forward: the input's memory layout, the random draws SAM's two passes share, the
  stochastic layers' switches (true gradient in SAM's first pass, ShakeDrop's fresh mask in its
  perturbed pass), autocast, the loss, BatchNorm left untouched by the perturbed pass (`Passes`);
- after the backward (`apply_gradients`): the L2 term of `wd_mode=loss` (`add_l2_`), the gradients
  averaged over processes (DDP), unscaled (fp16), clipped at each member's own global norm
  (`grad_clip`: the applied gradient only), each member's base optimizer step, and the step's
  statistics (`member_stats`). Nothing here synchronizes with the host.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sam_repro.config import OptimConfig
from sam_repro.models.stochastic import RandomDraws, ShakeDrop, StochasticLayer
from sam_repro.optim.methods import MethodOptimizer
from sam_repro.optim.sam import SAM

BN_STATS = ("first_pass", "both")
SHAKEDROP_MASKS = ("fresh", "replay")  # SAM's perturbed pass: redraw the ShakeDrop mask (official) or replay it


@dataclass
class StepConfig:
    """The switches of one step (from `optim.*` and `engine.*`)."""

    m: Optional[int] = None  # SAM: examples per perturbation (divides device_batch); None = device_batch
    device_batch: Optional[int] = None  # examples per (emulated) device; None = the whole batch
    bn_stats: str = "first_pass"
    grad_clip: Optional[float] = None
    label_smoothing: float = 0.0
    true_gradient: bool = True
    shakedrop_mask: str = "fresh"
    autocast_dtype: Optional[torch.dtype] = None  # None = fp32
    channels_last: bool = False

    @classmethod
    def of(cls, optim: "OptimConfig", device_batch: Optional[int] = None, autocast_dtype: Optional[torch.dtype] = None,
           channels_last: bool = False) -> "StepConfig":
        """The step's switches as a run's `optim.*` config (and its device batch and runtime) set them."""
        return cls(m=optim.m, device_batch=device_batch, bn_stats=optim.bn_stats, grad_clip=optim.grad_clip,
                   label_smoothing=optim.label_smoothing, true_gradient=optim.true_gradient,
                   shakedrop_mask=optim.shakedrop_mask, autocast_dtype=autocast_dtype, channels_last=channels_last)


@dataclass
class StepStats:
    """Sums over one member's examples of one step, on the device (no host sync)."""

    loss_sum: Tensor
    correct: Tensor
    count: int
    # SAM only (None for SGD), means over the step's devices: the norm of the gradient at w (unscaled,
    # L2 term included) and the perturbation norm ||e||
    grad_norm: Optional[Tensor] = None
    perturbation_norm: Optional[Tensor] = None
    # the examples of the step's batch (the throughput counts them), when the sums are over fewer: the
    # subset ESAM's perturbed pass saw; 0: `count`
    images: int = 0


@dataclass
class Member:
    """What the step needs of one run: the plain module whose parameters its optimizer steps."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    sam: Optional[SAM | MethodOptimizer] = None  # SAM, one of its follow-ups (optim/methods/), or None: SGD
    grad_clip: Optional[float] = None


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


def batchnorm_buffers(model: nn.Module) -> dict[str, Tensor]:
    """The running statistics (and counts) of every BatchNorm layer that keeps them, by name."""
    return {f"{prefix}.{name}" if prefix else name: buffer
            for prefix, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
            for name, buffer in module.named_buffers(recurse=False) if buffer is not None}


@contextlib.contextmanager
def running_stats_frozen(layers: list[nn.Module]) -> Iterator[None]:
    """BatchNorm in train mode normalizes with batch statistics but updates nothing.

    With track_running_stats=False, PyTorch's BatchNorm neither updates running_mean/var nor
    counts num_batches_tracked, and still uses the batch's statistics in train mode."""
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


def device_size(n: int, cfg: StepConfig, uses_sam: bool) -> int:
    """Examples per device for a batch of n: the device batch, or SAM's m when it is smaller."""
    size = cfg.device_batch or n
    if uses_sam and cfg.m:
        size = min(size, cfg.m)
    return min(size, n)


def to_layout(x: Tensor, channels_last: bool) -> Tensor:
    """Images (..., C, H, W) with C innermost in memory (channels_last) when asked; any leading dims."""
    if not channels_last or x.dim() < 4:
        return x
    return x.movedim(-3, -1).contiguous().movedim(-1, -3)


def per_example_losses(logits: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Each example's cross-entropy over the last axis of `logits` (in fp32 under autocast), shaped as `y`."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none",
                             label_smoothing=label_smoothing)
    return losses.view(y.shape)


def add_l2_(grads: Sequence[Tensor], weights: Sequence[Tensor], l2: Sequence[float | Tensor],
            scale: Optional[Tensor] = None) -> None:
    """grads += l2 * weights, the gradient of 0.5 * l2 * ||w||^2 (`wd_mode=loss`), in the gradients'
    loss `scale` (fp16). Per tensor, l2 is a float (one run: one foreach kernel per value) or a tensor
    that broadcasts each member's own value over its rows."""
    by_value: dict[float, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
    with torch.no_grad():  # a gradient must not become part of a graph (the weights require grad)
        for grad, weight, coef in zip(grads, weights, l2):
            if isinstance(coef, Tensor):
                grad.add_(weight * (coef if scale is None else coef * scale))
            elif coef:
                by_value[coef][0].append(grad)
                by_value[coef][1].append(weight)
        for coef, (gs, ws) in by_value.items():
            if scale is None:
                torch._foreach_add_(gs, ws, alpha=coef)
            else:
                torch._foreach_add_(gs, torch._foreach_mul(ws, scale * coef))


def clip_(grads: Sequence[Tensor], max_norm: Optional[Tensor]) -> None:
    """Clip each member's gradient, rows i of the (P, ...) tensors `grads`, at its own global norm
    `max_norm[i]` (inf: no clipping), by torch's clip_grad_norm_ formula: g * min(1, c / (||g|| + 1e-6)),
    the norm accumulated in float32 at least."""
    if max_norm is None:
        return
    members = grads[0].shape[0]
    acc = torch.promote_types(grads[0].dtype, torch.float32)
    rows = [g[i] for g in grads for i in range(members)]
    norms = torch.stack(torch._foreach_norm(rows, 2, dtype=acc)).view(len(grads), members)
    coef = (max_norm.to(acc) / (torch.linalg.vector_norm(norms, 2, dim=0) + 1e-6)).clamp(max=1.0)
    if members == 1:
        torch._foreach_mul_(list(grads), coef[0].to(grads[0].dtype))
    else:
        for g in grads:
            g.mul_(coef.to(g.dtype).view(-1, *[1] * (g.dim() - 1)))


def clip_norms(members: Sequence[Member], device: torch.device) -> Optional[Tensor]:
    """The members' clipping norms as one (P,) tensor (inf where a member does not clip); None if none clips."""
    norms = [m.grad_clip or float("inf") for m in members]
    if all(n == float("inf") for n in norms):
        return None
    return torch.tensor(norms, dtype=torch.float64, device=device)


def apply_gradients(members: Sequence[Member], grads: Sequence[Tensor], max_norm: Optional[Tensor],
                    active: Sequence[bool], scaler: Optional[torch.amp.GradScaler] = None,
                    grad_reduce: Optional[Callable[[list[Tensor]], None]] = None) -> None:
    """After the backward, for both backends: `grads` (P, ...) are the members' gradients (row i: the
    .grad of member i's parameters), averaged over processes by `grad_reduce`, unscaled by the fp16
    `scaler`, clipped per member; then every active member's optimizer steps (a diverged member is
    frozen) and every gradient is zeroed."""
    if grad_reduce is not None:
        grad_reduce(list(grads))
    if scaler is not None:
        scaler.unscale_(members[0].optimizer)  # fp16 runs are never packed: one member
    with torch.no_grad():
        clip_(grads, max_norm)
    for member, is_active in zip(members, active):
        if not is_active:
            continue
        if scaler is not None:
            scaler.step(member.optimizer)
        else:
            member.optimizer.step()
    if scaler is not None:
        scaler.update()
    for member in members:
        member.optimizer.zero_grad(set_to_none=False)


def loss_scale(scaler: Optional[torch.amp.GradScaler], device: torch.device) -> Optional[Tensor]:
    """fp16: the scale the gradients carry (an L2 term added to them must carry it too); None otherwise."""
    if scaler is None:
        return None
    if scaler._scale is None:  # the scaler creates its scale at its first scale() call
        scaler.scale(torch.ones((), device=device))
    return scaler._scale


def member_stats(loss_sum: Tensor, correct: Tensor, count: int, sam: Optional[SAM | MethodOptimizer],
                 loss_scale: Optional[Tensor], images: int = 0) -> StepStats:
    """One member's StepStats (`images`: the batch's examples where `count` is a subset of them); SAM's
    logged gradient norm at w without the fp16 loss scale."""
    grad_norm = e_norm = None
    if sam is not None and sam.last_grad_norm is not None:
        grad_norm, e_norm = sam.last_grad_norm, sam.last_perturbation_norm
        if loss_scale is not None:  # the gradients carry the loss scale (e does not)
            grad_norm = grad_norm / loss_scale.to(grad_norm.device)
    return StepStats(loss_sum=loss_sum, correct=correct, count=count, grad_norm=grad_norm, perturbation_norm=e_norm,
                     images=images)


class Passes:
    """What both backends do around a forward pass: the random draws SAM's two passes share, the
    stochastic layers' switches, autocast, the loss, BatchNorm left untouched by the perturbed pass."""

    def __init__(self, module: nn.Module, cfg: StepConfig, device: torch.device) -> None:
        self.module, self.cfg, self.device = module, cfg, device
        self.draws = RandomDraws(device)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.batchnorms = batchnorm_layers(module)
        self._stochastic = [m for m in module.modules() if isinstance(m, StochasticLayer)]
        for layer in self._stochastic:
            if isinstance(layer, ShakeDrop):
                layer.replay_mask = cfg.shakedrop_mask == "replay"

    @contextlib.contextmanager
    def first_pass(self, uses_sam: bool) -> Iterator[None]:
        """SAM's pass at w: shake layers use one coefficient both ways (`true_gradient`)."""
        for layer in self._stochastic:
            layer.true_gradient = uses_sam and self.cfg.true_gradient
        try:
            yield
        finally:
            for layer in self._stochastic:
                layer.true_gradient = False

    @contextlib.contextmanager
    def perturbed_pass(self) -> Iterator[None]:
        """SAM's pass at w + e: the first pass's draws replayed (ShakeDrop's mask fresh), and with
        `bn_stats=first_pass` the running statistics left alone."""
        self.draws.replay()
        for layer in self._stochastic:
            layer.perturbed_pass = True
        frozen = running_stats_frozen(self.batchnorms) if self.cfg.bn_stats == "first_pass" else contextlib.nullcontext()
        try:
            with frozen:
                yield
        finally:
            for layer in self._stochastic:
                layer.perturbed_pass = False

    def autocast(self) -> ContextManager:
        return torch.autocast(self.device.type, dtype=self.cfg.autocast_dtype or torch.float32,
                              enabled=self.cfg.autocast_dtype is not None)

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy over the examples, in fp32 under autocast."""
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return self.criterion(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


