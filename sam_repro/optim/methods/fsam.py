"""F-SAM: Friendly Sharpness-Aware Minimization (Li et al., CVPR 2024).

    opt = FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.2, sigma=1.0, lmbda=0.6, lr=0.05, momentum=0.9)
    for x, y in batches:
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)     # e along g - sigma * m (m: a running mean of g)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

Per device, from the gradient g at w (nblt/F-SAM, utils.py, FriendlySAM.first_step):
    step 0:  m <- g,  d = g                       (bitwise SAM)
    later:   d = g - sigma * m_old,  m <- lmbda * m_old + (1 - lmbda) * g
    e = rho d / (||d|| + 1e-12)
The gradient at w + e is applied as it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Sequence

import torch
from torch import Tensor

from sam_repro.optim.methods.base import DEVICE, MethodOptimizer, Rule, State, check_rows, sam_direction_


@dataclass
class FriendlySAMRule(Rule):
    rho: float
    sigma: float
    lmbda: float
    eps: float = 1e-12

    persistent: ClassVar[dict[str, str]] = {"momentum": DEVICE}

    def perturbation(self, params: Sequence[Tensor], grads: list[Tensor], state: State, lr: float) -> Tensor:
        if "momentum" not in state:
            state["momentum"] = [g.clone() for g in grads]
        else:
            m = state["momentum"]
            check_rows(state, "momentum", grads)
            # d = g - sigma m_old, then m = lmbda m_old + (1 - lmbda) g = (lmbda + (1 - lmbda) sigma) m_old
            # + (1 - lmbda) d: the same update without a copy of g
            torch._foreach_add_(grads, m, alpha=-self.sigma)
            torch._foreach_mul_(m, self.lmbda + (1 - self.lmbda) * self.sigma)
            torch._foreach_add_(m, grads, alpha=1 - self.lmbda)
        return sam_direction_(grads, self.rho, self.eps)


class FriendlySAM(MethodOptimizer):
    """F-SAM around a base optimizer (see the module docstring)."""

    rule: FriendlySAMRule

    def __init__(self, params: Iterable[Any], base_optimizer_cls: type[torch.optim.Optimizer], rho: float = 0.2,
                 sigma: float = 1.0, lmbda: float = 0.6, eps: float = 1e-12, **base_kwargs: Any) -> None:
        super().__init__(params, base_optimizer_cls, FriendlySAMRule(rho, sigma, lmbda, eps), **base_kwargs)
