"""LookSAM (Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022).

    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=5, alpha=0.7, lr=0.1, momentum=0.9)
    for x, y in batches:
        loss_fn(model(x), y).backward()
        if opt.first_step(zero_grad=True):     # every k-th step: a SAM step that stores g_v
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)        # between them: g + alpha ||g|| / ||g_v|| g_v

No official code exists; this is the paper's Algorithm 1, per device, with a step counter t from 0:
    t % k == 0:  e = rho g / (||g|| + eps);  g_s = gradient at w + e (applied);
                 g_v = g_s - (g . g_s / (||g||^2 + eps)) g     (g_s's component orthogonal to g, stored)
    otherwise:   applied g_s = g + alpha ||g|| / (||g_v|| + eps) g_v    (one forward/backward)
The eps (1e-12) in the two divisions is ours (the paper writes none). `projection` chooses the reading
of the vectors: "model" (the default: the paper writes g, g_s, g_v as vectors over all parameters)
takes one projection and one norm ratio over the whole model; "tensor" projects each tensor on its own
gradient and rescales each with its own ||g_i|| / ||g_v,i||, as the widespread port
(pytorch_optimizer's LookSAM) does: each tensor's g_v is then orthogonal to that tensor's gradient,
and the stored component is reweighted layer by layer (what Look-LayerSAM's layer-wise scaling builds on).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Sequence

import torch
from torch import Tensor

from sam_repro.optim.methods.base import (COMBINE_PER_DEVICE, DEVICE, HOST, MethodOptimizer, Needs, Rule, State,
                                          check_rows, counter, sam_direction_, scratch)
from sam_repro.optim.methods.kernels import (add_rows_, device_dots, device_norms, tensor_dots, tensor_norms)

LOOKSAM_PROJECTIONS = ("model", "tensor")


@dataclass
class LookSAMRule(Rule):
    rho: float
    k: int
    alpha: float
    projection: str = "model"
    eps: float = 1e-12

    needs: ClassVar[Needs] = Needs(combine=COMBINE_PER_DEVICE, plain_per_device=True, skips_perturbation=True)
    persistent: ClassVar[dict[str, str]] = {"step": HOST, "g_v": DEVICE}

    def __post_init__(self) -> None:
        if self.projection not in LOOKSAM_PROJECTIONS:
            raise ValueError(f"projection={self.projection!r} is invalid: choose one of {', '.join(LOOKSAM_PROJECTIONS)}")

    def perturbs(self, state: State) -> bool:
        return int(counter(state)) % self.k == 0

    def passes_per_step(self) -> tuple[float, float]:
        return 1 + 1 / self.k, 1 + 1 / self.k

    def perturbation(self, params: Sequence[Tensor], grads: list[Tensor], state: State, lr: float) -> Tensor:
        torch._foreach_copy_(scratch(state, "grad_w", grads), grads)
        return sam_direction_(grads, self.rho, self.eps)

    def combine(self, grads: list[Tensor], state: State) -> None:
        g = state["grad_w"]
        if "g_v" in state:
            check_rows(state, "g_v", grads)
        g_v = scratch(state, "g_v", grads)
        torch._foreach_copy_(g_v, grads)
        if self.projection == "model":
            coef = device_dots(g, grads) / (device_norms(g).square() + self.eps)
        else:
            coef = tensor_dots(g, grads) / (tensor_norms(g).square() + self.eps)
        add_rows_(g_v, g, -coef)

    def plain(self, grads: list[Tensor], state: State) -> None:
        if "g_v" not in state:
            return  # no SAM step yet (only with a counter that does not start at 0): plain SGD
        g_v = state["g_v"]
        check_rows(state, "g_v", grads)
        if self.projection == "model":
            coef = self.alpha * device_norms(grads) / (device_norms(g_v) + self.eps)
        else:
            coef = self.alpha * tensor_norms(grads) / (tensor_norms(g_v) + self.eps)
        add_rows_(grads, g_v, coef)

    def end_step(self, state: State) -> None:
        counter(state).add_(1)


class LookSAM(MethodOptimizer):
    """LookSAM around a base optimizer (see the module docstring)."""

    rule: LookSAMRule

    def __init__(self, params: Iterable[Any], base_optimizer_cls: type[torch.optim.Optimizer], rho: float = 0.05,
                 k: int = 5, alpha: float = 0.7, projection: str = "model", eps: float = 1e-12,
                 **base_kwargs: Any) -> None:
        super().__init__(params, base_optimizer_cls, LookSAMRule(rho, k, alpha, projection, eps), **base_kwargs)
