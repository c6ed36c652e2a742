#!/usr/bin/env python3
"""Benchmark our Hessian estimates (each HVP mode) against PyHessian, side by side, at equal accuracy.

In ONE process, per configuration (a network, its data, BatchNorm in eval mode as PyHessian puts
it, fp32), interleaved in rounds so that a noisy neighbour hits every side alike:
- lambda_max to a stated relative accuracy `--eig-tol`, checked against a reference (a Lanczos
  run to a 1e-6 residual, not timed): ours by Lanczos, stopped when the Ritz residual (a bound
  on the eigenvalue's error) is below tol x lambda; PyHessian by its power iteration, whose stop
  (two consecutive estimates within tol, relatively) bounds no error: its tol starts at the same
  number and shrinks tenfold until its value meets the target, and only that run is timed.
- the trace by Hutchinson with the same number of Rademacher probes on both sides (`--probes`,
  no early stop): the same expected standard error; both error bars are printed.
The time of each side covers everything it does after the model and data exist (our gradient
graphs are built inside the eigenvalue's time). Ratio = PyHessian's time / ours: above 1, ours
is faster. One JSON line per configuration goes to stdout, and with --out is appended to
OUT/sharpness_vs_pyhessian.jsonl (torch version, threads, CPU, git sha).

    OMP_NUM_THREADS=1 nice -n 19 python scripts/bench_sharpness.py --threads 1 --out results/bench
    python scripts/bench_sharpness.py --quick           # seconds: the small CNN only, few probes

Exit status 2 (one line) when pyhessian is not importable: `pip install pyhessian` (dev extra).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sam_repro.models import create_model  # noqa: E402
from sam_repro.sharpness import HVP_MODES, Objective, hutchinson_trace, prepare_model, top_eigenvalues  # noqa: E402

OUT_FILE = "sharpness_vs_pyhessian.jsonl"
REFERENCE_TOL = 1e-6  # the reference lambda_max: Lanczos residual below 1e-6 x lambda


class SmallCNN(nn.Module):
    """A small CNN (about 1.2k parameters); tests/sharpness/test_sharpness_pyhessian.py uses it too."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2))
        self.fc = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1))


# name -> (model factory, examples, image side, batch size, SGD steps before measuring, rounds)
CONFIGS: dict[str, dict[str, Any]] = {
    "small_cnn": dict(make=SmallCNN, n=64, side=12, batch=32, sgd_steps=20, rounds=3),
    "resnet20": dict(make=lambda: create_model("resnet20", num_classes=10), n=256, side=32, batch=128, sgd_steps=10,
                     rounds=1),
}


def problem(name: str, seed: int) -> tuple[nn.Module, Tensor, Tensor, int]:
    """The network after a few full-batch SGD steps (the curvature of a random init is atypical),
    in eval mode, with its random data (CIFAR-sized for the ResNet)."""
    spec = CONFIGS[name]
    torch.manual_seed(seed)
    model = spec["make"]()
    x, y = torch.randn(spec["n"], 3, spec["side"], spec["side"]), torch.randint(0, 10, (spec["n"],))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(spec["sgd_steps"]):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    return model, x, y, spec["batch"]


