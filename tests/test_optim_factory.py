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


@pytest.mark.parametrize("wd_on_bn", [True, False])
@pytest.mark.parametrize("wd_mode", ["loss", "decoupled"])
@pytest.mark.parametrize("name", ["sgd", "sam", "asam"])
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
