"""Hessian spectrum estimates from Hessian-vector products: Lanczos (top-k eigenvalues), Hutchinson
(trace) and stochastic Lanczos quadrature (spectral density).

The solvers see only a function v -> H v on flat vectors (sam_repro.sharpness.objective builds it
with torch.func), so they are tested on matrices whose spectrum is known.

Error bars:
- Lanczos: the Ritz residual ||H q - theta q|| = |beta_m * s_m| (s_m: last component of the
  eigenvector of the tridiagonal matrix). For a symmetric H some eigenvalue lies within it of theta.
- Hutchinson: the standard error of the mean of the probes z^T H z (Rademacher z).
- SLQ: none beyond the number of probes and iterations, which are stated.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


def rademacher(dim: int, g: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A vector of +-1 entries, drawn on the CPU from `g` (the same draws on every device)."""
    return (torch.randint(0, 2, (dim,), generator=g).to(device=device, dtype=dtype) * 2 - 1)


@dataclass
class Lanczos:
    """The tridiagonal matrix of m Lanczos steps and its eigen-decomposition."""

    alphas: list[float]
    betas: list[float]  # betas[i] couples steps i and i+1; the last one is the residual norm
    ritz_values: Tensor  # ascending
    ritz_vectors: Tensor  # columns: eigenvectors of the tridiagonal matrix

    @property
    def residuals(self) -> Tensor:
        """|beta_m * s_m| for each Ritz pair (same order as ritz_values)."""
        return (self.betas[-1] * self.ritz_vectors[-1, :]).abs()


