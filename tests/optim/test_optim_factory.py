"""sam_repro.optim.factory: which parameter decays, where the decay goes, and what the base
optimizer and SAM are built with, against the rules of the module's docstring written out here."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sam_repro.config import OptimConfig
from sam_repro.optim.factory import build_optimizer


class Net(nn.Module):
    """Every kind of parameter: 4-d conv weight, 2-d linear weight, 1-d biases and BatchNorm, and a
    frozen parameter in the middle (it must be skipped, not end the walk)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.fc = nn.Linear(4, 2)


def decay_of(opt: torch.optim.Optimizer) -> dict[int, tuple[float, float]]:
    """id(param) -> (l2, weight_decay) of its group."""
    return {id(q): (g["l2"], g["weight_decay"]) for g in opt.param_groups for q in g["params"]}


ALL_METHODS = ["sgd", "sam", "asam", "gsam", "esam", "fsam", "vasso", "samon", "asam_on", "interval_sam", "looksam",
               "rwp", "wsam"]


@pytest.mark.parametrize("wd_on_bn", [True, False])
@pytest.mark.parametrize("wd_mode", ["loss", "decoupled"])
@pytest.mark.parametrize("name", ALL_METHODS)
def test_every_trainable_parameter_gets_its_decay_in_the_right_place(name: str, wd_mode: str, wd_on_bn: bool) -> None:
    net, wd = Net(), 5e-4
    opt, _ = build_optimizer(net, OptimConfig(name=name, wd_mode=wd_mode, wd_on_bn=wd_on_bn, weight_decay=wd))
    got = decay_of(opt)
    trainable = [q for q in net.parameters() if q.requires_grad]
    assert set(got) == {id(q) for q in trainable}  # the frozen layer is left out, everything after it is in
    for q in trainable:
        want = wd if (wd_on_bn or q.dim() >= 2) else 0.0  # biases and BatchNorm are the 1-d ones
        assert got[id(q)] == ((want, 0.0) if wd_mode == "loss" else (0.0, want)), (q.shape, got[id(q)])


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_base_takes_lr_momentum_and_nesterov_from_the_config(nesterov: bool) -> None:
    cfg = OptimConfig(name="sgd", lr=0.3, momentum=0.7, nesterov=nesterov)
    opt, sam = build_optimizer(Net(), cfg)
    assert sam is None and type(opt) is torch.optim.SGD
    for g in opt.param_groups:
        assert (g["lr"], g["momentum"], g["nesterov"]) == (0.3, 0.7, nesterov)


def test_adamw_base_takes_lr_and_the_per_group_decay() -> None:
    cfg = OptimConfig(name="sam", base="adamw", lr=3e-4, weight_decay=0.05, wd_mode="decoupled", wd_on_bn=False)
    opt, sam = build_optimizer(Net(), cfg)
    assert type(opt) is torch.optim.AdamW and sam is not None and sam.base_optimizer is opt
    assert {g["lr"] for g in opt.param_groups} == {3e-4}
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]


@pytest.mark.parametrize("name, p", [("sam", 2.0), ("sam", math.inf), ("asam", 2.0)])
def test_sam_is_built_with_the_configs_rho_p_eta_eps_and_adaptive(name: str, p: float) -> None:
    cfg = OptimConfig(name=name, rho=0.7, p=p, eta=0.01, eps=1e-6)
    _, sam = build_optimizer(Net(), cfg)
    for g in sam.param_groups:
        assert (g["rho"], g["p"], g["eta"], g["sam_eps"], g["adaptive"]) == (0.7, p, 0.01, 1e-6, name == "asam")


