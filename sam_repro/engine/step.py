"""ONE training step for SGD and SAM (sam=None is SGD), with the official code's semantics.

A step sees the batch of one process. The batch is split into groups that each behave like one of
the paper's devices (`device_batch` examples; SAM: `m` examples when m is smaller): each group's
BatchNorm normalizes over that group alone, and SAM perturbs each group with its own gradient.
Two paths compute this; which one runs depends only on the group size:

- one group (the whole batch; what one real device of a DDP run does): plain autograd.
  1. forward/backward at w (the random draws captured first; shake layers in "true gradient"
     mode when `optim.true_gradient`), L2 gradient added in `wd_mode=loss`;
  2. SAM only: w -> w + e(w) (SAM.first_step); the same random draws replayed (ShakeDrop's mask
     fresh, as the official code); L2 gradient at w + e, then forward/backward at w + e(w)
     accumulating onto it (BatchNorm running statistics untouched when `bn_stats=first_pass`);
     w restored exactly.
- k groups (devices emulated on one GPU, or m-sharpness inside a device): the same two passes,
  vectorized over the groups with torch.func instead of run one after another (k times the kernel
  launches). Each group gets its own copy of the BatchNorm running statistics (vmap over them), and
  the copies are averaged after the step, exactly what k real devices end with once the official
  code averages their statistics (r <- 0.9 r + 0.1 * mean_g s_g, linear in r). SGD: one vmapped
  forward with shared weights and one backward. SAM: per-group gradients at w (vmap of grad), e_g
  for every group at once (SAM.grouped_perturbation), then one vmapped forward at the k perturbed
  weight sets w + e_g, whose backward sums the groups' gradients into w.grad (then / k).
Then the gradients are averaged over processes (DDP), clipped by global norm (`grad_clip`: the
applied gradient only), and the base optimizer steps. Training metrics come from the applied pass
(the perturbed one for SAM), as in the official code.

Nothing here synchronizes with the host: the step returns device tensors that the loop sums and
reads once per logging interval.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Optional

import torch
from torch import Tensor, nn

from torch.func import functional_call, grad, vmap

from sam_repro.models.stochastic import RandomDraws, ShakeDrop, StochasticLayer
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


def batchnorm_buffers(model: nn.Module) -> dict[str, Tensor]:
    """The running statistics (and counts) of every BatchNorm layer that keeps them, by name."""
    return {f"{prefix}.{name}" if prefix else name: buffer
            for prefix, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
            for name, buffer in module.named_buffers(recurse=False) if buffer is not None}


def group_size(n: int, cfg: StepConfig, uses_sam: bool) -> int:
    """Examples per group for a batch of n: the device batch, or SAM's m when it is smaller."""
    size = cfg.device_batch or n
    if uses_sam and cfg.m:
        size = min(size, cfg.m)
    return min(size, n)


