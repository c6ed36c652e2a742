"""m-sharpness (sam_repro/sharpness/msharpness.py) on losses whose answer is known in closed form:
linear and quadratic chunk losses, where the one-step value, the n-step ascent's iterates, the
constrained maximum over the rho-ball and the standard error over chunks are written out here.

The ascent docs/sharpness.md states: e_1 = rho g/||g||, then e <- Proj(e + (rho/2) g(w+e)/||g(w+e)||)
with Proj the projection onto the ball ||e|| <= rho (an iterate inside stays where it is, one
outside is scaled onto the surface); the value is the largest loss over the iterates."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from sam_repro.sharpness import m_sharpness, m_sharpness_grid
from sam_repro.sharpness.msharpness import MSharpness

F64 = torch.float64
DIRECTION = torch.tensor([0.6, 0.0, -0.8], dtype=F64)  # a unit vector: every chunk's gradient points along it


class Concave:
    """The part of an Objective that m_sharpness reads (params, x, y, n, batch_loss), with the chunk
    loss L(w) = mean_i x_i . w - 0.5 * mean_i(y_i) * ||w - w0||^2 (y_i: a curvature per example).

    With every example of a chunk alike (x_i = G u, y_i = a), L(w0 + t u) - L(w0) = G t - a t^2 / 2
    along u, the gradient stays along u, and the whole ascent is a walk t_k on [-rho, rho]."""

    def __init__(self, grads: list[float], curvatures: list[float], m: int, w0: torch.Tensor | None = None) -> None:
        self.w0 = torch.tensor([0.25, -1.5, 0.5], dtype=F64) if w0 is None else w0
        self.params = (self.w0.clone(),)
        self.x = torch.cat([g * DIRECTION.expand(m, 3) for g in grads])
        self.y = torch.cat([torch.full((m,), a, dtype=F64) for a in curvatures])

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    def batch_loss(self, params, x, y):
        w = params[0]
        return (x @ w).mean() - 0.5 * y.mean() * ((w - self.w0) ** 2).sum()


def walk(grad: float, curvature: float, rho: float, steps: int) -> float:
    """The documented ascent on f(t) = G t - a t^2 / 2 over |t| <= rho, in plain floats: max over
    the iterates of f. Start at SAM's t = rho; then a step of rho/2 in the direction of f'(t);
    clipped to the ball (a point inside stays)."""
    f = lambda t: grad * t - 0.5 * curvature * t * t
    t = rho
    best = f(t)
    for _ in range(steps - 1):
        slope = grad - curvature * t
        t = t + (rho / 2) * (1.0 if slope > 0 else -1.0 if slope < 0 else 0.0)
        t = max(-rho, min(rho, t))
        best = max(best, f(t))
    return best


def true_max(grad: float, curvature: float, rho: float) -> float:
    """max over |t| <= rho of G t - a t^2 / 2 (G > 0): the vertex G/a when it is inside, else t = rho."""
    if curvature > 0 and grad / curvature <= rho:
        return grad * grad / (2 * curvature)
    return grad * rho - 0.5 * curvature * rho * rho


# (G, a) with rho = 0.5; the comment says where the maximum is and what the walk does
CASES = {
    "vertex at rho/2": (1.0, 4.0),  # SAM's e overshoots (f = 0); the second iterate is the maximiser
    "vertex at 0.3 rho": (0.6, 4.0),  # the walk goes rho -> rho/2 -> 0 -> rho/2 ...: a lower bound
    "maximum on the surface": (2.0, 2.0),  # f'(rho) > 0: the step leaves the ball and is put back on it
    "linear": (1.5, 0.0),  # the maximiser is rho g/||g|| exactly
}
RHO = 0.5


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
@pytest.mark.parametrize("case", list(CASES))
def test_ascent_walks_as_documented(case: str, steps: int) -> None:
    grad, curvature = CASES[case]
    got = m_sharpness(Concave([grad], [curvature], m=4), m=4, rho=RHO, steps=steps)
    assert got.value == pytest.approx(walk(grad, curvature, RHO, steps), rel=1e-9, abs=1e-12)
    assert got.value <= true_max(grad, curvature, RHO) + 1e-12  # never above the constrained maximum


def test_the_second_step_goes_rho_over_2_and_stays_inside_the_ball() -> None:
    """Vertex at rho/2: one step (SAM's e, on the surface) gives 0; the second iterate, rho - rho/2,
    is the maximiser G^2 / (2a) only with a step of rho/2 that is kept inside the ball (a step of
    rho lands on w, a projection onto the surface puts it back at rho: 0 either way)."""
    grad, curvature = CASES["vertex at rho/2"]
    obj = Concave([grad], [curvature], m=4)
    assert m_sharpness(obj, 4, RHO, steps=1).value == pytest.approx(0.0, abs=1e-12)
    assert m_sharpness(obj, 4, RHO, steps=2).value == pytest.approx(grad ** 2 / (2 * curvature), rel=1e-12)


def test_an_iterate_outside_the_ball_is_put_back_on_its_surface() -> None:
    """Linear loss: the maximum over the ball is rho ||g|| (at rho g/||g||); every later step leaves
    the ball along g and must come back to the same point, however many steps."""
    grad, _ = CASES["linear"]
    obj = Concave([grad], [0.0], m=4)
    for steps in (1, 2, 6):
        assert m_sharpness(obj, 4, RHO, steps=steps).value == pytest.approx(RHO * grad, rel=1e-12)
    grad, curvature = CASES["maximum on the surface"]
    value = m_sharpness(Concave([grad], [curvature], m=4), 4, RHO, steps=4).value
    assert value == pytest.approx(grad * RHO - 0.5 * curvature * RHO ** 2, rel=1e-12)


class Quadratic:
    """Chunk loss L(w) = mean_i x_i . w + 0.5 mean_i (z_i . (w - w0))^2: gradient g = mean x_i and
    Hessian A = mean z_i z_i^T at w0, the same for every w (x holds x_i and z_i side by side)."""

    def __init__(self, x: torch.Tensor, z: torch.Tensor, w0: torch.Tensor) -> None:
        self.w0, self.params = w0, (w0.clone(),)
        self.x, self.y = torch.stack([x, z], 1), torch.zeros(x.shape[0], dtype=torch.long)

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    def batch_loss(self, params, xz, y):
        e = params[0] - self.w0
        return (xz[:, 0] @ params[0]).mean() + 0.5 * ((xz[:, 1] @ e) ** 2).mean()


def trust_region_max(g: torch.Tensor, a: torch.Tensor, rho: float) -> float:
    """max over ||e|| <= rho of g.e + e^T A e / 2 for a positive semi-definite A: on the surface, at
    e = (mu I - A)^-1 g with mu > lambda_max(A) chosen by bisection so that ||e|| = rho."""
    eye = torch.eye(len(g), dtype=F64)
    norm = lambda mu: float(torch.linalg.norm(torch.linalg.solve(mu * eye - a, g)))
    lo = float(torch.linalg.eigvalsh(a)[-1]) + 1e-12
    hi = lo + 1.0
    while norm(hi) > rho:
        hi += 2 * (hi - lo)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if norm(mid) > rho else (lo, mid)
    e = torch.linalg.solve(hi * eye - a, g)
    return float(g @ e + 0.5 * e @ a @ e)


def quadratic_problem(seed: int = 0, m: int = 6, dim: int = 4) -> tuple[Quadratic, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(dim, dtype=F64, generator=gen)
    x = 0.3 * torch.randn(m, dim, dtype=F64, generator=gen)
    z = torch.randn(m, dim, dtype=F64, generator=gen)
    return Quadratic(x, z, w0), x.mean(0), z.T @ z / m


def test_many_steps_reach_the_constrained_maximum_of_a_quadratic() -> None:
    """A convex quadratic whose gradient is not an eigenvector: SAM's one step stays well below the
    maximum over the ball (found here by the trust-region equation), the ascent climbs to it."""
    obj, g, a = quadratic_problem()
    best = trust_region_max(g, a, RHO)
    values = [m_sharpness(obj, 6, RHO, steps=s).value for s in (1, 5, 40)]
    assert values[0] < 0.6 * best
    assert values == sorted(values) and values[-1] <= best + 1e-12
    assert values[-1] == pytest.approx(best, rel=1e-8)


def test_the_quadratics_iterates_match_a_per_chunk_autograd_loop() -> None:
    """Three steps on two chunks with different quadratics, against the documented update written
    as a loop over chunks with torch.autograd (no vmap)."""
    a_obj, _, _ = quadratic_problem(seed=1, m=3)
    b_obj, _, _ = quadratic_problem(seed=2, m=3)
    obj = Quadratic(torch.cat([a_obj.x[:, 0], b_obj.x[:, 0]]), torch.cat([a_obj.x[:, 1], b_obj.x[:, 1]]), a_obj.w0)
    rho, values = 0.3, []
    for c in range(2):
        xz, y = obj.x[3 * c:3 * c + 3], obj.y[3 * c:3 * c + 3]

        def loss_at(e: torch.Tensor) -> tuple[float, torch.Tensor]:
            e = e.detach().requires_grad_(True)
            value = obj.batch_loss((obj.w0 + e,), xz, y)
            return float(value.detach()), torch.autograd.grad(value, e)[0]

        at_w, g = loss_at(torch.zeros(4, dtype=F64))
        e = rho * g / g.norm()
        best = loss_at(e)[0]
        for _ in range(2):
            step = loss_at(e)[1]
            e = e + (rho / 2) * step / step.norm()
            e = e * min(1.0, rho / float(e.norm()))
            best = max(best, loss_at(e)[0])
        values.append(best - at_w)
    got = m_sharpness(obj, 3, rho, steps=3, max_batch=3)  # one chunk per vmapped group
    assert got.chunks == 2 and got.value == pytest.approx(sum(values) / 2, rel=1e-10)


# -- the standard error over chunks ----------------------------------------------------------------

def test_standard_error_is_the_sample_std_over_sqrt_chunks() -> None:
    """Linear chunks with ||g_c|| = 1, 2, 3, 4: chunk c's m-sharpness is rho ||g_c||, so the mean is
    2.5 rho and the standard error s/sqrt(4) with s the sample (n - 1) std of 1..4, sqrt(5/3)."""
    obj = Concave([1.0, 2.0, 3.0, 4.0], [0.0] * 4, m=2)
    got = m_sharpness(obj, m=2, rho=RHO, steps=1, max_batch=4)  # two chunks per vmapped group
    assert got.chunks == 4
    assert got.value == pytest.approx(2.5 * RHO, rel=1e-12)
    assert got.stderr == pytest.approx(RHO * math.sqrt(5 / 3) / 2, rel=1e-12)
    # L(w) subtracted: the mean over chunks of x . w0 = G_c * (u . w0)
    assert got.loss_at_w == pytest.approx(2.5 * float(DIRECTION @ obj.w0), rel=1e-12)


def test_standard_error_of_n_step_values_and_of_one_chunk() -> None:
    grads, curvatures = [1.0, 0.6, 2.0], [4.0, 4.0, 2.0]
    obj = Concave(grads, curvatures, m=2)
    values = [walk(g, a, RHO, 3) for g, a in zip(grads, curvatures)]
    got = m_sharpness(obj, 2, RHO, steps=3)
    assert (got.m, got.rho, got.steps, got.chunks) == (2, RHO, 3, 3)
    assert got.value == pytest.approx(statistics.fmean(values), rel=1e-10)
    assert got.stderr == pytest.approx(statistics.stdev(values) / math.sqrt(3), rel=1e-9)
    one = m_sharpness(obj, 6, RHO)  # a single chunk has no spread to estimate
    assert one.chunks == 1 and math.isnan(one.stderr)


def test_grid_is_every_m_and_rho_with_m_outer() -> None:
    obj = Concave([1.0, 2.0, 3.0, 4.0], [0.0] * 4, m=2)
    cells = m_sharpness_grid(obj, [2, 4], [0.5, 0.25], steps=2)
    assert [(c.m, c.rho, c.steps) for c in cells] == [(2, 0.5, 2), (2, 0.25, 2), (4, 0.5, 2), (4, 0.25, 2)]
    # m = 4 pairs the chunks (1, 2) and (3, 4): gradients 1.5 and 3.5, values rho * 1.5 and rho * 3.5
    assert cells[2].value == pytest.approx(0.5 * 2.5, rel=1e-12)
    assert cells[3].stderr == pytest.approx(0.25 * statistics.stdev([1.5, 3.5]) / math.sqrt(2), rel=1e-12)
    assert isinstance(cells[0], MSharpness) and set(cells[0].as_json()) == {
        "m", "rho", "steps", "value", "stderr", "chunks", "loss_at_w", "time_s"}


@pytest.mark.parametrize("m, steps, match", [(0, 1, "does not divide"), (3, 1, "does not divide"),
                                             (2, 0, "steps=0 must be >= 1")])
def test_bad_m_or_steps_are_refused(m: int, steps: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        m_sharpness(Concave([1.0, 2.0], [0.0, 0.0], m=2), m, RHO, steps=steps)


def test_one_step_is_the_default_and_one_example_chunks_are_allowed() -> None:
    grad, curvature = CASES["vertex at rho/2"]  # one step: 0; two steps: the maximum
    obj = Concave([grad, grad], [curvature, curvature], m=1)
    assert m_sharpness(obj, 1, RHO).value == pytest.approx(0.0, abs=1e-12) and m_sharpness(obj, 1, RHO).chunks == 2
    assert [c.value for c in m_sharpness_grid(obj, [1, 2], [RHO])] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert m_sharpness(obj, 1, RHO).steps == 1 and m_sharpness_grid(obj, [2], [RHO])[0].steps == 1


def test_time_is_the_cells_own_wall_time() -> None:
    import time

    obj = Concave([1.0, 2.0], [0.0, 0.0], m=2)
    t0 = time.perf_counter()
    cell = m_sharpness(obj, 2, RHO, steps=2)
    assert 0.0 <= cell.time_s <= time.perf_counter() - t0


# -- survivors of the second mutation run: the norm guard, the group bound, one chunk -------------

GUARD = 1e-12  # the code's e = rho g / (||g|| + 1e-12), also in the later steps and the projection


@pytest.mark.parametrize("grad", [1e-12, 2e-12, 1e-9])
def test_a_gradient_near_the_guard_gives_the_guarded_finite_ascent(grad: float) -> None:
    """Linear chunk with ||g|| = G of the guard's order: SAM's e is rho G / (G + 1e-12) along g,
    the second step adds (rho/2) G / (G + 1e-12) and is projected back into the ball; the value
    is G times the best iterate. A guard that subtracts divides by ~0 (inf, NaN) or overshoots."""
    obj = Concave([grad], [0.0], m=2)
    t1 = RHO * grad / (grad + GUARD)
    t2 = t1 + 0.5 * RHO * grad / (grad + GUARD)
    t2 *= min(1.0, RHO / (abs(t2) + GUARD))
    assert m_sharpness(obj, 2, RHO).value == pytest.approx(grad * t1, rel=1e-9)
    assert m_sharpness(obj, 2, RHO, steps=2).value == pytest.approx(grad * max(t1, t2), rel=1e-9)


def test_vmapped_groups_hold_at_most_max_batch_examples_and_at_least_one_chunk(monkeypatch) -> None:
    """`max_batch` bounds the examples per vmapped group (the CLI passes --batch-size); a chunk
    larger than it still goes alone. The value does not depend on the grouping."""
    from sam_repro.sharpness import msharpness

    groups = []
    original = msharpness._group_sharpness

    def recording(obj, xs, ys, rho, steps):
        groups.append(tuple(xs.shape[:2]))
        return original(obj, xs, ys, rho, steps)

    monkeypatch.setattr(msharpness, "_group_sharpness", recording)
    obj = Concave([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [0.0] * 6, m=2)
    alone = m_sharpness(obj, 4, RHO, max_batch=3)  # 4 > 3: one chunk per group
    assert groups == [(1, 4)] * 3
    groups.clear()
    cells = m_sharpness_grid(obj, [2], [RHO], max_batch=5)  # two chunks of 2 per group
    assert groups == [(2, 2), (2, 2), (2, 2)]
    assert cells[0].value == pytest.approx(RHO * 3.5, rel=1e-12)
    assert alone.value == pytest.approx(RHO * statistics.fmean([1.5, 3.5, 5.5]), rel=1e-12)


def test_one_chunk_has_no_standard_error_and_no_warning() -> None:
    """A single chunk: stderr is NaN by definition, not a sample std of one value (which torch
    computes with a 'degrees of freedom <= 0' warning)."""
    import warnings

    obj = Concave([1.0, 2.0], [0.0, 0.0], m=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = m_sharpness(obj, 4, RHO)
    assert one.chunks == 1 and math.isnan(one.stderr) and one.value == pytest.approx(RHO * 1.5, rel=1e-12)
