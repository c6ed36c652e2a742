"""VaSSO: Variance Suppressed Sharpness-Aware Optimization (Li and Giannakis, NeurIPS 2023).

    opt = VaSSO(model.parameters(), torch.optim.SGD, rho=0.05, theta=0.9, lr=0.05, momentum=0.9)
    for x, y in batches:
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)     # e along a running mean of the gradient
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

From the gradient g at w (BingcongLi/VaSSO, solver/vasso.py, VASSO.first_step):
    step 0: ema <- g;  later: ema <- (1 - theta) ema + theta g     (theta weights the NEW gradient)
    e = rho ema / (||ema|| + 1e-7)
The gradient at w + e is applied as it is. The released code's first backward is synchronized by
DDP, so the running mean is of the gradient averaged over all devices and one e serves them all:
over emulated devices the rule averages the devices' gradients itself (`needs.first_pass_synchronized`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Sequence

import torch
from torch import Tensor

from sam_repro.optim.methods.base import DEVICE, MethodOptimizer, Needs, Rule, State
from sam_repro.optim.methods.kernels import device_norms, mul_rows_


@dataclass
class VaSSORule(Rule):
    rho: float
    theta: float
    eps: float = 1e-7

    needs: ClassVar[Needs] = Needs(first_pass_synchronized=True)
    persistent: ClassVar[dict[str, str]] = {"ema": DEVICE}

    def perturbation(self, params: Sequence[Tensor], grads: list[Tensor], state: State, lr: float) -> Tensor:
        k = grads[0].shape[0]
        mean = grads if k == 1 else [g.mean(dim=0, keepdim=True) for g in grads]
        if "ema" not in state:
            state["ema"] = [g.clone() for g in mean]
        else:
            ema = state["ema"]
            torch._foreach_mul_(ema, 1 - self.theta)
            torch._foreach_add_(ema, mean, alpha=self.theta)
        ema = state["ema"]
        norm = device_norms(ema)
        torch._foreach_copy_(grads, [e.expand_as(g) for e, g in zip(ema, grads)])
        mul_rows_(grads, (self.rho / (norm + self.eps)).expand(k))
        return norm.expand(k)


class VaSSO(MethodOptimizer):
    """VaSSO around a base optimizer (see the module docstring)."""

    rule: VaSSORule

    def __init__(self, params: Iterable[Any], base_optimizer_cls: type[torch.optim.Optimizer], rho: float = 0.05,
                 theta: float = 0.9, eps: float = 1e-7, **base_kwargs: Any) -> None:
        super().__init__(params, base_optimizer_cls, VaSSORule(rho, theta, eps), **base_kwargs)