# -- the SAM family: each method built with the config's hyperparameters ---------------------------------
OWN = {  # name: (config values, what the method's rule must then hold)
    "gsam": (dict(rho=0.3, gsam_rho_min=0.1, gsam_alpha=0.2, gsam_lr_min=0.01, gsam_adaptive="jax", lr=0.2, eps=1e-9),
             dict(rho_max=0.3, rho_min=0.1, alpha=0.2, lr_min=0.01, lr_max=0.2, adaptive="jax", eps=1e-9)),
    "esam": (dict(rho=0.1, esam_beta=0.7, esam_gamma=0.4, esam_selection="topk", esam_swp_draw="start_of_step",
                  esam_sharpness_bn="frozen", eps=1e-7),
             dict(rho=0.1, beta=0.7, gamma=0.4, selection="topk", swp_draw="start_of_step", sharpness_bn="frozen",
                  eps=1e-7)),
    "fsam": (dict(rho=0.2, fsam_sigma=0.5, fsam_lambda=0.9, eps=1e-11), dict(rho=0.2, sigma=0.5, lmbda=0.9, eps=1e-11)),
    "vasso": (dict(rho=0.2, vasso_theta=0.4, eps=1e-7), dict(rho=0.2, theta=0.4, eps=1e-7)),
    "interval_sam": (dict(rho=0.3, sam_interval=4), dict(rho=0.3, interval=4)),
    "looksam": (dict(rho=0.1, looksam_k=7, looksam_alpha=0.5, looksam_projection="tensor"),
                dict(rho=0.1, k=7, alpha=0.5, projection="tensor")),
    "rwp": (dict(rwp_alpha=0.3, rwp_gamma=0.02), dict(alpha=0.3, gamma=0.02)),
    "wsam": (dict(rho=0.1, wsam_gamma=0.8, wsam_max_norm=None, wsam_decouple=False),
             dict(rho=0.1, gamma=0.8, max_norm=None, decouple=False)),
    "samon": (dict(rho=0.4, eps=1e-16), dict(rho=0.4, eps=1e-16, scaled=None)),
}


@pytest.mark.parametrize("name", sorted(OWN))
def test_each_method_is_built_with_the_configs_hyperparameters(name: str) -> None:
    given, want = OWN[name]
    base, method = build_optimizer(Net(), OptimConfig(name=name, **given))
    assert type(method).__name__ == {"gsam": "GSAM", "esam": "ESAM", "fsam": "FriendlySAM", "vasso": "VaSSO",
                                     "interval_sam": "IntervalSAM", "looksam": "LookSAM", "rwp": "RWP", "wsam": "WSAM",
                                     "samon": "SAMON"}[name]
    assert method.base_optimizer is base and base.param_groups is method.param_groups
    assert {k: getattr(method.rule, k) for k in want} == want


def test_gsam_with_no_rho_min_keeps_rho_constant() -> None:
    _, gsam = build_optimizer(Net(), OptimConfig(name="gsam", rho=0.3, gsam_rho_min=None))
    assert gsam.rule.rho_min == gsam.rule.rho_max == 0.3


def test_the_random_methods_are_seeded_from_the_runs_seed() -> None:
    torch.manual_seed(123)
    _, esam = build_optimizer(Net(), OptimConfig(name="esam"))
    _, rwp = build_optimizer(Net(), OptimConfig(name="rwp"))
    assert esam.rule.seed == rwp.rule.seed == 123


class Blocks(nn.Module):
    """BatchNorm where the released SAM-ON's name test cannot see it (inside an unnamed Sequential), and
    a LayerNorm that it can."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)


@pytest.mark.parametrize("select, want", [("type", ["stem.1.weight", "stem.1.bias", "norm.weight", "norm.bias"]),
                                          ("name", ["norm.weight", "norm.bias"])])
def test_samon_perturbs_the_normalization_parameters_by_type_or_by_name(select: str, want: list[str]) -> None:
    model = Blocks()
    _, samon = build_optimizer(model, OptimConfig(name="samon", samon_select=select))
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p, chosen in zip(samon.params, samon.rule.perturbed) if chosen] == want


@pytest.mark.parametrize("normalize_bias", [True, False])
def test_asam_on_scales_the_weights_and_the_biases_only_with_normalize_bias(normalize_bias: bool) -> None:
    model = Blocks()
    _, asam_on = build_optimizer(model, OptimConfig(name="asam_on", rho=10.0, eta=0.0, samon_normalize_bias=normalize_bias))
    names = {id(p): n for n, p in model.named_parameters()}
    scaled = {names[id(p)] for p, s in zip(asam_on.params, asam_on.rule.scaled) if s}
    assert {"stem.1.bias", "norm.bias"} <= scaled if normalize_bias else not {"stem.1.bias", "norm.bias"} & scaled
    assert {"stem.1.weight", "norm.weight"} <= scaled
