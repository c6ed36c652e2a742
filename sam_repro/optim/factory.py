"""Build the optimizer a config asks for: param groups, base optimizer, and SAM (or one of its
follow-ups, optim/methods/) around it or not.

The training step takes (base optimizer, SAM or None): SGD runs are the same step with sam=None.
Weight decay follows `optim.wd_mode`:
- `loss` (official code): an L2 term 0.5 * wd * ||w||^2 in the loss. The step adds its gradient
  wd * w after every backward (cheaper than a norm in the graph, same gradient), so the decay
  enters the perturbation e(w) and the gradient at w + e(w). Each group carries it as `l2`.
- `decoupled` (the popular PyTorch port): decay inside the base optimizer only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from sam_repro.config import OptimConfig
from sam_repro.optim.methods import (ASAMON, ESAM, GSAM, RWP, SAMON, WSAM, FriendlySAM, IntervalSAM, LookSAM,
                                     MethodOptimizer, VaSSO, normalization_parameters)
from sam_repro.optim.methods.registry import METHOD_SPECS, MethodSpec
from sam_repro.optim.sam import SAM

BaseChoice = tuple[type[torch.optim.Optimizer], dict[str, Any]]
# (model, param groups, config, base optimizer class, its kwargs) -> the method around the base optimizer
MethodBuilder = Callable[[nn.Module, list[dict[str, Any]], OptimConfig, type[torch.optim.Optimizer], dict[str, Any]],
                         MethodOptimizer]


def _gsam(model: nn.Module, groups: list[dict[str, Any]], cfg: OptimConfig, base: type[torch.optim.Optimizer],
          kwargs: dict[str, Any]) -> MethodOptimizer:
    rho_min = cfg.rho if cfg.gsam_rho_min is None else cfg.gsam_rho_min
    return GSAM(groups, base, rho_max=cfg.rho, rho_min=rho_min, alpha=cfg.gsam_alpha, lr_max=cfg.lr,
                lr_min=cfg.gsam_lr_min, adaptive=cfg.gsam_adaptive, eps=cfg.eps, **kwargs)


def _esam(model: nn.Module, groups: list[dict[str, Any]], cfg: OptimConfig, base: type[torch.optim.Optimizer],
          kwargs: dict[str, Any]) -> MethodOptimizer:
    return ESAM(groups, base, rho=cfg.rho, beta=cfg.esam_beta, gamma=cfg.esam_gamma, selection=cfg.esam_selection,
                swp_draw=cfg.esam_swp_draw, sharpness_bn=cfg.esam_sharpness_bn, eps=cfg.eps,
                **kwargs)  # the SWP draws seeded from the run's seed (torch.initial_seed)


def _fsam(model: nn.Module, groups: list[dict[str, Any]], cfg: OptimConfig, base: type[torch.optim.Optimizer],
          kwargs: dict[str, Any]) -> MethodOptimizer:
    return FriendlySAM(groups, base, rho=cfg.rho, sigma=cfg.fsam_sigma, lmbda=cfg.fsam_lambda, eps=cfg.eps, **kwargs)


def _vasso(model: nn.Module, groups: list[dict[str, Any]], cfg: OptimConfig, base: type[torch.optim.Optimizer],
           kwargs: dict[str, Any]) -> MethodOptimizer:
    return VaSSO(groups, base, rho=cfg.rho, theta=cfg.vasso_theta, eps=cfg.eps, **kwargs)


def _samon(model: nn.Module, groups: list[dict[str, Any]], cfg: OptimConfig, base: type[torch.optim.Optimizer],
           kwargs: dict[str, Any]) -> MethodOptimizer:
    return SAMON(groups, base, perturbed=normalization_parameters(model, cfg.samon_select), rho=cfg.rho, eps=cfg.eps,
                 **kwargs)


def _asam_on(model: nn.Module, groups: list[dict[str, Any]], cfg: OptimConfig, base: type[torch.optim.Optimizer],
             kwargs: dict[str, Any]) -> MethodOptimizer:
    # the released code scales by T = |w| + eta the tensors named *weight*, and the biases with normalize_bias
    unscaled = [] if cfg.samon_normalize_bias else [p for n, p in model.named_parameters() if "weight" not in n]
    return ASAMON(groups, base, perturbed=normalization_parameters(model, cfg.samon_select), rho=cfg.rho, eta=cfg.eta,
                  unscaled=unscaled, eps=cfg.eps, **kwargs)


def _interval_sam(model: nn.Module, groups: list[dict[str, Any]], cfg: OptimConfig, base: type[torch.optim.Optimizer],
                  kwargs: dict[str, Any]) -> MethodOptimizer:
    return IntervalSAM(groups, base, rho=cfg.rho, interval=cfg.sam_interval, eps=cfg.eps, **kwargs)


def _looksam(model: nn.Module, groups: list[dict[str, Any]], cfg: OptimConfig, base: type[torch.optim.Optimizer],
             kwargs: dict[str, Any]) -> MethodOptimizer:
    return LookSAM(groups, base, rho=cfg.rho, k=cfg.looksam_k, alpha=cfg.looksam_alpha,
                   projection=cfg.looksam_projection, eps=cfg.eps, **kwargs)


def _rwp(model: nn.Module, groups: list[dict[str, Any]], cfg: OptimConfig, base: type[torch.optim.Optimizer],
         kwargs: dict[str, Any]) -> MethodOptimizer:
    return RWP(groups, base, alpha=cfg.rwp_alpha, gamma=cfg.rwp_gamma, **kwargs)  # seeded from the run's seed


def _wsam(model: nn.Module, groups: list[dict[str, Any]], cfg: OptimConfig, base: type[torch.optim.Optimizer],
          kwargs: dict[str, Any]) -> MethodOptimizer:
    return WSAM(groups, base, rho=cfg.rho, gamma=cfg.wsam_gamma, max_norm=cfg.wsam_max_norm,
                decouple=cfg.wsam_decouple, eps=cfg.eps, **kwargs)


@dataclass(frozen=True)
class Method:
    """What an `optim.name` means: SAM or not, adaptive or not; for SAM's follow-ups, their registry
    entry (class, rule, what the step needs) and how the config builds them."""

    uses_sam: bool
    adaptive: bool
    spec: Optional[MethodSpec] = None
    build: Optional[MethodBuilder] = None

    def passes_per_step(self, cfg: OptimConfig) -> tuple[float, float]:
        """(forwards, backwards) per optimizer step on average, extra no-grad forwards counted: SGD one
        of each, SAM and ASAM two, a SAM-family method what its rule says for `cfg`'s hyperparameters
        (interval SAM and LookSAM perturb on some steps only). The one statement of a step's passes:
        the report and the benchmarks read it here."""
        if self.build is None:
            return (2.0, 2.0) if self.uses_sam else (1.0, 1.0)
        # The rule alone decides the count; a probe stands in for the model (SAM-ON needs a
        # normalization layer to select), so no real model or data is built to ask it.
        _, method = build_optimizer(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), cfg)
        return method.rule.passes_per_step()


BUILDERS: dict[str, MethodBuilder] = {
    "gsam": _gsam, "esam": _esam, "fsam": _fsam, "vasso": _vasso, "samon": _samon, "asam_on": _asam_on,
    "interval_sam": _interval_sam, "looksam": _looksam, "rwp": _rwp, "wsam": _wsam,
}
METHODS: dict[str, Method] = {
    "sgd": Method(uses_sam=False, adaptive=False),
    "sam": Method(uses_sam=True, adaptive=False),
    "asam": Method(uses_sam=True, adaptive=True),
    **{name: Method(uses_sam=True, adaptive=False, spec=METHOD_SPECS[name], build=build) for name, build in BUILDERS.items()},
}


def _sgd(cfg: OptimConfig, weight_decay: float) -> BaseChoice:
    return torch.optim.SGD, dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=weight_decay)


def _adamw(cfg: OptimConfig, weight_decay: float) -> BaseChoice:
    return torch.optim.AdamW, dict(lr=cfg.lr, weight_decay=weight_decay)


BASE_OPTIMIZERS: dict[str, Callable[[OptimConfig, float], BaseChoice]] = {
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


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> tuple[torch.optim.Optimizer, Optional[Union[SAM, MethodOptimizer]]]:
    """(base optimizer, SAM wrapper, a SAM-family method, or None). The base optimizer is what steps and
    what a scheduler or GradScaler talks to; SAM and the methods share its param groups."""
    method = METHODS[cfg.name]
    groups = param_groups(model, cfg)
    base_cls, kwargs = BASE_OPTIMIZERS[cfg.base](cfg, 0.0)
    kwargs.pop("weight_decay")  # set per group above
    if not method.uses_sam:
        base = base_cls(groups, **kwargs)
        return base, None
    if method.build is not None:
        wrapped = method.build(model, groups, cfg, base_cls, kwargs)
        return wrapped.base_optimizer, wrapped
    sam = SAM(groups, base_cls, rho=cfg.rho, p=cfg.p, adaptive=method.adaptive, eta=cfg.eta, eps=cfg.eps, **kwargs)
    return sam.base_optimizer, sam
