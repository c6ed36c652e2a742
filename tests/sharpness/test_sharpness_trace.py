"""Hutchinson's trace estimate (sam_repro/sharpness/hessian.py) and its standard error, against the
probes recomputed here: every probe z the estimator draws is recorded, z^T H z is computed by the
test, and the mean, the sample standard deviation / sqrt(probes) and the stopping rule are
written out with the standard library."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from sam_repro.sharpness import Trace, hutchinson_trace

F64 = torch.float64


def symmetric(dim: int, seed: int = 0) -> torch.Tensor:
    a = torch.randn(dim, dim, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return (a + a.T) / 2


class Recorded:
    """v -> H v that keeps every probe it is given."""

    def __init__(self, h: torch.Tensor) -> None:
        self.h, self.probes = h, []

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.probes.append(v.clone())
        return self.h @ v

    def quadratic_forms(self) -> list[float]:
        return [float(z @ self.h @ z) for z in self.probes]


@pytest.mark.parametrize("probes", [2, 3, 7])
def test_value_and_standard_error_from_the_probes_drawn(probes: int) -> None:
    h = symmetric(6)
    mv = Recorded(h)
    trace = hutchinson_trace(mv, 6, max_probes=probes, tol=0.0, seed=4, dtype=F64)
    forms = mv.quadratic_forms()
    assert len(forms) == probes == trace.probes and not trace.converged
    assert all(set(z.tolist()) <= {-1.0, 1.0} for z in mv.probes)  # Rademacher
    assert trace.samples == pytest.approx(forms, rel=1e-12)
    assert trace.value == pytest.approx(statistics.fmean(forms), rel=1e-12)
    # the standard error of a mean: sample std (n - 1 in the denominator) over sqrt(n)
    assert trace.stderr == pytest.approx(statistics.stdev(forms) / math.sqrt(probes), rel=1e-12)


def test_standard_error_matches_the_closed_form_spread_of_rademacher_probes() -> None:
    """For Rademacher z, Var(z^T H z) = 2 * sum_{i != j} H_ij^2; with 4000 probes the reported
    standard error is within a few percent of sqrt(that / 4000), and the mean within 4 of them of
    tr(H)."""
    h = symmetric(8, seed=1)
    n = 4000
    trace = hutchinson_trace(lambda v: h @ v, 8, max_probes=n, tol=0.0, seed=0, dtype=F64)
    off = h - torch.diag(torch.diag(h))
    expected = math.sqrt(2 * float((off ** 2).sum()) / n)
    assert trace.probes == n and trace.stderr == pytest.approx(expected, rel=0.05)
    assert abs(trace.value - float(torch.trace(h))) <= 4 * expected


def test_one_probe_has_no_standard_error() -> None:
    trace = hutchinson_trace(lambda v: symmetric(4) @ v, 4, max_probes=1, tol=1.0, seed=0, dtype=F64)
    assert trace.probes == 1 and trace.stderr == math.inf and not trace.converged


@pytest.mark.parametrize("tol, min_probes", [(0.25, 3), (0.25, 10), (0.1, 5), (0.05, 10)])
def test_it_stops_at_the_first_probe_count_whose_error_is_within_tol(tol: float, min_probes: int) -> None:
    """stderr <= tol * |mean| after at least min_probes: the first such count, found here from the
    probes of a run that never stops early (the same seed draws the same probes)."""
    h = symmetric(10, seed=2) + 3 * torch.eye(10, dtype=F64)  # a trace far from 0
    mv = Recorded(h)
    hutchinson_trace(mv, 10, max_probes=60, tol=0.0, seed=7, dtype=F64)
    forms = mv.quadratic_forms()
    stop = next((k for k in range(max(2, min_probes), 61)
                 if statistics.stdev(forms[:k]) / math.sqrt(k) <= tol * abs(statistics.fmean(forms[:k]))), None)
    trace = hutchinson_trace(lambda v: h @ v, 10, max_probes=60, tol=tol, seed=7, min_probes=min_probes, dtype=F64)
    assert stop is not None and 2 < stop < 60  # each case stops before its budget (at 3, 10, 14, 38 probes)
    assert (trace.probes, trace.converged) == (stop, True)
    assert trace.value == pytest.approx(statistics.fmean(forms[:stop]), rel=1e-12)
    assert trace.stderr == pytest.approx(statistics.stdev(forms[:stop]) / math.sqrt(stop), rel=1e-12)


def test_a_budget_below_min_probes_still_stops_on_the_error() -> None:
    """max_probes < min_probes: the error is checked from max_probes on (the smaller of the two)."""
    h = torch.diag(torch.arange(1.0, 7.0, dtype=F64))  # diagonal: every probe gives tr(H), stderr 0
    trace = hutchinson_trace(lambda v: h @ v, 6, max_probes=4, tol=1e-9, seed=0, min_probes=10, dtype=F64)
    assert (trace.probes, trace.converged, trace.value, trace.stderr) == (4, True, 21.0, 0.0)
    assert isinstance(trace, Trace) and "sqrt(probes)" in trace.as_json()["method"]
