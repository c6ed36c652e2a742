"""The sharpness table and the loss-landscape figures, from the sharpness.json files that
`sam-sharpness` writes into run directories (the report never measures anything itself).

Per setting (every config field but the optimizer's) and method: the final test error, lambda_max,
lambda_max / lambda_5, the Hessian trace and the m-sharpness cells; mean ± 95% t-interval over
seeds where there are several. One seed: the value, and for the trace and m-sharpness ± the 95%
interval of the estimate itself (t_{0.975, k-1} x its standard error over its k Hutchinson probes
or m-sharpness chunks), which is all a one-seed SGD vs SAM comparison has. Runs measured differently (another
subset, BatchNorm mode, weight-decay term or dtype) are never averaged together: the "measured
on" column tells them apart. One figure per setting puts SGD and SAM side by side on one scale.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import matplotlib.style
import numpy as np
import pandas as pd
import scipy.stats as sps
from matplotlib.figure import Figure

from sam_repro.report.plots import COLORS, OPTIMIZER_FIELDS, Plot, _real_runs, _save, _unique_stems, _without
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


def _get(doc: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(k)
    return doc


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else math.nan


def _measured_on(setup: dict[str, Any]) -> str:
    wd = "L2 in" if _get(setup, "weight_decay", "in_loss") else "L2 out"
    return f"{setup.get('subset')} train ex., BN {setup.get('bn_mode')}, {wd}, {setup.get('dtype')}"


def sharpness_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run with a sharpness.json: its setting, method and every number the table shows."""
    rows = []
    for _, r in _real_runs(runs).iterrows():  # iterrows: column names with dots stay readable
        doc = read_sharpness(r["abs_dir"])
        if doc is None:
            continue
        setting = json.loads(r["setting_key"])
        row = {"figure_key": _without(r["setting_key"], OPTIMIZER_FIELDS), "optimizer": setting.get("optimizer"),
               "rho": setting.get("rho"), "seed": r["seed"], "run_dir": r["run_dir"], "abs_dir": r["abs_dir"],
               "measured_on": _measured_on(doc.get("setup") or {}),
               "test_err": _num(r.get("final.test_err")),
               "lambda_max": _num(_get(doc, "hessian", "lambda_max")),
               "lambda_ratio": _num(_get(doc, "hessian", "lambda_max_over_lambda_5")),
               "trace": _num(_get(doc, "hessian", "trace", "value")),
               OWN_CI + "trace": _own_ci95(_get(doc, "hessian", "trace"), "probes")}
        for cell in _get(doc, "msharpness", "cells") or []:
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
    stderr, k = _num(_get(estimate, "stderr")), _num(_get(estimate, count_key))
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
    stems = _unique_stems(sorted(set(rows["figure_key"])))
    rows = rows.assign(setting=rows["figure_key"].map(stems),
                       _order=rows["optimizer"].map(lambda o: METHOD_ORDER.get(o, 9)))
    display, data = [], []
    for (setting, measured, _, opt, rho), g in rows.groupby(["setting", "measured_on", "_order", "optimizer", "rho"],
                                                            sort=True, dropna=False):
        label = opt.upper() if rho is None or (isinstance(rho, float) and math.isnan(rho)) else f"{opt.upper()} rho={rho:g}"
        d = {"setting": setting, "method": label, "n": str(len(g)), "measured on": measured}
        c = {"setting": setting, "method": label, "n": len(g), "measured_on": measured}
        for col, title in [*metrics, *((m, m) for m in msharp)]:
            vals = g[col] if col in g else pd.Series(dtype=float)
            own = g[OWN_CI + col] if OWN_CI + col in g else None
            d[title] = _fmt(vals, own)
            s = _stats(vals, own)
            c[f"{col}_mean"], c[f"{col}_ci95"] = s.mean, s.ci95
        display.append(d)
        data.append(c)
    return Table("sharpness", "Sharpness of the minima", pd.DataFrame(display), pd.DataFrame(data), notes), rows


def _curve(section: Any, x: str) -> bool:
    """A drawable 1D section: non-empty lists `x` and `loss` of one length (else it is not drawn)."""
    xs, loss = _get(section, x), _get(section, "loss")
    return isinstance(xs, list) and isinstance(loss, list) and 0 < len(xs) == len(loss)


def _grid(section: Any) -> bool:
    """A drawable 2D section: `loss` is a len(alpha) x len(beta) grid of numbers or nulls."""
    alpha, beta, loss = _get(section, "alpha"), _get(section, "beta"), _get(section, "loss")
    if not (isinstance(alpha, list) and isinstance(beta, list) and isinstance(loss, list) and alpha and beta):
        return False
    try:
        return np.asarray(loss, dtype=float).shape == (len(alpha), len(beta))
    except (TypeError, ValueError):
        return False


