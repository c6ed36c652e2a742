"""The measured objective: the training loss of a fixed subset as a function of the parameters.

Everything the instruments compute (Hessian-vector products, per-chunk gradients, losses at
perturbed weights) goes through `torch.func.functional_call`, so the model's own parameters are
never modified: w + e is a new tuple of tensors, not an in-place edit that could be left behind.

BatchNorm: in `eval` mode (default) the running statistics normalize, so the loss of a batch is
the mean of per-example losses and does not depend on how the subset is cut into mini-batches.
In `train` mode each forward normalizes with its own batch statistics (a BatchNorm without
running statistics, so nothing is updated): the loss then depends on the batch, as in training.
In eval mode every BatchNorm is rewritten as the per-channel affine map it then is
(`AffineBatchNorm`, same parameters and buffers): the same function, whose second derivatives
cost less than those of the generic batch-norm kernel (about 20 % of a ResNet-20 HVP on the CPU).
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from sam_repro.sharpness.hvp import DEFAULT_GRAPH_BUDGET, DEFAULT_HVP, BatchLoss, Params, make_hvp

BN_MODES = ("eval", "train")
DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "fp64": torch.float64}


class AffineBatchNorm(nn.Module):
    """An eval-mode BatchNorm as x * scale + shift, scale = weight / sqrt(running_var + eps),
    shift = bias - running_mean * scale: the same function of the same parameters and buffers
    (names kept, so checkpoints, functional_call and interpolation see no difference)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        for name, p in bn.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in bn.named_buffers(recurse=False):
            self.register_buffer(name, b)
        self.eps = bn.eps
        self.affine = bn.affine

    def forward(self, x: Tensor) -> Tensor:
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.affine:
            shift = shift + self.bias
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return torch.addcmul(shift.view(shape), x, scale.view(shape))


# exactly these classes: a subclass may do more in its forward (timm's BatchNormAct2d adds the
# activation), and a module with hooks would lose them; those keep the native kernel
_PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _affine_batch_norms_(module: nn.Module) -> None:
    """Replace, in place, every plain BatchNorm that normalizes with running statistics (eval mode)."""
    for name, child in module.named_children():
        plain = type(child) in _PLAIN_BATCH_NORMS and not (child._forward_hooks or child._forward_pre_hooks)
        if plain and child.running_var is not None:
            setattr(module, name, AffineBatchNorm(child))
        else:
            _affine_batch_norms_(child)


