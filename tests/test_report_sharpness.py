"""The report's sharpness table and landscape figure, from sharpness.json files written by hand
(the report reads them; it never measures)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sam_repro.report import generate
from sam_repro.report.sharpness import sharpness_table

REPO = Path(__file__).resolve().parent.parent
BUDGET = REPO / "results" / "runs" / "budget_cpu_cifar10jpeg_resnet20"


def sharpness_doc(lams: list[float], trace: float, msharp: float, offset: float) -> dict:
    alpha = [-1.0, 0.0, 1.0]
    return {"schema": 1,
            "setup": {"subset": 512, "seed": 0, "bn_mode": "eval", "dtype": "fp32", "weight_decay": {"in_loss": False}},
            "hessian": {"lambda_max": lams[0], "lambda_max_over_lambda_5": lams[0] / lams[4],
                        "top_eigenvalues": {"values": lams}, "trace": {"value": trace, "stderr": 1.0}},
            "msharpness": {"cells": [{"m": 16, "rho": 0.05, "steps": 1, "value": msharp}]},
            "landscape": {"d1": {"alpha": alpha, "loss": [2 + offset, 0.5, 2.5 + offset]},
                          "d2": {"alpha": alpha, "beta": alpha, "loss": [[1 + offset, 2, 3], [1, 0.5, 1], [3, 2, 1]]}},
            "interpolation": {"t": [0.0, 0.5, 1.0], "loss": [0.5, 1.5, 0.6], "other": {"optimizer": "sam"}}}


def test_sharpness_table_and_figure_from_run_directories(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(BUDGET, runs / "budget")
    dirs = {json.loads((p / "metrics.json").read_text())["config"]["optimizer"]: p
            for p in (runs / "budget").iterdir() if p.is_dir()}
    (dirs["sgd"] / "sharpness.json").write_text(json.dumps(sharpness_doc([40, 20, 10, 8, 5], 300, 0.2, 1.0)))
    (dirs["sam"] / "sharpness.json").write_text(json.dumps(sharpness_doc([20, 15, 10, 8, 4], 150, 0.1, 0.0)))
    out = tmp_path / "tables"
    report = generate(runs, out)
    table = report.sharpness.display
    assert list(table["method"]) == ["SGD", "SAM rho=0.05"]
    assert list(table["lambda_max"]) == ["40", "20"] and list(table["lambda_max / lambda_5"]) == ["8", "5"]
    assert list(table["trace"]) == ["300", "150"] and list(table["m-sharpness m=16 rho=0.05"]) == ["0.2", "0.1"]
    assert list(table["test error (%)"]) == ["22.62", "25.85"]
    figures = list(out.glob("sharpness_*.png"))
    assert len(figures) == 1 and figures[0].name in (out / "README.md").read_text()
    assert "sharpness.md" in (out / "README.md").read_text()
    # Several seeds: mean ± t-interval; another measurement setup is never averaged in.
    data = report.sharpness.data
    assert data.loc[data["method"] == "SGD", "lambda_max_mean"].item() == pytest.approx(40)
    again = generate(runs, tmp_path / "again")
    for name in ("sharpness.md", "sharpness.csv", "README.md"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert sharpness_table(report.loaded.runs.iloc[0:0])[0].display.empty
