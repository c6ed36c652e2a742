"""Each method reduces to SAM (sam_repro.optim.SAM, same model, batches and base optimizer) when its own
hyperparameter switches its change off: GSAM alpha = 0 with a constant rho, ESAM beta = gamma = 1,
interval 1, F-SAM sigma = 0, VaSSO theta = 1, SAM-ON over every parameter, LookSAM k = 1.

The equality is bitwise, in float64: the methods take the perturbation's norm with the kernels, in the
order, that SAM.first_step uses, restore w by copy as SAM does, and the terms the switch removes are
exactly zero (alpha * v, sigma * m, (1 - theta) * ema) or exact (a division by beta = 1). SAM is built
with each method's own eps (ESAM and VaSSO add 1e-7 to the norm, SAM-ON 1e-16), the one place where
the methods' released code and SAM's differ. With the switch on, each method leaves SAM's trajectory:
the comparison can fail.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from sam_repro.optim import SAM
from sam_repro.optim.methods import ESAM, GSAM, SAMON, FriendlySAM, IntervalSAM, LookSAM, VaSSO, normalization_parameters
from tests.optim.methods.methods_helpers import SGD_KWARGS, STEPS, batch, ce, tiny_net

Build = Callable[[torch.nn.Module], torch.optim.Optimizer]


def trajectory(build: Build, per_example: bool = False) -> torch.Tensor:
    """(steps, parameters): the weights after every step, and the gradient each step applied."""
    net = tiny_net()
    opt = build(net)
    base = opt.base_optimizer
    applied: list[torch.Tensor] = []
    base.register_step_pre_hook(lambda *_: applied.append(torch.cat([p.grad.flatten() for p in net.parameters()])))
    rows = []
    for t in range(STEPS):
        x, y = batch(t)
        if per_example:
            opt.step(lambda mask=None: F.cross_entropy(net(x if mask is None else x[mask]), y if mask is None else y[mask],
                                                       reduction="none"))
        else:
            ce(net, x, y).backward()
            if opt.first_step(zero_grad=True) is not False:
                ce(net, x, y).backward()
            opt.second_step(zero_grad=True)
        rows.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    return torch.cat([torch.stack(rows), torch.stack(applied)], dim=1)


def sam(eps: float) -> Build:
    return lambda net: SAM(net.parameters(), torch.optim.SGD, rho=0.05, eps=eps, **SGD_KWARGS)


# name: (the method at its reduction, the method with its change on, SAM's eps, per-example losses)
REDUCTIONS: dict[str, tuple[Build, Build, float, bool]] = {
    "gsam alpha=0, rho constant": (
        lambda n: GSAM(n.parameters(), torch.optim.SGD, rho_max=0.05, rho_min=0.05, alpha=0.0, **SGD_KWARGS),
        lambda n: GSAM(n.parameters(), torch.optim.SGD, rho_max=0.05, rho_min=0.05, alpha=0.3, **SGD_KWARGS), 1e-12, False),
    "esam beta=gamma=1": (
        lambda n: ESAM(n.parameters(), torch.optim.SGD, rho=0.05, beta=1.0, gamma=1.0, seed=0, **SGD_KWARGS),
        lambda n: ESAM(n.parameters(), torch.optim.SGD, rho=0.05, beta=1.0, gamma=0.5, seed=0, **SGD_KWARGS), 1e-7, True),
    "interval 1": (
        lambda n: IntervalSAM(n.parameters(), torch.optim.SGD, rho=0.05, interval=1, **SGD_KWARGS),
        lambda n: IntervalSAM(n.parameters(), torch.optim.SGD, rho=0.05, interval=2, **SGD_KWARGS), 1e-12, False),
    "fsam sigma=0": (
        lambda n: FriendlySAM(n.parameters(), torch.optim.SGD, rho=0.05, sigma=0.0, lmbda=0.6, **SGD_KWARGS),
        lambda n: FriendlySAM(n.parameters(), torch.optim.SGD, rho=0.05, sigma=1.0, lmbda=0.6, **SGD_KWARGS), 1e-12, False),
    "vasso theta=1": (
        lambda n: VaSSO(n.parameters(), torch.optim.SGD, rho=0.05, theta=1.0, **SGD_KWARGS),
        lambda n: VaSSO(n.parameters(), torch.optim.SGD, rho=0.05, theta=0.9, **SGD_KWARGS), 1e-7, False),
    "samon over every parameter": (
        lambda n: SAMON(n.parameters(), torch.optim.SGD, perturbed=list(n.parameters()), rho=0.05, **SGD_KWARGS),
        lambda n: SAMON(n.parameters(), torch.optim.SGD, perturbed=normalization_parameters(n), rho=0.05, **SGD_KWARGS),
        1e-16, False),
    "looksam k=1": (
        lambda n: LookSAM(n.parameters(), torch.optim.SGD, rho=0.05, k=1, alpha=0.7, **SGD_KWARGS),
        lambda n: LookSAM(n.parameters(), torch.optim.SGD, rho=0.05, k=2, alpha=0.7, **SGD_KWARGS), 1e-12, False),
    "looksam k=1, per-tensor projection": (
        lambda n: LookSAM(n.parameters(), torch.optim.SGD, rho=0.05, k=1, alpha=0.7, projection="tensor", **SGD_KWARGS),
        lambda n: LookSAM(n.parameters(), torch.optim.SGD, rho=0.05, k=2, alpha=0.7, projection="tensor", **SGD_KWARGS),
        1e-12, False),
}


@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_the_method_at_its_reduction_is_sam_bitwise(name: str) -> None:
    reduced, changed, eps, per_example = REDUCTIONS[name]
    want = trajectory(sam(eps))
    assert torch.equal(trajectory(reduced, per_example), want)
    assert (trajectory(changed, per_example) - want).abs().max() > 1e-6
