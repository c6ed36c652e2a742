"""The rules where no fixture reaches: k devices at once, the forms and switches the fixtures do not
run (LookSAM, which has no released code; GSAM's JAX adaptive form; WSAM coupled; ESAM's paper
reading), each against an independent reference written here, in float64."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F

from sam_repro.optim.methods import ESAM, GSAM, WSAM, LookSAM, MethodOptimizer
from sam_repro.optim.methods.registry import METHOD_SPECS
from tests.optim.methods.methods_helpers import SGD_KWARGS, STEPS, batch, ce, tiny_net
from tests.optim.methods.test_methods_state import BUILDERS


# -- k devices at once -------------------------------------------------------------------------------
def device_grads(opt: MethodOptimizer, k: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(k, *p.shape, generator=g, dtype=p.dtype) for p in opt.params]


PER_DEVICE = ["gsam", "esam", "fsam", "samon", "asam_on", "interval_sam", "looksam"]


@pytest.mark.parametrize("name", PER_DEVICE)
def test_a_per_device_method_over_k_devices_is_k_single_devices(name: str) -> None:
    """Three devices in one call equal three one-device copies of the method, each fed its own device's
    gradients, over three steps (the running states evolve per device): perturbation and applied gradient."""
    k = 3
    together = BUILDERS[name](tiny_net())
    alone = [BUILDERS[name](tiny_net()) for _ in range(k)]
    for step in range(3):
        at_w, at_e = device_grads(together, k, 2 * step), device_grads(together, k, 2 * step + 1)
        perturbs = together.perturbs_now()
        assert all(a.perturbs_now() == perturbs for a in alone)
        e = together.device_perturbations(together.params, [g.clone() for g in at_w]) if perturbs else None
        applied = (together.device_combine(together.params, [g.clone() for g in at_e]) if perturbs
                   else together.device_plain(together.params, [g.clone() for g in at_w]))
        for d, one in enumerate(alone):
            if perturbs:
                e_d = one.device_perturbations(one.params, [g[d:d + 1].clone() for g in at_w])
                assert all(torch.allclose(x[d:d + 1], y, rtol=0, atol=1e-15) for x, y in zip(e, e_d))
                a_d = one.device_combine(one.params, [g[d:d + 1].clone() for g in at_e])
            else:
                a_d = one.device_plain(one.params, [g[d:d + 1].clone() for g in at_w])
            assert all(torch.allclose(x[d:d + 1], y, rtol=0, atol=1e-15) for x, y in zip(applied, a_d))
            one.finish_step()
        together.finish_step()


@pytest.mark.parametrize("name", ["gsam", "fsam", "samon", "asam_on", "looksam", "wsam", "rwp"])
def test_the_engine_may_hand_the_tensors_in_its_own_order(name: str) -> None:
    """The engine lists parameters in the module's order, the optimizer in its param groups' (the
    factory groups them by decay): the method's masks and states follow its own order whatever the
    caller's. Reversed lists give the reversed results of the optimizer's order."""
    k = 2
    a, b = BUILDERS[name](tiny_net()), BUILDERS[name](tiny_net())
    if name == "rwp":
        b.method_state["generator"] = torch.Generator().manual_seed(0)
        a.method_state["generator"] = torch.Generator().manual_seed(0)
    for step in range(2):
        at_w, at_e = device_grads(a, k, 2 * step), device_grads(a, k, 2 * step + 1)
        e = a.device_perturbations(a.params, [g.clone() for g in at_w])
        e_rev = b.device_perturbations(b.params[::-1], [g.clone() for g in at_w[::-1]])
        assert all(torch.equal(x, y) for x, y in zip(e, e_rev[::-1]))
        c = a.device_combine(a.params, [g.clone() for g in at_e])
        c_rev = b.device_combine(b.params[::-1], [g.clone() for g in at_e[::-1]])
        assert all(torch.equal(x, y) for x, y in zip(c, c_rev[::-1]))
        a.finish_step()
        b.finish_step()


def test_vasso_over_k_devices_perturbs_all_of_them_with_the_mean_gradient() -> None:
    """VaSSO's released code synchronizes the first backward: one running mean of the devices' mean."""
    k = 3
    together, one = BUILDERS["vasso"](tiny_net()), BUILDERS["vasso"](tiny_net())
    for step in range(3):
        grads = device_grads(together, k, step)
        e = together.device_perturbations(together.params, [g.clone() for g in grads])
        e_mean = one.device_perturbations(one.params, [g.mean(0, keepdim=True) for g in grads])
        for x, y in zip(e, e_mean):
            assert torch.allclose(x, y.expand_as(x), rtol=0, atol=1e-15)


def test_wsam_over_k_devices_perturbs_per_device_and_combines_the_clipped_means() -> None:
    k, max_norm, alpha = 3, 0.4, 0.88 / 0.12
    opt = WSAM(tiny_net().parameters(), torch.optim.SGD, rho=0.05, gamma=0.88, max_norm=max_norm, **SGD_KWARGS)
    at_w, at_e = device_grads(opt, k, 0), device_grads(opt, k, 1)
    e = opt.device_perturbations(opt.params, [g.clone() for g in at_w])
    applied = opt.device_combine(opt.params, [g.clone() for g in at_e])

    def clipped_mean(grads: list[torch.Tensor]) -> list[torch.Tensor]:
        mean = [g.mean(0) for g in grads]
        norm = math.sqrt(sum(float((m * m).sum()) for m in mean))
        return [m * min(1.0, max_norm / (norm + 1e-6)) for m in mean]

    for d in range(k):
        norm = math.sqrt(sum(float((g[d] ** 2).sum()) for g in at_w))
        assert all(torch.allclose(x[d], 0.05 * g[d] / (norm + 1e-12), rtol=0, atol=1e-15) for x, g in zip(e, at_w))
    g0, g1 = clipped_mean(at_w), clipped_mean(at_e)
    assert all(torch.allclose(a[d], g, rtol=0, atol=1e-15) for a, g in zip(applied, g0) for d in range(k))
    before = [p.detach().clone() for p in opt.params]
    for group in opt.param_groups:
        group["lr"] = 0.05
    opt.finish_step()  # decoupled: w -= lr * alpha * (g1' - g0')
    for w0, w1, a, b in zip(before, opt.params, g0, g1):
        assert torch.allclose(w1, w0 - 0.05 * alpha * (b - a), rtol=0, atol=1e-15)


def test_rwp_draws_independent_noise_for_each_device() -> None:
    opt = BUILDERS["rwp"](tiny_net())
    e = opt.device_perturbations(opt.params, device_grads(opt, 2, 0))
    assert all(not torch.equal(x[0], x[1]) for x in e)


# -- LookSAM: the paper's Algorithm 1, written out -----------------------------------------------------
def looksam_reference(k: int, alpha: float, rho: float, per_tensor: bool) -> torch.Tensor:
    """Algorithm 1 with plain tensors and a hand-written SGD (momentum 0.9, decay 5e-4 inside)."""
    net = tiny_net()
    params = list(net.parameters())
    buf: list[torch.Tensor] = []
    g_v: list[torch.Tensor] = []
    eps = 1e-12

    def grad_at(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        return [g.detach() for g in torch.autograd.grad(ce(net, x, y), params)]

    def norm(ts: list[torch.Tensor]) -> float:
        return math.sqrt(sum(float((t * t).sum()) for t in ts))

    for t in range(STEPS):
        x, y = batch(t)
        g = grad_at(x, y)
        if t % k == 0:
            n = norm(g)
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.add_(rho * gi / (n + eps))
            g_s = grad_at(x, y)
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.sub_(rho * gi / (n + eps))
            if per_tensor:
                g_v = [gs - float((gi * gs).sum()) / (float((gi * gi).sum()) + eps) * gi for gi, gs in zip(g, g_s)]
            else:
                coef = sum(float((gi * gs).sum()) for gi, gs in zip(g, g_s)) / (n * n + eps)
                g_v = [gs - coef * gi for gi, gs in zip(g, g_s)]
            applied = g_s
        elif per_tensor:
            applied = [gi + alpha * float(gi.norm()) / (float(v.norm()) + eps) * v for gi, v in zip(g, g_v)]
        else:
            ratio = alpha * norm(g) / (norm(g_v) + eps)
            applied = [gi + ratio * v for gi, v in zip(g, g_v)]
        with torch.no_grad():
            for i, (p, a) in enumerate(zip(params, applied)):
                d = a + 5e-4 * p
                if len(buf) <= i:
                    buf.append(d.clone())
                else:
                    buf[i] = 0.9 * buf[i] + d
                p.sub_(0.1 * buf[i])
    return torch.cat([p.detach().flatten() for p in params])


@pytest.mark.parametrize("projection", ["model", "tensor"])
def test_looksam_follows_algorithm_1(projection: str) -> None:
    net = tiny_net()
    opt = LookSAM(net.parameters(), torch.optim.SGD, rho=0.05, k=3, alpha=0.7, projection=projection, **SGD_KWARGS)
    forwards = 0
    for t in range(STEPS):
        x, y = batch(t)
        ce(net, x, y).backward()
        forwards += 1
        if opt.first_step(zero_grad=True):
            ce(net, x, y).backward()
            forwards += 1
        opt.second_step(zero_grad=True)
    ours = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert (ours - looksam_reference(3, 0.7, 0.05, per_tensor=projection == "tensor")).abs().max() <= 1e-12
    assert forwards == STEPS + 3  # SAM steps 0, 3, 6: 11 forwards in 8 steps, not 16


def test_the_two_looksam_readings_differ() -> None:
    assert (looksam_reference(3, 0.7, 0.05, True) - looksam_reference(3, 0.7, 0.05, False)).abs().max() > 1e-6


# -- GSAM's forms --------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["none", "pytorch", "jax"])
def test_gsam_perturbation_forms(form: str) -> None:
    net = tiny_net()
    opt = GSAM(net.parameters(), torch.optim.SGD, rho_max=0.3, rho_min=0.1, alpha=0.4, lr_min=0.0, adaptive=form,
               **SGD_KWARGS)
    for group in opt.param_groups:
        group["lr"] = 0.05  # halfway: rho_t = 0.2
    w = [p.detach().clone() for p in opt.params]
    g = device_grads(opt, 1, 0)
    e = opt.device_perturbations(opt.params, [x.clone() for x in g])
    if form == "pytorch":
        n = math.sqrt(sum(float(((wi * gi[0]) ** 2).sum()) for wi, gi in zip(w, g)))
        want = [0.2 * wi * wi * gi[0] / (n + 1e-12) for wi, gi in zip(w, g)]
    else:
        n = math.sqrt(sum(float((gi ** 2).sum()) for gi in g))
        want = [(wi.abs() if form == "jax" else 1.0) * 0.2 * gi[0] / (n + 1e-12) for wi, gi in zip(w, g)]
    assert all(torch.allclose(x[0], y, rtol=0, atol=1e-15) for x, y in zip(e, want))
    assert opt.last_rho == pytest.approx(0.2, abs=1e-15)


def test_gsam_rho_is_rho_max_when_the_lr_never_moves() -> None:
    """big_vision's rule: lr_max == lr_min gives rho_max (no division by zero)."""
    rule = GSAM(tiny_net().parameters(), torch.optim.SGD, rho_max=0.3, rho_min=0.1, lr_min=0.1, **SGD_KWARGS).rule
    assert rule.rho(0.1) == 0.3


