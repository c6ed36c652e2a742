"""`sam-sharpness`: measure trained run directories and write sharpness.json into each.

    sam-sharpness RUN_DIR [RUN_DIR ...]                    # Hessian, m-sharpness, landscape slices
    sam-sharpness SGD_RUN SAM_RUN --interpolate            # ... and the linear path between the two
    sam-sharpness --runs results/runs --missing-only       # every run below a root that lacks it
    sam-sharpness RUN --parts hessian --subset 256 --dtype fp64 --bn train --weight-decay in
    sam-sharpness RUN --parts hessian --hvp forward --graph-memory 0      # jvp-of-grad HVPs, nothing kept

What is measured, and how, is written beside the numbers (docs/sharpness.md): the training split,
a fixed subset (--subset, --seed), no augmentation, BatchNorm in eval mode unless --bn train, the
cross-entropy of the run (its label smoothing) with the L2 term out unless --weight-decay in.
Exit status: 0 measured (or nothing to measure), 2 bad input (one line on stderr).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from sam_repro.errors import EXIT_BAD_INPUT, EXIT_OK, UserError, print_error
from sam_repro.rundir import RunDirLock, write_json
from sam_repro.sharpness import hessian, landscape, msharpness
from sam_repro.sharpness.hvp import DEFAULT_GRAPH_BUDGET, DEFAULT_HVP, HVP_MODES
from sam_repro.sharpness.objective import BN_MODES, DTYPES, Objective, prepare_model
from sam_repro.sharpness.rundir import (SHARPNESS_FILE, Run, RunDirError, finished_summary, load_run, require_checkpoint,
                                        train_subset)

SCHEMA = 1
WEIGHT_DECAY = ("out", "in")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


# Every option's help, beside the parser rather than inside it: text for people (the defaults each
# one states are checked against the parser's by tests/sharpness/test_sharpness_cli.py).
DESCRIPTION = ("Measure the sharpness of trained sam-train run directories (Hessian spectrum, m-sharpness, "
               "loss landscapes) and write sharpness.json into each.")
HELP = {
    "run_dirs": "run directories (config.yaml + checkpoint.pt)",
    "--runs": "measure every run directory below this root instead (those without a checkpoint or not "
              "finished are listed and skipped)",
    "--missing-only": "skip runs that already have sharpness.json",
    "--parts": "comma list of: hessian, msharpness, landscape (default hessian,msharpness,landscape)",
    "--subset": "training examples measured (a seeded draw; default 512)",
    "--seed": "seed of the subset, the probes and the directions (default 0)",
    "--batch-size": "examples per forward (memory only, in BN eval mode; default 256)",
    "--bn": "BatchNorm: running statistics (eval) or the statistics of each batch (train; nothing is "
            "updated) (default eval)",
    "--weight-decay": "the run's L2 term 0.5*wd*||w||^2 out of or in the measured loss (in adds wd to every "
                      "decayed eigenvalue) (default out)",
    "--dtype": "compute dtype (default fp32)",
    "--data-root": "where the run's dataset is now (overrides dataset.root)",
    "--threads": "torch CPU threads",
    "--hvp": "Hessian-vector products: reverse (double backward, each batch's gradient graph kept across "
             "products within --graph-memory; the faster on the CPU) or forward (jvp of grad, recomputed) "
             "(default reverse)",
    "--graph-memory": "GiB of gradient graphs --hvp reverse may keep (batches beyond it are recomputed per "
                      f"product; default {DEFAULT_GRAPH_BUDGET / 2 ** 30:g})",
    "--top-k": "top eigenvalues (default 5)",
    "--lanczos-iters": "most Lanczos steps (default 40)",
    "--lanczos-tol": "stop when every top-k Ritz residual is below this times lambda_max (default 0.001)",
    "--trace-probes": "most Hutchinson probes (default 100)",
    "--trace-tol": "stop when stderr <= this times |trace| (default 0.02)",
    "--density": "also the spectral density (SLQ)",
    "--density-probes": "SLQ probes (default 3)",
    "--density-iters": "Lanczos steps per SLQ probe (default 40)",
    "--m": "comma list of chunk sizes m, each dividing --subset (default 16,128)",
    "--rho": "comma list of radii rho (default 0.05)",
    "--ascent-steps": "1: SAM's one-step e; n > 1: n iterates of projected normalized ascent (steps of rho/2, "
                      "the largest loss over them) (default 1)",
    "--points": "points of the 1D slice (default 21)",
    "--grid": "side of the 2D grid (0: no 2D slice; default 11)",
    "--span": "alpha in [-span, span] (filter-normalized units; default 1)",
    "--interpolate": "with exactly two RUN_DIRs: the linear path between them, written into both",
    "--interp-points": "points of the interpolation (default 21)",
    "--interp-range": "t from T_MIN to T_MAX (t=0: this run, t=1: the other; default -0.5 1.5)",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sam-sharpness", description=DESCRIPTION)
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help=HELP["run_dirs"])
    p.add_argument("--runs", help=HELP["--runs"])
    p.add_argument("--missing-only", action="store_true", help=HELP["--missing-only"])
    p.add_argument("--parts", default=",".join(PARTS), help=HELP["--parts"])
    d = p.add_argument_group("data and objective")
    d.add_argument("--subset", type=int, default=512, help=HELP["--subset"])
    d.add_argument("--seed", type=int, default=0, help=HELP["--seed"])
    d.add_argument("--batch-size", type=int, default=256, help=HELP["--batch-size"])
    d.add_argument("--bn", choices=BN_MODES, default="eval", help=HELP["--bn"])
    d.add_argument("--weight-decay", choices=WEIGHT_DECAY, default="out", help=HELP["--weight-decay"])
    d.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help=HELP["--dtype"])
    d.add_argument("--data-root", help=HELP["--data-root"])
    d.add_argument("--threads", type=int, help=HELP["--threads"])
    h = p.add_argument_group("hessian")
    h.add_argument("--hvp", choices=list(HVP_MODES), default=DEFAULT_HVP, help=HELP["--hvp"])
    h.add_argument("--graph-memory", type=float, default=DEFAULT_GRAPH_BUDGET / 2 ** 30, help=HELP["--graph-memory"])
    h.add_argument("--top-k", type=int, default=5, help=HELP["--top-k"])
    h.add_argument("--lanczos-iters", type=int, default=40, help=HELP["--lanczos-iters"])
    h.add_argument("--lanczos-tol", type=float, default=1e-3, help=HELP["--lanczos-tol"])
    h.add_argument("--trace-probes", type=int, default=100, help=HELP["--trace-probes"])
    h.add_argument("--trace-tol", type=float, default=0.02, help=HELP["--trace-tol"])
    h.add_argument("--density", action="store_true", help=HELP["--density"])
    h.add_argument("--density-probes", type=int, default=3, help=HELP["--density-probes"])
    h.add_argument("--density-iters", type=int, default=40, help=HELP["--density-iters"])
    m = p.add_argument_group("m-sharpness")
    m.add_argument("--m", type=_ints, default=[16, 128], help=HELP["--m"])
    m.add_argument("--rho", type=_floats, default=[0.05], help=HELP["--rho"])
    m.add_argument("--ascent-steps", type=int, default=1, help=HELP["--ascent-steps"])
    ls = p.add_argument_group("landscape")
    ls.add_argument("--points", type=int, default=21, help=HELP["--points"])
    ls.add_argument("--grid", type=int, default=11, help=HELP["--grid"])
    ls.add_argument("--span", type=float, default=1.0, help=HELP["--span"])
    ls.add_argument("--interpolate", action="store_true", help=HELP["--interpolate"])
    ls.add_argument("--interp-points", type=int, default=21, help=HELP["--interp-points"])
    ls.add_argument("--interp-range", type=float, nargs=2, default=[-0.5, 1.5], metavar=("T_MIN", "T_MAX"),
                    help=HELP["--interp-range"])
    return p


# -- the parts: name -> function(objective, args) -> JSON block -------------------------------------
def _hessian(obj: Objective, a: argparse.Namespace) -> dict[str, Any]:
    dtype, device = obj.params[0].dtype, obj.params[0].device
    mv = obj.flat_hvp(a.hvp, int(a.graph_memory * 2 ** 30))
    top = hessian.top_eigenvalues(mv, obj.dim, a.top_k, a.lanczos_iters, a.lanczos_tol, a.seed, dtype, device)
    trace = hessian.hutchinson_trace(mv, obj.dim, a.trace_probes, a.trace_tol, a.seed, dtype=dtype, device=device)
    out: dict[str, Any] = {
        "lambda_max": top.values[0],
        "lambda_max_over_lambda_5": top.values[0] / top.values[4] if len(top.values) >= 5 and top.values[4] else None,
        "top_eigenvalues": top.as_json(),
        "trace": trace.as_json(),
        "density": None,
    }
    if a.density:
        out["density"] = hessian.slq_density(mv, obj.dim, a.density_probes, a.density_iters, a.seed,
                                             dtype=dtype, device=device).as_json()
    out["hvp"] = mv.stats()  # mode, batches, how many gradient graphs were kept and their bytes
    return out


def _msharpness(obj: Objective, a: argparse.Namespace) -> dict[str, Any]:
    cells = msharpness.m_sharpness_grid(obj, a.m, a.rho, a.ascent_steps, max_batch=a.batch_size)
    how = "one step (SAM's e = rho g/||g||)" if a.ascent_steps == 1 else \
        f"{a.ascent_steps} steps of projected normalized ascent (step {msharpness.ASCENT_STEP} rho), max over iterates"
    return {"definition": "mean over chunks of m examples of max_{||e||_2<=rho} L_chunk(w+e) - L_chunk(w)",
            "ascent": how, "steps": a.ascent_steps, "cells": [c.as_json() for c in cells]}


def _landscape(obj: Objective, a: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "directions": "gaussian, filter-normalized (Li et al. 2018); BN weights and biases not moved",
        "span": a.span,
        "d1": landscape.slice_1d(obj, a.span, a.points, a.seed).as_json(),
        "d2": landscape.slice_2d(obj, a.span, a.grid, a.seed + 1).as_json() if a.grid > 0 else None,
    }
    return out


PARTS: dict[str, Callable[[Objective, argparse.Namespace], dict[str, Any]]] = {
    "hessian": _hessian,
    "msharpness": _msharpness,
    "landscape": _landscape,
}


def _setup(run: Run, a: argparse.Namespace) -> dict[str, Any]:
    """How the run was measured: everything that changes the numbers."""
    optim = run.cfg.optim
    return {
        "split": "train", "subset": a.subset, "seed": a.seed, "preprocessing": "normalized as at evaluation, no augmentation",
        "bn_mode": a.bn, "dtype": a.dtype, "batch_size": a.batch_size, "hvp": a.hvp,
        "loss": "mean cross-entropy" + (f" (label smoothing {optim.label_smoothing:g})" if optim.label_smoothing else ""),
        "weight_decay": {"in_loss": a.weight_decay == "in", "value": float(optim.weight_decay),
                         "on_bn_and_bias": bool(optim.wd_on_bn)},
    }


def _objective(run: Run, a: argparse.Namespace) -> Objective:
    x, y = train_subset(run.bundle, a.subset, a.seed)
    dtype = DTYPES[a.dtype]
    model = prepare_model(run.model, a.bn, dtype)
    optim = run.cfg.optim
    l2 = float(optim.weight_decay) if a.weight_decay == "in" else 0.0
    return Objective.build(model, x, y, a.batch_size, l2=l2, l2_on_bn=bool(optim.wd_on_bn),
                           label_smoothing=float(optim.label_smoothing))


def _existing(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads((path / SHARPNESS_FILE).read_text(encoding="utf-8"))
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def _document(run: Run, setup: dict[str, Any], parts: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """sharpness.json: new parts merged into an existing file measured the same way."""
    old = _existing(run.path)
    doc = old if old.get("setup") == setup and old.get("schema") == SCHEMA else {}
    c = run.summary.get("config", {})
    doc.update({
        "schema": SCHEMA,
        "run": {k: c.get(k) for k in ("dataset", "model", "optimizer", "rho", "epochs", "seed")}
        | {"epochs_done": run.summary.get("epochs_done"),
           "final_test_err": (run.summary.get("final") or {}).get("test_err")},
        "setup": setup,
        "env": {"torch": torch.__version__, "device": "cpu", "threads": torch.get_num_threads()},
        "measured_at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
    })
    before = float(doc.get("wall_s", 0.0))  # a merged file keeps the time of its earlier parts
    doc.update(parts)
    doc["wall_s"] = round(before + wall_s, 3)
    return doc


def json_safe(x: Any) -> Any:
    """Non-finite floats (a standard error of one chunk or one probe) as null: JSON has no NaN."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def measure(run: Run, a: argparse.Namespace, parts: list[str]) -> tuple[Objective, dict[str, Any]]:
    """Measure the parts on one run; write sharpness.json atomically; return the objective too."""
    t0 = time.perf_counter()
    obj = _objective(run, a)
    blocks = {}
    for name in parts:
        t = time.perf_counter()
        blocks[name] = PARTS[name](obj, a)
        blocks[name]["time_s"] = round(time.perf_counter() - t, 3)
        print(f"  {name}: {blocks[name]['time_s']:.1f} s", flush=True)
    doc = _document(run, _setup(run, a), blocks, time.perf_counter() - t0)
    doc = json_safe(doc)
    write_json(run.path / SHARPNESS_FILE, doc)
    return obj, doc


