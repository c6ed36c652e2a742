"""RWP in the engine (docs/methods.md#rwp): the step's batch splits in two halves, the first clean
(gradient at w) and the second noisy (gradient at w + filter-wise noise), each half into devices as
usual; the applied gradient is (1 - alpha) x the clean devices' mean + alpha x the noisy devices'; the
BatchNorm statistics are the clean pass's (bn_stats=first_pass). This is the released 2-GPU DDP run
(rank 0 clean on batch A, rank 1 noisy on batch B), which the fixture recorded: batch = A then B.

- the fixture's trajectory through the engine's step, to 1e-10, with the fixture's noise injected;
- validate's refusals of layouts that do not halve;
- a resumed run equals an uninterrupted one (the noise generator is checkpointed);
- the roles of the devices and processes (engine/grid.py's two_halves).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pytest
import torch

from sam_repro.config import OptimConfig
from sam_repro.engine.grid import Halves, two_halves
from sam_repro.engine.step import StepConfig, TrainStep
from sam_repro.optim.factory import build_optimizer
from sam_repro.optim.methods.rwp import RWPRule
from tests.optim.methods.methods_helpers import BUFFERS, PARAMS, STEPS, TOL, batch, expected_buffers, fixture, tiny_net
from tests.test_validate import problems

# the fixtures' setting (tests/optim/methods/test_methods_engine.py): weight decay inside SGD, no clipping, BN from the clean pass
RWP_FIXTURE = OptimConfig(name="rwp", lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4, wd_mode="decoupled",
                          grad_clip=None, rwp_alpha=0.5, rwp_gamma=0.01, bn_stats="first_pass")


@pytest.mark.parametrize("device_batch", [16, None])
def test_the_engines_step_follows_the_released_two_rank_run(device_batch: Optional[int],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """device_batch=16: devices of 16, the first clean on batch A, the second noisy on batch B; None: one
    device, which the step still halves (the same two devices)."""
    fx = fixture("rwp")
    net = tiny_net()
    base, method = build_optimizer(net, RWP_FIXTURE)
    applied: list[list[torch.Tensor]] = []
    base.register_step_pre_hook(lambda opt, args, kw: applied.append([p.grad.detach().clone() for p in net.parameters()]))
    now = {"t": 0}

    def recorded_noise(self: RWPRule, params: list[torch.Tensor], k: int, state: dict) -> list[torch.Tensor]:
        assert k == 1  # one noisy device: the fixture's rank 1
        return [torch.from_numpy(fx[f"noise/{p}"][now["t"]]).unsqueeze(0) for p in PARAMS]

    monkeypatch.setattr(RWPRule, "draw_noise", recorded_noise)  # the fixture stores its noise: injected
    step = TrainStep(net, base, method, StepConfig.of(RWP_FIXTURE, device_batch=device_batch))
    buffers = expected_buffers("rwp", "frozen")  # rank 0's: one clean forward per step
    worst = {"params": 0.0, "grad": 0.0, "buffers": 0.0}
    for t in range(STEPS):
        now["t"] = t
        (xa, ya), (xb, yb) = batch(t), batch(t, second=True)
        step(torch.cat([xa, xb]), torch.cat([ya, yb]))
        state = net.state_dict()
        worst["params"] = max(worst["params"], *(float(np.abs(state[p].numpy() - fx[f"param/{p}"][t]).max()) for p in PARAMS))
        worst["grad"] = max(worst["grad"], *(float(np.abs(g.numpy() - fx[f"grad/{p}"][t]).max())
                                             for p, g in zip(PARAMS, applied[-1])))
        worst["buffers"] = max(worst["buffers"], *(float(np.abs(state[b].numpy() - buffers[b][t]).max()) for b in BUFFERS))
    assert all(v < TOL for v in worst.values()), worst


def test_the_noisy_devices_draw_their_own_noise_and_the_clean_ones_none() -> None:
    """Four devices: two clean at w exactly, two noisy, each with its own draw from the run's generator."""
    net = tiny_net()
    base, method = build_optimizer(net, RWP_FIXTURE)
    seen: list[list[torch.Tensor]] = []
    real = RWPRule.draw_noise

    def watched(self: RWPRule, params: list[torch.Tensor], k: int, state: dict) -> list[torch.Tensor]:
        noise = real(self, params, k, state)
        seen.append(noise)
        return noise

    RWPRule.draw_noise = watched  # type: ignore[method-assign]
    try:
        step = TrainStep(net, base, method, StepConfig.of(RWP_FIXTURE, device_batch=8))
        (xa, ya), (xb, yb) = batch(0), batch(0, second=True)
        stats = step(torch.cat([xa, xb]), torch.cat([ya, yb]))
    finally:
        RWPRule.draw_noise = real  # type: ignore[method-assign]
    (noise,) = seen
    assert all(n.shape[0] == 2 and not torch.equal(n[0], n[1]) for n in noise)
    assert "generator" in method.method_state_dict()
    assert torch.isfinite(stats.grad_norm) and float(stats.perturbation_norm) > 0