def test_wsam_coupled_hands_the_weighted_sum_to_the_base_optimizer() -> None:
    opt = WSAM(tiny_net().parameters(), torch.optim.SGD, rho=0.05, gamma=0.6, max_norm=None, decouple=False, **SGD_KWARGS)
    at_w, at_e = device_grads(opt, 1, 0), device_grads(opt, 1, 1)
    opt.device_perturbations(opt.params, [g.clone() for g in at_w])
    applied = opt.device_combine(opt.params, [g.clone() for g in at_e])
    alpha = 0.6 / 0.4
    assert all(torch.allclose(a, alpha * b + (1 - alpha) * c, rtol=0, atol=1e-15) for a, b, c in zip(applied, at_e, at_w))


# -- ESAM's paper reading ------------------------------------------------------------------------------
def test_esam_topk_selects_exactly_gamma_n_examples_and_strict_one_fewer() -> None:
    rise = torch.tensor([[0.3, -0.1, 0.9, 0.2, 0.5, 0.0, 0.7, 0.4]])
    before = torch.zeros_like(rise)
    strict = ESAM(tiny_net().parameters(), torch.optim.SGD, gamma=0.5, seed=0, **SGD_KWARGS).rule
    topk = ESAM(tiny_net().parameters(), torch.optim.SGD, gamma=0.5, selection="topk", seed=0, **SGD_KWARGS).rule
    assert strict.select(before, rise)[0].nonzero().flatten().tolist() == [2, 4, 6]  # above the 4th largest, 0.4
    assert topk.select(before, rise)[0].nonzero().flatten().tolist() == [2, 4, 6, 7]
    assert strict.select(before, torch.ones_like(rise)).sum() == 0  # ties at the cut-off: none strictly above
    assert ESAM(tiny_net().parameters(), torch.optim.SGD, gamma=0.99, seed=0, **SGD_KWARGS).rule.select(before, rise).all()


