"""Build the optimizer a config asks for: param groups, base optimizer, and SAM around it or not.

The training step takes (base optimizer, SAM or None): SGD runs are the same step with sam=None.
Weight decay follows `optim.wd_mode`:
- `loss` (official code): an L2 term 0.5 * wd * ||w||^2 in the loss. The step adds its gradient
  wd * w after every backward (cheaper than a norm in the graph, same gradient), so the decay
  enters the perturbation e(w) and the gradient at w + e(w). Each group carries it as `l2`.
- `decoupled` (the popular PyTorch port): decay inside the base optimizer only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from sam_repro.config import OptimConfig
from sam_repro.optim.sam import SAM


@dataclass(frozen=True)
class Method:
    """What an `optim.name` means: SAM or not, adaptive or not."""

    uses_sam: bool
    adaptive: bool


METHODS: dict[str, Method] = {
    "sgd": Method(uses_sam=False, adaptive=False),
    "sam": Method(uses_sam=True, adaptive=False),
    "asam": Method(uses_sam=True, adaptive=True),
}


def _sgd(cfg: OptimConfig, weight_decay: float) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    return torch.optim.SGD, dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=weight_decay)


def _adamw(cfg: OptimConfig, weight_decay: float) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    return torch.optim.AdamW, dict(lr=cfg.lr, weight_decay=weight_decay)


BASE_OPTIMIZERS: dict[str, Callable[[OptimConfig, float], tuple[type[torch.optim.Optimizer], dict[str, Any]]]] = {
    "sgd": _sgd,
    "adamw": _adamw,
}
WD_MODES = ("loss", "decoupled")


ASAM_SCALES = ("weights", "all")


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """The parameters grouped by (decay, ASAM scaling), in the model's order.

    Each group carries `l2` (the decay the step adds to the gradient in `loss` mode) and
    `weight_decay` (the base optimizer's own decay in `decoupled` mode); one of them is 0.
    BatchNorm/bias parameters (ndim <= 1) are exempt from decay when `wd_on_bn` is off. For ASAM,
    `adaptive_scale` says whether T = |w| + eta applies: with `asam_scale=weights` (the official ASAM
    code) only to parameters whose name contains `weight`; the others take T = 1.
    """
    adaptive = METHODS[cfg.name].adaptive
    split: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = cfg.weight_decay if (cfg.wd_on_bn or param.ndim > 1) else 0.0
        scaled = cfg.asam_scale == "all" or "weight" in name  # the official test, on the full name
        split.setdefault((decay, scaled if adaptive else True), []).append(param)
    in_loss = cfg.wd_mode == "loss"
    groups = []
    for (wd, scaled), params in split.items():
        group: dict[str, Any] = {"params": params, "l2": wd if in_loss else 0.0, "weight_decay": 0.0 if in_loss else wd}
        if adaptive:
            group["adaptive_scale"] = scaled
        groups.append(group)
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> tuple[torch.optim.Optimizer, Optional[SAM]]:
    """(base optimizer, SAM wrapper or None). The base optimizer is what steps and what a
    scheduler or GradScaler talks to; SAM shares its param groups."""
    method = METHODS[cfg.name]
    groups = param_groups(model, cfg)
    base_cls, kwargs = BASE_OPTIMIZERS[cfg.base](cfg, 0.0)
    kwargs.pop("weight_decay")  # set per group above
    if not method.uses_sam:
        base = base_cls(groups, **kwargs)
        return base, None
    sam = SAM(groups, base_cls, rho=cfg.rho, p=cfg.p, adaptive=method.adaptive, eta=cfg.eta, eps=cfg.eps, **kwargs)
    return sam.base_optimizer, sam
