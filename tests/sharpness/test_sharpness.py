"""The sharpness instruments against independent references: a quadratic with a known Hessian,
the full Hessian of a small network (torch.autograd.functional.hessian), a per-chunk Python loop
for m-sharpness, and the geometry of filter-normalized directions."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sam_repro.sharpness import (HVP_MODES, AffineBatchNorm, Objective, filter_normalized_direction,
                                 hutchinson_trace, interpolate, m_sharpness, make_hvp, prepare_model, slice_1d,
                                 slq_density, top_eigenvalues)

F64 = torch.float64
MODES = list(HVP_MODES)


def quadratic_hvp(a: torch.Tensor, w0: torch.Tensor, mode: str = "reverse"):
    """v -> H v of f(w) = 0.5 (w - w0)^T A (w - w0), by the instruments' HVP `mode`."""
    f = lambda ws: 0.5 * (ws[0] - w0) @ a @ (ws[0] - w0)
    products = make_hvp(mode, [(f, 1.0)], (torch.zeros_like(w0),))
    return lambda v: products((v,))[0]


def known_spd(dim: int, eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=F64, generator=torch.Generator().manual_seed(seed)))
    return q @ torch.diag(eigenvalues) @ q.T


@pytest.mark.parametrize("mode", MODES)
def test_quadratic_top_eigenvalues_are_exact(mode: str) -> None:
    lam = torch.cat([torch.tensor([50.0, 31.0, 17.5, 9.25, 4.0], dtype=F64), torch.linspace(-1, 2, 35, dtype=F64)])
    a = known_spd(40, lam)
    mv = quadratic_hvp(a, torch.randn(40, dtype=F64), mode)
    top = top_eigenvalues(mv, 40, k=5, iters=40, tol=1e-12, seed=3, dtype=F64)
    assert top.values == pytest.approx([50.0, 31.0, 17.5, 9.25, 4.0], abs=1e-6)
    assert top.converged and max(top.residuals) < 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_quadratic_trace_exact_on_a_diagonal_and_within_its_error_bar_otherwise(mode: str) -> None:
    lam = torch.linspace(-3, 12, 30, dtype=F64)
    # Rademacher probes of a diagonal matrix all give the trace exactly: z^T D z = sum d_i
    diag = hutchinson_trace(quadratic_hvp(torch.diag(lam), torch.zeros(30, dtype=F64), mode), 30, 20, 1e-3, 0,
                            dtype=F64)
    assert diag.value == pytest.approx(float(lam.sum()), abs=1e-6) and diag.stderr < 1e-6
    dense = hutchinson_trace(quadratic_hvp(known_spd(30, lam), torch.zeros(30, dtype=F64), mode), 30, 400, 1e-3, 0,
                             dtype=F64)
    assert abs(dense.value - float(lam.sum())) <= 3 * dense.stderr
    assert dense.probes == 400 and not dense.converged  # 0.1 % is out of reach: it says so


def test_slq_density_integrates_to_one_and_recovers_the_trace() -> None:
    lam = torch.linspace(0, 5, 20, dtype=F64)
    mv = quadratic_hvp(torch.diag(lam), torch.zeros(20, dtype=F64))
    d = slq_density(mv, 20, probes=2, iters=20, seed=0, dtype=F64)
    for weights in d.weights:
        assert sum(weights) == pytest.approx(1.0, abs=1e-9)
    # sum_i w_i theta_i = z^T H z / ||z||^2 exactly; for a diagonal H and Rademacher z that is tr(H) / dim
    for nodes, weights in zip(d.nodes, d.weights):
        assert sum(n * w for n, w in zip(nodes, weights)) * 20 == pytest.approx(float(lam.sum()), rel=1e-9)