def test_esam_start_of_step_draws_step_0s_mask_too() -> None:
    opt = ESAM(tiny_net().parameters(), torch.optim.SGD, beta=0.5, swp_draw="start_of_step", seed=4, **SGD_KWARGS)
    gen = torch.Generator().manual_seed(4)
    assert opt.keep_mask() == (torch.rand(9, generator=gen, dtype=torch.float64) <= 0.5).tolist()
    released = ESAM(tiny_net().parameters(), torch.optim.SGD, beta=0.5, seed=4, **SGD_KWARGS)
    assert released.keep_mask() == [True] * 9


def test_esam_first_pass_gives_no_gradient_to_the_tensors_left_out() -> None:
    net = tiny_net()
    opt = ESAM(net.parameters(), torch.optim.SGD, beta=0.5, seed=0, **SGD_KWARGS)
    keep = [True, False, True, False, True, True, False, True, True]
    opt.method_state["keep"] = torch.tensor(keep)
    x, y = batch(0)
    with opt.first_pass():
        F.cross_entropy(net(x), y).backward()
    assert [p.grad is not None for p in net.parameters()] == keep
    assert all(p.requires_grad for p in net.parameters())
    w = [p.detach().clone() for p in net.parameters()]
    opt.first_step(zero_grad=True)
    moved = [not torch.equal(p.detach(), w0) for p, w0 in zip(net.parameters(), w)]
    assert moved == keep