def _tridiagonal_eigh(alphas: list[float], betas: list[float]) -> tuple[Tensor, Tensor]:
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[:m - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(t)


def lanczos(matvec: MatVec, v0: Tensor, iters: int, check_every: int = 0,
            converged: Optional[Callable[[Lanczos], bool]] = None) -> Lanczos:
    """Lanczos with full reorthogonalization (twice, classical Gram-Schmidt) from start vector v0.

    Stops after `iters` steps, at an invariant subspace (beta ~ 0), or when `converged(state)` is
    true at a check (every `check_every` steps). Memory: `iters` vectors of the size of v0."""
    dim = v0.numel()
    steps = min(iters, dim)
    # the basis in one preallocated matrix: no copy of it per step (it is iters x dim)
    basis = v0.new_empty(steps, dim)
    basis[0] = v0 / v0.norm()
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        q = basis[j]
        w = matvec(q)
        alpha = float(torch.dot(w, q))
        alphas.append(alpha)
        qs = basis[:j + 1]
        for _ in range(2):  # full reorthogonalization keeps the Ritz values free of ghost copies
            w = w - qs.T @ (qs @ w)
        beta = float(w.norm())
        betas.append(beta)
        done = beta <= 1e-10 * max(1.0, abs(alpha)) or j + 1 == steps
        if not done and converged is not None and check_every and (j + 1) % check_every == 0:
            vals, vecs = _tridiagonal_eigh(alphas, betas)
            done = converged(Lanczos(alphas, betas, vals, vecs))
        if done:
            break
        basis[j + 1] = w / beta
    vals, vecs = _tridiagonal_eigh(alphas, betas)
    return Lanczos(alphas, betas, vals, vecs)


@dataclass
class TopEigen:
    """The k largest eigenvalues (descending) with their Ritz residuals (error bars)."""

    values: list[float]
    residuals: list[float]
    iterations: int
    tol: float
    converged: bool
    time_s: float
    method: str = "lanczos (full reorthogonalization), Ritz residual |beta_m s_m| as the error bar"

    def as_json(self) -> dict:
        return asdict(self)


def top_eigenvalues(matvec: MatVec, dim: int, k: int, iters: int, tol: float, seed: int,
                    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> TopEigen:
    """The k algebraically largest eigenvalues of H. Converged when every one of the k Ritz
    residuals is below tol * max(|theta_1|, 1e-12) (relative to the largest)."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    v0 = torch.randn(dim, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    k = min(k, dim)

    def ok(state: Lanczos) -> bool:
        if len(state.alphas) < k:
            return False
        res = state.residuals[-k:]
        scale = max(float(state.ritz_values[-1].abs()), 1e-12)
        return bool((res <= tol * scale).all())

    # checked after every step: the tridiagonal eigenproblem is tiny next to one HVP
    state = lanczos(matvec, v0, iters, check_every=1, converged=ok)
    top = torch.argsort(state.ritz_values, descending=True)[:k]
    return TopEigen(values=[float(state.ritz_values[i]) for i in top],
                    residuals=[float(state.residuals[i]) for i in top],
                    iterations=len(state.alphas), tol=tol, converged=ok(state) or len(state.alphas) == dim,
                    time_s=time.perf_counter() - t0)


@dataclass
class Trace:
    """Hutchinson's estimate: the mean of z^T H z over Rademacher probes, and its standard error."""

    value: float
    stderr: float
    probes: int
    tol: float
    converged: bool
    time_s: float
    method: str = "hutchinson (rademacher probes); stderr = sample std / sqrt(probes)"
    samples: list[float] = field(default_factory=list)

    def as_json(self) -> dict:
        return asdict(self)


def hutchinson_trace(matvec: MatVec, dim: int, max_probes: int, tol: float, seed: int, min_probes: int = 10,
                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Trace:
    """tr(H) ~ mean z^T H z. Stops when stderr <= tol * |mean| (after min_probes) or at max_probes."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    samples: list[float] = []
    mean, stderr, converged = math.nan, math.inf, False
    for i in range(max_probes):
        z = rademacher(dim, g, dtype, device)
        samples.append(float(torch.dot(z, matvec(z))))
        x = torch.tensor(samples, dtype=torch.float64)
        mean = float(x.mean())
        stderr = float(x.std(unbiased=True) / math.sqrt(len(samples))) if len(samples) > 1 else math.inf
        if len(samples) >= min(min_probes, max_probes) and stderr <= tol * abs(mean):
            converged = True
            break
    return Trace(mean, stderr, len(samples), tol, converged, time.perf_counter() - t0, samples=samples)


@dataclass
class Density:
    """Stochastic Lanczos quadrature: per probe, Ritz values (nodes) and weights (squared first
    components); their mixture approximates the spectral density; `grid`/`density` smooth it with
    a Gaussian of width `sigma`."""

    nodes: list[list[float]]
    weights: list[list[float]]
    probes: int
    iterations: int
    sigma: float
    grid: list[float]
    density: list[float]
    time_s: float
    method: str = "stochastic lanczos quadrature (rademacher starts), gaussian smoothing"

    def as_json(self) -> dict:
        return asdict(self)


def slq_density(matvec: MatVec, dim: int, probes: int, iters: int, seed: int, points: int = 200,
                sigma_fraction: float = 0.01, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> Density:
    """The spectral density of H by SLQ (Ghorbani et al. 2019, PyHessian's `density`)."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for _ in range(probes):
        state = lanczos(matvec, rademacher(dim, g, dtype, device), iters)
        nodes.append([float(v) for v in state.ritz_values])
        weights.append([float(w) for w in state.ritz_vectors[0, :] ** 2])
    all_nodes = torch.tensor([v for n in nodes for v in n], dtype=torch.float64)
    all_weights = torch.tensor([w for ws in weights for w in ws], dtype=torch.float64) / probes
    lo, hi = float(all_nodes.min()), float(all_nodes.max())
    pad = max(hi - lo, 1e-12) * 0.05
    grid = torch.linspace(lo - pad, hi + pad, points, dtype=torch.float64)
    sigma = sigma_fraction * max(hi - lo, 1e-12)
    kernel = torch.exp(-((grid[:, None] - all_nodes[None, :]) ** 2) / (2 * sigma ** 2)) / (sigma * math.sqrt(2 * math.pi))
    density = kernel @ all_weights
    return Density(nodes, weights, probes, iters, sigma, grid.tolist(), density.tolist(), time.perf_counter() - t0)
