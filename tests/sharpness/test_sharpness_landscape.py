"""Loss landscapes (sam_repro/sharpness/landscape.py) on a stand-in objective whose loss is a known
function of the weights and buffers: every slice point and every interpolation point is checked
against that function at the weights the docs promise (Li et al.'s filter-normalized directions,
drawn in the documented order; the straight line between two runs, buffers included)."""
from __future__ import annotations

import pytest
import torch

from sam_repro.sharpness import filter_normalized_direction, interpolate, slice_1d, slice_2d

F64 = torch.float64


class Known:
    """What the landscape functions read of an Objective: params, buffers and evaluate(params) ->
    (loss, error %). Here loss = sum_i c_i . p_i^2 + sum of the float buffers, error = 100 * p_0[0, 0]."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        # a conv-like 4D weight, a matrix, and 1D parameters (BN weight / bias: never moved)
        shapes = [(3, 2, 3, 3), (4, 5), (4,), (4,)]
        self.params = tuple(torch.randn(s, generator=g, dtype=F64) for s in shapes)
        self.coef = tuple(torch.rand(s, generator=g, dtype=F64) for s in shapes)
        self.buffers = {"running_mean": torch.randn(4, generator=g, dtype=F64),
                        "num_batches_tracked": torch.tensor(7)}

    def loss(self, params, buffers=None) -> float:
        buffers = self.buffers if buffers is None else buffers
        value = sum(float((c * p ** 2).sum()) for c, p in zip(self.coef, params))
        return value + sum(float(b.sum()) for b in buffers.values() if b.is_floating_point())

    def evaluate(self, params):
        return self.loss(params), 100.0 * float(params[0].reshape(-1)[0])


def direction(params, g: torch.Generator):
    """Li et al.: a Gaussian direction per weight, each filter (slice along dim 0) rescaled to that
    filter's norm; 1D parameters (BN, biases) not moved. Drawn in float64, parameter by parameter."""
    out = []
    for p in params:
        if p.ndim <= 1:
            out.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=g, dtype=F64)
        for i in range(p.shape[0]):
            d[i] = d[i] * (p[i].norm() / d[i].norm())
        out.append(d)
    return out


def test_filter_normalized_direction_rescales_each_filter_to_its_weights_norm() -> None:
    obj = Known()
    got = filter_normalized_direction(obj.params, torch.Generator().manual_seed(3))
    want = direction(obj.params, torch.Generator().manual_seed(3))
    assert len(got) == 4
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == F64 and torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    f32 = filter_normalized_direction([p.float() for p in obj.params], torch.Generator().manual_seed(3))
    assert f32[0].dtype == torch.float32 and torch.allclose(f32[0].double(), want[0], rtol=1e-5)


@pytest.mark.parametrize("span, points", [(1.0, 5), (0.5, 4)])
def test_slice_1d_is_the_loss_along_one_direction(span: float, points: int) -> None:
    obj = Known()
    s = slice_1d(obj, span=span, points=points, seed=11)
    d = direction(obj.params, torch.Generator().manual_seed(11))
    alphas = [-span + 2 * span * i / (points - 1) for i in range(points)]
    assert s.alpha == pytest.approx(alphas, abs=1e-15) and s.seed == 11
    for a, loss, err in zip(alphas, s.loss, s.err):
        shifted = [p + a * di for p, di in zip(obj.params, d)]
        assert loss == pytest.approx(obj.loss(shifted), rel=1e-9)  # the code guards ||d_i|| with 1e-10
        assert err == pytest.approx(100.0 * float(shifted[0].reshape(-1)[0]), rel=1e-9)
    assert set(s.as_json()) == {"alpha", "loss", "err", "seed", "time_s"}
    assert all(torch.equal(p, q) for p, q in zip(obj.params, Known().params))  # the weights are not moved


def test_slice_2d_is_the_loss_on_a_grid_of_two_directions() -> None:
    obj = Known()
    s = slice_2d(obj, span=1.0, points=3, seed=5)
    g = torch.Generator().manual_seed(5)
    d1, d2 = direction(obj.params, g), direction(obj.params, g)  # two draws of one generator
    assert s.alpha == s.beta == pytest.approx([-1.0, 0.0, 1.0], abs=1e-15)
    assert len(s.loss) == 3 and all(len(row) == 3 for row in s.loss) and s.seed == 5
    for i, a in enumerate(s.alpha):
        for j, b in enumerate(s.beta):
            shifted = [p + a * x + b * y for p, x, y in zip(obj.params, d1, d2)]
            assert s.loss[i][j] == pytest.approx(obj.loss(shifted), rel=1e-9)
            assert s.err[i][j] == pytest.approx(100.0 * float(shifted[0].reshape(-1)[0]), rel=1e-9)
    assert s.loss[1][1] == pytest.approx(obj.loss(obj.params), rel=1e-12)
    assert set(s.as_json()) == {"alpha", "beta", "loss", "err", "seed", "time_s"}


