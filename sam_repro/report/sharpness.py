"""The sharpness table and the loss-landscape figures, from the sharpness.json files that
`sam-sharpness` writes into run directories (the report never measures anything itself).

Per setting (every config field but the optimizer's) and method: the final test error, lambda_max,
lambda_max / lambda_5, the Hessian trace and the m-sharpness cells; mean ± 95% t-interval over
seeds where there are several. One seed: the value, and for the trace and m-sharpness ± the 95%
interval of the estimate itself (t_{0.975, k-1} x its standard error over its k Hutchinson probes
or m-sharpness chunks), which is all a one-seed SGD vs SAM comparison has. Runs measured differently (another
subset, BatchNorm mode, weight-decay term or dtype) are never averaged together: the "measured
on" column tells them apart; "trained" is the training the runs did (report/budget.py: steps,
epochs and images where train_steps cut the configured epochs). The landscape figure of each
setting (SGD and SAM side by side on one scale) is report/landscape.py's.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import scipy.stats as sps

from sam_repro.report.plots import OPTIMIZER_FIELDS, real_runs, unique_stems, without
from sam_repro.report.tables import DASH, Stats, Table, t_interval

SHARPNESS_FILE = "sharpness.json"
FIGURE_GLOB = "sharpness_*.png"
METHOD_ORDER = {"sgd": 0, "sam": 1, "asam": 2}
OWN_CI = "own_ci95 "  # a per-run column: the 95% half-width of the run's own estimate of the metric after it


def read_sharpness(run_dir: str | Path) -> Optional[dict[str, Any]]:
    """A run's sharpness.json, or None when it is absent or unreadable (never an exception)."""
    try:
        doc = json.loads((Path(run_dir) / SHARPNESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("schema") == 1 else None


def lookup(doc: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(k)
    return doc


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else math.nan


def _measured_on(setup: dict[str, Any]) -> str:
    wd = "L2 in" if lookup(setup, "weight_decay", "in_loss") else "L2 out"
    return f"{setup.get('subset')} train ex., BN {setup.get('bn_mode')}, {wd}, {setup.get('dtype')}"


def sharpness_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run with a sharpness.json: its setting, method and every number the table shows."""
    rows = []
    for _, r in real_runs(runs).iterrows():  # iterrows: column names with dots stay readable
        doc = read_sharpness(r["abs_dir"])
        if doc is None:
            continue
        setting = json.loads(r["setting_key"])
        row = {"figure_key": without(r["setting_key"], OPTIMIZER_FIELDS), "optimizer": setting.get("optimizer"),
               "rho": setting.get("rho"), "seed": r["seed"], "run_dir": r["run_dir"], "abs_dir": r["abs_dir"],
               "measured_on": _measured_on(doc.get("setup") or {}), "trained": r.get("trained.label"),
               "test_err": _num(r.get("final.test_err")),
               "lambda_max": _num(lookup(doc, "hessian", "lambda_max")),
               "lambda_ratio": _num(lookup(doc, "hessian", "lambda_max_over_lambda_5")),
               "trace": _num(lookup(doc, "hessian", "trace", "value")),
               OWN_CI + "trace": _own_ci95(lookup(doc, "hessian", "trace"), "probes")}
        for cell in lookup(doc, "msharpness", "cells") or []:
            if not isinstance(cell, dict) or math.isnan(_num(cell.get("rho"))):
                continue  # a malformed cell is left out, never a crash of the report
            steps = cell.get("steps", 1)
            name = f"m-sharpness m={cell.get('m')} rho={cell.get('rho'):g}" + (f" {steps}-step" if steps != 1 else "")
            row[name] = _num(cell.get("value"))
            row[OWN_CI + name] = _own_ci95(cell, "chunks")
        rows.append(row)
    return pd.DataFrame(rows)


def _own_ci95(estimate: Any, count_key: str) -> float:
    """The 95% half-width of one run's estimate, t_{0.975, k-1} * stderr over its k samples (the
    trace's probes, an m-sharpness cell's chunks); NaN when the file gives no finite stderr or k < 2."""
    stderr, k = _num(lookup(estimate, "stderr")), _num(lookup(estimate, count_key))
    if math.isnan(stderr) or math.isnan(k) or k < 2:
        return math.nan
    return float(sps.t.ppf(0.975, k - 1) * stderr)


def _stats(values: pd.Series, own_ci95: Optional[pd.Series] = None) -> Stats:
    """Mean ± 95% t-interval over the runs' values; one run: its own estimate's interval (`own_ci95`,
    aligned with `values`) where it has one."""
    values = values.astype(float)
    s = t_interval(values)
    if s.n == 1 and own_ci95 is not None:
        own = own_ci95.astype(float)[np.isfinite(values)]
        return Stats(1, s.mean, math.nan, float(own.iloc[0]))
    return s


def _fmt(values: pd.Series, own_ci95: Optional[pd.Series] = None) -> str:
    """'12.3' (one seed), '12.3 ± 0.4' (several: 95% t-interval; one with its own interval), a dash when absent."""
    s = _stats(values, own_ci95)
    if s.n == 0:
        return DASH
    # the half-width to two significant digits, without an exponent below 1e6 ("± 180", not "± 1.8e+02")
    return f"{s.mean:.4g}" if math.isnan(s.ci95) else f"{s.mean:.4g} ± {float(f'{s.ci95:.2g}'):g}"


def sharpness_table(runs: pd.DataFrame) -> tuple[Table, pd.DataFrame]:
    """The table (markdown + CSV) and the per-run rows it was built from."""
    rows = sharpness_rows(runs)
    metrics = [("test_err", "test error (%)"), ("lambda_max", "lambda_max"),
               ("lambda_ratio", "lambda_max / lambda_5"), ("trace", "trace")]
    notes = ["Measured by `sam-sharpness` on each run's own model and training data (a fixed seeded subset, no "
             "augmentation); every run's sharpness.json says how (subset, seed, iterations, tolerances, error "
             "bars). Several seeds: mean ± 95% CI over seeds (Student t); one seed: the value, the trace and "
             "m-sharpness ± the 95% CI of the run's own estimate (Student t over its Hutchinson probes or chunks).",
             "lambda: Hessian eigenvalues (Lanczos), trace: Hutchinson; m-sharpness: SAM paper Sec. 4.1 (mean "
             "over chunks of m examples of the loss increase at the worst perturbation of norm rho)."]
    if rows.empty:
        return Table("sharpness", "Sharpness of the minima", pd.DataFrame(), pd.DataFrame(), notes), rows
    msharp = sorted(c for c in rows.columns if c.startswith("m-sharpness"))
    stems = unique_stems(sorted(set(rows["figure_key"])))
    rows = rows.assign(setting=rows["figure_key"].map(stems),
                       _order=rows["optimizer"].map(lambda o: METHOD_ORDER.get(o, 9)))
    display, data = [], []
    for (setting, measured, _, opt, rho), g in rows.groupby(["setting", "measured_on", "_order", "optimizer", "rho"],
                                                            sort=True, dropna=False):
        label = opt.upper() if rho is None or (isinstance(rho, float) and math.isnan(rho)) else f"{opt.upper()} rho={rho:g}"
        trained = " / ".join(sorted({str(t) for t in g["trained"]}))  # one label unless the data sizes differ
        d = {"setting": setting, "method": label, "trained": trained, "n": str(len(g)), "measured on": measured}
        c = {"setting": setting, "method": label, "trained": trained, "n": len(g), "measured_on": measured}
        for col, title in [*metrics, *((m, m) for m in msharp)]:
            vals = g[col] if col in g else pd.Series(dtype=float)
            own = g[OWN_CI + col] if OWN_CI + col in g else None
            d[title] = _fmt(vals, own)
            s = _stats(vals, own)
            c[f"{col}_mean"], c[f"{col}_ci95"] = s.mean, s.ci95
        display.append(d)
        data.append(c)
    return Table("sharpness", "Sharpness of the minima", pd.DataFrame(display), pd.DataFrame(data), notes), rows
