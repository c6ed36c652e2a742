"""The sharpness instruments' building blocks on problems small enough to write the answer out:
Hessian-vector products of weighted batch losses (sam_repro/sharpness/hvp.py), the objective and
its BatchNorm rewrite (objective.py), Lanczos, the top-k search and the SLQ density (hessian.py)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sam_repro.sharpness import (HVP_MODES, AffineBatchNorm, ForwardHVP, Objective, ReverseHVP, lanczos, make_hvp,
                                 prepare_model, slq_density, top_eigenvalues)
from sam_repro.sharpness.hessian import Lanczos, _tridiagonal_eigh, rademacher

F64 = torch.float64
MODES = list(HVP_MODES)


def spd(dim: int, seed: int) -> torch.Tensor:
    a = torch.randn(dim, dim, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return a @ a.T / dim + torch.eye(dim, dtype=F64)


# -- hvp.py ----------------------------------------------------------------------------------------

def two_parameter_losses():
    """Three weighted batch losses of (u, v, c): f_b = 0.5 u^T A_b u + u.B_b v + k_b . c, where c
    enters linearly (a constant gradient: a zero Hessian block and no graph to differentiate)."""
    a = [spd(3, s) for s in range(3)]
    b = [torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(10 + s)) for s in range(3)]
    k = [torch.randn(4, dtype=F64, generator=torch.Generator().manual_seed(20 + s)) for s in range(3)]
    weights = [0.2, 0.3, 0.5]
    losses = [(lambda p, a=a[i], b=b[i], k=k[i]: 0.5 * p[0] @ a @ p[0] + p[0] @ b @ p[1] + k @ p[2], weights[i])
              for i in range(3)]
    hess = torch.zeros(9, 9, dtype=F64)  # [u (3), v (2), c (4)]
    for i, w in enumerate(weights):
        hess[:3, :3] += w * a[i]
        hess[:3, 3:5] += w * b[i]
        hess[3:5, :3] += w * b[i].T
    params = (torch.randn(3, dtype=F64), torch.randn(2, dtype=F64), torch.randn(4, dtype=F64))
    return losses, params, hess


@pytest.mark.parametrize("mode", MODES)
def test_hvp_is_the_weighted_sum_of_the_batch_hessians(mode: str) -> None:
    losses, params, hess = two_parameter_losses()
    op = make_hvp(mode, losses, params, graph_budget=10 ** 9)
    v = torch.randn(9, dtype=F64, generator=torch.Generator().manual_seed(5))
    for _ in range(2):  # twice: from the kept graphs the second time (reverse)
        out = op((v[:3], v[3:5], v[5:]))
        assert [o.shape for o in out] == [(3,), (2,), (4,)]
        assert torch.allclose(torch.cat(out), hess @ v, rtol=1e-12, atol=1e-12)
        assert all(not o.requires_grad for o in out)
    assert all(not p.requires_grad and p.grad is None for p in params)  # the caller's tensors untouched
    assert op.stats()["mode"] == mode and op.stats()["batches"] == 3


def test_a_loss_linear_in_every_parameter_has_a_zero_hessian() -> None:
    k = torch.tensor([1.0, -2.0], dtype=F64)
    for mode in MODES:
        op = make_hvp(mode, [(lambda p: k @ p[0], 0.7)], (torch.ones(2, dtype=F64),))
        assert torch.equal(op((torch.tensor([3.0, 4.0], dtype=F64),))[0], torch.zeros(2, dtype=F64))


def test_reverse_hvp_keeps_graphs_within_its_budget_only() -> None:
    losses, params, hess = two_parameter_losses()
    sized = ReverseHVP(losses, params, graph_budget=10 ** 9)
    v = tuple(torch.ones(n, dtype=F64) for n in (3, 2, 4))
    sized(v)
    total = sized.stats()["graph_bytes"]
    assert sized.stats() == {"mode": "reverse", "batches": 3, "graphs_kept": 3, "graph_bytes": total} and total > 0
    for budget, kept in ((0, 0), (total // 3, 1), (total, 3)):
        op = ReverseHVP(losses, params, graph_budget=budget)
        for _ in range(2):
            assert torch.allclose(torch.cat(op(v)), hess @ torch.ones(9, dtype=F64), rtol=1e-12)
        assert op.stats()["graphs_kept"] == kept and op.stats()["graph_bytes"] <= budget
    forward = ForwardHVP(losses, params, graph_budget=10 ** 9)
    assert forward.stats() == {"mode": "forward", "batches": 3, "graphs_kept": 0, "graph_bytes": 0}


def test_make_hvp_refuses_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="hvp mode 'exact' must be one of"):
        make_hvp("exact", [], ())
    assert isinstance(make_hvp("forward", [], ()), ForwardHVP) and isinstance(make_hvp("reverse", [], ()), ReverseHVP)


# -- objective.py ----------------------------------------------------------------------------------

class Net(nn.Module):
    """Linear -> BatchNorm1d -> tanh -> Linear: 39 parameters, a full Hessian in milliseconds."""

    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4, affine=affine)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def net_problem(seed: int = 0, n: int = 10, affine: bool = True):
    torch.manual_seed(seed)
    model = Net(affine)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        if affine:
            model.bn.weight.uniform_(0.5, 1.5)
            model.bn.bias.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(n, 3, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("affine", [True, False])
def test_affine_batch_norm_is_the_eval_batch_norm(affine: bool) -> None:
    model, x, _ = net_problem(affine=affine)
    native = model.bn.eval().double()
    rewritten = AffineBatchNorm(native)
    h = torch.randn(6, 4, dtype=F64)
    assert torch.allclose(rewritten(h), native(h), rtol=1e-12, atol=1e-13)
    bn2d = nn.BatchNorm2d(4, affine=affine).double().eval()
    with torch.no_grad():
        bn2d.running_mean.uniform_(-1, 1)
        bn2d.running_var.uniform_(0.5, 2)
    img = torch.randn(2, 4, 3, 3, dtype=F64)
    assert torch.allclose(AffineBatchNorm(bn2d)(img), bn2d(img), rtol=1e-12, atol=1e-13)
    assert dict(rewritten.named_buffers()).keys() == dict(native.named_buffers()).keys()
    assert [n for n, _ in rewritten.named_parameters()] == ([] if not affine else ["weight", "bias"])


def test_prepare_model_eval_rewrites_plain_batch_norms_only() -> None:
    model, x, _ = net_problem()
    wrapped = nn.Sequential(model, nn.BatchNorm1d(3))  # nested, and one more at the top level
    wrapped[1].running_var.fill_(2.0)
    hooked = nn.BatchNorm1d(3)
    hooked.register_forward_hook(lambda m, i, o: o)
    untracked = nn.BatchNorm1d(3, track_running_stats=False)
    whole = nn.Sequential(wrapped, hooked, untracked)
    prepared = prepare_model(whole, "eval", F64)
    assert isinstance(prepared[0][0].bn, AffineBatchNorm) and isinstance(prepared[0][1], AffineBatchNorm)
    assert type(prepared[1]) is nn.BatchNorm1d and type(prepared[2]) is nn.BatchNorm1d
    assert not prepared.training and all(p.dtype == F64 for p in prepared.parameters())
    assert type(whole[0][0].bn) is nn.BatchNorm1d and whole[0][0].fc1.weight.dtype == torch.float32  # untouched
    with pytest.raises(ValueError, match="bn_mode='test' must be one of"):
        prepare_model(model, "test", F64)


def test_prepare_model_train_normalizes_with_batch_statistics_and_updates_nothing() -> None:
    model, x, _ = net_problem()
    prepared = prepare_model(model, "train", F64)
    assert prepared.training and prepared.bn.running_mean is None
    h = prepared.fc1(x.double())
    want = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * prepared.bn.weight + prepared.bn.bias
    assert torch.allclose(prepared.bn(h), want, rtol=1e-10, atol=1e-12)
    assert model.bn.running_mean is not None and model.training  # the caller's model is untouched


def reference_loss(model: nn.Module, x, y, l2: float, mask, smoothing: float = 0.0) -> torch.Tensor:
    logits = model(x)
    logp = torch.log_softmax(logits, 1)
    k = logits.shape[1]
    target = torch.full_like(logp, smoothing / k)
    target[torch.arange(len(y)), y] += 1 - smoothing
    data = -(target * logp).sum(1).mean()
    decay = sum((p ** 2).sum() for p, on in zip(model.parameters(), mask) if on)
    return data + 0.5 * l2 * decay


@pytest.mark.parametrize("l2_on_bn", [True, False])
def test_objective_loss_error_and_batches(l2_on_bn: bool) -> None:
    model, x, y = net_problem(n=10)
    prepared = prepare_model(model, "eval", F64)
    obj = Objective.build(prepared, x, y, batch_size=4, l2=0.01, l2_on_bn=l2_on_bn, label_smoothing=0.1)
    assert obj.names == ("fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias")
    assert obj.l2_mask == ((True,) * 6 if l2_on_bn else (True, False, False, False, True, False))
    assert obj.n == 10 and obj.dim == 39 and obj.x.dtype == F64 and type(obj.batch_size) is int
    assert [(len(yb), w) for _, yb, w in obj.batches()] == [(4, 0.4), (4, 0.4), (2, 0.2)]
    with torch.no_grad():
        want = reference_loss(prepared, x.double(), y, 0.01, obj.l2_mask, 0.1)
        err = 100.0 * float((prepared(x.double()).argmax(1) != y).sum()) / 10
    loss, got_err = obj.evaluate(obj.params)
    assert loss == pytest.approx(float(want), rel=1e-12) and got_err == err
    whole = Objective.build(prepared, x, y, batch_size=10, l2=0.01, l2_on_bn=l2_on_bn, label_smoothing=0.1)
    assert float(whole.batch_loss(whole.params, whole.x, whole.y)) == pytest.approx(float(want), rel=1e-12)
    assert float(obj.l2_term(obj.params)) == pytest.approx(
        0.005 * sum(float((p ** 2).sum()) for p, on in zip(obj.params, obj.l2_mask) if on), rel=1e-12)
    parts = obj.batch_losses()
    assert [w for _, w in parts] == [0.4, 0.4, 0.2]
    assert float(parts[2][0](obj.params)) == pytest.approx(float(obj.data_loss(obj.params, obj.x[8:], obj.y[8:])), rel=1e-12)


def test_frozen_parameters_are_not_measured_and_l2_out_is_zero() -> None:
    model, x, y = net_problem()
    model.fc1.requires_grad_(False)
    obj = Objective.build(prepare_model(model, "eval", F64), x, y, batch_size=5)
    assert obj.names == ("bn.weight", "bn.bias", "fc2.weight", "fc2.bias") and obj.dim == 4 + 4 + 12 + 3
    zero = obj.l2_term(obj.params)
    assert zero.shape == () and float(zero) == 0.0 and zero.dtype == F64
    no_decayed = Objective.build(prepare_model(nn.Sequential(nn.BatchNorm1d(3)), "eval", F64), x, y, 5,
                                 l2=0.1, l2_on_bn=False)
    assert float(no_decayed.l2_term(no_decayed.params)) == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_objective_hessian_is_the_full_hessian_with_the_l2_term_on_decayed_parameters(mode: str) -> None:
    model, x, y = net_problem(n=8)
    obj = Objective.build(prepare_model(model, "eval", F64), x, y, batch_size=3, l2=0.05, l2_on_bn=False)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params = obj.unflatten(flat)
        return sum(w * obj.data_loss(params, xb, yb) for xb, yb, w in obj.batches()) + obj.l2_term(params)

    h = torch.autograd.functional.hessian(loss, obj.flatten(obj.params))
    v = torch.randn(obj.dim, dtype=F64, generator=torch.Generator().manual_seed(3))
    op = obj.flat_hvp(mode)
    assert torch.allclose(op(v), h @ v, rtol=1e-10, atol=1e-12)
    assert torch.allclose(obj.flatten(obj.hvp(obj.unflatten(v), mode)), h @ v, rtol=1e-10, atol=1e-12)
    assert op.stats()["mode"] == mode and op.stats()["batches"] == 3
    assert torch.equal(obj.flatten(obj.unflatten(v)), v)
    assert [t.shape for t in obj.unflatten(v)] == [p.shape for p in obj.params]


# -- hessian.py ------------------------------------------------------------------------------------

def test_rademacher_draws_plus_minus_one_from_its_generator() -> None:
    a = rademacher(1000, torch.Generator().manual_seed(0), F64, torch.device("cpu"))
    b = rademacher(1000, torch.Generator().manual_seed(0), torch.float32, torch.device("cpu"))
    assert a.dtype == F64 and b.dtype == torch.float32 and torch.equal(a, b.double())
    assert set(a.tolist()) == {-1.0, 1.0} and abs(float(a.mean())) < 0.1


def test_tridiagonal_eigh_and_ritz_residuals() -> None:
    vals, vecs = _tridiagonal_eigh([2.0], [0.5])
    assert vals.tolist() == [2.0] and vecs.tolist() == [[1.0]]
    vals, vecs = _tridiagonal_eigh([1.0, 3.0, 2.0], [0.5, -1.0, 0.25])
    t = torch.tensor([[1.0, 0.5, 0.0], [0.5, 3.0, -1.0], [0.0, -1.0, 2.0]], dtype=F64)
    assert torch.allclose(vals, torch.linalg.eigvalsh(t), rtol=1e-12)
    state = Lanczos([1.0, 3.0, 2.0], [0.5, -1.0, 0.25], vals, vecs)
    assert torch.allclose(state.residuals, (0.25 * vecs[-1, :]).abs(), rtol=1e-12)


def test_lanczos_basis_is_orthonormal_and_the_tridiagonal_matrix_is_its_projection() -> None:
    a = spd(12, 0)
    seen = []

    def mv(v):
        seen.append(v.clone())
        return a @ v

    state = lanczos(mv, torch.randn(12, dtype=F64, generator=torch.Generator().manual_seed(1)), iters=5)
    q = torch.stack(seen)  # the basis vectors, in order
    assert len(state.alphas) == 5 and len(state.betas) == 5
    assert torch.allclose(q @ q.T, torch.eye(5, dtype=F64), atol=1e-12)
    t = q @ a @ q.T
    assert torch.allclose(torch.diag(t), torch.tensor(state.alphas, dtype=F64), rtol=1e-10)
    assert torch.allclose(torch.diag(t, 1), torch.tensor(state.betas[:4], dtype=F64), rtol=1e-10)
    assert torch.allclose(state.ritz_values, torch.linalg.eigvalsh(t), rtol=1e-10)


def test_lanczos_stops_at_an_invariant_subspace_and_at_the_dimension() -> None:
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64))
    one = lanczos(lambda v: a @ v, torch.tensor([0.0, 0.0, 5.0, 0.0], dtype=F64), iters=4)  # an eigenvector
    assert one.alphas == pytest.approx([3.0]) and one.betas[-1] < 1e-12
    two = lanczos(lambda v: a @ v, torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64), iters=4)  # spans 2 of them
    assert len(two.alphas) == 2 and sorted(two.ritz_values.tolist()) == pytest.approx([1.0, 3.0])
    full = lanczos(lambda v: a @ v, torch.ones(4, dtype=F64), iters=10)
    assert len(full.alphas) == 4 and full.ritz_values.tolist() == pytest.approx([1.0, 2.0, 3.0, 4.0])


def test_lanczos_checks_convergence_every_few_steps() -> None:
    a = spd(20, 2)
    checked = []

    def converged(state):
        checked.append(len(state.alphas))
        return len(state.alphas) >= 6

    state = lanczos(lambda v: a @ v, torch.ones(20, dtype=F64), iters=15, check_every=3, converged=converged)
    assert checked == [3, 6] and len(state.alphas) == 6
    never = lanczos(lambda v: a @ v, torch.ones(20, dtype=F64), iters=7, check_every=0, converged=converged)
    assert len(never.alphas) == 7 and checked == [3, 6]


def test_top_eigenvalues_stop_at_the_relative_tolerance_and_say_so() -> None:
    lam = torch.tensor([100.0, 50.0, 20.0] + [1.0 - i / 40 for i in range(37)], dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=F64, generator=torch.Generator().manual_seed(0)))
    a = q @ torch.diag(lam) @ q.T
    steps = []
    mv = lambda v: steps.append(1) or a @ v
    loose = top_eigenvalues(mv, 40, k=2, iters=40, tol=1e-2, seed=0, dtype=F64)
    assert loose.converged and loose.iterations == len(steps) < 40
    assert all(r <= 1e-2 * loose.values[0] for r in loose.residuals)
    assert loose.values == pytest.approx([100.0, 50.0], rel=1e-2) and loose.values[0] > loose.values[1]
    tight = top_eigenvalues(lambda v: a @ v, 40, k=2, iters=40, tol=1e-10, seed=0, dtype=F64)
    assert tight.iterations > loose.iterations and tight.values == pytest.approx([100.0, 50.0], rel=1e-10)
    short = top_eigenvalues(lambda v: a @ v, 40, k=3, iters=3, tol=1e-12, seed=0, dtype=F64)
    assert not short.converged and short.iterations == 3
    small = torch.diag(torch.tensor([3.0, -1.0, 2.0], dtype=F64))
    every = top_eigenvalues(lambda v: small @ v, 3, k=5, iters=9, tol=0.0, seed=1, dtype=F64)
    assert every.values == pytest.approx([3.0, 2.0, -1.0]) and every.converged and every.iterations == 3
    assert set(every.as_json()) == {"values", "residuals", "iterations", "tol", "converged",
                                                      "time_s", "method"}


def test_top_eigenvalues_tolerance_is_relative_to_the_largest_magnitude() -> None:
    """A spectrum scaled by 1e-6 converges in the same steps: the residuals are compared with
    tol * |lambda_max|, not with tol."""
    a = spd(30, 4)
    big = top_eigenvalues(lambda v: a @ v, 30, k=1, iters=30, tol=1e-6, seed=0, dtype=F64)
    tiny = top_eigenvalues(lambda v: 1e-6 * (a @ v), 30, k=1, iters=30, tol=1e-6, seed=0, dtype=F64)
    assert tiny.iterations == big.iterations and tiny.values[0] == pytest.approx(1e-6 * big.values[0], rel=1e-9)


def test_slq_density_is_the_smoothed_mixture_of_its_nodes() -> None:
    lam = torch.tensor([0.0, 1.0, 1.0, 4.0, 9.0], dtype=F64)
    d = slq_density(lambda v: lam * v, 5, probes=3, iters=5, seed=2, points=50, sigma_fraction=0.02, dtype=F64)
    assert d.probes == 3 and d.iterations == 5 and len(d.grid) == len(d.density) == 50
    nodes = torch.tensor(sum(d.nodes, []), dtype=F64)
    weights = torch.tensor(sum(d.weights, []), dtype=F64) / 3
    lo, hi = float(nodes.min()), float(nodes.max())
    assert lo == pytest.approx(0.0, abs=1e-9) and hi == pytest.approx(9.0, rel=1e-9)
    assert d.grid[0] == pytest.approx(lo - 0.05 * (hi - lo)) and d.grid[-1] == pytest.approx(hi + 0.05 * (hi - lo))
    assert d.sigma == pytest.approx(0.02 * (hi - lo))
    grid = torch.tensor(d.grid, dtype=F64)
    gauss = torch.exp(-((grid[:, None] - nodes[None, :]) ** 2) / (2 * d.sigma ** 2)) / (d.sigma * math.sqrt(2 * math.pi))
    assert torch.allclose(torch.tensor(d.density, dtype=F64), gauss @ weights, rtol=1e-10)
    step = d.grid[1] - d.grid[0]
    assert sum(d.density) * step == pytest.approx(1.0, abs=1e-3)  # a density: integrates to one
