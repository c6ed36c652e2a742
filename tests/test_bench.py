"""The benchmark's reference (the popular port's per-parameter loop) computes the same SAM update as
ours, so the speed-up the benchmark prints compares equal work."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from sam_repro.optim import SAM
from tests.optim.test_sam import batches, loss_of, make_net

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from bench_step import LoopSAM  # noqa: E402


def test_reference_loop_sam_equals_the_fused_sam() -> None:
    ours, ref = make_net(), make_net()
    kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt, loop = SAM(ours.parameters(), torch.optim.SGD, rho=0.05, **kw), LoopSAM(ref.parameters(), torch.optim.SGD, rho=0.05, **kw)
    for x, y in batches(4):
        for net, o in ((ours, opt), (ref, loop)):
            loss_of(net, x, y).backward()
            o.first_step(zero_grad=True)
            loss_of(net, x, y).backward()
            o.second_step(zero_grad=True)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