def test_interpolation_follows_the_straight_line_buffers_included() -> None:
    a, b = Known(seed=0), Known(seed=1)
    b.buffers["num_batches_tracked"] = torch.tensor(99)
    path = interpolate(a, b.params, b.buffers, -0.5, 1.5, 5)
    assert path.t == pytest.approx([-0.5, 0.0, 0.5, 1.0, 1.5], abs=1e-15)
    for t, loss, err in zip(path.t, path.loss, path.err):
        params = [(1 - t) * pa + t * pb for pa, pb in zip(a.params, b.params)]
        # float buffers (BN running statistics) on the same line; integer ones (batch counters) stay a's
        buffers = {"running_mean": (1 - t) * a.buffers["running_mean"] + t * b.buffers["running_mean"],
                   "num_batches_tracked": a.buffers["num_batches_tracked"]}
        assert loss == pytest.approx(a.loss(params, buffers), rel=1e-12)
        assert err == pytest.approx(100.0 * float(params[0].reshape(-1)[0]), rel=1e-12)
    assert torch.equal(a.buffers["running_mean"], Known(seed=0).buffers["running_mean"])  # restored
    assert set(path.as_json()) == {"t", "loss", "err", "time_s"}


def test_interpolation_restores_the_buffers_when_evaluation_fails() -> None:
    a, b = Known(seed=0), Known(seed=1)
    own = a.buffers

    def broken(params):
        raise RuntimeError("out of memory")

    a.evaluate = broken
    with pytest.raises(RuntimeError):
        interpolate(a, b.params, b.buffers, 0.0, 1.0, 3)
    assert a.buffers is own


def test_interpolation_steps_are_float64_and_the_other_run_is_cast_to_this_one() -> None:
    """t = i/6 exactly as a float64 (a float32 linspace would print 0.16666667163372); the other
    run's weights and statistics in float32 are cast to this run's float64 before mixing."""
    a, b = Known(seed=0), Known(seed=1)
    b32 = [p.float() for p in b.params]
    buffers32 = {k: (v.float() if v.is_floating_point() else v) for k, v in b.buffers.items()}
    path = interpolate(a, b32, buffers32, 0.0, 1.0, 7)
    assert path.t == pytest.approx([i / 6 for i in range(7)], rel=1e-15, abs=1e-16)
    for t, loss in zip(path.t, path.loss):
        params = [torch.lerp(pa, pb.double(), t) for pa, pb in zip(a.params, b32)]
        buffers = {"running_mean": torch.lerp(a.buffers["running_mean"], buffers32["running_mean"].double(), t),
                   "num_batches_tracked": a.buffers["num_batches_tracked"]}
        assert loss == pytest.approx(a.loss(params, buffers), rel=1e-12)


def test_each_result_records_its_own_wall_time() -> None:
    import time

    obj = Known()
    t0 = time.perf_counter()
    results = [slice_1d(obj, 1.0, 3, 0), slice_2d(obj, 1.0, 2, 0), interpolate(obj, Known(1).params, Known(1).buffers,
                                                                               0.0, 1.0, 2)]
    elapsed = time.perf_counter() - t0
    assert all(0.0 <= r.time_s <= elapsed for r in results)


def test_filter_norm_is_guarded_by_adding_1e_10_to_the_directions_norm() -> None:
    """Filters of one weight each: ||d_i|| = |d_i|, some of them small among 300 draws, where
    d_i * ||w_i|| / (||d_i|| + 1e-10) and any other guard differ well above float64 rounding."""
    p = torch.randn(300, 1, generator=torch.Generator().manual_seed(1), dtype=F64)
    got = filter_normalized_direction([p], torch.Generator().manual_seed(2))[0]
    d = torch.randn(300, 1, generator=torch.Generator().manual_seed(2), dtype=F64)
    assert float(d.abs().min()) < 0.05
    assert torch.allclose(got, d * (p.abs() / (d.abs() + 1e-10)), rtol=1e-13, atol=0.0)
