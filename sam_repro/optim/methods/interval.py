"""Interval SAM: a SAM step every `interval` steps, plain steps between, as MosaicML Composer does it.

    opt = IntervalSAM(model.parameters(), torch.optim.SGD, rho=0.5, interval=10, lr=0.1, momentum=0.9)
    for x, y in batches:
        loss_fn(model(x), y).backward()
        if opt.first_step(zero_grad=True):     # True on SAM steps only
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

mosaicml/composer, composer/algorithms/sam/sam.py, SAMOptimizer.step: with a step counter t from 0,
step t is a SAM step (e = rho g / (||g|| + 1e-12), the gradient at w + e applied) when
(t + 1) % interval == 0, else the gradient at w is applied (one forward/backward). interval = 1 is SAM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Sequence

import torch
from torch import Tensor

from sam_repro.optim.methods.base import HOST, MethodOptimizer, Needs, Rule, State, counter, sam_direction_


@dataclass
class IntervalSAMRule(Rule):
    rho: float
    interval: int
    eps: float = 1e-12

    needs: ClassVar[Needs] = Needs(skips_perturbation=True)
    persistent: ClassVar[dict[str, str]] = {"step": HOST}

    def perturbs(self, state: State) -> bool:
        return (int(counter(state)) + 1) % self.interval == 0

    def passes_per_step(self) -> tuple[float, float]:
        return 1 + 1 / self.interval, 1 + 1 / self.interval

    def perturbation(self, params: Sequence[Tensor], grads: list[Tensor], state: State, lr: float) -> Tensor:
        return sam_direction_(grads, self.rho, self.eps)

    def end_step(self, state: State) -> None:
        counter(state).add_(1)


class IntervalSAM(MethodOptimizer):
    """Composer's interval SAM around a base optimizer (see the module docstring)."""

    rule: IntervalSAMRule

    def __init__(self, params: Iterable[Any], base_optimizer_cls: type[torch.optim.Optimizer], rho: float = 0.05,
                 interval: int = 1, eps: float = 1e-12, **base_kwargs: Any) -> None:
        super().__init__(params, base_optimizer_cls, IntervalSAMRule(rho, interval, eps), **base_kwargs)
