"""The fused SAM step against an independent per-parameter reference written here, in float64."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sam_repro.optim import SAM

LR, MOMENTUM = 0.1, 0.9


def make_net(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """A small net with BatchNorm (its scale and bias are parameters too) and a unused layer."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )
    return net.to(dtype)


def two_groups(net: nn.Module, rho_second: float | None = None) -> list[dict]:
    """Conv + BN in one group, the classifier in another with its own lr (and maybe rho)."""
    head = {"params": list(net[4].parameters()), "lr": LR / 2}
    if rho_second is not None:
        head["rho"] = rho_second
    return [{"params": list(net[0].parameters()) + list(net[1].parameters())}, head]


def batches(n: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 6, 6, generator=g, dtype=dtype), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def loss_of(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(net(x), y)


class ReferenceSAM:
    """The textbook algorithm, one parameter at a time: Eq. 2 of the paper, then Nesterov SGD."""

    def __init__(self, groups: list[dict], rho: float, p: float, adaptive: bool, eta: float) -> None:
        self.groups = [{"lr": g.get("lr", LR), "rho": g.get("rho", rho), "params": g["params"]} for g in groups]
        self.p, self.adaptive, self.eta = p, adaptive, eta
        self.buf: dict[int, torch.Tensor] = {}

    def step(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        net.zero_grad()
        loss_of(net, x, y).backward()
        items = [(g, w) for g in self.groups for w in g["params"] if w.grad is not None]
        if self.adaptive:
            t = {id(w): w.detach().abs() + self.eta for _, w in items}
            norm = math.sqrt(sum(float(((t[id(w)] * w.grad) ** 2).sum()) for _, w in items))
            e = {id(w): g["rho"] * t[id(w)] ** 2 * w.grad / norm for g, w in items}
        elif self.p == 2:
            norm = math.sqrt(sum(float((w.grad**2).sum()) for _, w in items))
            e = {id(w): g["rho"] * w.grad / norm for g, w in items}
        else:
            e = {id(w): g["rho"] * torch.sign(w.grad) for g, w in items}
        with torch.no_grad():
            for _, w in items:
                w.add_(e[id(w)])
        net.zero_grad()
        loss_of(net, x, y).backward()
        with torch.no_grad():
            for g, w in items:
                w.sub_(e[id(w)])
                buf = self.buf.get(id(w))
                buf = w.grad.clone() if buf is None else buf.mul_(MOMENTUM).add_(w.grad)
                self.buf[id(w)] = buf
                w.sub_(g["lr"] * (w.grad + MOMENTUM * buf))  # Nesterov


def sam_step(net: nn.Module, opt: SAM, x: torch.Tensor, y: torch.Tensor) -> None:
    loss_of(net, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(net, x, y).backward()
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize(
    "p, adaptive, eta, rho",
    [(2, False, 0.0, 0.05), (math.inf, False, 0.0, 0.01), (2, True, 0.0, 0.5), (2, True, 0.01, 0.5)],
    ids=["p2", "pinf", "asam-eta0", "asam-eta0.01"],
)
def test_matches_per_parameter_reference(p: float, adaptive: bool, eta: float, rho: float) -> None:
    ours, ref = make_net(), make_net()
    opt = SAM(two_groups(ours), torch.optim.SGD, rho=rho, p=p, adaptive=adaptive, eta=eta, eps=0.0,
              lr=LR, momentum=MOMENTUM, nesterov=True)
    reference = ReferenceSAM(two_groups(ref), rho, p, adaptive, eta)
    for x, y in batches(5):
        sam_step(ours, opt, x, y)
        reference.step(ref, x, y)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    # The trajectory really moved, and SAM moved it differently from plain SGD.
    sgd = make_net()
    sgd_opt = torch.optim.SGD(two_groups(sgd), lr=LR, momentum=MOMENTUM, nesterov=True)
    for x, y in batches(5):
        sgd_opt.zero_grad()
        loss_of(sgd, x, y).backward()
        sgd_opt.step()
    assert not torch.allclose(ours[4].weight, sgd[4].weight, atol=1e-6)


def test_per_group_rho_overrides_default() -> None:
    ours, ref = make_net(), make_net()
    opt = SAM(two_groups(ours, rho_second=0.2), torch.optim.SGD, rho=0.05, eps=0.0, lr=LR, momentum=MOMENTUM, nesterov=True)
    reference = ReferenceSAM(two_groups(ref, rho_second=0.2), 0.05, 2, False, 0.0)
    for x, y in batches(3):
        sam_step(ours, opt, x, y)
        reference.step(ref, x, y)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_rho_zero_is_the_base_optimizer_bit_for_bit() -> None:
    ours, base = make_net(torch.float32), make_net(torch.float32)
    opt = SAM(two_groups(ours), torch.optim.SGD, rho=0.0, lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=5e-4)
    sgd = torch.optim.SGD(two_groups(base), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=5e-4)
    for x, y in batches(6, torch.float32):
        sam_step(ours, opt, x, y)
        sgd.zero_grad()
        loss_of(base, x, y).backward()
        sgd.step()
    for a, b in zip(ours.parameters(), base.parameters()):
        assert torch.equal(a, b)


class RecordingSGD(torch.optim.SGD):
    """Records the weights the base optimizer sees when its step starts."""

    seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):  # type: ignore[override]
        RecordingSGD.seen.append([p.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def test_base_optimizer_sees_exactly_the_weights_from_before_first_step() -> None:
    net = make_net(torch.float32)
    opt = SAM(net.parameters(), RecordingSGD, rho=0.5, lr=LR, momentum=MOMENTUM)
    RecordingSGD.seen = []
    for x, y in batches(3, torch.float32):
        before = [p.detach().clone() for p in net.parameters()]
        loss_of(net, x, y).backward()
        opt.first_step(zero_grad=True)
        assert any(not torch.equal(a, b) for a, b in zip(net.parameters(), before)), "first_step must move w"
        loss_of(net, x, y).backward()
        opt.second_step(zero_grad=True)
        assert all(torch.equal(a, b) for a, b in zip(RecordingSGD.seen[-1], before))


def test_buffers_are_allocated_once_and_parameter_storage_is_kept() -> None:
    net = make_net(torch.float32)
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=LR)
    storage = [p.data_ptr() for p in net.parameters()]
    saved_ptrs = None
    for x, y in batches(3, torch.float32):
        sam_step(net, opt, x, y)
        ptrs = [opt.state[p]["sam_w"].data_ptr() for p in net.parameters()]
        saved_ptrs = saved_ptrs or ptrs
        assert ptrs == saved_ptrs
    assert [p.data_ptr() for p in net.parameters()] == storage


def test_closure_step_equals_the_two_call_form() -> None:
    a, b = make_net(), make_net()
    opt_a = SAM(two_groups(a), torch.optim.SGD, rho=0.05, lr=LR, momentum=MOMENTUM, nesterov=True)
    opt_b = SAM(two_groups(b), torch.optim.SGD, rho=0.05, lr=LR, momentum=MOMENTUM, nesterov=True)
    for x, y in batches(4):
        sam_step(a, opt_a, x, y)
        loss_of(b, x, y).backward()
        loss = opt_b.step(lambda: loss_of(b, x, y).backward() or loss_of(b, x, y))
        opt_b.zero_grad()
        assert torch.is_tensor(loss)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_state_dict_round_trip_mid_training_continues_identically() -> None:
    net = make_net()
    opt = SAM(two_groups(net, rho_second=0.1), torch.optim.SGD, rho=0.05, lr=LR, momentum=MOMENTUM, nesterov=True)
    data = batches(6)
    for x, y in data[:3]:
        sam_step(net, opt, x, y)
    model_sd, opt_sd = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    for x, y in data[3:]:
        sam_step(net, opt, x, y)

    resumed = make_net(seed=123)  # different initial weights: everything must come from the state
    resumed.load_state_dict(model_sd)
    opt2 = SAM(two_groups(resumed), torch.optim.SGD, rho=0.7, lr=1.0, momentum=0.0)
    opt2.load_state_dict(opt_sd)
    assert opt2.param_groups[1]["rho"] == 0.1 and opt2.param_groups[0]["rho"] == 0.05
    assert opt2.param_groups[0]["lr"] == LR and opt2.param_groups[0]["momentum"] == MOMENTUM
    for x, y in data[3:]:
        sam_step(resumed, opt2, x, y)
    for a, b in zip(net.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_grad_scaler_with_an_inf_gradient_skips_the_step_cleanly() -> None:
    net = make_net(torch.float32)
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=LR, momentum=MOMENTUM)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def scaled_step(x: torch.Tensor, y: torch.Tensor) -> None:
        scaler.scale(loss_of(net, x, y)).backward()
        opt.first_step(zero_grad=True)
        scaler.scale(loss_of(net, x, y)).backward()
        opt.unperturb()
        scaler.step(opt.base_optimizer)
        scaler.update()
        opt.zero_grad()

    (x, y), (x2, y2) = batches(2, torch.float32)
    scaled_step(x, y)  # a finite step first, so momentum buffers exist
    before = [p.detach().clone() for p in net.parameters()]
    momentum_before = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in net.parameters()]
    scale_before = scaler.get_scale()
    bad = x2.clone()
    bad[0, 0, 0, 0] = float("inf")
    scaled_step(bad, y2)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), before)), "weights must not move"
    assert all(torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], m) for p, m in zip(net.parameters(), momentum_before))
    assert scaler.get_scale() == scale_before / 2
    scaled_step(x2, y2)  # and training goes on
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(net.parameters(), before))


