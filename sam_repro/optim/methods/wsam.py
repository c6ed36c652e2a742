"""WSAM: Weighted SAM, sharpness as a weighted regularization term (Yue et al., KDD 2023), decoupled.

    opt = WSAM(model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.88, max_norm=1.0, lr=0.1, momentum=0.9)
    for x, y in batches:
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)     # e from g0; keeps g0 clipped
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)    # base step with g0, then w -= lr * alpha * (g1 - g0)

intelligent-machine-learning/dlrover, atorch/atorch/optimizers/wsam.py, WeightedSAM (alpha = gamma / (1 - gamma)):
1. e = rho g0 / (||g0|| + 1e-12) from the device's own, unclipped gradient at w;
2. g0 is averaged over all devices, then clipped at `max_norm` (clip_grad_norm_'s formula) into g0';
3. the gradient at w + e, averaged and clipped the same way, is g1';
4. decoupled: the base optimizer steps with g0' (its weight decay and momentum see g0' only), then
   w <- w - lr * alpha * (g1' - g0'), outside the base optimizer; coupled (decouple=False): the base
   optimizer steps with alpha g1' + (1 - alpha) g0'.
The clipping is the method's own, on both gradients, before they are combined; max_norm=None clips nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Optional, Sequence

import torch
from torch import Tensor

from sam_repro.optim.methods.base import COMBINE_ON_MEAN, MethodOptimizer, Needs, Rule, State, sam_direction_, scratch
from sam_repro.optim.methods.kernels import clip_rows_


@dataclass
class WSAMRule(Rule):
    rho: float
    gamma: float
    max_norm: Optional[float] = 1.0
    decouple: bool = True
    eps: float = 1e-12

    needs: ClassVar[Needs] = Needs(combine=COMBINE_ON_MEAN, after_step=True)

    @property
    def alpha(self) -> float:
        """The sharpness term's weight, gamma / (1 - gamma)."""
        return self.gamma / (1 - self.gamma)

    @staticmethod
    def _mean(grads: Sequence[Tensor], out: list[Tensor]) -> None:
        """out <- the devices' mean gradient (1, *shape)."""
        if grads[0].shape[0] == 1:
            torch._foreach_copy_(out, list(grads))
        else:
            for o, g in zip(out, grads):
                torch.mean(g, dim=0, keepdim=True, out=o)

    def _clip(self, grads: list[Tensor]) -> None:
        if self.max_norm is not None:
            clip_rows_(grads, self.max_norm)

    def perturbation(self, params: Sequence[Tensor], grads: list[Tensor], state: State, lr: float) -> Tensor:
        self._mean(grads, scratch(state, "grad_w", [g[:1] for g in grads]))
        return sam_direction_(grads, self.rho, self.eps)

    def kept_first_gradient(self, state: State) -> list[Tensor]:
        return state["grad_w"]

    def combine(self, grads: list[Tensor], state: State) -> None:
        g0 = state["grad_w"]
        self._clip(g0)
        g1 = scratch(state, "sharpness", g0)
        self._mean(grads, g1)
        self._clip(g1)
        if self.decouple:
            torch._foreach_sub_(g1, g0)  # the sharpness g1' - g0', applied after the base step
            applied = g0
        else:
            torch._foreach_mul_(g1, self.alpha)
            torch._foreach_add_(g1, g0, alpha=1 - self.alpha)
            applied = g1
        torch._foreach_copy_(grads, [a.expand_as(g) for a, g in zip(applied, grads)])

    def after_step(self, params: Sequence[Tensor], state: State, lrs: Sequence[float]) -> None:
        if not self.decouple:
            return
        sharpness = [s[0] for s in state["sharpness"]]
        by_lr: dict[float, list[int]] = {}
        for i, lr in enumerate(lrs):
            by_lr.setdefault(lr, []).append(i)
        for lr, index in by_lr.items():
            torch._foreach_add_([params[i] for i in index], [sharpness[i] for i in index], alpha=-lr * self.alpha)


class WSAM(MethodOptimizer):
    """WSAM around a base optimizer (see the module docstring)."""

    rule: WSAMRule

    def __init__(self, params: Iterable[Any], base_optimizer_cls: type[torch.optim.Optimizer], rho: float = 0.05,
                 gamma: float = 0.88, max_norm: Optional[float] = 1.0, decouple: bool = True, eps: float = 1e-12,
                 **base_kwargs: Any) -> None:
        super().__init__(params, base_optimizer_cls, WSAMRule(rho, gamma, max_norm, decouple, eps), **base_kwargs)
