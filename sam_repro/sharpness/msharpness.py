"""m-sharpness (SAM paper, Sec. 4.1): the mean over disjoint chunks of m training examples of
max_{||e||_2 <= rho} L_chunk(w + e) - L_chunk(w).

The inner max is approximated as SAM does (one step: e = rho * g / ||g||, g the chunk's gradient)
or by projected normalized gradient ascent (n steps: e_1 is SAM's e; then
e <- Proj_{||e|| <= rho}(e + (rho / 2) * g(w + e) / ||g(w + e)||); the value is the largest loss
seen over the iterates, so it never falls below the one-step value and stays a lower bound of the
true max). All chunks of a group are computed at once with torch.func.vmap (one batched forward and
backward per step, no Python loop over chunks or examples); with BatchNorm in train mode each chunk
is normalized over its own m examples, as on the paper's per-device batches.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import Tensor
from torch.func import grad, vmap

from sam_repro.sharpness.objective import Objective, Params

ASCENT_STEP = 0.5  # the n-step ascent's step after the first, in units of rho


@dataclass
class MSharpness:
    """One (m, rho) cell: mean over chunks and its standard error."""

    m: int
    rho: float
    steps: int
    value: float
    stderr: float
    chunks: int
    loss_at_w: float  # mean chunk loss at w (the L(w) subtracted)
    time_s: float

    def as_json(self) -> dict:
        return asdict(self)


def _chunk_norms(g: Params) -> Tensor:
    """||g_c|| per chunk for per-chunk gradients with a leading chunk dimension."""
    return torch.sqrt(sum(t.reshape(t.shape[0], -1).pow(2).sum(1) for t in g))


def _scale(g: Params, s: Tensor) -> Params:
    return tuple(t * s.view(-1, *([1] * (t.ndim - 1))) for t in g)


def _group_sharpness(obj: Objective, xs: Tensor, ys: Tensor, rho: float, steps: int) -> tuple[Tensor, Tensor]:
    """(sharpness, L(w)) per chunk of one group; xs [C, m, ...], ys [C, m]."""
    loss = obj.batch_loss
    per_chunk_grad = vmap(grad(loss), in_dims=(None, 0, 0))
    at_w = vmap(loss, in_dims=(None, 0, 0))(obj.params, xs, ys)
    g = per_chunk_grad(obj.params, xs, ys)
    e = _scale(g, rho / (_chunk_norms(g) + 1e-12))
    batched_loss = vmap(loss, in_dims=(0, 0, 0))
    batched_grad = vmap(grad(loss), in_dims=(0, 0, 0))

    def perturbed(e: Params) -> Params:
        return tuple(p.unsqueeze(0) + ei for p, ei in zip(obj.params, e))

    best = batched_loss(perturbed(e), xs, ys)
    for _ in range(steps - 1):
        g = batched_grad(perturbed(e), xs, ys)
        e = tuple(ei + gi for ei, gi in zip(e, _scale(g, ASCENT_STEP * rho / (_chunk_norms(g) + 1e-12))))
        norm = _chunk_norms(e)
        e = _scale(e, torch.clamp(rho / (norm + 1e-12), max=1.0))  # projected: outside onto the surface, inside kept
        best = torch.maximum(best, batched_loss(perturbed(e), xs, ys))
    return (best - at_w).detach(), at_w.detach()


def m_sharpness(obj: Objective, m: int, rho: float, steps: int = 1, max_batch: int = 256) -> MSharpness:
    """m-sharpness of `obj`'s subset for one (m, rho). The subset size must be a multiple of m;
    chunks are the subset's consecutive slices of m (the subset is already a random draw).
    `max_batch` bounds the examples per vmapped group (memory: one gradient per chunk)."""
    if m < 1 or obj.n % m:
        raise ValueError(f"m={m} does not divide the subset size {obj.n}")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    t0 = time.perf_counter()
    chunks = obj.n // m
    xs = obj.x.reshape(chunks, m, *obj.x.shape[1:])
    ys = obj.y.reshape(chunks, m)
    per_group = max(1, max_batch // m)
    sharp, base = [], []
    for at in range(0, chunks, per_group):
        s, b = _group_sharpness(obj, xs[at:at + per_group], ys[at:at + per_group], rho, steps)
        sharp.append(s)
        base.append(b)
    s = torch.cat(sharp).double()
    stderr = float(s.std(unbiased=True) / math.sqrt(chunks)) if chunks > 1 else math.nan
    return MSharpness(m, float(rho), steps, float(s.mean()), stderr, chunks, float(torch.cat(base).double().mean()),
                      time.perf_counter() - t0)


def m_sharpness_grid(obj: Objective, ms: Sequence[int], rhos: Sequence[float], steps: int = 1,
                     max_batch: int = 256) -> list[MSharpness]:
    """Every (m, rho) of the lists, m outer."""
    return [m_sharpness(obj, m, rho, steps, max_batch) for m in ms for rho in rhos]