class Counted:
    """Wraps a function and counts its calls (the HVPs each side spends)."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self.fn(*args)


def ours(model: nn.Module, x: Tensor, y: Tensor, batch: int, mode: str, eig_tol: float, probes: int,
         seed: int) -> dict[str, Any]:
    """lambda_max then the trace with our HVP `mode`, one operator (kept graphs shared by both)."""
    t0 = time.perf_counter()
    obj = Objective.build(prepare_model(model, "eval", torch.float32), x, y, batch)
    op = obj.flat_hvp(mode)
    mv = Counted(op)
    top = top_eigenvalues(mv, obj.dim, k=1, iters=200, tol=eig_tol, seed=seed)
    t1, eig_hvps = time.perf_counter(), mv.calls
    trace = hutchinson_trace(mv, obj.dim, probes, 0.0, seed)
    t2 = time.perf_counter()
    return {"lambda_max": top.values[0], "residual": top.residuals[0], "eig_hvps": eig_hvps, "eig_s": t1 - t0,
            "trace": trace.value, "stderr": trace.stderr, "probes": trace.probes, "trace_s": t2 - t1,
            "total_s": t2 - t0, "hvp": op.stats()}


def theirs(pyhessian: Any, model: nn.Module, x: Tensor, y: Tensor, batch: int, eig_tol: float, probes: int,
           seed: int, ref: float) -> dict[str, Any]:
    """PyHessian on the same batches: power iteration, then `probes` probes. Its stopping rule
    bounds no error, so its tol starts at eig_tol and shrinks tenfold until lambda_max is within
    eig_tol of the reference; only that last run is timed (the most favourable reading for it)."""
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]
    tried = []
    for tol in (eig_tol * 10.0 ** -i for i in range(4)):
        t0 = time.perf_counter()
        h = pyhessian.hessian(model, nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
        h.dataloader_hv_product = mv = Counted(h.dataloader_hv_product)  # its solvers call it through self
        torch.manual_seed(seed)
        top, _ = h.eigenvalues(maxIter=500, tol=tol, top_n=1)
        eig_s, eig_hvps = time.perf_counter() - t0, mv.calls
        tried.append(tol)
        if abs(float(top[0]) - ref) <= eig_tol * abs(ref):
            break
    t1 = time.perf_counter()
    samples = torch.tensor(h.trace(maxIter=probes, tol=0.0), dtype=torch.float64)
    trace_s = time.perf_counter() - t1
    model.zero_grad(set_to_none=True)  # its create_graph backward leaves graph-holding .grad behind
    return {"lambda_max": float(top[0]), "eig_hvps": eig_hvps, "eig_s": eig_s, "power_tol": tried[-1],
            "power_tols_tried": tried, "trace": float(samples.mean()),
            "stderr": float(samples.std() / math.sqrt(len(samples))), "probes": len(samples), "trace_s": trace_s,
            "total_s": eig_s + trace_s}


def reference_lambda(model: nn.Module, x: Tensor, y: Tensor, batch: int, seed: int) -> float:
    obj = Objective.build(prepare_model(model, "eval", torch.float32), x, y, batch)
    top = top_eigenvalues(obj.flat_hvp(), obj.dim, k=1, iters=300, tol=REFERENCE_TOL, seed=seed + 1)
    return top.values[0]


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The values of the first round with the median time of each timed field over the rounds."""
    out = dict(runs[0])
    for k in ("eig_s", "trace_s", "total_s"):
        out[k] = round(statistics.median(r[k] for r in runs), 3)
    return out


def bench(pyhessian: Any, name: str, modes: list[str], eig_tol: float, probes: int, rounds: int | None,
          seed: int) -> dict[str, Any]:
    model, x, y, batch = problem(name, seed)
    ref = reference_lambda(model, x, y, batch, seed)
    sides = ["pyhessian", *modes]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for r in range(rounds or CONFIGS[name]["rounds"]):
        for side in sides if r % 2 == 0 else sides[::-1]:  # alternate the order: no side always goes first
            if side == "pyhessian":
                runs[side].append(theirs(pyhessian, model, x, y, batch, eig_tol, probes, seed, ref))
            else:
                runs[side].append(ours(model, x, y, batch, side, eig_tol, probes, seed))
    result: dict[str, Any] = {s: _median_run(runs[s]) for s in sides}
    for side in sides:
        result[side]["rel_err"] = abs(result[side]["lambda_max"] - ref) / abs(ref)
        result[side]["meets_eig_tol"] = result[side]["rel_err"] <= eig_tol
        hvps = result[side]["eig_hvps"] + result[side]["probes"]
        result[side]["s_per_hvp"] = round(result[side]["total_s"] / hvps, 4)
    th = result["pyhessian"]
    nparams = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "kind": "sharpness_vs_pyhessian", "model": name, "params": nparams, "examples": len(y), "batch": batch,
        "bn": "eval", "dtype": "fp32", "eig_tol": eig_tol, "probes": probes, "reference_lambda_max": ref,
        "rounds": len(runs["pyhessian"]), **{s: result[s] for s in sides},
        "ratio_pyhessian_over_ours": {m: round(th["total_s"] / result[m]["total_s"], 3) for m in modes},
        "ratio_eig": {m: round(th["eig_s"] / result[m]["eig_s"], 3) for m in modes},
        "ratio_trace": {m: round(th["trace_s"] / result[m]["trace_s"], 3) for m in modes},
        "trace_agrees": {m: abs(result[m]["trace"] - th["trace"]) <= 3 * math.hypot(result[m]["stderr"], th["stderr"])
                         for m in modes},
    }