class FunctionalPasses:
    """What the step of one run (TrainStep) and the step of a pack (engine/pack.py) share: autocast,
    the loss, the stochastic layers' switches and the functional forward of `self.module` that
    torch.func vmaps. Set up by `_init_passes`."""

    def _init_passes(self, module: nn.Module, cfg: StepConfig, device: torch.device) -> None:
        self.module, self.cfg, self.device = module, cfg, device
        self.draws = RandomDraws(device)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        # Found once: the step toggles these twice per step.
        self._batchnorms = batchnorm_layers(module)
        self._stochastic = [m for m in module.modules() if isinstance(m, StochasticLayer)]
        for layer in self._stochastic:
            if isinstance(layer, ShakeDrop):
                layer.replay_mask = cfg.shakedrop_mask == "replay"
        self._norm_params = {f"{prefix}.{n}" if prefix else n for prefix, m in module.named_modules()
                             if isinstance(m, nn.modules.batchnorm._NormBase) for n, _ in m.named_parameters(recurse=False)}
        self._bn_in_float = False
        if cfg.autocast_dtype is not None:
            self._install_batchnorm_hooks()

    def _set_true_gradient(self, enabled: bool) -> None:
        for layer in self._stochastic:
            layer.true_gradient = enabled

    def _set_perturbed_pass(self, perturbed: bool) -> None:
        for layer in self._stochastic:
            layer.perturbed_pass = perturbed

    def _autocast(self) -> ContextManager:
        return torch.autocast(self.device.type, dtype=self.cfg.autocast_dtype or torch.float32,
                              enabled=self.cfg.autocast_dtype is not None)

    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the loss in fp32 under autocast
        return self.criterion(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def _group_logits(self, weights: dict[str, Tensor], x: Tensor) -> Tensor:
        """The module's logits for one group's examples, with `weights` (parameters and/or BatchNorm
        buffers) in place of the module's own; vmapped over the groups."""
        with self._autocast(), self._batchnorm_in_float():
            return functional_call(self.module, weights, (x,))

    @contextlib.contextmanager
    def _batchnorm_in_float(self) -> Iterator[None]:
        """Under autocast, BatchNorm reads its input in its statistics' dtype (fp32) and hands back
        the autocast dtype: vmap's batch-norm rule, unlike the plain kernel, refuses a bf16 input with
        fp32 running statistics. The hooks are installed once (__init__) and act only in here."""
        self._bn_in_float = self.cfg.autocast_dtype is not None
        try:
            yield
        finally:
            self._bn_in_float = False

    def _install_batchnorm_hooks(self) -> None:
        def to_float(module: nn.Module, args: tuple) -> Optional[tuple]:
            if not self._bn_in_float:
                return None
            return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

        def back(module: nn.Module, args: tuple, out: Tensor) -> Optional[Tensor]:
            return out.to(self.cfg.autocast_dtype) if self._bn_in_float else None

        for layer in self._batchnorms:
            layer.register_forward_pre_hook(to_float)
            layer.register_forward_hook(back)

    def _low_precision(self, weights: dict[str, Tensor], x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """What autocast does to a convolution's input and weights on the plain path, done by hand:
        under vmap with batched weights autocast casts neither (BatchNorm's stay fp32, see above)."""
        low = self.cfg.autocast_dtype
        if low is None:
            return weights, x
        return {n: (w.to(low) if n not in self._norm_params else w) for n, w in weights.items()}, x.to(low)


class TrainStep(FunctionalPasses):
    """Callable (x, y) -> StepStats that updates the model in place."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sam: Optional[SAM],
        cfg: StepConfig,
        scaler: Optional[torch.amp.GradScaler] = None,
        first_pass_context: Callable[[], ContextManager] = contextlib.nullcontext,
        module: Optional[nn.Module] = None,
        grad_reduce: Optional[Callable[[list[Tensor]], None]] = None,
    ) -> None:
        """`model` runs the one-group path (a DDP wrapper and/or torch.compile'd); `module` is the plain
        nn.Module under it, which the grouped path calls functionally (default: `model`).
        `first_pass_context` wraps the first (unperturbed) forward AND backward of the one-group path:
        DDP passes `model.no_sync` there so that each replica perturbs with its own gradient.
        `grad_reduce` averages the gradients over processes after a grouped step (DDP's own hooks only
        run on the one-group path)."""
        self.model, self.optimizer, self.sam, self.scaler = model, optimizer, sam, scaler
        self.first_pass_context = first_pass_context
        self.grad_reduce = grad_reduce
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self._init_passes(module if module is not None else model, cfg, self.params[0].device)
        # The grouped path's view of the parameters (by name, in the optimizer's order) and buffers.
        names = {id(p): n for n, p in self.module.named_parameters()}
        self._param_names = [names[id(p)] for p in self.params]
        self._l2 = [g.get("l2", 0.0) for g in optimizer.param_groups for _ in g["params"]]
        self._bn_buffers = batchnorm_buffers(self.module)

    def _backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _forward_backward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with self._autocast():
            logits = self.model(x)
            loss = self._loss(logits, y)
        self._backward(loss)
        return loss.detach(), logits.detach()

    def _loss_scale(self) -> float | Tensor:
        # gradients carry the loss scale under fp16; the L2 term must too
        if self.scaler is None:
            return 1.0
        if self.scaler._scale is None:  # the scaler creates its scale at its first scale() call
            self.scaler.scale(torch.ones((), device=self.device))
        return self.scaler._scale

    def _add_l2(self, grad: Tensor, weight: Tensor, l2: float) -> None:
        """grad += l2 * weight, in the loss scale of the gradients."""
        if self.scaler is None:
            grad.add_(weight, alpha=l2)
        else:
            grad.add_(weight * (self._loss_scale() * l2))

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
            else:
                torch._foreach_add_(grads, torch._foreach_mul(params, self._loss_scale() * l2))

    def group_size(self, n: int) -> int:
        """Examples per group for a batch of n (see `group_size`)."""
        return group_size(n, self.cfg, self.sam is not None)

    # -- the step -------------------------------------------------------------------------------
    def __call__(self, x: Tensor, y: Tensor) -> StepStats:
        if self.cfg.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        size = self.group_size(x.shape[0])
        if x.shape[0] % size:
            raise ValueError(f"a batch of {x.shape[0]} examples cannot be split into groups of {size}")
        loss, logits = self._one_group(x, y) if size == x.shape[0] else self._grouped(x, y, size)
        self._apply()
        loss_sum = loss * y.shape[0]
        correct = (logits.reshape(-1, logits.shape[-1]).argmax(dim=1) == y).sum()
        grad_norm = e_norm = None
        if self.sam is not None and self.sam.last_grad_norm is not None:
            # set by first_step (one device) or grouped_perturbation (means over the devices)
            grad_norm, e_norm = self.sam.last_grad_norm, self.sam.last_perturbation_norm
            if self.scaler is not None:  # the gradients carry the loss scale (e does not)
                grad_norm = grad_norm / self._loss_scale().to(grad_norm.device)
        return StepStats(loss_sum=loss_sum, correct=correct, count=int(y.shape[0]),
                         grad_norm=grad_norm, perturbation_norm=e_norm)

    def _one_group(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The batch is one device: plain autograd, SAM through first_step/unperturb."""
        self.draws.capture()
        first_context = self.first_pass_context() if self.sam is not None else contextlib.nullcontext()
        with first_context:
            if self.sam is not None:
                self._set_true_gradient(self.cfg.true_gradient)
            loss, logits = self._forward_backward(x, y)
            self._add_l2_gradient()
        if self.sam is None:
            return loss, logits
        self._set_true_gradient(False)
        self.sam.first_step(zero_grad=True)
        self.draws.replay()
        # The L2 gradient at w + e goes in BEFORE the backward, which accumulates onto it: under
        # DDP the all-reduce then averages it with the loss gradient (each replica has its own e);
        # added afterwards, each replica would step with its own l2 * (w + e) and drift apart.
        self._add_l2_gradient()
        frozen = running_stats_frozen(self._batchnorms) if self.cfg.bn_stats == "first_pass" else contextlib.nullcontext()
        self._set_perturbed_pass(True)
        try:
            with frozen:
                loss, logits = self._forward_backward(x, y)
        finally:
            self._set_perturbed_pass(False)
        self.sam.unperturb()
        return loss, logits

    # -- k groups at once (torch.func) -----------------------------------------------------------
    def _per_group_gradients(self, buffers: dict[str, Tensor], xg: Tensor, yg: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """Each group's gradient at w (k, *shape per parameter; vmap of grad, the weights shared, so
        every convolution runs once over all groups), the mean loss and the logits."""
        def loss_of(weights: dict[str, Tensor], stats: dict[str, Tensor], x: Tensor, y: Tensor):
            logits = self._group_logits({**weights, **stats}, x)
            loss = self._loss(logits, y)
            scaled = loss * self._loss_scale() if self.scaler is not None else loss
            return scaled, (loss.detach(), logits.detach())

        weights = {n: p.detach() for n, p in zip(self._param_names, self.params)}
        per_group, (loss, logits) = vmap(grad(loss_of, has_aux=True), in_dims=(None, 0, 0, 0),
                                         randomness="different")(weights, buffers, xg, yg)
        # A parameter the loss never reaches gets vmap's expanded zeros (stride 0 over the groups): it
        # needs memory of its own, since the L2 term is added to the gradients in place.
        grads = [per_group[n] if per_group[n].stride(0) else per_group[n].clone() for n in self._param_names]
        return grads, loss.mean(), logits

    def _stacked_buffers(self, k: int) -> dict[str, Tensor]:
        """One copy of every BatchNorm running statistic per group (each device keeps its own)."""
        return {n: b.unsqueeze(0).expand(k, *b.shape).clone() for n, b in self._bn_buffers.items()}

    @torch.no_grad()
    def _average_buffers(self, stacked: dict[str, Tensor]) -> None:
        """The devices' statistics averaged, as the official code averages them before evaluation."""
        for name, buffer in self._bn_buffers.items():
            value = stacked[name]
            if buffer.is_floating_point():  # the mean in at least fp32 (bf16 statistics would lose it)
                buffer.copy_(value.mean(0, dtype=torch.promote_types(value.dtype, torch.float32)))
            else:  # num_batches_tracked: every device counted the same steps
                buffer.copy_(value[0])

    def _grouped(self, x: Tensor, y: Tensor, size: int) -> tuple[Tensor, Tensor]:
        k = x.shape[0] // size
        xg, yg = x.view(k, size, *x.shape[1:]), y.view(k, size)
        buffers = self._stacked_buffers(k)
        self.draws.capture()
        if self.sam is None:
            # one forward with shared weights (vmap folds the devices into each convolution's batch,
            # BatchNorm sees each device alone) and one backward: the mean of the devices' gradients
            # (the weights passed in, cast by hand: autocast leaves a convolution under vmap in fp32)
            weights, xg = self._low_precision(dict(zip(self._param_names, self.params)), xg)
            logits = vmap(lambda stats, x_dev: self._group_logits({**weights, **stats}, x_dev),
                          randomness="different")(buffers, xg)
            loss = self._loss(logits, yg)
            self._backward(loss)
            self._add_l2_gradient()
        else:
            loss, logits = self._grouped_sam(xg, yg, buffers)
        self._average_buffers(buffers)
        if self.grad_reduce is not None:
            self.grad_reduce([p.grad for p in self.params])
        return loss.detach(), logits.detach()

    def _grouped_sam(self, xg: Tensor, yg: Tensor, buffers: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        # 1. each group's gradient at w, L2 term included
        self._set_true_gradient(self.cfg.true_gradient)
        grads, _, _ = self._per_group_gradients(buffers, xg, yg)
        self._set_true_gradient(False)
        with torch.no_grad():
            for g, w, l2 in zip(grads, self.params, self._l2):
                if l2:
                    self._add_l2(g, w, l2)
        # 2. e_g for every group from its own gradient, then the k perturbed weight sets
        e = self.sam.grouped_perturbation(self.params, grads)
        perturbed = {n: p.unsqueeze(0) + e_p for n, p, e_p in zip(self._param_names, self.params, e)}
        perturbed, xg = self._low_precision(perturbed, xg)
        self.draws.replay()
        self._set_perturbed_pass(True)
        try:
            # the groups' statistics go in either way (BatchNorm in eval mode, when finetuning, reads them)
            frozen = running_stats_frozen(self._batchnorms) if self.cfg.bn_stats == "first_pass" else contextlib.nullcontext()
            with frozen:  # first_pass: the perturbed pass leaves the statistics alone
                logits = vmap(self._group_logits, in_dims=(0, 0), randomness="different")({**perturbed, **buffers}, xg)
            loss = self._loss(logits, yg)
            self._backward(loss)  # w.grad = mean over groups of the gradient at w + e_g
        finally:
            self._set_perturbed_pass(False)
        with torch.no_grad():  # the L2 gradient at w + e_g, averaged: l2 * (w + mean_g e_g)
            for p, e_p, l2 in zip(self.params, e, self._l2):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if l2:
                    self._add_l2(p.grad, p + e_p.mean(0), l2)
        return loss, logits

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