def _interpolate(a_run: Run, b_run: Run, a_obj: Objective, args: argparse.Namespace) -> None:
    """The linear path a -> b on a's subset, and b -> a on b's; each written into its own file."""
    for run, obj, other in ((a_run, a_obj, b_run), (b_run, None, a_run)):
        obj = obj or _objective(run, args)
        other_model = prepare_model(other.model, args.bn, obj.params[0].dtype)
        other_params = tuple(p.detach() for n, p in other_model.named_parameters() if n in set(obj.names))
        path = landscape.interpolate(obj, other_params, dict(other_model.named_buffers()),
                                     args.interp_range[0], args.interp_range[1], args.interp_points)
        c = other.summary.get("config", {})
        block = {"other": {"optimizer": c.get("optimizer"), "rho": c.get("rho"), "seed": c.get("seed"),
                           "run_dir": os.path.relpath(Path(other.path).resolve(), Path(run.path).resolve())},
                 "direction": "t=0: this run, t=1: the other", **path.as_json()}
        doc = json_safe(_document(run, _setup(run, args), {"interpolation": block}, path.time_s))
        write_json(run.path / SHARPNESS_FILE, doc)
        print(f"  interpolation {run.label} -> {other.label}: {path.time_s:.1f} s", flush=True)


def _check_args(a: argparse.Namespace, parts: list[str]) -> Optional[str]:
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        return f"--parts {','.join(unknown)}: not a part; choose from {','.join(PARTS)}"
    if a.subset < 1 or a.batch_size < 1:
        return f"--subset {a.subset} and --batch-size {a.batch_size} must be >= 1"
    if "msharpness" in parts:
        for m in a.m:
            if m < 1 or a.subset % m:
                return f"--m {m} does not divide --subset {a.subset} (chunks of m examples must tile the subset)"
        if a.ascent_steps < 1 or any(r <= 0 for r in a.rho):
            return f"--ascent-steps {a.ascent_steps} must be >= 1 and every --rho > 0"
    if "hessian" in parts and a.top_k < 1:
        return f"--top-k {a.top_k} must be >= 1"
    if a.graph_memory < 0:
        return f"--graph-memory {a.graph_memory:g} must be >= 0 (GiB; 0 keeps no graph)"
    if a.interpolate and len(a.run_dirs) != 2:
        return f"--interpolate needs exactly two RUN_DIRs, got {len(a.run_dirs)}"
    if bool(a.runs) == bool(a.run_dirs):
        return "give RUN_DIRs or --runs ROOT (one of the two)"
    return None


