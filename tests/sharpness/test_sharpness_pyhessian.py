"""Our Hessian estimates against PyHessian (Yao et al. 2020; a test dependency only) on the same
CNN, data and BatchNorm mode (eval: PyHessian puts the model in eval mode), for each of our HVP
modes. The times are printed with their ratio, never asserted (scripts/bench_sharpness.py measures
them at equal accuracy)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from sam_repro.sharpness import HVP_MODES, Objective, hutchinson_trace, prepare_model, top_eigenvalues

pyhessian = pytest.importorskip("pyhessian")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_sharpness import SmallCNN  # noqa: E402  (the benchmark's CNN: one network, measured and tested)


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

    ours = {}
    for mode in HVP_MODES:  # one operator per mode: eigenvalue and trace share its kept graphs
        t0 = time.perf_counter()
        obj = Objective.build(prepare_model(model, "eval", torch.float32), x, y, batch_size=32)
        mv = obj.flat_hvp(mode)
        top = top_eigenvalues(mv, obj.dim, k=1, iters=60, tol=1e-5, seed=0)
        trace = hutchinson_trace(mv, obj.dim, 100, 0.0, seed=0)
        ours[mode] = (top, trace, time.perf_counter() - t0)

    ref = pyhessian.hessian(model, nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    theirs_top, _ = ref.eigenvalues(maxIter=200, tol=1e-6, top_n=1)
    samples = ref.trace(maxIter=100, tol=0.0)
    theirs_s = time.perf_counter() - t0
    theirs_trace = float(torch.tensor(samples, dtype=torch.float64).mean())
    theirs_err = float(torch.tensor(samples, dtype=torch.float64).std() / len(samples) ** 0.5)

    print(f"\nPyHessian: lambda_max {theirs_top[0]:.6g} (power iteration), trace {theirs_trace:.6g} ± "
          f"{theirs_err:.2g} ({len(samples)} probes), {theirs_s:.2f} s")
    for mode, (top, trace, seconds) in ours.items():
        print(f"ours --hvp {mode}: lambda_max {top.values[0]:.6g} (residual {top.residuals[0]:.2g}, "
              f"{top.iterations} Lanczos steps), trace {trace.value:.6g} ± {trace.stderr:.2g} ({trace.probes} "
              f"probes), {seconds:.2f} s; PyHessian / ours = {theirs_s / seconds:.2f}")
    for top, trace, _ in ours.values():
        assert top.values[0] == pytest.approx(theirs_top[0], rel=0.01)
        assert abs(trace.value - theirs_trace) <= 3 * (trace.stderr ** 2 + theirs_err ** 2) ** 0.5


@pytest.mark.slow
def test_the_benchmark_script_runs_and_reports_every_side(tmp_path, capsys) -> None:
    """scripts/bench_sharpness.py --quick: both HVP modes and PyHessian, one JSON line appended."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import bench_sharpness

    argv, sys.argv = sys.argv, ["bench_sharpness.py", "--quick", "--out", str(tmp_path)]
    try:
        assert bench_sharpness.main() == 0
    finally:
        sys.argv = argv
    (line,) = (tmp_path / bench_sharpness.OUT_FILE).read_text().splitlines()
    row = json.loads(line)
    assert set(row["ratio_pyhessian_over_ours"]) == set(HVP_MODES) and row["threads"] >= 1
    for side in ("pyhessian", *HVP_MODES):
        assert row[side]["meets_eig_tol"] and row[side]["probes"] == 5 and row[side]["total_s"] > 0
    assert "PyHessian / ours (reverse)" in capsys.readouterr().out
