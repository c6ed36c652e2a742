"""GSAM: Surrogate Gap Guided Sharpness-Aware Minimization (Zhuang et al., ICLR 2022).

    opt = GSAM(model.parameters(), torch.optim.SGD, rho_max=0.05, rho_min=0.01, alpha=0.3,
               lr=0.1, momentum=0.9, weight_decay=5e-4)     # lr_max = 0.1 (the lr given), lr_min = 0
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt.base_optimizer, T_max=steps)
    for x, y in batches:
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)       # w -> w + e, rho_t from the lr in use
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)      # g1 - alpha * (g0's component orthogonal to g1), base step
        sched.step()

Per device, from g0 (at w) and g1 (at w + e):
    rho_t = rho_min + (rho_max - rho_min) (lr - lr_min) / (lr_max - lr_min)   (rho_max if lr_max = lr_min)
    v = g0 - cos(g0, g1) ||g0|| g1 / (||g1|| + eps),   applied g = g1 - alpha v
The perturbation has three forms (`adaptive`):
- "none": e = rho_t g0 / (||g0|| + eps): the paper's Algorithm 1, and the official JAX code's default
  (google-research/big_vision, trainers/proj/gsam/gsam.py, adaptive_perturbation=False);
- "pytorch": e = rho_t w^2 g0 / (||w g0|| + eps), the ASAM form with T = |w| on every tensor: the
  author's PyTorch code with adaptive=True (juntang-zhuang/GSAM, gsam/gsam.py), which its CIFAR
  example uses (rho 2.0, alpha 0.4);
- "jax": e = rho_t |w| g0 / (||g0|| + eps): big_vision's adaptive_perturbation=True.
The decomposition is the PyTorch code's, with eps in its two divisions; the JAX code divides by
||g1|| without eps (a difference of order eps / ||g1||).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Optional, Sequence

import torch
from torch import Tensor

from sam_repro.optim.methods.base import COMBINE_PER_DEVICE, MethodOptimizer, Needs, Rule, State, scratch
from sam_repro.optim.methods.kernels import add_rows_, device_dots, device_norms, mul_rows_

GSAM_ADAPTIVE = ("none", "pytorch", "jax")


@dataclass
class GSAMRule(Rule):
    rho_max: float
    rho_min: float
    alpha: float
    lr_max: float
    lr_min: float = 0.0
    adaptive: str = "none"
    eps: float = 1e-12

    needs: ClassVar[Needs] = Needs(combine=COMBINE_PER_DEVICE)

    def __post_init__(self) -> None:
        if self.adaptive not in GSAM_ADAPTIVE:
            raise ValueError(f"adaptive={self.adaptive!r} is invalid: choose one of {', '.join(GSAM_ADAPTIVE)}")

    def rho(self, lr: float) -> float:
        """rho_t, proportional to the learning rate between (lr_min, rho_min) and (lr_max, rho_max)."""
        if self.lr_max == self.lr_min:
            return self.rho_max
        return self.rho_min + (self.rho_max - self.rho_min) * (lr - self.lr_min) / (self.lr_max - self.lr_min)

    def perturbation(self, params: Sequence[Tensor], grads: list[Tensor], state: State, lr: float) -> Tensor:
        return self.perturb_with_rho(params, grads, state, self.rho(lr))

    def perturb_with_rho(self, params: Sequence[Tensor], grads: list[Tensor], state: State, rho: float) -> Tensor:
        kept = scratch(state, "grad_w", grads)
        torch._foreach_copy_(kept, grads)  # g0, for the decomposition after the perturbed pass
        state["rho_t"] = rho
        plain_norm = device_norms(grads)
        if self.adaptive == "pytorch":
            torch._foreach_mul_(grads, [w.abs() for w in params])  # |w| g0: its norm scales e
            norm = device_norms(grads)
            torch._foreach_copy_(grads, kept)
            mul_rows_(grads, rho / (norm + self.eps))
            torch._foreach_mul_(grads, [w * w for w in params])
        else:
            mul_rows_(grads, rho / (plain_norm + self.eps))
            if self.adaptive == "jax":
                torch._foreach_mul_(grads, [w.abs() for w in params])
        return plain_norm

    def combine(self, grads: list[Tensor], state: State) -> None:
        g0 = state["grad_w"]
        n0, n1 = device_norms(g0), device_norms(grads)
        cos = device_dots(g0, grads) / (n1 * n0 + self.eps)
        add_rows_(g0, grads, -cos * n0 / (n1 + self.eps))  # g0 <- v, its component orthogonal to g1
        torch._foreach_add_(grads, g0, alpha=-self.alpha)


class GSAM(MethodOptimizer):
    """GSAM around a base optimizer; rho follows the first param group's lr (see the module docstring)."""

    rule: GSAMRule

    def __init__(self, params: Iterable[Any], base_optimizer_cls: type[torch.optim.Optimizer], rho_max: float = 0.05,
                 rho_min: float = 0.05, alpha: float = 0.4, lr_max: Optional[float] = None, lr_min: float = 0.0,
                 adaptive: str = "none", eps: float = 1e-12, **base_kwargs: Any) -> None:
        super().__init__(params, base_optimizer_cls, GSAMRule(rho_max, rho_min, alpha, 0.0, lr_min, adaptive, eps),
                         **base_kwargs)
        self.rule.lr_max = float(self.param_groups[0]["lr"]) if lr_max is None else lr_max
        self._rho: Optional[float] = None

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, rho: Optional[float] = None) -> bool:
        """As MethodOptimizer.first_step; `rho` replaces this step's rho_t (a schedule of your own)."""
        self._rho = rho
        try:
            return super().first_step(zero_grad)
        finally:
            self._rho = None

    @torch.no_grad()
    def device_perturbations(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        ours, work = self.ordered(params, grads)
        rho = self.rule.rho(self.lr) if self._rho is None else self._rho
        norm = self.rule.perturb_with_rho(ours, work, self.method_state, rho)
        self.last_grad_norm = norm.mean()
        self.last_perturbation_norm = device_norms(work).mean()
        return grads

    @property
    def last_rho(self) -> Optional[float]:
        """The rho_t of the last perturbation."""
        return self.method_state.get("rho_t")
