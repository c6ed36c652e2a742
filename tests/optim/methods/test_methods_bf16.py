"""Every SAM-family method's engine step under engine.precision=bf16 (autocast; on the CPU here): a few
steps with finite losses that stay close to the same steps in fp32, so that bf16 is not silently
broken for any method (a rule that mishandled the autocast dtype, or a pass left out of the casts
grid.py makes by hand under vmap, would fail, give NaN, or drift as far as plain SGD is)."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from sam_repro.config import OptimConfig
from sam_repro.engine.runtime import PRECISIONS
from sam_repro.engine.step import StepConfig, TrainStep
from sam_repro.optim.factory import build_optimizer
from sam_repro.optim.methods import METHOD_SPECS
from tests.optim.methods.methods_helpers import batch, tiny_net

STEPS = 4
# what makes each method's 4 steps exercise its whole step: plain and SAM steps alternating, ESAM's subsets
OWN = {"interval_sam": dict(sam_interval=2), "looksam": dict(looksam_k=2), "esam": dict(esam_selection="topk")}
# perturbations large enough that each method's 4 steps end far from plain SGD's (at the default rho
# 0.05 on this network the two differ by about bf16's own error), so that "close to fp32" can fail
LARGE = dict(rho=0.5, rwp_gamma=0.1)


@lru_cache(maxsize=None)
def train(method: str, precision: str) -> tuple[tuple[torch.Tensor, ...], tuple[float, ...]]:
    """STEPS steps of the tiny BatchNorm network (float32 weights) over 2 devices of 16 (RWP: one clean,
    one noisy): its weights after them, and the losses."""
    torch.manual_seed(0)  # the methods' own draws (ESAM's keep masks, RWP's noise) are seeded from it
    net = tiny_net().float()
    cfg = OptimConfig(name=method, lr=0.1, momentum=0.9, weight_decay=5e-4, **LARGE, **OWN.get(method, {}))
    base, sam = build_optimizer(net, cfg)
    step = TrainStep(net, base, sam, StepConfig.of(cfg, device_batch=16, autocast_dtype=PRECISIONS[precision].autocast))
    losses = []
    for t in range(STEPS):
        (xa, ya), (xb, yb) = batch(t), batch(t, second=True)
        stats = step(torch.cat([xa, xb]).float(), torch.cat([ya, yb]))
        losses.append(float(stats.loss_sum) / stats.count)
    return tuple(p.detach().clone() for p in net.parameters()), tuple(losses)


def max_gap(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("method", sorted(METHOD_SPECS))
def test_each_method_steps_in_bf16_close_to_fp32(method: str) -> None:
    low, low_losses = train(method, "bf16")
    full, _ = train(method, "fp32")
    sgd, _ = train("sgd", "fp32")
    assert all(torch.isfinite(torch.tensor(low_losses)))
    start = tuple(p.detach().float() for p in tiny_net().parameters())
    moved, gap, from_sgd = max_gap(full, start), max_gap(low, full), max_gap(sgd, full)
    # bf16 keeps 8 significant bits: each convolution's output and gradient carries ~0.4 % rounding,
    # and 4 steps with momentum accumulate it to a few percent of the distance the weights moved
    # (measured: 2-6 %; WSAM 16 %, its sharpness step g1 - g0 being a difference of nearly equal
    # gradients that cancels their common part and keeps their rounding). 30 % of the distance moved
    # leaves room for that and is far below what a broken step does (NaN, a pass in the wrong dtype).
    assert gap < 0.3 * moved, (gap, moved)
    # ... and the bf16 run is at least twice as close to its fp32 run as plain SGD is (measured: 3.7 to 18
    # times), so a method that silently lost its perturbation in bf16 would fail here
    assert gap < 0.5 * from_sgd, (gap, from_sgd)
