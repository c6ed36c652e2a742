"""engine/step.py's `grad_reduce` (multi-process per-device runs): called once per step on the
per-device path, with every parameter's gradient in the optimizer's order, before the update.

The real reduce (distributed.average_gradients, an all-reduce over processes) is checked against a
2-process run in tests/engine/test_distributed.py; here a stand-in that halves the gradients (as averaging
with a process whose gradients are zero would) shows which gradients the update uses.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sam_repro.config import OptimConfig
from sam_repro.engine.step import StepConfig, TrainStep
from sam_repro.optim.factory import build_optimizer


def make() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 3)).double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(8, 3, 5, 5, generator=g).double(), torch.randint(0, 3, (8,), generator=g)


def one_step(name: str, reduce=None, device_batch: int | None = 4) -> tuple[nn.Module, list[torch.Tensor]]:
    model = make()
    opt, sam = build_optimizer(model, OptimConfig(name=name, lr=0.1, momentum=0.9, weight_decay=5e-4, rho=0.05))
    step = TrainStep(model, opt, sam, StepConfig(device_batch=device_batch), grad_reduce=reduce)
    model.train()
    step(*batch())
    return model, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["sgd", "sam"])
def test_grad_reduce_gets_every_gradient_once_per_step_and_the_update_uses_what_it_leaves(name: str) -> None:
    calls: list[list[torch.Tensor]] = []

    def halve(grads: list[torch.Tensor]) -> None:
        calls.append(grads)
        for g in grads:
            g.mul_(0.5)

    model, grads = one_step(name, halve)
    ref_model, ref_grads = one_step(name)
    assert len(calls) == 1 and len(calls[0]) == len(grads)
    # the gradients themselves (views of each, with a leading member axis of one), in the optimizer's order
    assert all(a.data_ptr() == p.grad.data_ptr() and a.shape == (1, *p.grad.shape) for a, p in zip(calls[0], model.parameters()))
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref * 0.5, rtol=1e-12, atol=1e-15)
    # the update used the halved gradients: one SGD step with momentum from zero moves each weight
    # by lr * (1 + momentum) * g under Nesterov, lr * g without; either way in proportion to g
    start = [p.detach().clone() for p in make().parameters()]
    for w0, w, w_ref in zip(start, model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(w0 - w, (w0 - w_ref) * 0.5, rtol=1e-9, atol=1e-15)


def test_without_grad_reduce_the_per_device_step_is_unchanged_and_the_one_group_path_never_calls_it() -> None:
    calls = []
    model, grads = one_step("sam", lambda g: calls.append(g), device_batch=None)
    assert calls == []  # the one-group path: DDP's own hooks reduce there
    _, ref_grads = one_step("sam", None, device_batch=None)
    for g, ref in zip(grads, ref_grads):
        assert torch.equal(g, ref)