@pytest.mark.parametrize("overrides, line", [
    (["batch_size=33"], "batch_size=33 is invalid: optim=rwp splits each step's batch into a clean and a noisy half: "
                        "it must be even"),
    (["batch_size=96", "device_batch=32"], "device_batch=32 is invalid: optim=rwp splits each step's devices into a "
                                           "clean and a noisy half: the batch of 96 makes 3 devices of 32; choose one "
                                           "that makes an even number"),
    (["batch_size=96", "optim.m=32"], "optim.m=32 is invalid: optim=rwp splits each step's devices into a clean and a "
                                      "noisy half: the batch of 96 makes 3 devices of 32; choose one that makes an even "
                                      "number"),
    (["batch_size=96", "engine.ddp=true", "engine.device=cpu", "engine.nproc=3"],
     "engine.nproc=3 is invalid: optim=rwp runs its clean pass on the even ranks and its noisy pass on the odd ones: "
     "it needs an even number of processes, not 3"),
])
def test_validate_refuses_a_layout_that_does_not_halve_in_one_line(overrides: list[str], line: str) -> None:
    assert problems("optim=rwp", *overrides) == [line]


@pytest.mark.parametrize("overrides", [[], ["device_batch=32"], ["batch_size=96", "device_batch=48"],
                                       ["batch_size=96", "engine.ddp=true", "engine.device=cpu", "engine.nproc=2",
                                        "device_batch=16"]])
def test_validate_accepts_a_layout_that_halves(overrides: list[str]) -> None:
    assert problems("optim=rwp", *overrides) == []


@pytest.mark.parametrize("k, rank, world, want", [
    (2, 0, 1, Halves(1, slice(0, 1), 1)),          # one process: the first half clean, the second noisy
    (4, 0, 1, Halves(2, slice(0, 2), 2)),
    (1, 0, 2, Halves(1, slice(0, 0), 1)),          # DDP: an even rank is clean and draws (to discard) rank 1's noise
    (1, 1, 2, Halves(0, slice(0, 1), 1)),
    (2, 3, 4, Halves(0, slice(2, 4), 4)),          # rank 3, the second noisy rank: rows 2, 3 of every rank's draw
])
def test_the_devices_roles(k: int, rank: int, world: int, want: Halves) -> None:
    assert two_halves(k, rank, world) == want


def test_a_layout_that_does_not_halve_is_refused_by_the_step_too() -> None:
    with pytest.raises(ValueError, match="3 devices"):
        two_halves(3)
    with pytest.raises(ValueError, match="3 processes"):
        two_halves(1, 0, 3)
    net = tiny_net()
    base, method = build_optimizer(net, RWP_FIXTURE)
    x, y = batch(0)
    with pytest.raises(ValueError, match="a batch of 15 examples does not"):
        TrainStep(net, base, method, StepConfig.of(RWP_FIXTURE))(x[:15], y[:15])