def test_parameters_without_gradient_are_neither_perturbed_nor_counted() -> None:
    net = make_net()
    extra = nn.Linear(3, 3).double()  # in the optimizer, never used: grad stays None
    net[0].bias.requires_grad_(False)  # frozen
    bias_before, extra_before = net[0].bias.detach().clone(), extra.weight.detach().clone()
    opt = SAM(list(net.parameters()) + list(extra.parameters()), torch.optim.SGD, rho=0.05, eps=0.0, lr=LR)
    x, y = batches(1)[0]
    loss_of(net, x, y).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    w = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt.first_step()
    norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
    for n, p in net.named_parameters():
        if n in grads:
            torch.testing.assert_close(p - w[n], 0.05 * grads[n] / norm, rtol=1e-9, atol=1e-12)
    assert torch.equal(net[0].bias, bias_before) and torch.equal(extra.weight, extra_before)
    opt.second_step()
    assert torch.equal(extra.weight, extra_before)


def test_first_step_twice_without_restoring_is_refused() -> None:
    net = make_net()
    opt = SAM(net.parameters(), torch.optim.SGD, lr=LR)
    x, y = batches(1)[0]
    loss_of(net, x, y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()


def test_mixed_dtypes_share_one_global_norm() -> None:
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(5, dtype=torch.float32))
    b = nn.Parameter(torch.randn(7, dtype=torch.float64))
    opt = SAM([a, b], torch.optim.SGD, rho=0.3, eps=0.0, lr=LR)
    ((a.double() ** 3).sum() + (b**2).sum()).backward()
    ga, gb = a.grad.double().clone(), b.grad.clone()
    wa, wb = a.detach().double().clone(), b.detach().clone()
    opt.first_step()
    norm = torch.sqrt((ga**2).sum() + (gb**2).sum())
    torch.testing.assert_close(a.double() - wa, 0.3 * ga / norm, rtol=1e-5, atol=1e-6)
    # The float32 bucket contributes a float32-accurate partial norm, hence rtol 1e-6.
    torch.testing.assert_close(b - wb, 0.3 * gb / norm, rtol=1e-6, atol=1e-9)


