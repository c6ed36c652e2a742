"""Our Hessian estimates against PyHessian (Yao et al. 2020; a test dependency only) on the same
CNN, data and BatchNorm mode (eval: PyHessian puts the model in eval mode). The times of both are
printed with their ratio, never asserted."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from sam_repro.sharpness import Objective, hutchinson_trace, prepare_model, top_eigenvalues

pyhessian = pytest.importorskip("pyhessian")


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2))
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


@pytest.mark.slow
def test_top_eigenvalue_and_trace_agree_with_pyhessian() -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = torch.randn(64, 3, 12, 12), torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):  # a few SGD steps, so that the curvature is not that of a random init
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 64, 32)]

    obj = Objective.build(prepare_model(model, "eval", torch.float32), x, y, batch_size=32)
    t0 = time.perf_counter()
    ours_top = top_eigenvalues(obj.flat_hvp(), obj.dim, k=1, iters=60, tol=1e-5, seed=0)
    ours_trace = hutchinson_trace(obj.flat_hvp(), obj.dim, 100, 0.0, seed=0)
    ours_s = time.perf_counter() - t0

    ref = pyhessian.hessian(model, nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    theirs_top, _ = ref.eigenvalues(maxIter=200, tol=1e-6, top_n=1)
    samples = ref.trace(maxIter=100, tol=0.0)
    theirs_s = time.perf_counter() - t0
    theirs_trace = float(torch.tensor(samples, dtype=torch.float64).mean())
    theirs_err = float(torch.tensor(samples, dtype=torch.float64).std() / len(samples) ** 0.5)

    print(f"\nlambda_max: ours {ours_top.values[0]:.6g} (residual {ours_top.residuals[0]:.2g}, "
          f"{ours_top.iterations} Lanczos steps), PyHessian {theirs_top[0]:.6g} (power iteration)")
    print(f"trace: ours {ours_trace.value:.6g} ± {ours_trace.stderr:.2g} ({ours_trace.probes} probes), "
          f"PyHessian {theirs_trace:.6g} ± {theirs_err:.2g} ({len(samples)} probes)")
    print(f"time (eigenvalue + trace): ours {ours_s:.2f} s, PyHessian {theirs_s:.2f} s, "
          f"PyHessian / ours = {theirs_s / ours_s:.2f}")
    assert ours_top.values[0] == pytest.approx(theirs_top[0], rel=0.01)
    assert abs(ours_trace.value - theirs_trace) <= 3 * (ours_trace.stderr ** 2 + theirs_err ** 2) ** 0.5
