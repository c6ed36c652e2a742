"""The sharpness table and the loss-landscape figures, from the sharpness.json files that
`sam-sharpness` writes into run directories (the report never measures anything itself).

Per setting (every config field but the optimizer's) and method: the final test error, lambda_max,
lambda_max / lambda_5, the Hessian trace and the m-sharpness cells; mean ± 95% t-interval over
seeds where there are several (one seed: the value alone). Runs measured differently (another
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

import pandas as pd

from sam_repro.report.plots import OPTIMIZER_FIELDS, real_runs, unique_stems, without
from sam_repro.report.tables import DASH, Table, t_interval

SHARPNESS_FILE = "sharpness.json"
FIGURE_GLOB = "sharpness_*.png"
METHOD_ORDER = {"sgd": 0, "sam": 1, "asam": 2}


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
               "trace": _num(lookup(doc, "hessian", "trace", "value"))}
        for cell in lookup(doc, "msharpness", "cells") or []:
            if not isinstance(cell, dict) or math.isnan(_num(cell.get("rho"))):
                continue  # a malformed cell is left out, never a crash of the report
            steps = cell.get("steps", 1)
            name = f"m-sharpness m={cell.get('m')} rho={cell.get('rho'):g}" + (f" {steps}-step" if steps != 1 else "")
            row[name] = _num(cell.get("value"))
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(values: pd.Series) -> str:
    """'12.3' (one seed), '12.3 ± 0.4' (several: 95% t-interval), a dash when absent."""
    s = t_interval(values.astype(float))
    if s.n == 0:
        return DASH
    return f"{s.mean:.4g}" if math.isnan(s.ci95) else f"{s.mean:.4g} ± {s.ci95:.2g}"


def sharpness_table(runs: pd.DataFrame) -> tuple[Table, pd.DataFrame]:
    """The table (markdown + CSV) and the per-run rows it was built from."""
    rows = sharpness_rows(runs)
    metrics = [("test_err", "test error (%)"), ("lambda_max", "lambda_max"),
               ("lambda_ratio", "lambda_max / lambda_5"), ("trace", "trace")]
    notes = ["Measured by `sam-sharpness` on each run's own model and training data (a fixed seeded subset, no "
             "augmentation); every run's sharpness.json says how (subset, seed, iterations, tolerances, error "
             "bars). One seed: the value; several: mean ± 95% CI over seeds (Student t).",
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
            d[title] = _fmt(vals)
            s = t_interval(vals.astype(float))
            c[f"{col}_mean"], c[f"{col}_ci95"] = s.mean, s.ci95
        display.append(d)
        data.append(c)
    return Table("sharpness", "Sharpness of the minima", pd.DataFrame(display), pd.DataFrame(data), notes), rows
