"""The one training step: each semantics switch against a naive reference written here."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from typing import Optional

import pytest
import torch
from torch import nn

from sam_repro.config import OptimConfig
from sam_repro.engine.step import StepConfig, TrainStep
from sam_repro.models import ShakeShake, set_true_gradient
from sam_repro.models.stochastic import StochasticLayer
from sam_repro.optim.factory import build_optimizer

LR, WD, RHO = 0.1, 5e-3, 0.3


class TinyNet(nn.Module):
    def __init__(self, dropout: float = 0.0, shake: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1) if shake else None
        self.shake = ShakeShake() if shake else None
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x))
        if self.shake is not None:
            h = self.shake(h, self.conv_b(x))
        h = torch.relu(h).mean(dim=(2, 3))
        return self.fc(self.drop(h))


def make(seed: int = 0, **kw) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kw).double()


def data(n: int = 8, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def optim_cfg(name: str = "sam", **kw) -> OptimConfig:
    base = dict(name=name, lr=LR, momentum=0.9, nesterov=True, weight_decay=WD, rho=RHO, eps=0.0, grad_clip=None)
    base.update(kw)
    return OptimConfig(**base)


def engine_step(model: nn.Module, ocfg: OptimConfig, x, y, steps: int = 1, **step_kw) -> TrainStep:
    opt, sam = build_optimizer(model, ocfg)
    cfg = dataclasses.replace(StepConfig.of(ocfg), **step_kw)
    step = TrainStep(model, opt, sam, cfg)
    model.train()
    for _ in range(steps):
        step(x, y)
    return step


# -- the naive reference: autograd on the literal objective, one parameter at a time ------------
def grads_of(model: nn.Module, x, y, l2: float, smoothing: float = 0.0) -> list[torch.Tensor]:
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y, label_smoothing=smoothing)
    loss = loss + 0.5 * l2 * sum((p**2).sum() for p in model.parameters())
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def bn_stats_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def reference_step(model: nn.Module, x, y, *, sam: bool, wd_mode: str = "loss", rho: float = RHO,
                   m: Optional[int] = None, clip: Optional[float] = None, bufs: dict, smoothing: float = 0.0,
                   freeze_second_bn: bool = True, group: Optional[int] = None) -> None:
    """k devices, literally: each group of `group` examples (SAM: `m` when given) is a device that
    starts from the same BatchNorm statistics, computes its own gradient (and, for SAM, its own e),
    and keeps its own statistics; the gradients and the statistics are then averaged."""
    l2 = WD if wd_mode == "loss" else 0.0
    size = (m if (sam and m) else None) or group or x.shape[0]
    chunks = list(zip(x.split(size), y.split(size)))
    total = [torch.zeros_like(p) for p in model.parameters()]
    start = bn_stats_of(model)
    ends = []
    for xc, yc in chunks:
        model.load_state_dict({**model.state_dict(), **start})
        if not sam:
            g = grads_of(model, xc, yc, l2, smoothing)
        else:
            g0 = grads_of(model, xc, yc, l2, smoothing)
            norm = math.sqrt(sum(float((t**2).sum()) for t in g0))
            w = [p.detach().clone() for p in model.parameters()]
            with torch.no_grad():
                for p, t in zip(model.parameters(), g0):
                    p.add_(rho * t / norm)
            stats = bn_stats_of(model)
            g = grads_of(model, xc, yc, l2, smoothing)
            if freeze_second_bn:
                model.load_state_dict({**model.state_dict(), **stats})
            with torch.no_grad():
                for p, w0 in zip(model.parameters(), w):
                    p.copy_(w0)
        ends.append(bn_stats_of(model))
        for acc, t in zip(total, g):
            acc += t / len(chunks)
    averaged = {k: (sum(e[k] for e in ends) / len(ends)) if ends[0][k].is_floating_point() else ends[0][k] for k in start}
    model.load_state_dict({**model.state_dict(), **averaged})
    if clip is not None:
        norm = math.sqrt(sum(float((t**2).sum()) for t in total))
        total = [t * min(1.0, clip / (norm + 1e-6)) for t in total]
    with torch.no_grad():
        for i, (p, g) in enumerate(zip(model.parameters(), total)):
            if wd_mode == "decoupled":
                g = g + WD * p
            buf = bufs.get(i)
            buf = g.clone() if buf is None else buf.mul_(0.9).add_(g)
            bufs[i] = buf
            p.sub_(LR * (g + 0.9 * buf))


def assert_same(a: nn.Module, b: nn.Module, buffers: bool = True) -> None:
    for (name, t), u in zip(a.state_dict().items(), b.state_dict().values()):
        if buffers or name in dict(a.named_parameters()):
            torch.testing.assert_close(t, u, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("name", ["sgd", "sam"])
@pytest.mark.parametrize("wd_mode", ["loss", "decoupled"])
def test_step_matches_the_literal_objective(name: str, wd_mode: str) -> None:
    x, y = data()
    ours, ref = make(), make()
    engine_step(ours, optim_cfg(name, wd_mode=wd_mode), x, y, steps=3)
    bufs: dict = {}
    ref.train()
    for _ in range(3):
        reference_step(ref, x, y, sam=name == "sam", wd_mode=wd_mode, bufs=bufs)
    assert_same(ours, ref)


def test_wd_modes_really_differ_for_sam() -> None:
    """In `loss` mode the decay enters e(w); in `decoupled` it does not: different weights."""
    x, y = data()
    a, b = make(), make()
    engine_step(a, optim_cfg("sam", wd_mode="loss"), x, y, steps=2)
    engine_step(b, optim_cfg("sam", wd_mode="decoupled"), x, y, steps=2)
    assert not torch.allclose(a.fc.weight, b.fc.weight, atol=1e-8)


def test_bn_running_stats_first_pass_only_or_both() -> None:
    x, y = data()
    first = make()
    engine_step(first, optim_cfg("sam", bn_stats="first_pass"), x, y)
    one_pass = make()
    one_pass.train()
    one_pass(x)  # the running statistics of ONE forward at w
    torch.testing.assert_close(first.bn.running_mean, one_pass.bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(first.bn.running_var, one_pass.bn.running_var, rtol=0, atol=0)
    assert int(first.bn.num_batches_tracked) == 1

    both, ref = make(), make()
    engine_step(both, optim_cfg("sam", bn_stats="both"), x, y)
    ref.train()
    reference_step(ref, x, y, sam=True, bufs={}, freeze_second_bn=False)
    assert_same(both, ref)
    assert int(both.bn.num_batches_tracked) == 2
    assert not torch.allclose(both.bn.running_mean, first.bn.running_mean)


@pytest.mark.parametrize("m", [2, 4])
def test_m_sharpness_perturbs_each_chunk_with_its_own_gradient(m: int) -> None:
    x, y = data(8)
    ours, ref = make(), make()
    engine_step(ours, optim_cfg("sam", m=m), x, y, steps=2)
    bufs: dict = {}
    ref.train()
    for _ in range(2):
        reference_step(ref, x, y, sam=True, m=m, bufs=bufs)
    assert_same(ours, ref)  # weights, and the chunks' BatchNorm statistics averaged as k devices keep them
    assert int(ours.bn.num_batches_tracked) == 2
    whole = make()
    engine_step(whole, optim_cfg("sam"), x, y, steps=2)
    assert not torch.allclose(whole.fc.weight, ours.fc.weight, atol=1e-8)


@pytest.mark.parametrize("name", ["sgd", "sam"])
@pytest.mark.parametrize("wd_mode", ["loss", "decoupled"])
def test_per_device_step_equals_k_literal_devices(name: str, wd_mode: str) -> None:
    """device_batch=4 over 12 examples: three devices, each with its own BatchNorm (normalizing over
    its 4 examples, keeping its own running statistics, averaged) and, for SAM, its own e(w)."""
    x, y = data(12)
    ours, ref = make(), make()
    engine_step(ours, optim_cfg(name, wd_mode=wd_mode), x, y, steps=3, device_batch=4)
    bufs: dict = {}
    ref.train()
    for _ in range(3):
        reference_step(ref, x, y, sam=name == "sam", wd_mode=wd_mode, bufs=bufs, group=4)
    assert_same(ours, ref)
    # ... and not the one-device step: BatchNorm over 12 examples gives other weights and statistics
    whole = make()
    engine_step(whole, optim_cfg(name, wd_mode=wd_mode), x, y, steps=3)
    assert not torch.allclose(whole.fc.weight, ours.fc.weight, atol=1e-8)
    assert not torch.allclose(whole.bn.running_var, ours.bn.running_var, atol=1e-8)


def test_m_smaller_than_the_device_batch_splits_each_device() -> None:
    """SAM with device_batch=4 and m=2 perturbs every 2 examples; SGD ignores m (BatchNorm over 4)."""
    x, y = data(8)
    sam_net, ref = make(), make()
    engine_step(sam_net, optim_cfg("sam", m=2), x, y, steps=2, device_batch=4)
    bufs: dict = {}
    ref.train()
    for _ in range(2):
        reference_step(ref, x, y, sam=True, m=2, bufs=bufs)
    assert_same(sam_net, ref)
    sgd_net, sgd_ref = make(), make()
    engine_step(sgd_net, optim_cfg("sgd", m=2), x, y, steps=2, device_batch=4)
    bufs = {}
    sgd_ref.train()
    for _ in range(2):
        reference_step(sgd_ref, x, y, sam=False, bufs=bufs, group=4)
    assert_same(sgd_net, sgd_ref)


@pytest.mark.parametrize("bn_stats", ["first_pass", "both"])
def test_per_device_bn_stats_first_pass_only_or_both(bn_stats: str) -> None:
    x, y = data(8)
    ours, ref = make(), make()
    engine_step(ours, optim_cfg("sam", bn_stats=bn_stats), x, y, steps=2, device_batch=4)
    bufs: dict = {}
    ref.train()
    for _ in range(2):
        reference_step(ref, x, y, sam=True, bufs=bufs, group=4, freeze_second_bn=bn_stats == "first_pass")
    assert_same(ours, ref)
    assert int(ours.bn.num_batches_tracked) == (2 if bn_stats == "first_pass" else 4)


def test_per_device_step_with_clipping_and_label_smoothing() -> None:
    x, y = data(8)
    ours, ref = make(), make()
    engine_step(ours, optim_cfg("sam", grad_clip=0.05, label_smoothing=0.1), x, y, steps=2, device_batch=4)
    bufs: dict = {}
    ref.train()
    for _ in range(2):
        reference_step(ref, x, y, sam=True, bufs=bufs, group=4, clip=0.05, smoothing=0.1)
    assert_same(ours, ref)


def test_per_device_step_replays_dropout_in_the_perturbed_pass() -> None:
    """rho=0: the perturbed pass evaluates w itself; with every group's mask replayed the SAM step is
    exactly the per-device SGD step taken from the same generator state."""
    x, y = data(8)
    sam_net, sgd_net = make(dropout=0.5), make(dropout=0.5)
    torch.manual_seed(42)
    engine_step(sam_net, optim_cfg("sam", rho=0.0), x, y, device_batch=4)
    torch.manual_seed(42)
    engine_step(sgd_net, optim_cfg("sgd"), x, y, device_batch=4)
    assert_same(sam_net, sgd_net)


def test_gradient_buffers_are_kept_across_steps() -> None:
    """The step zeroes gradients in place (set_to_none=False): the base optimizer's and the clip's
    foreach kernels see the same storage every step, on both paths."""
    x, y = data(8)
    for kw in ({}, {"device_batch": 4}):
        step = engine_step(make(), optim_cfg("sam"), x, y, steps=1, **kw)
        params = [p for g in step.member.optimizer.param_groups for p in g["params"]]
        ptrs = [p.grad.data_ptr() for p in params]
        step(x, y)
        assert ptrs == [p.grad.data_ptr() for p in params]


def test_grad_clip_applies_to_the_applied_gradient() -> None:
    x, y = data()
    ours, ref, unclipped = make(), make(), make()
    engine_step(ours, optim_cfg("sam", grad_clip=0.05), x, y, steps=2)
    engine_step(unclipped, optim_cfg("sam"), x, y, steps=2)
    bufs: dict = {}
    ref.train()
    for _ in range(2):
        reference_step(ref, x, y, sam=True, clip=0.05, bufs=bufs)
    assert_same(ours, ref, buffers=False)
    assert not torch.allclose(ours.fc.weight, unclipped.fc.weight, atol=1e-6)


def test_label_smoothing() -> None:
    x, y = data()
    ours, ref = make(), make()
    engine_step(ours, optim_cfg("sam", label_smoothing=0.1), x, y)
    ref.train()
    reference_step(ref, x, y, sam=True, bufs={}, smoothing=0.1)
    assert_same(ours, ref)


def test_both_passes_see_the_same_dropout_mask() -> None:
    """rho=0 makes SAM's two passes evaluate the same point: with the mask replayed, the step is
    exactly an SGD step taken from the same generator state; with a fresh mask it is not."""
    x, y = data()
    sam_net, sgd_net = make(dropout=0.5), make(dropout=0.5)
    torch.manual_seed(42)
    engine_step(sam_net, optim_cfg("sam", rho=0.0), x, y)
    torch.manual_seed(42)
    engine_step(sgd_net, optim_cfg("sgd"), x, y)
    assert_same(sam_net, sgd_net, buffers=False)


def record_first_step(sam, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The gradients SAM's first_step perturbs with, one list per call."""
    recorded: list[list[torch.Tensor]] = []
    original = sam.first_step

    def first_step(zero_grad: bool = False) -> None:
        recorded.append([p.grad.clone() for p in params])
        original(zero_grad=zero_grad)

    sam.first_step = first_step  # type: ignore[method-assign]
    return recorded