class TinyCNN(nn.Module):
    """Conv -> BN -> ReLU -> pool -> linear: a few hundred parameters, small enough for the full Hessian."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 3 * 3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(h.flatten(1))


def tiny_problem(seed: int = 0, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyCNN()
    with torch.no_grad():  # non-trivial running statistics and BN affine parameters
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.3, 0.3)
    x = torch.randn(n, 2, 6, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y


def full_hessian(obj: Objective) -> torch.Tensor:
    """The Hessian of the whole-subset loss, by torch.autograd.functional.hessian (the reference)."""
    def loss(flat: torch.Tensor) -> torch.Tensor:
        params = obj.unflatten(flat)
        total = sum(w * obj.batch_loss(params, xb, yb) for xb, yb, w in obj.batches())
        # batch_loss adds the L2 term once per batch; the weights sum to 1, so it is counted once
        return total
    return torch.autograd.functional.hessian(loss, obj.flatten(obj.params).clone())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bn_mode, l2", [("eval", 0.0), ("eval", 5e-3), ("train", 0.0)])
def test_small_network_matches_the_full_hessian(bn_mode: str, l2: float, mode: str) -> None:
    model, x, y = tiny_problem()
    obj = Objective.build(prepare_model(model, bn_mode, F64), x, y, batch_size=4, l2=l2)
    h = full_hessian(obj)
    assert torch.allclose(h, h.T, atol=1e-10)
    v = torch.randn(obj.dim, dtype=F64, generator=torch.Generator().manual_seed(1))
    mv = obj.flat_hvp(mode)
    assert torch.allclose(mv(v), h @ v, rtol=1e-9, atol=1e-10)
    assert torch.allclose(mv(v), h @ v, rtol=1e-9, atol=1e-10)  # again: from kept graphs in reverse mode
    assert mv.stats()["mode"] == mode and mv.stats()["batches"] == 3
    exact = torch.linalg.eigvalsh(h).flip(0)
    top = top_eigenvalues(mv, obj.dim, k=5, iters=obj.dim, tol=1e-9, seed=0, dtype=F64)
    for ours, ref in zip(top.values, exact[:5].tolist()):
        assert ours == pytest.approx(ref, rel=1e-4)
    trace = hutchinson_trace(mv, obj.dim, 30, 1e-4, 0, dtype=F64)
    assert abs(trace.value - float(torch.trace(h))) <= 4 * trace.stderr


@pytest.mark.parametrize("budget_batches, kept", [(0, 0), (1, 1), (3, 3)])
def test_reverse_hvp_keeps_the_graphs_that_fit_its_budget_and_recomputes_the_rest(budget_batches: int,
                                                                                   kept: int) -> None:
    model, x, y = tiny_problem()
    obj = Objective.build(prepare_model(model, "eval", F64), x, y, batch_size=4)
    v = torch.randn(obj.dim, dtype=F64, generator=torch.Generator().manual_seed(2))
    one = obj.flat_hvp("reverse", graph_budget=10 ** 9)
    expected = one(v)
    per_batch = one.stats()["graph_bytes"] / 3
    assert per_batch > 0
    mv = obj.flat_hvp("reverse", graph_budget=int(per_batch * budget_batches * 1.01))
    for _ in range(2):
        assert torch.allclose(mv(v), expected, rtol=1e-12, atol=1e-14)
    assert mv.stats()["graphs_kept"] == kept


def test_eval_batch_norm_is_rewritten_as_the_same_affine_map() -> None:
    model, x, y = tiny_problem()
    model.eval()
    prepared = prepare_model(model, "eval", F64)
    assert isinstance(prepared.bn, AffineBatchNorm)
    assert dict(prepared.named_buffers()).keys() == dict(model.named_buffers()).keys()
    assert [n for n, _ in prepared.named_parameters()] == [n for n, _ in model.named_parameters()]
    native = model.double()
    assert torch.allclose(prepared(x.double()), native(x.double()), rtol=1e-12, atol=1e-13)
    # the same function of the same parameters, so the same Hessian (native kernel as the reference)
    obj = Objective.build(prepared, x, y, batch_size=12)

    def native_loss(flat: torch.Tensor) -> torch.Tensor:
        params = dict(zip(obj.names, obj.unflatten(flat)))
        logits = torch.func.functional_call(native, ({**dict(native.named_buffers()), **params},), (x.double(),))
        return nn.functional.cross_entropy(logits, y)
    assert torch.allclose(full_hessian(obj), torch.autograd.functional.hessian(native_loss, obj.flatten(obj.params)),
                          rtol=1e-10, atol=1e-12)


def test_batch_norm_subclasses_keep_their_own_forward() -> None:
    class BatchNormAct(nn.BatchNorm2d):  # like timm's BatchNormAct2d: more than the affine map
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(super().forward(x))

    model, x, _ = tiny_problem()
    model.bn = BatchNormAct(3)
    prepared = prepare_model(model, "eval", F64)
    assert type(prepared.bn) is BatchNormAct and (prepared(x.double()) == model.eval().double()(x.double())).all()


def test_weight_decay_in_shifts_every_eigenvalue_by_wd() -> None:
    model, x, y = tiny_problem()
    out = Objective.build(prepare_model(model, "eval", F64), x, y, 12)
    inn = Objective.build(prepare_model(model, "eval", F64), x, y, 12, l2=0.01)
    a = top_eigenvalues(out.flat_hvp(), out.dim, 3, out.dim, 1e-10, 0, dtype=F64)
    b = top_eigenvalues(inn.flat_hvp(), inn.dim, 3, inn.dim, 1e-10, 0, dtype=F64)
    assert [v + 0.01 for v in a.values] == pytest.approx(b.values, rel=1e-8)


def test_bn_eval_loss_does_not_depend_on_the_batch_size_but_train_does() -> None:
    model, x, y = tiny_problem()
    ev = [Objective.build(prepare_model(model, "eval", F64), x, y, b) for b in (4, 12)]
    assert ev[0].evaluate(ev[0].params)[0] == pytest.approx(ev[1].evaluate(ev[1].params)[0], rel=1e-12)
    tr = [Objective.build(prepare_model(model, "train", F64), x, y, b) for b in (4, 12)]
    assert abs(tr[0].evaluate(tr[0].params)[0] - tr[1].evaluate(tr[1].params)[0]) > 1e-6
    assert model.bn.running_mean.abs().sum() > 0 and model.training  # the caller's model is untouched


def reference_m_sharpness(model: nn.Module, x, y, m: int, rho: float, bn_mode: str) -> float:
    """A plain per-chunk loop with torch.autograd on an in-place perturbed copy (independent of torch.func)."""
    vals = []
    for at in range(0, len(y), m):
        net = copy.deepcopy(model).double()
        net.train(bn_mode == "train")
        xb, yb = x[at:at + m].double(), y[at:at + m]
        with torch.no_grad():
            before = float(nn.functional.cross_entropy(copy.deepcopy(net)(xb), yb))
        probe = copy.deepcopy(net)
        loss = nn.functional.cross_entropy(probe(xb), yb)
        grads = torch.autograd.grad(loss, list(probe.parameters()))
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        with torch.no_grad():
            for p, g in zip(net.parameters(), grads):
                p.add_(g * (rho / (norm + 1e-12)))
            after = float(nn.functional.cross_entropy(net(xb), yb))
        vals.append(after - before)
    return sum(vals) / len(vals)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_m_sharpness_one_step_matches_a_per_chunk_loop(bn_mode: str) -> None:
    model, x, y = tiny_problem(n=12)
    obj = Objective.build(prepare_model(model, bn_mode, F64), x, y, 12)
    for m in (3, 6):
        ours = m_sharpness(obj, m, rho=0.1, steps=1, max_batch=8)
        assert ours.chunks == 12 // m
        assert ours.value == pytest.approx(reference_m_sharpness(model, x, y, m, 0.1, bn_mode), rel=1e-8)


def test_m_sharpness_n_steps_climb_at_least_as_high_and_m_must_divide() -> None:
    model, x, y = tiny_problem(n=12)
    obj = Objective.build(prepare_model(model, "eval", F64), x, y, 12)
    one, five = m_sharpness(obj, 4, 0.2, steps=1), m_sharpness(obj, 4, 0.2, steps=5)
    assert five.value >= one.value - 1e-12 and five.value > 0
    with pytest.raises(ValueError, match="does not divide"):
        m_sharpness(obj, 5, 0.2)


def test_filter_normalized_direction_and_slices() -> None:
    model, x, y = tiny_problem()
    obj = Objective.build(prepare_model(model, "eval", F64), x, y, 12)
    d = filter_normalized_direction(obj.params, torch.Generator().manual_seed(0))
    for p, di in zip(obj.params, d):
        if p.ndim <= 1:
            assert (di == 0).all()  # BN weights and biases stay put (Li et al.'s default)
        else:
            dims = tuple(range(1, p.ndim))
            vn = torch.linalg.vector_norm
            assert torch.allclose(vn(di, dim=dims), vn(p, dim=dims), rtol=1e-10)
    s = slice_1d(obj, span=1.0, points=5, seed=0)
    assert s.alpha[2] == 0.0 and s.loss[2] == pytest.approx(obj.evaluate(obj.params)[0], rel=1e-12)


def test_interpolation_ends_at_both_runs() -> None:
    a_model, x, y = tiny_problem(seed=0)
    b_model, _, _ = tiny_problem(seed=1)
    a = Objective.build(prepare_model(a_model, "eval", F64), x, y, 12)
    b = Objective.build(prepare_model(b_model, "eval", F64), x, y, 12)
    path = interpolate(a, b.params, b.buffers, 0.0, 1.0, 3)
    assert path.loss[0] == pytest.approx(a.evaluate(a.params)[0], rel=1e-12)
    assert path.loss[-1] == pytest.approx(b.evaluate(b.params)[0], rel=1e-12)
    assert math.isfinite(path.loss[1]) and a.buffers["bn.running_mean"] is not b.buffers["bn.running_mean"]
