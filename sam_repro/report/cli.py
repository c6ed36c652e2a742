"""`sam-report`: regenerate the results tables from the run directories.

    sam-report [--runs results/runs] [--out results/tables]

Exit code 0 whenever the tables were written, even with no runs at all (then every cell is a
dash and the commands that fill them are printed); 2 for a bad command line.
"""
from __future__ import annotations

import argparse
import sys

from sam_repro.report import generate
from sam_repro.report.paper import sweep_script


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sam-report",
        description="Aggregate sam-train run directories into the SAM paper's tables, plots and a summary.",
    )
    p.add_argument("--runs", default="results/runs", help="searched recursively for metrics.json "
                   "(default: results/runs)")
    p.add_argument("--out", default="results/tables", help="where tables, plots and README.md go "
                   "(default: results/tables)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the report; print what was read, skipped and filled, and how to fill the rest."""
    args = _parser().parse_args(argv)
    report = generate(args.runs, args.out)
    runs, skipped = report.loaded.runs, report.loaded.skipped
    print(f"sam-report: {len(runs)} completed runs read from {args.runs}, {len(skipped)} skipped")
    for r in skipped.itertuples():
        print(f"  skipped {r.run_dir}: {r.reason}")
    for table in report.tables:
        filled, total = report.filled(table)
        print(f"{table.name}: {filled}/{total} paper cells filled")
        if table.missing:
            print(f"  empty cells (whole table: bash {sweep_script(table.missing[0].table)}):")
        for m in table.missing:
            print(f"    {m.row} [{', '.join(m.methods)}]: {m.command}")
    kinds = report.budget.data["kind"]
    print(f"budget / non-paper settings: {int((kinds == 'budget').sum())} (budget.md); "
          f"synthetic-data pipeline checks: {int((kinds == 'synthetic').sum())}")
    if report.methods is not None:
        print(f"SAM-family methods: {len(report.methods.sections)} settings side by side (methods.md)")
    print(f"wrote {len(report.files)} files to {args.out} (summary: {args.out}/README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
