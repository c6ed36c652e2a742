"""SAM-ON and ASAM-ON: perturb only the normalization layers' parameters (Mueller et al., NeurIPS 2023).

    opt = SAMON(model.parameters(), torch.optim.SGD, perturbed=normalization_parameters(model),
                rho=0.5, lr=0.1, momentum=0.9)
    for x, y in batches:
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)     # only the normalization parameters move
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)    # every parameter is updated with the gradient at w + e

Per device (mueller-mp/SAM-ON, sam_on.py, SAM_ON / ASAM_ON.ascent_step), over the perturbed tensors S:
    SAM-ON:  e = rho g / (||g||_S + 1e-16)
    ASAM-ON: T = |w| + eta on the tensors named *weight* (on every tensor of S with normalize_bias),
             T = 1 elsewhere;  e = rho T^2 g / (||T g||_S + 1e-16)   (the elementwise, p = 2 form)
Tensors outside S get e = 0. The released code picks S by name ('norm' or 'bn' in the parameter's
name); `normalization_parameters(model)` picks them by module type (BatchNorm, LayerNorm, GroupNorm,
...), which agrees with the name rule on the authors' models and also finds the normalization layers
kept in unnamed containers (Shake-Shake's and PyramidNet's `branch.1`, ResNet-50's `downsample.1`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from sam_repro.optim.methods.base import MethodOptimizer, Rule, State
from sam_repro.optim.methods.kernels import device_norms, mul_rows_

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
SAMON_SELECT = ("type", "name")


def normalization_parameters(model: nn.Module, select: str = "type") -> list[nn.Parameter]:
    """The parameters SAM-ON perturbs: those of normalization modules ("type"), or, as the released
    code, those whose name contains 'norm' or 'bn' ("name")."""
    if select == "type":
        return [p for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)]
    if select == "name":
        return [p for n, p in model.named_parameters() if "norm" in n or "bn" in n]
    raise ValueError(f"select={select!r} is invalid: choose one of {', '.join(SAMON_SELECT)}")


@dataclass
class SAMONRule(Rule):
    rho: float
    perturbed: list[bool]  # per tensor, in the optimizer's parameter order
    scaled: Optional[list[bool]] = None  # ASAM-ON: where T = |w| + eta applies; None: SAM-ON (T = 1)
    eta: float = 0.0
    eps: float = 1e-16
    _index: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = [i for i, p in enumerate(self.perturbed) if p]

    def perturbation(self, params: Sequence[Tensor], grads: list[Tensor], state: State, lr: float) -> Tensor:
        chosen = [grads[i] for i in self._index]
        left = [g for i, g in enumerate(grads) if not self.perturbed[i]]
        if left:
            torch._foreach_zero_(left)
        if not chosen:
            return torch.zeros(grads[0].shape[0], dtype=grads[0].dtype, device=grads[0].device)
        plain_norm = device_norms(chosen)
        if self.scaled is None:
            mul_rows_(chosen, self.rho / (plain_norm + self.eps))
            return plain_norm
        scaled = [i for i in self._index if self.scaled[i]]
        grads_t = [grads[i] for i in scaled]
        t = [params[i].abs() + self.eta for i in scaled]
        torch._foreach_mul_(grads_t, t)  # T g
        norm = device_norms(chosen)
        torch._foreach_mul_(grads_t, t)  # T^2 g
        mul_rows_(chosen, self.rho / (norm + self.eps))
        return plain_norm


class SAMON(MethodOptimizer):
    """SAM-ON (or, with adaptive=True, ASAM-ON) around a base optimizer: e only on `perturbed`."""

    rule: SAMONRule

    def __init__(self, params: Iterable[Any], base_optimizer_cls: type[torch.optim.Optimizer],
                 perturbed: Iterable[Tensor], rho: float = 0.5, adaptive: bool = False, eta: float = 0.0,
                 unscaled: Iterable[Tensor] = (), eps: float = 1e-16, **base_kwargs: Any) -> None:
        """`perturbed`: the tensors e moves (normalization_parameters(model)). ASAM-ON: `unscaled` are the
        perturbed tensors that take T = 1 (the released code's biases unless normalize_bias)."""
        super().__init__(params, base_optimizer_cls, SAMONRule(rho, []), **base_kwargs)
        chosen, plain = {id(p) for p in perturbed}, {id(p) for p in unscaled}
        self.rule = SAMONRule(rho, [id(p) in chosen for p in self.params],
                              [id(p) not in plain for p in self.params] if adaptive else None, eta, eps)


class ASAMON(SAMON):
    """ASAM-ON: SAM-ON with the adaptive (elementwise) perturbation."""

    def __init__(self, params: Iterable[Any], base_optimizer_cls: type[torch.optim.Optimizer],
                 perturbed: Iterable[Tensor], rho: float = 10.0, eta: float = 0.0, unscaled: Iterable[Tensor] = (),
                 eps: float = 1e-16, **base_kwargs: Any) -> None:
        super().__init__(params, base_optimizer_cls, perturbed, rho=rho, adaptive=True, eta=eta, unscaled=unscaled,
                         eps=eps, **base_kwargs)