def stochastic_layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, StochasticLayer)]


@pytest.mark.parametrize("true_gradient", [True, False])
def test_first_pass_uses_the_true_gradient_of_shake_layers(true_gradient: bool) -> None:
    x, y = data()
    net = make(shake=True)
    ocfg = optim_cfg("sam", true_gradient=true_gradient)
    opt, sam = build_optimizer(net, ocfg)
    recorded = record_first_step(sam, list(net.parameters()))
    step = TrainStep(net, opt, sam, StepConfig(true_gradient=true_gradient))
    reference = make(shake=True)
    net.train()
    reference.train()
    torch.manual_seed(7)
    step(x, y)
    torch.manual_seed(7)  # same draws as the engine's first pass
    set_true_gradient(reference, true_gradient)
    expected = grads_of(reference, x, y, WD)
    (first_grads,) = recorded
    for got, want in zip(first_grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.manual_seed(7)
    set_true_gradient(reference, not true_gradient)
    other = grads_of(reference, x, y, WD)
    assert any(not torch.allclose(g, o) for g, o in zip(first_grads, other))
    assert all(layer.true_gradient is False for layer in stochastic_layers(net)), "the second pass is a normal pass"


def test_stats_come_from_the_applied_pass() -> None:
    x, y = data()
    net = make()
    opt, sam = build_optimizer(net, optim_cfg("sam"))
    step = TrainStep(net, opt, sam, StepConfig())
    net.train()
    probe = copy.deepcopy(net)
    stats = step(x, y)
    # The perturbed pass's loss: recompute at w + e from a copy of the starting point.
    g = grads_of(probe, x, y, WD)
    norm = math.sqrt(sum(float((t**2).sum()) for t in g))
    with torch.no_grad():
        for p, t in zip(probe.parameters(), g):
            p.add_(RHO * t / norm)
    logits = probe(x)
    expected = nn.functional.cross_entropy(logits, y) * x.shape[0]
    torch.testing.assert_close(stats.loss_sum, expected.detach().to(stats.loss_sum.dtype), rtol=1e-9, atol=1e-9)
    assert int(stats.correct) == int((logits.argmax(1) == y).sum())
    assert stats.count == 8


# -- fp16's GradScaler: a loss scale must change nothing but the backward's magnitude -----------
@pytest.mark.parametrize("name, kw", [
    ("sgd", {}), ("sam", {}), ("sgd", {"device_batch": 4}),
    ("sam", {"device_batch": 4}),  # the grid backend read the scale before the scaler created it (fixed)
    ("sam", {"m": 2}),
], ids=["sgd", "sam", "sgd-per-device", "sam-per-device", "sam-m2"])
def test_a_grad_scaler_steps_like_no_scaler(name: str, kw: dict) -> None:
    """A power-of-two loss scale is exact in float64: the scaled step (L2 term, perturbation, clipping,
    unscale, base step) must land on the same weights and log the same unscaled norms as the plain one
    (up to the rounding of w + e, ~1e-12)."""
    x, y = data()
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        model = make()
        ocfg = optim_cfg(name, grad_clip=0.5, m=kw.get("m"))
        opt, sam = build_optimizer(model, ocfg)
        step = TrainStep(model, opt, sam, StepConfig(m=ocfg.m, grad_clip=0.5, device_batch=kw.get("device_batch")),
                         scaler=scaler)
        model.train()
        stats = [step(x, y) for _ in range(2)]
        runs.append((model, stats))
    (plain, plain_stats), (scaled, scaled_stats) = runs
    for (key, a), b in zip(plain.state_dict().items(), scaled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=key)
    for a, b in zip(plain_stats, scaled_stats):
        torch.testing.assert_close(a.loss_sum, b.loss_sum, rtol=1e-9, atol=0)
        if name == "sam":
            torch.testing.assert_close(a.grad_norm, b.grad_norm, rtol=1e-9, atol=0)
            torch.testing.assert_close(a.perturbation_norm, b.perturbation_norm, rtol=1e-9, atol=0)


# -- ShakeDrop in SAM's two passes: which draws the perturbed pass repeats --------------------
class ShakeDropNet(nn.Module):
    """A residual branch through ShakeDrop; a hook records each pass's per-sample coefficient."""

    def __init__(self, keep_prob: float) -> None:
        super().__init__()
        from sam_repro.models.stochastic import ShakeDrop

        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = ShakeDrop(keep_prob)
        self.fc = nn.Linear(4, 5)
        self.coefs: list[torch.Tensor] = []
        self.drop.register_forward_hook(
            lambda module, args, out: self.coefs.append((out / args[0]).flatten(1)[:, 0].detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.fc(torch.relu(h + self.drop(h)).mean(dim=(2, 3)))


def test_shakedrop_mask_is_fresh_in_the_perturbed_pass_unless_replayed() -> None:
    """Official semantics (`shakedrop_mask=fresh`): SAM's perturbed pass draws a new keep/drop mask b,
    while alpha is replayed; `replay` repeats b too. keep_prob 0.5 on 64 samples: two masks agreeing
    everywhere by chance has probability 2^-64. keep_prob 0 (every branch dropped: coefficient = alpha)
    checks that alpha is the same in both passes either way."""
    x = torch.randn(64, 3, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 5, (64,))
    for keep_prob in (0.5, 0.0):
        seen = {}
        for mask in ("fresh", "replay"):
            torch.manual_seed(0)
            net = ShakeDropNet(keep_prob).double()
            engine_step(net, optim_cfg("sam"), x, y, shakedrop_mask=mask)
            seen[mask] = tuple(net.coefs[-2:])  # the step's two forward passes (first, then at w + e)
        (fresh_first, fresh_second), (replay_first, replay_second) = seen["fresh"], seen["replay"]
        torch.testing.assert_close(fresh_first, replay_first)  # the same draws up to the perturbed pass
        torch.testing.assert_close(replay_second, replay_first)  # replay: b and alpha both repeated
        if keep_prob == 0.5:  # fresh: another b (not float noise: samples whose b changed, coefficient 1 <-> alpha)
            assert int((~torch.isclose(fresh_second, fresh_first, rtol=1e-6, atol=1e-9)).sum()) >= 8
            assert set(fresh_second.unique().tolist()) - {1.0}  # dropped samples still take alpha
        else:
            torch.testing.assert_close(fresh_second, fresh_first)  # b = 0 in both: alpha alone, replayed


def test_shakedrop_mask_switch_acts_in_the_per_device_step() -> None:
    """The vmapped per-device path (where a hook cannot keep batched tensors): with keep_prob 0.5 the
    fresh and replayed masks train to different weights; with keep_prob 0 (b = 0 in every draw) the
    switch cannot matter, and the weights agree, so alpha is replayed there too."""
    x = torch.randn(64, 3, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 5, (64,))
    for keep_prob, differ in ((0.5, True), (0.0, False)):
        weights = {}
        for mask in ("fresh", "replay"):
            torch.manual_seed(0)
            net = ShakeDropNet(keep_prob).double()
            net.drop._forward_hooks.clear()  # the coefficient recorder is for the one-device path only
            engine_step(net, optim_cfg("sam"), x, y, shakedrop_mask=mask, device_batch=8)
            weights[mask] = torch.cat([p.detach().flatten() for p in net.parameters()])
        assert (not torch.allclose(weights["fresh"], weights["replay"], rtol=0, atol=1e-12)) == differ


# -- the flags a step sets on its stochastic layers, the DDP context, an unused parameter ----------
@pytest.mark.parametrize("device_batch", [None, 4], ids=["one-group", "per-device"])
def test_after_a_step_every_stochastic_layer_is_back_in_a_normal_pass(device_batch: int | None) -> None:
    """true_gradient and perturbed_pass are on only inside their pass: the next forward (an eval, the
    next step's first pass) must be a plain one."""
    x, y = data()
    net = make(shake=True)
    engine_step(net, optim_cfg("sam", true_gradient=True), x, y, device_batch=device_batch)
    layers = stochastic_layers(net)
    assert layers and all(layer.true_gradient is False and layer.perturbed_pass is False for layer in layers)


def test_true_gradient_acts_on_the_per_device_path() -> None:
    """Shake-Shake's first-pass gradient (true_gradient: forward and backward share alpha) changes the
    per-device step's weights; drawn from the same generator state, true_gradient=False does not."""
    x, y = data()
    weights = {}
    for true_gradient in (True, False):
        net = make(shake=True)
        torch.manual_seed(3)
        engine_step(net, optim_cfg("sam", true_gradient=true_gradient), x, y, device_batch=4)
        weights[true_gradient] = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert not torch.allclose(weights[True], weights[False], rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["sgd", "sam"])
def test_the_first_pass_context_wraps_sams_first_pass_only(name: str) -> None:
    """DDP passes model.no_sync as first_pass_context: SAM's first (unperturbed) pass must not all-reduce
    (each replica perturbs with its own gradient); SGD's only pass must."""
    x, y = data()
    net = make()
    opt, sam = build_optimizer(net, optim_cfg(name))
    entered = []

    @contextlib.contextmanager
    def no_sync():
        entered.append(True)
        yield

    step = TrainStep(net, opt, sam, StepConfig(), first_pass_context=no_sync)
    net.train()
    step(x, y)
    step(x, y)
    assert len(entered) == (2 if name == "sam" else 0)


def test_a_parameter_without_gradient_still_gets_its_l2_step_on_the_per_device_path() -> None:
    """A parameter the loss does not reach (an unused head) gets no gradient from either pass; its L2
    term (wd_mode=loss, as the official code's L2 in the loss) still moves it: w - lr * l2 * (w + mean e),
    with rho ~ 0 here so that e ~ 0. (vmap hands such a parameter expanded zeros, which the L2 term
    used to be added to in place: a crash.)"""
    x, y = data()
    net = make()
    net.unused = nn.Parameter(torch.full((3,), 2.0, dtype=torch.float64))
    engine_step(net, optim_cfg("sam", momentum=0.0, nesterov=False, rho=1e-12), x, y, device_batch=4)
    torch.testing.assert_close(net.unused.detach(), torch.full((3,), 2.0 - LR * WD * 2.0, dtype=torch.float64),
                               rtol=1e-10, atol=0)


def test_a_model_that_is_itself_a_batchnorm_keeps_per_device_statistics() -> None:
    """A root module (no name prefix) on the per-device path: each device normalizes its own slice, and
    the running statistics become the devices' mean of their batch statistics."""
    torch.manual_seed(0)
    model = nn.BatchNorm1d(5).double()  # features in, the normalized features as 5 logits
    x = torch.randn(8, 5, dtype=torch.float64) + torch.arange(5, dtype=torch.float64)
    y = torch.randint(0, 5, (8,))
    engine_step(model, optim_cfg("sgd"), x, y, device_batch=4)
    device_means = x.view(2, 4, 5).mean(1)
    torch.testing.assert_close(model.running_mean, 0.1 * device_means.mean(0), rtol=1e-12, atol=1e-14)
    unbiased = x.view(2, 4, 5).var(1, unbiased=True)
    torch.testing.assert_close(model.running_var, 0.9 + 0.1 * unbiased.mean(0), rtol=1e-12, atol=1e-14)


def test_a_root_batchnorm_keeps_its_weights_in_float32_under_bf16_on_the_per_device_path() -> None:
    """The root module's parameters have no prefix either ('weight'): BatchNorm's weights stay fp32
    under autocast, as they do for a BatchNorm inside a model (tests/engine/test_step_layouts.py)."""
    torch.manual_seed(0)
    model = nn.BatchNorm1d(5)
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(m.weight.dtype))
    x, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    engine_step(model, optim_cfg("sgd"), x, y, device_batch=4, autocast_dtype=torch.bfloat16)
    assert seen and set(seen) == {torch.float32}


def test_the_per_device_path_calls_the_plain_module_never_its_wrapper() -> None:
    """Under DDP or torch.compile the step gets the wrapper as `model` and the plain module as `module`:
    the grid backend must call the plain module functionally (a DDP forward would all-reduce inside
    vmap) and still train the same weights."""
    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.inner(x)

    x, y = data()
    plain, inner = make(), make()
    wrapper = Wrapper(inner)
    for model, module in ((plain, None), (wrapper, inner)):
        opt, sam = build_optimizer(model, optim_cfg("sam"))
        step = TrainStep(model, opt, sam, StepConfig(device_batch=4), module=module)
        model.train()
        step(x, y)
    assert wrapper.calls == 0
    assert_same(plain, inner)
