"""The report: run directories -> the paper's tables (markdown, CSV), plots and a README summary.

`generate(runs_dir, out_dir)` does it all; `sam-report` (report/cli.py) calls it and prints.
Modules, in the order data flows: load (run dirs -> pandas), paper (the paper's numbers and
settings), tables (matching, aggregation, rendering), plots, methods (the SAM family side by side).
The output depends only on the run directories: no timestamps, no absolute paths, sorted rows,
fixed float formats, PNGs without version metadata. Generating twice gives the same bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sam_repro.report import landscape, methods, plots, tables
from sam_repro.report.load import Loaded, load_runs

PAPER_TABLES = (1, 2, 3, 4, 5)
# Files of ours that a new generation may leave stale (a setting whose runs were removed).
GENERATED_PLOT_GLOBS = ("curves_*.png", "rho_*.png", "label_noise.png", "methods_*.png")


@dataclass
class Report:
    """Everything one generation produced; the CLI prints from it."""

    loaded: Loaded
    tables: list[tables.Table]
    budget: tables.Table
    plots: dict[str, plots.Plot]
    files: list[Path] = field(default_factory=list)
    sharpness: tables.Table | None = None  # from the runs' sharpness.json (sam-sharpness)
    methods: tables.Table | None = None  # SGD, SAM and the SAM family per setting (report/methods.py)

    def filled(self, table: tables.Table) -> tuple[int, int]:
        """(paper cells with at least one run, paper cells) of one table."""
        ns = table.data[[c for c in table.data.columns if c.endswith("_n")]]
        return int((ns > 0).to_numpy().sum()), int(ns.size)


def generate(runs_dir: str | Path, out_dir: str | Path) -> Report:
    """Read every run below `runs_dir`; write the tables, plots and README.md into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_runs(runs_dir)
    cells = tables.paper_cells()
    matches = tables.match_runs(loaded.runs, cells)
    paper_tables = [tables.paper_table(n, loaded.runs, cells, matches) for n in PAPER_TABLES]
    budget = tables.budget_table(loaded.runs, cells, matches)
    methods_table = methods.methods_table(loaded.runs)
    files: list[Path] = []
    for t in [*paper_tables, budget, methods_table]:
        files += tables.write_table(t, out)
    for pattern in GENERATED_PLOT_GLOBS:
        for stale in out.glob(pattern):
            stale.unlink()
    drawn = {
        "learning curves": plots.learning_curves(loaded.runs, out),
        "label noise": plots.label_noise(paper_tables[3], out),
        "rho sweep": plots.rho_sweep(loaded.runs, out),
        "methods": plots.methods_comparison(methods_table, out),
    }
    sharp_table, drawn["loss landscape"] = landscape.generate(loaded.runs, out)
    files += tables.write_table(sharp_table, out)
    report = Report(loaded, paper_tables, budget, drawn, sharpness=sharp_table, methods=methods_table)
    in_cells = {k for k, m in matches.items() if m.cells}
    readme = out / "README.md"
    readme.write_text(_readme(report, loaded.runs[loaded.runs["setting_key"].isin(in_cells)]),
                      encoding="utf-8", newline="\n")
    report.files = [readme, *files, *(f for p in drawn.values() for f in p.files)]
    return report


def _deviations(paper_tables: list[tables.Table], top: int = 5) -> pd.DataFrame:
    """The filled cells farthest from the paper: ours minus paper, largest |difference| first."""
    rows = []
    for t in paper_tables:
        label_cols = [c for c in t.display.columns if "(" not in c]
        for (_, disp), (_, data) in zip(t.display.iterrows(), t.data.iterrows()):
            for method in ("sam", "sgd"):
                if data[f"{method}_n"] > 0:
                    delta = data[f"{method}_mean"] - data[f"{method}_paper"]
                    rows.append({"table": t.name, "cell": " ".join(disp[c] for c in label_cols),
                                 "method": method.upper(), "ours": tables.fmt_ours(_stats(data, method)),
                                 "paper": disp[f"{method.upper()} (paper)"],
                                 "ours - paper": tables.fmt_diff(delta),
                                 "_abs": round(abs(delta), 6)})  # rounded: float noise must not order ties
    df = pd.DataFrame(rows, columns=["table", "cell", "method", "ours", "paper", "ours - paper", "_abs"])
    df = df.sort_values(["_abs", "table", "cell", "method"], ascending=[False, True, True, True],
                        kind="stable")
    return df.head(top).drop(columns="_abs")


def _stats(data: pd.Series, method: str) -> tables.Stats:
    return tables.Stats(int(data[f"{method}_n"]), data[f"{method}_mean"], math.nan, data[f"{method}_ci95"])


def _readme(report: Report, paper_runs: pd.DataFrame) -> str:
    """README.md of the output folder: summary first, then links, then what was skipped."""
    counts = [report.filled(t) for t in report.tables]
    filled, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
    per_table = ", ".join(f"Table {n}: {f}/{t}" for n, (f, t) in zip(PAPER_TABLES, counts))
    devices = paper_runs["env.device"].fillna("unknown").value_counts().sort_index() \
        if "env.device" in paper_runs else pd.Series(dtype=int)
    hardware = "; ".join(f"{d} ({c} runs)" for d, c in devices.items()) or "none (no runs in paper cells)"
    n_runs, n_budget = len(report.loaded.runs), int(report.budget.data["n"].sum())
    lines = [
        "# SAM reproduction: results",
        "Generated by `sam-report` (`make table`) from the run directories; edit nothing here by hand. "
        "How to read the tables: docs/report.md.",
        "## Summary",
        f"- Paper cells filled: **{filled} of {total}** ({per_table}).\n"
        f"- Hardware (env.device of the runs in paper cells): {hardware}.\n"
        f"- Runs: {n_runs} completed ({len(paper_runs)} in paper cells, {n_budget} budget / non-paper "
        f"or synthetic); {len(report.loaded.skipped)} skipped or not final (listed below).",
        "## Largest deviations from the paper (ours minus paper, top 5)",
        tables.markdown_table(_deviations(report.tables)),
        "## Files",
        "\n".join([*(f"- [{t.title}]({t.name}.md) ([csv]({t.name}.csv))" for t in report.tables),
                   f"- [{report.budget.title}](budget.md) ([csv](budget.csv))",
                   *([f"- [{report.methods.title}](methods.md) ([csv](methods.csv))"] if report.methods else []),
                   *([f"- [{report.sharpness.title}](sharpness.md) ([csv](sharpness.csv))"] if report.sharpness else []),
                   *(f"- {kind}: [{f.name}]({f.name})" for kind, p in report.plots.items() for f in p.files)]),
        "## Skipped / not final",
        tables.markdown_table(report.loaded.skipped.rename(columns={"run_dir": "run directory"})),
    ]
    return "\n\n".join(lines) + "\n"
