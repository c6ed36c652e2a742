"""SAM's per-device perturbation (k groups at once) and ASAM's official T, against references here."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sam_repro.config import OptimConfig
from sam_repro.optim import SAM
from sam_repro.optim.factory import build_optimizer


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 5)).double()


def groups_of(net: nn.Module) -> list[dict]:
    """Two groups with their own rho; the head's bias unscaled by ASAM (adaptive_scale=False)."""
    return [
        {"params": [*net[0].parameters(), *net[1].parameters()], "rho": 0.05},
        {"params": [net[3].weight], "rho": 0.2},
        {"params": [net[3].bias], "rho": 0.2, "adaptive_scale": False},
    ]


def per_group_grads(net: nn.Module, k: int, seed: int = 3) -> list[torch.Tensor]:
    """k gradients per parameter, spanning orders of magnitude (each group's norm must be its own)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([10.0 ** (2 * j - k) for j in range(k)], dtype=torch.float64)
    return [torch.randn(k, *p.shape, generator=g, dtype=torch.float64) * scales.view(k, *[1] * p.dim())
            for p in net.parameters()]


@pytest.mark.parametrize("p, adaptive, eta", [(2, False, 0.0), (math.inf, False, 0.0), (2, True, 0.01)],
                         ids=["p2", "pinf", "asam"])
def test_device_perturbations_equals_first_step_for_each_group(p: float, adaptive: bool, eta: float) -> None:
    net = make_net()
    opt = SAM(groups_of(net), torch.optim.SGD, rho=0.1, p=p, adaptive=adaptive, eta=eta, eps=0.0, lr=0.1)
    params = list(net.parameters())
    k = 3
    grads = per_group_grads(net, k)
    per_device = opt.device_perturbations(params, [g.clone() for g in grads])
    for j in range(k):
        w = [q.detach().clone() for q in params]
        for q, g in zip(params, grads):
            q.grad = g[j].clone()
        opt.first_step()
        e = [q.detach() - w0 for q, w0 in zip(params, w)]
        opt.unperturb()
        for got, want in zip(per_device, e):
            torch.testing.assert_close(got[j], want, rtol=1e-9, atol=1e-15)
    # each group's e has its own norm: rho for p = 2 however large its gradient
    if p == 2 and not adaptive:
        rho_of = [0.05] * 4 + [0.2, 0.2]
        for j in range(k):
            scaled_back = math.sqrt(sum(float(((e[j] / r) ** 2).sum()) for e, r in zip(per_device, rho_of)))
            assert scaled_back == pytest.approx(1.0, rel=1e-9)


def asam_reference(named: list[tuple[str, torch.Tensor]], grads: list[torch.Tensor], rho: float, eta: float,
                   every_parameter: bool) -> list[torch.Tensor]:
    """The official ASAM code (SamsungLabs/ASAM, asam.py), restated: T = |w| + eta for parameters whose
    name contains 'weight' (every parameter with every_parameter), T = 1 otherwise."""
    t = [(w.detach().abs() + eta) if (every_parameter or "weight" in n) else torch.ones_like(w) for n, w in named]
    norm = math.sqrt(sum(float(((ti * g) ** 2).sum()) for ti, g in zip(t, grads)))
    return [rho * ti * ti * g / norm for ti, g in zip(t, grads)]


@pytest.mark.parametrize("asam_scale", ["weights", "all"])
def test_asam_scales_only_weights_by_default(asam_scale: str) -> None:
    net = make_net()
    cfg = OptimConfig(name="asam", rho=0.5, eta=0.01, eps=0.0, weight_decay=0.0, asam_scale=asam_scale)
    _, sam = build_optimizer(net, cfg)
    named = list(net.named_parameters())
    grads = [g[0] for g in per_group_grads(net, 1)]
    want = asam_reference(named, grads, 0.5, 0.01, every_parameter=asam_scale == "all")
    other = asam_reference(named, grads, 0.5, 0.01, every_parameter=asam_scale != "all")
    w = [p.detach().clone() for _, p in named]
    for (_, p), g in zip(named, grads):
        p.grad = g.clone()
    sam.first_step()
    got = [p.detach() - w0 for (_, p), w0 in zip(named, w)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)
    assert any(not torch.allclose(a, b) for a, b in zip(got, other)), "the two choices must differ"