def _contour_levels(grids: list[np.ndarray]) -> np.ndarray:
    lo = min(float(np.nanmin(g)) for g in grids)
    hi = max(float(np.nanmax(g)) for g in grids)
    return np.linspace(lo, hi, 16) if hi > lo else np.array([lo, lo + 1e-9])


def landscape_figures(rows: pd.DataFrame, out: Path) -> Plot:
    """One PNG per setting with landscape data: 1D slices of every run on one axis, the 2D slices
    side by side with shared contour levels, and the SGD -> SAM interpolation where measured."""
    columns = ["figure", "run_dir", "optimizer", "panel", "x", "y", "loss"]
    if rows.empty:
        return Plot(pd.DataFrame(columns=columns))
    long, files = [], []
    for setting, g in rows.sort_values(["_order", "seed", "run_dir"], kind="stable").groupby("setting", sort=True):
        docs = [(r, read_sharpness(r.abs_dir)) for r in g.itertuples()]
        docs = [(r, d) for r, d in docs if _curve(_get(d, "landscape", "d1"), "alpha")]
        if not docs:
            continue
        name = f"sharpness_{setting}"
        two_d = [(r, d) for r, d in docs if _grid(_get(d, "landscape", "d2"))]
        interp = [(r, d) for r, d in docs if _curve(_get(d, "interpolation"), "t")]
        ncols = 1 + len(two_d) + (1 if interp else 0)
        with matplotlib.style.context("default"):
            fig = Figure(figsize=(4.2 * ncols, 3.8), layout="constrained")
            axes = list(np.atleast_1d(fig.subplots(1, ncols)))
        ax = axes.pop(0)
        for r, d in docs:
            s = d["landscape"]["d1"]
            ax.plot(s["alpha"], s["loss"], "o-", ms=3, color=COLORS.get(r.optimizer, "tab:gray"),
                    label=f"{r.optimizer.upper()} seed {r.seed}")
            long += [{"figure": name, "run_dir": r.run_dir, "optimizer": r.optimizer, "panel": "1d", "x": a,
                      "y": math.nan, "loss": v} for a, v in zip(s["alpha"], s["loss"])]
        ax.set(xlabel="alpha (filter-normalized direction)", ylabel="training loss (subset)", title="1D slice")
        ax.legend(fontsize="small")
        if two_d:
            grids = [np.asarray(d["landscape"]["d2"]["loss"], dtype=float) for _, d in two_d]
            levels = _contour_levels(grids)
            for (r, d), grid in zip(two_d, grids):
                ax = axes.pop(0)
                s = d["landscape"]["d2"]
                cs = ax.contourf(s["beta"], s["alpha"], grid, levels=levels, cmap="viridis")
                ax.set(xlabel="beta", ylabel="alpha", title=f"2D slice: {r.optimizer.upper()} seed {r.seed}",
                       aspect="equal")
                long += [{"figure": name, "run_dir": r.run_dir, "optimizer": r.optimizer, "panel": "2d", "x": a,
                          "y": b, "loss": grid[i, j]} for i, a in enumerate(s["alpha"]) for j, b in enumerate(s["beta"])]
            fig.colorbar(cs, ax=ax, label="training loss (same scale)")
        if interp:
            ax = axes.pop(0)
            r, d = interp[0]  # the first method in order (SGD): t = 0 is it, t = 1 the other run
            s = d["interpolation"]
            other = str(_get(s, "other", "optimizer")).upper()
            ax.plot(s["t"], s["loss"], "o-", ms=3, color="black")
            ax.axvline(0, color=COLORS.get(r.optimizer, "gray"), ls="--", lw=1, label=f"{r.optimizer.upper()} (t=0)")
            ax.axvline(1, color=COLORS.get(str(_get(s, 'other', 'optimizer')), "gray"), ls="--", lw=1,
                       label=f"{other} (t=1)")
            ax.set(xlabel="t", ylabel="training loss (subset)", title="linear interpolation")
            ax.legend(fontsize="small")
            long += [{"figure": name, "run_dir": r.run_dir, "optimizer": r.optimizer, "panel": "interpolation",
                      "x": t, "y": math.nan, "loss": v} for t, v in zip(s["t"], s["loss"])]
        fig.suptitle(f"{setting}: loss landscape (SGD vs SAM)")
        files.append(_save(fig, out / f"{name}.png"))
    return Plot(pd.DataFrame(long, columns=columns), files)


def generate(runs: pd.DataFrame, out: Path) -> tuple[Table, Plot]:
    """The sharpness table and the landscape figures of every run that has a sharpness.json."""
    for stale in out.glob(FIGURE_GLOB):
        stale.unlink()
    table, rows = sharpness_table(runs)
    return table, landscape_figures(rows, out)
