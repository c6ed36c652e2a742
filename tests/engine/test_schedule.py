"""sam_repro.engine.schedule: the lr of every optimizer step, against formulas written here.

The references below are the textbook definitions, written independently of the module:
- cosine (the official CIFAR code): lr_t = lr * (f + (1 - f) * (1 + cos(pi * t / T)) / 2), t = 0..T-1,
  so step 0 trains at the full lr and the curve reaches f * lr only after the last step;
- linear warm-up over W steps: lr_t = lr * (t + 1) / W for t < W (the first step already moves,
  the W-th step reaches the full lr), then the decay runs over the remaining T - W steps;
- step decay: lr_t = lr * gamma ** #{milestones m : m * steps_per_epoch <= t}, so the decay
  takes effect on the first step of epoch m (0-based), as torch's MultiStepLR does per epoch.
"""
from __future__ import annotations

import math

import pytest
import torch

from sam_repro.config import SchedConfig
from sam_repro.engine.schedule import SCHEDULES, LrSetter

LR = 0.1
PER_EPOCH = 7  # steps per epoch; odd, so an off-by-one in epoch arithmetic cannot cancel out
EPOCHS = 6
TOTAL = PER_EPOCH * EPOCHS


def curve(cfg: SchedConfig, lr: float = LR, total: int = TOTAL, per_epoch: int = PER_EPOCH) -> list[float]:
    """The lr LrSetter gives at every step 0..total-1 (read back from the optimizer's group)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    setter = LrSetter(opt, cfg, total, per_epoch)
    out = []
    for step in range(total):
        returned = setter(step)
        assert returned == opt.param_groups[0]["lr"]  # what the log records is what the optimizer uses
        out.append(opt.param_groups[0]["lr"])
    return out


def cosine_ref(t: int, total: int, warmup: int = 0, final: float = 0.0) -> float:
    if t < warmup:
        return LR * (t + 1) / warmup
    return LR * (final + (1 - final) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))) / 2)


def test_the_registry_has_the_three_documented_schedules() -> None:
    assert set(SCHEDULES) == {"cosine", "step", "constant"}


def test_cosine_without_warmup_is_the_official_curve_step_by_step() -> None:
    got = curve(SchedConfig(name="cosine"))
    want = [cosine_ref(t, TOTAL) for t in range(TOTAL)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert got[0] == LR  # the first step trains at the full lr, not one step into the decay
    assert got[TOTAL // 2] == pytest.approx(LR / 2, abs=1e-15)  # half-way: half the lr


def test_cosine_with_a_final_lr_fraction_ends_above_zero() -> None:
    got = curve(SchedConfig(name="cosine", final_lr_fraction=0.1))
    want = [cosine_ref(t, TOTAL, final=0.1) for t in range(TOTAL)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("warmup_epochs", [1.0, 2.0, 0.5])
def test_cosine_with_warmup_ramps_linearly_from_the_first_step_then_decays(warmup_epochs: float) -> None:
    warm = warmup_epochs * PER_EPOCH  # 3.5 steps for 0.5 epochs: the ramp is defined per step
    got = curve(SchedConfig(name="cosine", warmup_epochs=warmup_epochs))
    want = [LR * min(1.0, (t + 1) / warm) if t < warm  # never above lr, even when warm is fractional
            else LR * (1 + math.cos(math.pi * (t - warm) / (TOTAL - warm))) / 2 for t in range(TOTAL)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert got[0] == pytest.approx(LR / warm)  # warm-up never starts at lr 0 (a wasted step)
    assert max(got) == LR  # the peak is the configured lr, reached once the warm-up ends


@pytest.mark.parametrize("milestones", [[2, 4], [4, 2], [1.5, 3]])
def test_step_decay_multiplies_by_gamma_on_the_first_step_of_each_milestone_epoch(milestones: list[float]) -> None:
    gamma = 0.2
    got = curve(SchedConfig(name="step", milestones=milestones, gamma=gamma))
    want = [LR * gamma ** sum(m * PER_EPOCH <= t for m in milestones) for t in range(TOTAL)]
    assert got == pytest.approx(want, rel=1e-12)
    if milestones == [2, 4]:  # spelled out for one case: steps 13 | 14 and 27 | 28 are the edges
        assert got[2 * PER_EPOCH - 1] == LR and got[2 * PER_EPOCH] == pytest.approx(LR * gamma)
        assert got[4 * PER_EPOCH - 1] == pytest.approx(LR * gamma)
        assert got[4 * PER_EPOCH] == pytest.approx(LR * gamma ** 2)


def test_step_decay_after_warmup() -> None:
    got = curve(SchedConfig(name="step", milestones=[3], gamma=0.5, warmup_epochs=1.0))
    want = [LR * (t + 1) / PER_EPOCH if t < PER_EPOCH else LR * 0.5 ** (t >= 3 * PER_EPOCH) for t in range(TOTAL)]
    assert got == pytest.approx(want, rel=1e-12)


def test_constant_is_flat_and_takes_a_warmup() -> None:
    assert curve(SchedConfig(name="constant")) == [LR] * TOTAL
    got = curve(SchedConfig(name="constant", warmup_epochs=1.0))
    want = [LR * min(1.0, (t + 1) / PER_EPOCH) for t in range(TOTAL)]
    assert got == pytest.approx(want, rel=1e-12)


def test_every_group_keeps_its_own_initial_lr_and_a_resumed_setter_does_not_compound() -> None:
    # Finetuning gives the head and the body different lrs; the schedule scales each from its own.
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}], lr=0.1)
    cfg = SchedConfig(name="cosine")
    LrSetter(opt, cfg, TOTAL, PER_EPOCH)(10)
    setter = LrSetter(opt, cfg, TOTAL, PER_EPOCH)  # a second setter (a resume) must read initial_lr
    setter(TOTAL // 2)
    factor = (1 + math.cos(math.pi * (TOTAL // 2) / TOTAL)) / 2
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * factor, 0.01 * factor], rel=1e-12)


def test_a_decay_phase_shorter_than_two_steps_still_follows_the_formula() -> None:
    # 3 steps, warm-up 0.75 epochs of 2 steps = 1.5 steps: the cosine spans the last 1.5 steps.
    got = curve(SchedConfig(name="cosine", warmup_epochs=0.75), total=3, per_epoch=2)
    want = [LR / 1.5, LR, LR * (1 + math.cos(math.pi * 0.5 / 1.5)) / 2]
    assert got == pytest.approx(want, rel=1e-12)


def test_a_schedule_added_to_the_registry_is_what_lr_setter_uses() -> None:
    """SCHEDULES is the registry (docs/architecture.md: a new schedule is a function in it)."""
    SCHEDULES["test_half"] = lambda cfg: (lambda step, total, per_epoch: 0.5)
    try:
        assert curve(SchedConfig(name="test_half"), total=3) == [LR / 2] * 3
    finally:
        SCHEDULES.pop("test_half")