def _discover(root: Path, missing_only: bool) -> list[Path]:
    """Run directories below root that can be measured; the others are listed with why not."""
    found = []
    for f in sorted(root.rglob("metrics.json")):
        d = f.parent
        if missing_only and (d / SHARPNESS_FILE).is_file():
            continue
        why = None
        try:
            finished_summary(d)
            require_checkpoint(d)
        except RunDirError as e:
            why = str(e)
        if why:
            print(f"  skipped {d}: {why}")
        else:
            found.append(d)
    return found


def main(argv: list[str] | None = None) -> int:
    """Measure; 0 on success, 2 with one line on stderr for bad input."""
    a = _parser().parse_args(argv)
    parts = [p for p in a.parts.split(",") if p]
    problem = _check_args(a, parts)
    if problem:
        print_error("sam-sharpness", problem)
        return EXIT_BAD_INPUT
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        dirs = _discover(Path(a.runs), a.missing_only) if a.runs else [Path(d) for d in a.run_dirs]
        if not a.runs:
            for d in dirs:  # cheap checks of every directory before the first measurement
                if not d.is_dir():
                    raise RunDirError(f"{d} is not a directory")
                finished_summary(d)
                require_checkpoint(d)
        loaded: list[tuple[Run, Objective]] = []
        for d in dirs:
            if a.missing_only and (d / SHARPNESS_FILE).is_file():
                print(f"  {d}: has {SHARPNESS_FILE}, skipped")
                continue
            with RunDirLock(d, purpose="sam-sharpness"):  # no run may train into it meanwhile
                run = load_run(d, a.data_root)
                print(f"sam-sharpness: {d} ({run.label})", flush=True)
                obj, _ = measure(run, a, parts)
            loaded.append((run, obj))
        if a.interpolate:
            (ra, oa), (rb, _) = loaded
            with RunDirLock(ra.path, purpose="sam-sharpness"):
                _interpolate(ra, rb, oa, a)
    except UserError as e:
        print_error("sam-sharpness", e)
        return EXIT_BAD_INPUT
    print(f"sam-sharpness: measured {len(loaded)} run(s)")
    return EXIT_OK


def console_main() -> None:
    """The `sam-sharpness` console script."""
    sys.exit(main(sys.argv[1:]))
