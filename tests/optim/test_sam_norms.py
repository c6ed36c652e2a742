"""SAM's logged norms: the gradient norm at w and the perturbation norm ||e|| that first_step keeps
(device tensors, read by the loop once per logging interval), against values computed here."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sam_repro.engine.step import StepConfig, TrainStep
from sam_repro.optim import SAM


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.Linear(3, 3)).double()


def data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("p, adaptive", [(2, False), (2, True), (math.inf, False)])
def test_first_step_keeps_the_gradient_norm_and_the_perturbation_norm(p: float, adaptive: bool) -> None:
    net = make_net()
    groups = [{"params": net[0].parameters()}, {"params": net[2].parameters(), "rho": 0.2}]  # net[3]: no gradient
    opt = SAM(groups, torch.optim.SGD, rho=0.05, p=p, adaptive=adaptive, eta=0.01, lr=0.1)
    x, y = data()
    nn.functional.cross_entropy(net[2](net[1](net[0](x))), y).backward()
    grads = [q.grad.clone() for q in net.parameters() if q.grad is not None]
    before = [q.detach().clone() for q in net.parameters()]
    opt.first_step(zero_grad=True)
    e = torch.cat([(q.detach() - w).flatten() for q, w in zip(net.parameters(), before)])
    assert opt.last_grad_norm.device == e.device and opt.last_grad_norm.ndim == 0  # a device tensor, not a float
    torch.testing.assert_close(opt.last_grad_norm.double(), torch.cat([g.flatten() for g in grads]).norm(), rtol=1e-6, atol=0)
    torch.testing.assert_close(opt.last_perturbation_norm.double(), e.norm(), rtol=1e-6, atol=0)
    if p == 2 and not adaptive:  # per group: rho_g * ||g_g|| / ||g||
        g0 = torch.cat([g.flatten() for g in grads[:2]]).norm()  # net[0]: weight, bias
        g1 = torch.cat([g.flatten() for g in grads[2:]]).norm()
        total = torch.cat([g.flatten() for g in grads]).norm()
        expected = torch.sqrt((0.05 * g0 / total) ** 2 + (0.2 * g1 / total) ** 2)
        torch.testing.assert_close(opt.last_perturbation_norm.double(), expected, rtol=1e-6, atol=0)


def test_train_step_reports_the_norms_for_sam_and_none_for_sgd() -> None:
    x, y = data(8)
    net = make_net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    stats = TrainStep(net, sgd, None, StepConfig())(x, y)
    assert stats.grad_norm is None and stats.perturbation_norm is None

    net = make_net()
    sam = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    stats = TrainStep(net, sam.base_optimizer, sam, StepConfig())(x, y)
    assert stats.grad_norm == sam.last_grad_norm and stats.perturbation_norm == pytest.approx(0.05, rel=1e-6)

    # m-sharpness: the mean over the step's chunks, each with its own gradient at w
    net = make_net()
    chunk_norms = []
    for xc, yc in zip(x.split(4), y.split(4)):
        ref = make_net()
        nn.functional.cross_entropy(ref(xc), yc).backward()
        chunk_norms.append(torch.cat([q.grad.flatten() for q in ref.parameters() if q.grad is not None]).norm())
    assert chunk_norms[0] != chunk_norms[1]
    sam = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    stats = TrainStep(net, sam.base_optimizer, sam, StepConfig(m=4))(x, y)
    torch.testing.assert_close(stats.grad_norm.double(), (chunk_norms[0] + chunk_norms[1]) / 2, rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.perturbation_norm.double(), torch.tensor(0.05, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: checks the kept norms add no host sync")
@pytest.mark.parametrize("p, adaptive", [(2, False), (2, True), (math.inf, False)])
def test_keeping_the_norms_adds_no_host_synchronization(p: float, adaptive: bool) -> None:
    net = make_net().float().cuda()
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, p=p, adaptive=adaptive, lr=0.1)
    x, y = (t.cuda() for t in data())
    for _ in range(2):  # the first step allocates the buffers
        nn.functional.cross_entropy(net(x.float()), y).backward()
        if _ == 1:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.first_step(zero_grad=True)
            total = opt.last_grad_norm + opt.last_perturbation_norm  # what the loop sums, on the device
        finally:
            torch.cuda.set_sync_debug_mode("default")
        nn.functional.cross_entropy(net(x.float()), y).backward()
        opt.second_step(zero_grad=True)
    assert total.is_cuda


def test_norms_of_parts_on_several_devices_combine_on_the_first_parts_device_in_float32() -> None:
    """A model split over devices: each part's norm is taken where it lives, and the parts meet on the
    first part's device. "meta" stands in for a second device on a CPU-only machine (a tensor can be
    moved onto it; stacking it with a CPU tensor fails, as a CUDA and a CPU tensor would)."""
    from sam_repro.optim.sam import _combine

    on_cpu = _combine([torch.tensor(3.0, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float16)])
    assert on_cpu.dtype == torch.float32 and on_cpu.item() == 5.0
    split = _combine([torch.tensor(3.0, dtype=torch.float64, device="meta"), torch.tensor(4.0, dtype=torch.float64)])
    assert (split.device.type, split.dtype, split.shape) == ("meta", torch.float32, torch.Size([]))