# -- the registry ----------------------------------------------------------------------------------------
def test_every_registered_method_has_a_class_a_rule_and_a_source() -> None:
    assert set(METHOD_SPECS) == set(BUILDERS)
    for name, spec in METHOD_SPECS.items():
        opt = BUILDERS[name](tiny_net())
        assert isinstance(opt, spec.optimizer) and isinstance(opt.rule, spec.rule) and spec.source and spec.paper
        forwards, backwards = opt.rule.passes_per_step()
        assert 1 < forwards <= 3 and 1 < backwards <= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: checks that the rules add no host sync")
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_the_hand_driven_step_adds_no_host_synchronization(name: str) -> None:
    """After a first step (buffers allocated), the optimizer's own calls run with CUDA's sync debug mode
    set to error: norms, scales, selections, draws and counters stay on the device or on the host."""
    net = tiny_net().float().cuda()
    opt = BUILDERS[name](net)
    for t in range(3):
        x, y = (v.cuda() for v in batch(t))
        x = x.float()
        checked = t > 0
        if name == "esam":
            with opt.first_pass():
                before = F.cross_entropy(net(x), y, reduction="none")
                before.mean().backward()
            with sync_errors(checked):
                opt.first_step(zero_grad=True)
            with torch.no_grad():
                after = F.cross_entropy(net(x), y, reduction="none")
            with sync_errors(checked):
                mask = opt.select(before.detach(), after)
            F.cross_entropy(net(x[mask]), y[mask]).backward()  # boolean indexing: the caller's sync
        else:
            ce(net, x, y).backward()
            with sync_errors(checked):
                perturbed = opt.first_step(zero_grad=True)
            if perturbed:
                ce(net, x, y).backward()
        with sync_errors(checked):
            opt.second_step(zero_grad=True)
    assert opt.last_grad_norm.is_cuda


@contextlib.contextmanager
def sync_errors(on: bool) -> Iterator[None]:
    if on:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