def test_bf16_parameters_use_a_float32_norm() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4096, dtype=torch.bfloat16) * 100)
    opt = SAM([w], torch.optim.SGD, rho=0.05, eps=0.0, lr=LR)
    (w.float() ** 2).sum().backward()
    g = w.grad.double().clone()
    w0 = w.detach().double().clone()
    opt.first_step()
    expected = 0.05 * g / g.norm()
    torch.testing.assert_close(w.double() - w0, expected, rtol=0.05, atol=2.0)  # bf16 rounding of w + e
    opt.unperturb()
    assert torch.equal(w.double(), w0)


def test_under_bf16_autocast_e_follows_the_actual_gradients() -> None:
    net = make_net(torch.float32)
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, eps=0.0, lr=LR)
    x, y = batches(1, torch.float32)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(net, x, y)
    loss.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    w = [p.detach().clone() for p in net.parameters()]
    opt.first_step(zero_grad=True)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    for p, g, w0 in zip(net.parameters(), grads, w):
        torch.testing.assert_close((p - w0).double(), 0.05 * g.double() / norm, rtol=1e-4, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_of(net, x, y).backward()
    g_at_e = [p.grad.clone() for p in net.parameters()]  # the bf16-autocast gradient at w + e
    opt.second_step(zero_grad=True)
    # Back to w exactly, then plain SGD with the gradient taken at w + e: w - lr * g(w + e).
    for p, g, w0 in zip(net.parameters(), g_at_e, w):
        torch.testing.assert_close(p, torch.add(w0, g, alpha=-LR), rtol=1e-6, atol=1e-8)
    assert any(not torch.equal(a, b) for a, b in zip(g_at_e, grads))  # the second gradient is a new one


def test_adamw_base_optimizer() -> None:
    """SAM around AdamW: rho=0 is AdamW exactly; rho>0 matches a reference e(w) then AdamW."""
    ours, base, ref = make_net(), make_net(), make_net()
    opt = SAM(ours.parameters(), torch.optim.AdamW, rho=0.0, lr=1e-3, weight_decay=0.01)
    adamw = torch.optim.AdamW(base.parameters(), lr=1e-3, weight_decay=0.01)
    for x, y in batches(3):
        sam_step(ours, opt, x, y)
        adamw.zero_grad()
        loss_of(base, x, y).backward()
        adamw.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), base.parameters()))

    ours = make_net()
    opt = SAM(ours.parameters(), torch.optim.AdamW, rho=0.1, eps=0.0, lr=1e-3, weight_decay=0.01)
    ref_adamw = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01)
    for x, y in batches(3):
        sam_step(ours, opt, x, y)
        ref_adamw.zero_grad()
        loss_of(ref, x, y).backward()
        norm = math.sqrt(sum(float((p.grad**2).sum()) for p in ref.parameters()))
        saved = [p.detach().clone() for p in ref.parameters()]
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.1 * p.grad / norm)
        ref_adamw.zero_grad()
        loss_of(ref, x, y).backward()
        with torch.no_grad():
            for p, w in zip(ref.parameters(), saved):
                p.copy_(w)
        ref_adamw.step()
    # The conv bias feeds a BatchNorm, so its true gradient is 0 and what backward returns is
    # rounding noise, which Adam normalizes to steps of size ~lr: compare at 1e-9, not 1e-12.
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_compiled_model_sees_the_perturbed_and_restored_weights() -> None:
    torch._dynamo.reset()
    eager, compiled_net = make_net(torch.float32), make_net(torch.float32)
    compiled = torch.compile(compiled_net, backend="aot_eager")
    opt_e = SAM(eager.parameters(), torch.optim.SGD, rho=0.05, lr=LR, momentum=MOMENTUM)
    opt_c = SAM(compiled_net.parameters(), torch.optim.SGD, rho=0.05, lr=LR, momentum=MOMENTUM)
    for x, y in batches(3, torch.float32):
        sam_step(eager, opt_e, x, y)
        sam_step(compiled, opt_c, x, y)
    for a, b in zip(eager.parameters(), compiled_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: checks the step never syncs with the host")
def test_no_host_synchronization_on_cuda() -> None:
    net = make_net(torch.float32).cuda()
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=LR, momentum=MOMENTUM, nesterov=True)
    x, y = (t.cuda() for t in batches(1, torch.float32)[0])
    sam_step(net, opt, x, y)  # warm-up allocates the buffers
    loss_of(net, x, y).backward()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.first_step(zero_grad=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    loss_of(net, x, y).backward()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.second_step(zero_grad=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_invalid_settings_are_refused() -> None:
    params = make_net().parameters()
    with pytest.raises(ValueError, match="rho"):
        SAM(params, torch.optim.SGD, rho=-0.1, lr=LR)
    with pytest.raises(ValueError, match="p="):
        SAM(make_net().parameters(), torch.optim.SGD, p=1, lr=LR)


# ---- the API's documented defaults and edges (mutation-testing gaps) --------------------------

def test_the_documented_defaults() -> None:
    """docs/paper.md#the-optimizer-class: SAM(params, base, rho=0.05, p=2, adaptive=False, eta=0.0,
    eps=1e-12, **base kwargs); every group carries them (adaptive_scale=True: T = |w| + eta on every
    parameter), the logged norms are None until the first step, and the base optimizer is built with
    the base kwargs."""
    net = make_net()
    opt = SAM(net.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM)
    assert opt.last_grad_norm is None and opt.last_perturbation_norm is None
    for g in opt.param_groups:
        assert (g["rho"], g["p"], g["adaptive"], g["eta"], g["sam_eps"], g["adaptive_scale"]) == (
            0.05, 2, False, 0.0, 1e-12, True)
        assert (g["lr"], g["momentum"]) == (LR, MOMENTUM)
    # a group added later (progressive unfreezing) takes the configured lr and momentum, not SGD's defaults
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt.base_optimizer.add_param_group({"params": [extra]})
    assert (opt.param_groups[-1]["lr"], opt.param_groups[-1]["momentum"]) == (LR, MOMENTUM)


def test_unperturb_is_a_no_op_before_a_step_and_idempotent_after_one() -> None:
    net = make_net()
    w0 = [q.detach().clone() for q in net.parameters()]
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.5, lr=LR)
    opt.unperturb()
    opt.unperturb()
    x, y = batches(1)[0]
    loss_of(net, x, y).backward()
    opt.first_step(zero_grad=True)
    assert any(not torch.equal(q, w) for q, w in zip(net.parameters(), w0))
    opt.unperturb()
    opt.unperturb()
    assert all(torch.equal(q, w) for q, w in zip(net.parameters(), w0))


def test_a_first_step_without_gradients_moves_nothing_and_can_be_undone() -> None:
    net = make_net()
    w0 = [q.detach().clone() for q in net.parameters()]
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.5, lr=LR)
    opt.first_step()
    opt.unperturb()
    opt.first_step()  # not "called twice": nothing was perturbed
    opt.second_step()
    assert all(torch.equal(q, w) for q, w in zip(net.parameters(), w0))


