"""Loss landscapes: 1D and 2D slices along filter-normalized random directions (Li et al. 2018,
"Visualizing the Loss Landscape of Neural Nets") and the linear path between two solutions.

Filter normalization: a Gaussian direction d, then for every filter (slice along dim 0) of every
weight with ndim > 1, d_i <- d_i * ||w_i|| / ||d_i||; BatchNorm weights and biases (ndim <= 1)
get d = 0, as in Li et al.'s default (their `ignore='biasbn'`). BatchNorm running statistics
stay those of w (eval mode). Under this scaling alpha = 1 moves every filter by its own norm, so
slices of differently scaled networks (SGD vs SAM) are comparable on one axis.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import Tensor

from sam_repro.sharpness.objective import Objective, Params


def filter_normalized_direction(params: Sequence[Tensor], g: torch.Generator) -> Params:
    """One random direction, filter-normalized against `params` (drawn on the CPU from `g`)."""
    out = []
    for p in params:
        if p.ndim <= 1:
            out.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=g, dtype=torch.float64).to(device=p.device, dtype=p.dtype)
        dims = tuple(range(1, p.ndim))
        norm = torch.linalg.vector_norm  # Tensor.norm over 3 dims would take the matrix-norm path and fail
        scale = norm(p, dim=dims, keepdim=True) / (norm(d, dim=dims, keepdim=True) + 1e-10)
        out.append(d * scale)
    return tuple(out)


def _shifted(params: Sequence[Tensor], dirs: Sequence[Params], coefs: Sequence[float]) -> Params:
    out = []
    for i, p in enumerate(params):
        q = p.clone()
        for d, c in zip(dirs, coefs):
            q.add_(d[i], alpha=c)
        out.append(q)
    return tuple(out)


@dataclass
class Slice1D:
    alpha: list[float]
    loss: list[float]
    err: list[float]
    seed: int
    time_s: float

    def as_json(self) -> dict:
        return asdict(self)


@dataclass
class Slice2D:
    alpha: list[float]
    beta: list[float]
    loss: list[list[float]]  # loss[i][j] at (alpha[i], beta[j])
    err: list[list[float]]
    seed: int
    time_s: float

    def as_json(self) -> dict:
        return asdict(self)


def _coords(span: float, points: int) -> list[float]:
    return [float(a) for a in torch.linspace(-span, span, points, dtype=torch.float64)]


def slice_1d(obj: Objective, span: float, points: int, seed: int) -> Slice1D:
    """L(w + alpha d) for alpha in [-span, span] along one filter-normalized direction."""
    t0 = time.perf_counter()
    d = filter_normalized_direction(obj.params, torch.Generator().manual_seed(seed))
    alpha = _coords(span, points)
    vals = [obj.evaluate(_shifted(obj.params, [d], [a])) for a in alpha]
    return Slice1D(alpha, [v[0] for v in vals], [v[1] for v in vals], seed, time.perf_counter() - t0)


def slice_2d(obj: Objective, span: float, points: int, seed: int) -> Slice2D:
    """L(w + alpha d1 + beta d2) on a points x points grid (two independent directions)."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    d1 = filter_normalized_direction(obj.params, g)
    d2 = filter_normalized_direction(obj.params, g)
    alpha = _coords(span, points)
    loss, err = [], []
    for a in alpha:
        row = [obj.evaluate(_shifted(obj.params, [d1, d2], [a, b])) for b in alpha]
        loss.append([v[0] for v in row])
        err.append([v[1] for v in row])
    return Slice2D(alpha, list(alpha), loss, err, seed, time.perf_counter() - t0)


@dataclass
class Interpolation:
    """L((1 - t) w_a + t w_b): t = 0 is this run, t = 1 the other one."""

    t: list[float]
    loss: list[float]
    err: list[float]
    time_s: float

    def as_json(self) -> dict:
        return asdict(self)


def interpolate(obj_a: Objective, params_b: Sequence[Tensor], buffers_b: dict[str, Tensor],
                t_min: float, t_max: float, points: int) -> Interpolation:
    """The linear path from obj_a's weights to params_b on obj_a's subset. Floating-point buffers
    (BatchNorm running statistics) are interpolated too; integer ones (batch counters) stay a's."""
    t0 = time.perf_counter()
    ts = [float(t) for t in torch.linspace(t_min, t_max, points, dtype=torch.float64)]
    own = obj_a.buffers
    losses, errs = [], []
    try:
        for t in ts:
            params = tuple(torch.lerp(pa, pb.to(pa), t) for pa, pb in zip(obj_a.params, params_b))
            obj_a.buffers = {k: torch.lerp(v, buffers_b[k].to(v), t) if v.is_floating_point() else v
                             for k, v in own.items()}
            loss, err = obj_a.evaluate(params)
            losses.append(loss)
            errs.append(err)
    finally:
        obj_a.buffers = own
    return Interpolation(ts, losses, errs, time.perf_counter() - t0)