def prepare_model(model: nn.Module, bn_mode: str, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` in the measured BatchNorm mode and dtype (the caller's model is untouched)."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode={bn_mode!r} must be one of {BN_MODES}")
    model = copy.deepcopy(model).to(dtype)
    if bn_mode == "train":
        # batch statistics in every forward, and no running-statistics update to leak out of the
        # measurement (in-place buffer updates are also not allowed under torch.func transforms)
        torch.func.replace_all_batch_norm_modules_(model)
        model.train()
    else:
        model.eval()
        _affine_batch_norms_(model)
    return model


@dataclass
class Objective:
    """L(w) = mean cross-entropy over (x, y) [+ 0.5 * l2 * ||w_decayed||^2], in mini-batches.

    `params` are the detached weights (a tuple in `names` order); `l2_mask[i]` says whether
    parameter i carries the L2 term (the run's `optim.wd_on_bn`)."""

    model: nn.Module
    names: Tuple[str, ...]
    params: Params
    buffers: Dict[str, Tensor]
    x: Tensor
    y: Tensor
    batch_size: int
    l2: float = 0.0
    l2_mask: Tuple[bool, ...] = ()
    label_smoothing: float = 0.0

    @classmethod
    def build(cls, model: nn.Module, x: Tensor, y: Tensor, batch_size: int, l2: float = 0.0,
              l2_on_bn: bool = True, label_smoothing: float = 0.0) -> "Objective":
        """The objective of an already prepared model (see `prepare_model`) on (x, y)."""
        named = [(n, p.detach()) for n, p in model.named_parameters() if p.requires_grad]
        names = tuple(n for n, _ in named)
        params = tuple(p for _, p in named)
        buffers = {n: b for n, b in model.named_buffers()}
        mask = tuple(bool(l2_on_bn or p.ndim > 1) for p in params)
        x = x.to(params[0].dtype)
        return cls(model, names, params, buffers, x, y, int(batch_size), float(l2), mask, float(label_smoothing))

    # -- losses -----------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.params)

    def logits(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        return functional_call(self.model, ({**self.buffers, **dict(zip(self.names, params))},), (x,))

    def data_loss(self, params: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy of one batch (no L2 term)."""
        return nn.functional.cross_entropy(self.logits(params, x), y, label_smoothing=self.label_smoothing)

    def l2_term(self, params: Sequence[Tensor]) -> Tensor:
        """0.5 * l2 * ||w||^2 over the decayed parameters (0 when weight decay is measured out)."""
        terms = [p.pow(2).sum() for p, on in zip(params, self.l2_mask) if on]
        return 0.5 * self.l2 * torch.stack(terms).sum() if self.l2 and terms else params[0].new_zeros(())

    def batch_loss(self, params: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy of one batch plus the L2 term: the loss whose curvature is measured."""
        return self.data_loss(params, x, y) + self.l2_term(params)

    def batches(self) -> list[tuple[Tensor, Tensor, float]]:
        """(x, y, weight) mini-batches of the subset; the weights (batch size / n) sum to 1."""
        out = []
        for at in range(0, self.n, self.batch_size):
            xb, yb = self.x[at:at + self.batch_size], self.y[at:at + self.batch_size]
            out.append((xb, yb, yb.shape[0] / self.n))
        return out

    @torch.no_grad()
    def evaluate(self, params: Sequence[Tensor]) -> tuple[float, float]:
        """(loss with the L2 term when it is in, error % without it) over the whole subset."""
        loss, wrong = 0.0, 0
        for xb, yb, w in self.batches():
            logits = self.logits(params, xb)
            loss += w * float(nn.functional.cross_entropy(logits, yb, label_smoothing=self.label_smoothing))
            wrong += int((logits.argmax(1) != yb).sum())
        return loss + float(self.l2_term(params)), 100.0 * wrong / self.n

    # -- derivatives ------------------------------------------------------------------------------
    def batch_losses(self) -> list[tuple[BatchLoss, float]]:
        """(params -> data loss of one mini-batch, its weight) for every mini-batch of the subset."""
        return [(functools.partial(self._batch_data_loss, xb, yb), w) for xb, yb, w in self.batches()]

    def _batch_data_loss(self, x: Tensor, y: Tensor, params: Sequence[Tensor]) -> Tensor:
        return self.data_loss(params, x, y)

    def hvp(self, v: Sequence[Tensor], mode: str = DEFAULT_HVP) -> Params:
        """One H v at w on parameter tuples (no graph kept for a next call: use `flat_hvp` for many)."""
        return self.flat_hvp(mode, graph_budget=0).params(v)

    # -- flat vectors (what the eigen-solvers work on) ----------------------------------------------
    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: Tensor) -> Params:
        out, at = [], 0
        for p in self.params:
            out.append(flat[at:at + p.numel()].view_as(p))
            at += p.numel()
        return tuple(out)

    def flat_hvp(self, mode: str = DEFAULT_HVP, graph_budget: int = DEFAULT_GRAPH_BUDGET) -> "HessianOperator":
        """v -> H v at w on flat vectors of length `dim` (mini-batches summed, the L2 term added),
        by the HVP `mode` (a key of hvp.HVP_MODES). Gradient graphs kept within `graph_budget`
        bytes live as long as the returned operator."""
        return HessianOperator(self, make_hvp(mode, self.batch_losses(), self.params, graph_budget))


class HessianOperator:
    """H of an Objective as an operator: `op(v)` on flat vectors (what the eigen-solvers take),
    `op.params(v)` on parameter tuples; `op.stats()` says how the products were computed."""

    def __init__(self, obj: Objective, products: Callable[[Sequence[Tensor]], Params]) -> None:
        self.obj, self.products = obj, products

    def params(self, v: Sequence[Tensor]) -> Params:
        v = tuple(v)
        out = list(self.products(v))
        if self.obj.l2:  # the Hessian of 0.5 * l2 * ||w||^2 is l2 * I on the decayed parameters
            out = [o.add(vi, alpha=self.obj.l2) if on else o for o, vi, on in zip(out, v, self.obj.l2_mask)]
        return tuple(out)

    def __call__(self, v: Tensor) -> Tensor:
        return self.obj.flatten(self.params(self.obj.unflatten(v)))

    def stats(self) -> dict:
        return self.products.stats()