@pytest.mark.parametrize("which, setting", [(1, {"p": math.inf}), (1, {"adaptive": True}), (2, {"adaptive": True})])
def test_every_group_must_share_p_and_adaptive(which: int, setting: dict) -> None:
    params = [nn.Parameter(torch.randn(3, dtype=torch.float64)) for _ in range(3)]
    groups = [{"params": [q]} for q in params]
    groups[which].update(setting)
    opt = SAM(groups, torch.optim.SGD, rho=0.1, lr=LR)
    sum((q**2).sum() for q in params).backward()
    with pytest.raises(ValueError, match="share p and adaptive"):
        opt.first_step()


@pytest.mark.parametrize("zero_grad", [True, False])
def test_eps_enters_e_and_both_logged_norms_describe_the_step_taken(zero_grad: bool) -> None:
    """eps is normally 1e-12 and invisible; at eps=0.5 e = rho g / (||g|| + eps) is a different vector.
    last_perturbation_norm is the norm of the move actually made; zero_grad=False keeps g."""
    net = make_net()
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.3, eps=0.5, lr=LR)
    x, y = batches(1)[0]
    loss_of(net, x, y).backward()
    g = [q.grad.clone() for q in net.parameters()]
    w0 = [q.detach().clone() for q in net.parameters()]
    norm = math.sqrt(sum(float((gi**2).sum()) for gi in g))
    opt.first_step(zero_grad=zero_grad)
    moves = [q.detach() - w for q, w in zip(net.parameters(), w0)]
    for move, gi in zip(moves, g):
        torch.testing.assert_close(move, 0.3 * gi / (norm + 0.5), rtol=1e-12, atol=1e-15)
    assert float(opt.last_grad_norm) == pytest.approx(norm, rel=1e-12)
    assert float(opt.last_perturbation_norm) == pytest.approx(
        math.sqrt(sum(float((m**2).sum()) for m in moves)), rel=1e-9)
    for q, gi in zip(net.parameters(), g):
        assert torch.equal(q.grad, torch.zeros_like(gi) if zero_grad else gi)