def env() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = f"{names[0]} ({len(names)} logical cores)" if names else cpu
    except OSError:
        pass
    repo = Path(__file__).resolve().parent.parent
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu, "git_sha": sha or None,
            "dirty": dirty, "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()}


def report(r: dict[str, Any], modes: list[str]) -> None:
    print(f"\n{r['model']}: {r['params']} parameters, {r['examples']} examples in batches of {r['batch']}, BN eval, "
          f"fp32, {r['threads']} thread(s); reference lambda_max {r['reference_lambda_max']:.6g}; median of "
          f"{r['rounds']} round(s)")
    for side in ["pyhessian", *modes]:
        s = r[side]
        label = "PyHessian (power it.)" if side == "pyhessian" else f"ours --hvp {side}"
        print(f"  {label:22s} lambda_max {s['lambda_max']:.6g} (err {s['rel_err']:.1e}, {s['eig_hvps']} HVPs, "
              f"{s['eig_s']:.2f} s) | trace {s['trace']:.5g} ± {s['stderr']:.2g} ({s['probes']} probes, "
              f"{s['trace_s']:.2f} s) | total {s['total_s']:.2f} s, {s['s_per_hvp'] * 1e3:.1f} ms/HVP"
              + ("" if s["meets_eig_tol"] else f"  [lambda_max misses the {r['eig_tol']:g} target]"))
    for m in modes:
        print(f"  PyHessian / ours ({m}): total {r['ratio_pyhessian_over_ours'][m]:.2f}x, eigenvalue "
              f"{r['ratio_eig'][m]:.2f}x, trace {r['ratio_trace'][m]:.2f}x; traces agree: {r['trace_agrees'][m]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--modes", default=",".join(HVP_MODES), help="our HVP modes to time")
    p.add_argument("--eig-tol", type=float, default=1e-3, help="relative accuracy target of lambda_max")
    p.add_argument("--probes", type=int, default=30, help="Hutchinson probes on each side")
    p.add_argument("--rounds", type=int, help="rounds per model (default: 3 for the small CNN, 1 for ResNet-20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, the same for every side")
    p.add_argument("--quick", action="store_true", help="the small CNN, 1 round, 5 probes (a smoke run)")
    p.add_argument("--out", type=Path, help=f"also append the JSON lines to OUT/{OUT_FILE}")
    a = p.parse_args()
    try:
        import pyhessian
    except ImportError as e:
        print(f"bench_sharpness: error: pyhessian is not importable ({e}); `pip install pyhessian` "
              f"(the dev extra: `make install`)", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    models = ["small_cnn"] if a.quick else [m for m in a.models.split(",") if m]
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in models if m not in CONFIGS] + [m for m in modes if m not in HVP_MODES]
    if bad:
        print(f"bench_sharpness: error: unknown {', '.join(bad)}; models: {', '.join(CONFIGS)}; "
              f"modes: {', '.join(HVP_MODES)}", file=sys.stderr)
        return 2
    probes, rounds = (5, 1) if a.quick else (a.probes, a.rounds)
    info = env()
    for name in models:
        r = {**bench(pyhessian, name, modes, a.eig_tol, probes, rounds, a.seed), **info}
        report(r, modes)
        line = json.dumps(r)
        print(line, flush=True)
        if a.out:
            a.out.mkdir(parents=True, exist_ok=True)
            with open(a.out / OUT_FILE, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
