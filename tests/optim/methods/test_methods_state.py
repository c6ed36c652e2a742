"""Every method's own state goes into its state_dict: a class rebuilt from a checkpoint taken after 4
steps continues exactly as the uninterrupted run (bitwise, float64): F-SAM's and VaSSO's running means,
LookSAM's stored component and counter, the interval's counter, ESAM's keep mask and generator, RWP's
generator, the base optimizer's momentum. And each of those states is really there (a rebuilt class
that did not load it takes another path)."""
from __future__ import annotations

import io
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from sam_repro.optim.methods import (ASAMON, ESAM, GSAM, RWP, SAMON, WSAM, FriendlySAM, IntervalSAM, LookSAM,
                                     MethodOptimizer, VaSSO, normalization_parameters)
from tests.optim.methods.methods_helpers import SGD_KWARGS, STEPS, batch, ce, tiny_net

BUILDERS: dict[str, Callable[[torch.nn.Module], MethodOptimizer]] = {
    "gsam": lambda n: GSAM(n.parameters(), torch.optim.SGD, rho_max=0.05, rho_min=0.01, alpha=0.3, **SGD_KWARGS),
    "esam": lambda n: ESAM(n.parameters(), torch.optim.SGD, rho=0.05, beta=0.6, gamma=0.5, seed=1, **SGD_KWARGS),
    "fsam": lambda n: FriendlySAM(n.parameters(), torch.optim.SGD, rho=0.05, sigma=1.0, lmbda=0.6, **SGD_KWARGS),
    "vasso": lambda n: VaSSO(n.parameters(), torch.optim.SGD, rho=0.05, theta=0.9, **SGD_KWARGS),
    "samon": lambda n: SAMON(n.parameters(), torch.optim.SGD, perturbed=normalization_parameters(n), rho=0.5, **SGD_KWARGS),
    "asam_on": lambda n: ASAMON(n.parameters(), torch.optim.SGD, perturbed=normalization_parameters(n), rho=1.0,
                                **SGD_KWARGS),
    "interval_sam": lambda n: IntervalSAM(n.parameters(), torch.optim.SGD, rho=0.05, interval=3, **SGD_KWARGS),
    "looksam": lambda n: LookSAM(n.parameters(), torch.optim.SGD, rho=0.05, k=3, alpha=0.7, **SGD_KWARGS),
    "rwp": lambda n: RWP(n.parameters(), torch.optim.SGD, alpha=0.5, gamma=0.01, seed=1, **SGD_KWARGS),
    "wsam": lambda n: WSAM(n.parameters(), torch.optim.SGD, rho=0.05, gamma=0.88, max_norm=0.4, **SGD_KWARGS),
}
# what a checkpoint must carry beyond the base optimizer (a method without entry keeps none)
CARRIES = {"esam": {"keep", "generator"}, "fsam": {"momentum"}, "vasso": {"ema"}, "interval_sam": {"step"},
           "looksam": {"step", "g_v"}, "rwp": {"generator"}}


def one_step(name: str, opt: MethodOptimizer, net: torch.nn.Module, t: int) -> None:
    x, y = batch(t)
    if name == "esam":
        opt.step(lambda mask=None: F.cross_entropy(net(x if mask is None else x[mask]), y if mask is None else y[mask],
                                                   reduction="none"))
        return
    ce(net, x, y).backward()
    if opt.first_step(zero_grad=True):
        xb, yb = batch(t, second=True) if name == "rwp" else (x, y)  # RWP: the noisy pass on its own batch
        ce(net, xb, yb).backward()
    opt.second_step(zero_grad=True)


def weights(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().flatten().double() for t in net.state_dict().values()])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_class_loaded_from_a_checkpoint_continues_exactly(name: str) -> None:
    net = tiny_net()
    opt = BUILDERS[name](net)
    for t in range(STEPS):
        one_step(name, opt, net, t)
    want = weights(net)

    net = tiny_net()
    opt = BUILDERS[name](net)
    for t in range(STEPS // 2):
        one_step(name, opt, net, t)
    blob = io.BytesIO()
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, blob)
    assert set(opt.method_state_dict()) == CARRIES.get(name, set())

    blob.seek(0)
    saved = torch.load(blob, weights_only=False)
    resumed_net = tiny_net()
    resumed_net.load_state_dict(saved["model"])
    resumed = BUILDERS[name](resumed_net)
    resumed.load_state_dict(saved["optimizer"])
    for t in range(STEPS // 2, STEPS):
        one_step(name, resumed, resumed_net, t)
    assert torch.equal(weights(resumed_net), want)

    if name in CARRIES:  # the method's own state matters: without it the run takes another path
        forgetful_net = tiny_net()
        forgetful_net.load_state_dict(saved["model"])
        forgetful = BUILDERS[name](forgetful_net)
        forgetful.load_state_dict({k: v for k, v in saved["optimizer"].items() if k != "method"})
        for t in range(STEPS // 2, STEPS):
            one_step(name, forgetful, forgetful_net, t)
        assert not torch.equal(weights(forgetful_net), want)


def test_a_per_device_state_refuses_another_device_count() -> None:
    """F-SAM's running mean was built for 2 devices: a step over 3 says so instead of broadcasting."""
    net = tiny_net()
    opt = BUILDERS["fsam"](net)
    params = opt.params
    opt.device_perturbations(params, [torch.randn(2, *p.shape, dtype=p.dtype) for p in params])
    with pytest.raises(ValueError, match="holds 2 devices, the step has 3"):
        opt.device_perturbations(params, [torch.randn(3, *p.shape, dtype=p.dtype) for p in params])
