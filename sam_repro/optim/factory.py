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


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """One group, or two when BatchNorm/bias parameters (ndim <= 1) are exempt from decay.

    Each group carries `l2` (the decay the step adds to the gradient in `loss` mode) and
    `weight_decay` (the base optimizer's own decay in `decoupled` mode); one of them is 0.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.wd_on_bn:
        split = [(params, cfg.weight_decay)]
    else:
        split = [([p for p in params if p.ndim > 1], cfg.weight_decay), ([p for p in params if p.ndim <= 1], 0.0)]
    in_loss = cfg.wd_mode == "loss"
    return [
        {"params": ps, "l2": wd if in_loss else 0.0, "weight_decay": 0.0 if in_loss else wd}
        for ps, wd in split
        if ps
    ]


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