@pytest.mark.parametrize("p, adaptive", [(2, False), (math.inf, False), (2, True)], ids=["p2", "pinf", "asam"])
def test_bf16_gradient_norms_are_accumulated_and_kept_in_float32(p: float, adaptive: bool) -> None:
    """The logged ||g|| of bf16 gradients is float32-accurate (a bf16 result is off by up to 2^-9)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4096, dtype=torch.bfloat16) * 100)
    opt = SAM([w], torch.optim.SGD, rho=0.05, p=p, adaptive=adaptive, lr=LR)
    (w.float() ** 3).sum().backward()
    ref = w.grad.double().norm()
    opt.first_step()
    assert opt.last_grad_norm.dtype == torch.float32
    assert abs(float(opt.last_grad_norm) - float(ref)) <= 1e-6 * float(ref)


def test_device_perturbations_logs_float32_norms_of_bf16_gradients() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4096, dtype=torch.bfloat16))
    opt = SAM([w], torch.optim.SGD, rho=0.05, lr=LR)
    grads = torch.randn(3, 4096, dtype=torch.bfloat16) * 100
    ref = grads.double().norm(dim=1).mean()
    opt.device_perturbations([w], [grads.clone()])
    assert abs(float(opt.last_grad_norm) - float(ref)) <= 1e-6 * float(ref)
