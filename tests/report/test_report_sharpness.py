"""The report's sharpness table and landscape figure, from sharpness.json files written by hand
or by the instruments' own JSON blocks (the report reads them; it never measures)."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from tests.report.conftest_report import write_run
from tests.sharpness.test_msharpness import Concave

from sam_repro.report import generate
from sam_repro.report import sharpness as S
from sam_repro.report.load import load_runs
from sam_repro.report.sharpness import sharpness_table
from sam_repro.sharpness import hutchinson_trace, m_sharpness

REPO = Path(__file__).resolve().parents[2]
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
    generate(runs, tmp_path / "again")
    for name in ("sharpness.md", "sharpness.csv", "README.md", figures[0].name):  # the PNG too: byte-stable
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert sharpness_table(report.loaded.runs.iloc[0:0])[0].display.empty


# ---- unit tests of sam_repro.report.sharpness, on run directories written in each test ----------

C10 = "cifar10_wrn28_10_basic_200ep"
C100 = "cifar100_wrn28_10_basic_200ep"
ON_512 = "512 train ex., BN eval, L2 out, fp32"
ON_1024 = "1024 train ex., BN eval, L2 out, fp32"
NOTES = [
    "Measured by `sam-sharpness` on each run's own model and training data (a fixed seeded subset, no "
    "augmentation); every run's sharpness.json says how (subset, seed, iterations, tolerances, error "
    "bars). Several seeds: mean ± 95% CI over seeds (Student t); one seed: the value, the trace and "
    "m-sharpness ± the 95% CI of the run's own estimate (Student t over its Hutchinson probes or chunks).",
    "lambda: Hessian eigenvalues (Lanczos), trace: Hutchinson; m-sharpness: SAM paper Sec. 4.1 (mean "
    "over chunks of m examples of the loss increase at the worst perturbation of norm rho)."]


def sdoc(lmax: float, ratio: float, trace: float, cells: list | None = None, subset: int = 512,
         trace_block: dict | None = None, **more) -> dict:
    """A sharpness.json document with the given numbers (no landscape unless `more` adds one)."""
    doc = {"schema": 1,
           "setup": {"subset": subset, "seed": 0, "bn_mode": "eval", "dtype": "fp32", "weight_decay": {"in_loss": False}},
           "hessian": {"lambda_max": lmax, "lambda_max_over_lambda_5": ratio,
                       "trace": trace_block or {"value": trace, "stderr": 1.0}},
           "msharpness": {"cells": cells or []}}
    doc.update(more)
    return doc


def put(run: Path, doc: dict) -> Path:
    (run / "sharpness.json").write_text(json.dumps(doc), encoding="utf-8")
    return run


def cell(m: int, rho: float, value, **more) -> dict:
    return {"m": m, "rho": rho, "value": value, **more}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and Student-t 95% half-width, written out here (NaN half-width for one value)."""
    x = np.array(values, dtype=float)
    if len(x) == 1:
        return float(x[0]), math.nan
    return float(x.mean()), float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def figure_key(dataset: str = "cifar10", source: str = "torchvision") -> str:
    """The setting without seed and optimizer fields, for write_run's defaults."""
    return json.dumps({"augment": "basic", "batch_size": 256, "data.source": source, "dataset": dataset,
                       "device_batch": 32, "epochs": 200, "grad_clip": 5.0, "label_noise": 0.0,
                       "label_smoothing": 0.0, "lr": 0.1, "model": "wrn28_10", "noise_kind": "symmetric",
                       "precision": "bf16", "train_steps": None, "val_fraction": 0.0, "wd_mode": "loss",
                       "weight_decay": 0.0005}, sort_keys=True)


# -- read_sharpness, lookup, _num, _measured_on -------------------------------------------------------

def test_read_sharpness_returns_the_schema_1_document(tmp_path: Path) -> None:
    doc = sdoc(40.0, 8.0, 300.0, [cell(16, 0.05, 0.2)])
    doc["setup"]["bn_mode"] = "évaluation ±"  # non-ASCII: read as UTF-8
    (tmp_path / "sharpness.json").write_bytes(json.dumps(doc, ensure_ascii=False).encode("utf-8"))
    assert S.read_sharpness(tmp_path) == doc
    assert S.read_sharpness(str(tmp_path)) == doc
    assert S.SHARPNESS_FILE == "sharpness.json" and S.FIGURE_GLOB == "sharpness_*.png"


@pytest.mark.parametrize("content", [
    None,  # no file
    b"",  # empty
    b'{"schema": 1, "hessian": {',  # truncated
    b'{"schema": 1, "setup": "\xff\xfe"}',  # not UTF-8
    b"[1, 2]", b"null", b'"schema"', b"1",  # not an object
    b'{"hessian": {}}',  # no schema
    b'{"schema": 2, "hessian": {}}', b'{"schema": 0}', b'{"schema": "1"}', b'{"schema": null}',
])
def test_read_sharpness_none_for_absent_unreadable_or_other_schema(tmp_path: Path, content) -> None:
    if content is not None:
        (tmp_path / "sharpness.json").write_bytes(content)
    assert S.read_sharpness(tmp_path) is None


def test_read_sharpness_none_for_a_directory_or_a_missing_run(tmp_path: Path) -> None:
    (tmp_path / "sharpness.json").mkdir()
    assert S.read_sharpness(tmp_path) is None
    assert S.read_sharpness(tmp_path / "nowhere") is None
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "Sharpness.json").write_text(json.dumps(sdoc(1, 1, 1)))
    (tmp_path / "other" / "metrics.json").write_text(json.dumps(sdoc(1, 1, 1)))
    assert S.read_sharpness(tmp_path / "other") is None


def test_get_walks_nested_objects_and_stops_at_non_objects() -> None:
    doc = {"a": {"b": {"c": 3}, "n": 0, "l": [1]}, "z": None}
    assert S.lookup(doc, "a", "b", "c") == 3
    assert S.lookup(doc, "a", "b") == {"c": 3}
    assert S.lookup(doc) is doc
    assert S.lookup(doc, "a", "n") == 0
    assert S.lookup(doc, "a", "n", "x") is None  # through a number
    assert S.lookup(doc, "a", "l", "x") is None  # through a list
    assert S.lookup(doc, "z", "x") is None  # through null
    assert S.lookup(doc, "missing", "x", "y") is None
    assert S.lookup(None, "a") is None and S.lookup([1], "a") is None
    assert S.lookup(None) is None


@pytest.mark.parametrize(("x", "want"), [(3, 3.0), (-2, -2.0), (0, 0.0), (0.25, 0.25), (1e300, 1e300), (-0.0, 0.0)])
def test_num_keeps_finite_numbers_as_float(x, want) -> None:
    got = S._num(x)
    assert type(got) is float and got == want


@pytest.mark.parametrize("x", [True, False, math.nan, math.inf, -math.inf, None, "3", [1], {"v": 1}])
def test_num_is_nan_for_anything_else(x) -> None:
    got = S._num(x)
    assert type(got) is float and math.isnan(got)


@pytest.mark.parametrize(("setup", "want"), [
    ({"subset": 512, "bn_mode": "eval", "dtype": "fp32", "weight_decay": {"in_loss": False}}, ON_512),
    ({"subset": 2048, "bn_mode": "train", "dtype": "fp64", "weight_decay": {"in_loss": True}},
     "2048 train ex., BN train, L2 in, fp64"),
    ({"subset": 1024, "bn_mode": "eval", "dtype": "fp32", "weight_decay": {"in_loss": 1}},
     "1024 train ex., BN eval, L2 in, fp32"),
    ({"subset": 1024, "bn_mode": "eval", "dtype": "fp32", "weight_decay": 0.0005}, ON_1024),
    ({"subset": 1024, "bn_mode": "eval", "dtype": "fp32", "weight_decay": {}}, ON_1024),
    ({"subset": 1024, "bn_mode": "eval", "dtype": "fp32"}, ON_1024),
    ({}, "None train ex., BN None, L2 out, None"),
])
def test_measured_on_text(setup, want) -> None:
    assert S._measured_on(setup) == want


# -- sharpness_rows --------------------------------------------------------------------------------

def test_sharpness_rows_one_row_per_real_run_with_a_file(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_run(root, "a_sgd", test_err=3.5, optimizer="sgd")  # no sharpness.json: no row, later runs still read
    put(write_run(root, "b_sam0", test_err=2.5, seed=0),
        sdoc(20.0, 5.0, 150.0, [cell(16, 0.10, 0.1, steps=1), cell(128, 0.05, 0.07)], subset=1024))
    put(write_run(root, "c_sam1", test_err=2.75, seed=1, rho=0.1),
        sdoc(22, 6.5, 160, [cell(16, 0.1, 0.12), cell(16, 0.1, 0.3, steps=3), cell(16, 0.05, 0.2, steps=2)]))
    put(write_run(root, "d_smoke", test_err=50.0, source="synthetic"), sdoc(1.0, 1.0, 1.0))  # never a result
    runs = load_runs(root).runs
    rows = S.sharpness_rows(runs)
    cells = ["m-sharpness m=16 rho=0.1", "m-sharpness m=128 rho=0.05", "m-sharpness m=16 rho=0.1 3-step",
             "m-sharpness m=16 rho=0.05 2-step"]
    assert list(rows.columns) == [
        "figure_key", "optimizer", "rho", "seed", "run_dir", "abs_dir", "measured_on", "trained", "test_err",
        "lambda_max", "lambda_ratio", "trace", "own_ci95 trace", *(c for name in cells for c in (name, f"own_ci95 {name}"))]
    assert list(rows["run_dir"]) == ["b_sam0", "c_sam1"]
    assert list(rows["abs_dir"]) == [str(root / "b_sam0"), str(root / "c_sam1")]
    assert list(rows["figure_key"]) == [figure_key(), figure_key()]
    assert list(rows["optimizer"]) == ["sam", "sam"] and list(rows["rho"]) == [0.05, 0.1]
    assert list(rows["seed"]) == [0, 1]
    assert list(rows["measured_on"]) == [ON_1024, ON_512]
    assert list(rows["test_err"]) == [2.5, 2.75]
    assert list(rows["lambda_max"]) == [20.0, 22.0] and list(rows["lambda_ratio"]) == [5.0, 6.5]
    assert list(rows["trace"]) == [150.0, 160.0]
    assert list(rows["m-sharpness m=16 rho=0.1"]) == [0.1, 0.12]
    assert rows["m-sharpness m=128 rho=0.05"].iloc[0] == 0.07 and math.isnan(rows["m-sharpness m=128 rho=0.05"].iloc[1])
    three = rows["m-sharpness m=16 rho=0.1 3-step"]
    assert math.isnan(three.iloc[0]) and three.iloc[1] == 0.3
    assert rows["m-sharpness m=16 rho=0.05 2-step"].iloc[1] == 0.2


def test_sharpness_rows_sgd_runs_have_no_rho(tmp_path: Path) -> None:
    put(write_run(tmp_path, "sgd", test_err=3.5, optimizer="sgd", seed=4), sdoc(40, 8, 300))
    rows = S.sharpness_rows(load_runs(tmp_path).runs)
    assert rows[["optimizer", "seed", "run_dir"]].values.tolist() == [["sgd", 4, "sgd"]]
    assert rows["rho"].tolist() == [None] and rows["figure_key"].tolist() == [figure_key()]


def test_sharpness_rows_values_that_are_not_finite_numbers_are_nan(tmp_path: Path) -> None:
    bad = {"schema": 1, "setup": None,
           "hessian": {"lambda_max": True, "lambda_max_over_lambda_5": "8", "trace": 300.0},
           "msharpness": {"cells": [cell(16, 0.05, None), cell(32, 0.05, math.inf), cell(64, 0.05, False)]}}
    put(write_run(tmp_path, "a", test_err=3.0, seed=0), bad)
    put(write_run(tmp_path, "b", test_err=4.0, seed=1), {"schema": 1, "hessian": {"lambda_max": math.nan,
                                                                                "trace": {"value": -math.inf}}})
    put(write_run(tmp_path, "c", test_err=5.0, seed=2), {"schema": 1, "setup": {}, "msharpness": None})
    rows = S.sharpness_rows(load_runs(tmp_path).runs)
    assert list(rows["run_dir"]) == ["a", "b", "c"]
    assert list(rows["measured_on"]) == ["None train ex., BN None, L2 out, None"] * 3
    assert list(rows["test_err"]) == [3.0, 4.0, 5.0]
    numbers = ["lambda_max", "lambda_ratio", "trace", "m-sharpness m=16 rho=0.05", "m-sharpness m=32 rho=0.05",
               "m-sharpness m=64 rho=0.05"]
    assert list(rows.columns[8:]) == ["test_err", *(c for name in numbers for c in (
        [name] if name.startswith("lambda") else [name, f"own_ci95 {name}"]))]
    assert rows[numbers].isna().all().all() and rows[[f"own_ci95 {n}" for n in numbers[2:]]].isna().all().all()


def test_sharpness_rows_empty_without_files(tmp_path: Path) -> None:
    write_run(tmp_path, "a", test_err=3.0)
    (tmp_path / "a" / "sharpness.json").write_text('{"schema": 2}')
    write_run(tmp_path, "b", test_err=3.0, seed=1)
    rows = S.sharpness_rows(load_runs(tmp_path).runs)
    assert rows.empty and list(rows.columns) == []


# -- _fmt and sharpness_table ----------------------------------------------------------------------

def test_fmt_value_interval_or_dash() -> None:
    assert S._fmt(pd.Series([], dtype=float)) == "—"
    assert S._fmt(pd.Series([math.nan, math.inf])) == "—"
    assert S._fmt(pd.Series([1.23456])) == "1.235"
    assert S._fmt(pd.Series([2.0, math.nan])) == "2"
    assert S._fmt(pd.Series([1, 2, 3])) == "2 ± 2.5"  # t(0.975, 2) * 1 / sqrt(3) = 2.484
    assert S._fmt(pd.Series([40.0, 40.0])) == "40 ± 0"
    assert S._fmt(pd.Series([1234.5678, 1234.5678, 1234.6])) == "1235 ± 0.046"
    assert S._fmt(pd.Series([900.0, 1000.0])) == "950 ± 640"  # t(0.975, 1) * 70.7 / sqrt(2) = 635: no exponent
    assert S._fmt(pd.Series([3e6, 5e6])) == "4e+06 ± 1.3e+07"
    assert S._fmt(pd.Series([924.7]), pd.Series([183.2])) == "924.7 ± 180"  # one run: its own interval
    assert S._fmt(pd.Series([math.nan, 0.5]), pd.Series([9.0, 0.25])) == "0.5 ± 0.25"  # the run with the value


def test_sharpness_table_of_no_rows(tmp_path: Path) -> None:
    write_run(tmp_path, "a", test_err=3.0)
    table, rows = S.sharpness_table(load_runs(tmp_path).runs)
    assert (table.name, table.title, table.notes) == ("sharpness", "Sharpness of the minima", NOTES)
    assert table.display.empty and table.data.empty and list(table.display.columns) == []
    assert rows.empty and list(rows.columns) == []


TABLE_RUNS = [  # run_dir, config, test_err, sharpness.json
    ("a_adam", {"optimizer": "adam", "seed": 0}, 4.0, sdoc(50, 9, 400)),
    ("b_asam", {"optimizer": "asam", "rho": 0.5, "adaptive": True, "seed": 0}, 2.5, sdoc(15, 4, 120)),
    ("c_sam0", {"seed": 0}, 2.6, sdoc(20, 5, 150, [cell(16, 0.1, 0.1), cell(128, 0.05, 0.07)])),
    ("d_sam1", {"seed": 1}, 2.75, sdoc(22, 6, 160, [cell(16, 0.1, 0.12)])),
    ("e_sam2", {"seed": 2}, 2.9, sdoc(21, 5.5, 155, [cell(16, 0.1, 0.11)], subset=1024)),  # measured otherwise
    ("f_sgd0", {"optimizer": "sgd", "seed": 0}, 3.4, sdoc(40, 8, 300, [cell(16, 0.1, 0.2)])),
    ("g_sgd1", {"optimizer": "sgd", "seed": 1}, 3.5, sdoc(44, 8.5, 310, [cell(16, 0.1, 0.25)])),
    ("h_sgd2", {"optimizer": "sgd", "seed": 2}, 3.6, sdoc(42, 9, 290, [cell(16, 0.1, 0.3)])),
    ("i_nofile", {"optimizer": "sgd", "seed": 3}, 9.9, None),
    ("z_c100", {"optimizer": "sgd", "dataset": "cifar100", "seed": 0}, 19.0, sdoc(30, 3, 200)),
]


def write_table_runs(root: Path) -> pd.DataFrame:
    for name, config, err, doc in TABLE_RUNS:
        run = write_run(root, name, test_err=err, **config)
        if doc is not None:
            put(run, doc)
    return load_runs(root).runs


def test_sharpness_table_display(tmp_path: Path) -> None:
    table, _ = S.sharpness_table(write_table_runs(tmp_path))
    assert (table.name, table.title, table.notes) == ("sharpness", "Sharpness of the minima", NOTES)
    m128, m16 = "m-sharpness m=128 rho=0.05", "m-sharpness m=16 rho=0.1"
    assert list(table.display.columns) == ["setting", "method", "trained", "n", "measured on", "test error (%)",
                                           "lambda_max", "lambda_max / lambda_5", "trace", m128, m16]
    # Settings in order, then the measurement setup, then SGD, SAM, ASAM, anything else; never averaged across setups.
    e200 = "200 epochs"  # write_run's runs: completed, 200 epochs configured and done
    assert table.display.values.tolist() == [
        [C100, "SGD", e200, "1", ON_512, "19", "30", "3", "200", "—", "—"],
        [C10, "SAM rho=0.05", e200, "1", ON_1024, "2.9", "21", "5.5", "155", "—", "0.11"],
        [C10, "SGD", e200, "3", ON_512, "3.5 ± 0.25", "42 ± 5", "8.5 ± 1.2", "300 ± 25", "—", "0.25 ± 0.12"],
        [C10, "SAM rho=0.05", e200, "2", ON_512, "2.675 ± 0.95", "21 ± 13", "5.5 ± 6.4", "155 ± 64", "0.07", "0.11 ± 0.13"],
        [C10, "ASAM rho=0.5", e200, "1", ON_512, "2.5", "15", "4", "120", "—", "—"],
        [C10, "ADAM rho=0.05", e200, "1", ON_512, "4", "50", "9", "400", "—", "—"],
    ]


def test_sharpness_table_data_and_rows(tmp_path: Path) -> None:
    table, rows = S.sharpness_table(write_table_runs(tmp_path))
    metrics = ["test_err", "lambda_max", "lambda_ratio", "trace", "m-sharpness m=128 rho=0.05", "m-sharpness m=16 rho=0.1"]
    assert list(table.data.columns) == ["setting", "method", "trained", "n", "measured_on",
                                        *(f"{m}_{s}" for m in metrics for s in ("mean", "ci95"))]
    assert set(table.data["trained"]) == {"200 epochs"}
    assert table.data[["setting", "method", "n", "measured_on"]].values.tolist() == [
        [C100, "SGD", 1, ON_512], [C10, "SAM rho=0.05", 1, ON_1024], [C10, "SGD", 3, ON_512],
        [C10, "SAM rho=0.05", 2, ON_512], [C10, "ASAM rho=0.5", 1, ON_512], [C10, "ADAM rho=0.05", 1, ON_512]]
    assert all(type(n) is int for n in table.data["n"].tolist())
    nan = math.nan
    values = [  # per table row: each metric's values over the row's runs
        [[19.0], [30], [3], [200], [nan], [nan]],
        [[2.9], [21], [5.5], [155], [nan], [0.11]],
        [[3.4, 3.5, 3.6], [40, 44, 42], [8, 8.5, 9], [300, 310, 290], [nan], [0.2, 0.25, 0.3]],
        [[2.6, 2.75], [20, 22], [5, 6], [150, 160], [0.07], [0.1, 0.12]],
        [[2.5], [15], [4], [120], [nan], [nan]],
        [[4.0], [50], [9], [400], [nan], [nan]],
    ]
    for i, row in enumerate(values):
        for metric, vals in zip(metrics, row):
            mean, ci = mean_ci(vals)
            got_mean, got_ci = table.data.loc[i, f"{metric}_mean"], table.data.loc[i, f"{metric}_ci95"]
            assert (got_mean == pytest.approx(mean, rel=1e-12)) if not math.isnan(mean) else math.isnan(got_mean)
            assert (got_ci == pytest.approx(ci, rel=1e-12)) if not math.isnan(ci) else math.isnan(got_ci)
    # The per-run rows come back with their setting's stem and the method's order.
    assert rows[["run_dir", "setting", "_order"]].values.tolist() == [
        ["a_adam", C10, 9], ["b_asam", C10, 2], ["c_sam0", C10, 1], ["d_sam1", C10, 1], ["e_sam2", C10, 1],
        ["f_sgd0", C10, 0], ["g_sgd1", C10, 0], ["h_sgd2", C10, 0], ["z_c100", C100, 0]]
    assert list(rows.columns[-2:]) == ["setting", "_order"]
    assert S.METHOD_ORDER == {"sgd": 0, "sam": 1, "asam": 2}


def test_sharpness_table_one_method_without_rho_and_settings_sharing_a_stem(tmp_path: Path) -> None:
    put(write_run(tmp_path, "a", test_err=3.0, optimizer="sgd", lr=0.2), sdoc(10, 2, 100))
    put(write_run(tmp_path, "b", test_err=4.0, optimizer="sgd", lr=0.1), sdoc(12, 2.5, 110))
    put(write_run(tmp_path, "c", test_err=5.0, optimizer="sgd", lr=0.1, seed=1), sdoc(14, 3, 120))
    table, rows = S.sharpness_table(load_runs(tmp_path).runs)
    assert rows["rho"].tolist() == [None, None, None]
    keys = {lr: json.dumps({**json.loads(figure_key()), "lr": lr}, sort_keys=True) for lr in (0.1, 0.2)}
    stem = {lr: f"{C10}_{hashlib.sha1(k.encode()).hexdigest()[:6]}" for lr, k in keys.items()}
    order = sorted([0.1, 0.2], key=lambda lr: stem[lr])
    by_lr = {0.1: ["2", "4.5 ± 6.4", "13 ± 13", "2.75 ± 3.2", "115 ± 64"], 0.2: ["1", "3", "10", "2", "100"]}
    assert list(table.display.columns) == ["setting", "method", "trained", "n", "measured on", "test error (%)",
                                           "lambda_max", "lambda_max / lambda_5", "trace"]
    assert table.display.values.tolist() == [[stem[lr], "SGD", "200 epochs", by_lr[lr][0], ON_512, *by_lr[lr][1:]]
                                             for lr in order]


# -- one seed: the estimate's own interval from its standard error ---------------------------------

def own_half_width(stderr: float, k: int) -> float:
    """The 95% half-width of a mean of k samples with this standard error (Student t, k - 1 dof)."""
    return float(stats.t.ppf(0.975, k - 1) * stderr)


def test_one_seed_shows_the_trace_and_m_sharpness_with_their_own_interval(tmp_path: Path) -> None:
    """The table's ± on a one-seed row is the estimator's: t_{0.975, k-1} x the stderr sharpness.json
    gives over its k probes (trace) or chunks (m-sharpness); lambda_max and rows without a usable
    stderr or count show the value alone; several seeds are the interval over seeds, whatever the stderrs."""
    trace = {"value": 300.0, "stderr": 4.0, "probes": 10}
    cells = [cell(16, 0.1, 0.2, stderr=0.01, chunks=32), cell(128, 0.05, 0.07, stderr=None, chunks=1),
             cell(64, 0.05, 0.05, stderr=0.02)]  # no chunk count: no interval
    put(write_run(tmp_path, "a_sgd", test_err=3.0, optimizer="sgd"), sdoc(40, 8, 300, cells, trace_block=trace))
    sam = [(0, 150.0, 0.1), (1, 170.0, 0.14)]
    for seed, tr, ms in sam:
        put(write_run(tmp_path, f"b_sam{seed}", test_err=2.0, seed=seed),
            sdoc(20, 5, tr, [cell(16, 0.1, ms, stderr=0.5, chunks=32)], trace_block={"value": tr, "stderr": 50.0,
                                                                                   "probes": 10}))
    table, rows = S.sharpness_table(load_runs(tmp_path).runs)
    sgd = table.display.set_index("method").loc["SGD"]
    assert sgd["trace"] == "300 ± 9"  # t(0.975, 9) * 4 = 9.05
    assert sgd["m-sharpness m=16 rho=0.1"] == f"0.2 ± {own_half_width(0.01, 32):.2g}"
    assert (sgd["m-sharpness m=128 rho=0.05"], sgd["m-sharpness m=64 rho=0.05"], sgd["lambda_max"]) == ("0.07", "0.05", "40")
    data = table.data.set_index("method")
    assert data.loc["SGD", "trace_ci95"] == pytest.approx(own_half_width(4.0, 10), rel=1e-12)
    assert data.loc["SGD", "m-sharpness m=16 rho=0.1_ci95"] == pytest.approx(own_half_width(0.01, 32), rel=1e-12)
    assert math.isnan(data.loc["SGD", "m-sharpness m=128 rho=0.05_ci95"]) and math.isnan(data.loc["SGD", "lambda_max_ci95"])
    mean, ci = mean_ci([150.0, 170.0])
    assert data.loc["SAM rho=0.05", "trace_ci95"] == pytest.approx(ci, rel=1e-12)  # over seeds, not the stderrs
    assert table.display.set_index("method").loc["SAM rho=0.05", "m-sharpness m=16 rho=0.1"] == \
        "%.4g ± %.2g" % mean_ci([0.1, 0.14])
    assert rows.loc[rows["run_dir"] == "a_sgd", "own_ci95 trace"].item() == pytest.approx(own_half_width(4.0, 10))


def test_a_seed_without_the_metric_leaves_the_interval_to_the_run_that_has_it(tmp_path: Path) -> None:
    """Two runs of one method, only the second with a trace: n = 1, and the ± is that run's own."""
    put(write_run(tmp_path, "a", test_err=3.0, seed=0), sdoc(20, 5, None, trace_block={"value": None}))
    put(write_run(tmp_path, "b", test_err=3.0, seed=1), sdoc(20, 5, 150, trace_block={"value": 150.0, "stderr": 2.0,
                                                                                        "probes": 5}))
    table, _ = S.sharpness_table(load_runs(tmp_path).runs)
    assert table.display["trace"].tolist() == ["150 ± 5.6"]  # t(0.975, 4) * 2 = 5.55


@pytest.mark.parametrize("estimate, count_key, want", [
    ({"stderr": 4.0, "probes": 10}, "probes", own_half_width(4.0, 10)),
    ({"stderr": 0.5, "chunks": 2}, "chunks", own_half_width(0.5, 2)),  # t(0.975, 1) = 12.7
    ({"stderr": 0.5, "chunks": 1}, "chunks", math.nan),
    ({"stderr": None, "chunks": 8}, "chunks", math.nan),
    ({"stderr": 0.5}, "chunks", math.nan),
    ({"stderr": 0.5, "probes": 8}, "chunks", math.nan),
    (None, "probes", math.nan),
])
def test_own_ci95(estimate, count_key: str, want: float) -> None:
    got = S._own_ci95(estimate, count_key)
    assert math.isnan(got) if math.isnan(want) else got == pytest.approx(want, rel=1e-12)


def test_the_table_uses_the_stderrs_the_instruments_compute(tmp_path: Path) -> None:
    """hutchinson_trace and m_sharpness's own JSON blocks, as sam-sharpness writes them, give the
    one-seed interval t_{0.975, k-1} * s / sqrt(k) of their samples (recomputed here from them)."""
    h = torch.tensor([[2.0, 1.0, 0.5], [1.0, -1.0, 0.25], [0.5, 0.25, 3.0]], dtype=torch.float64)
    trace = hutchinson_trace(lambda v: h @ v, 3, max_probes=6, tol=0.0, seed=0, dtype=torch.float64).as_json()
    ms = m_sharpness(Concave([1.0, 2.0, 4.0], [0.0] * 3, m=2), 2, 0.5).as_json()
    put(write_run(tmp_path, "a", test_err=3.0), sdoc(20, 5, trace["value"], [ms], trace_block=trace))
    table, _ = S.sharpness_table(load_runs(tmp_path).runs)
    samples = trace["samples"]
    want = stats.t.ppf(0.975, 5) * statistics.stdev(samples) / math.sqrt(6)
    assert table.data.loc[0, "trace_ci95"] == pytest.approx(want, rel=1e-9)
    values = [0.5 * 1.0, 0.5 * 2.0, 0.5 * 4.0]  # rho ||g_c|| per chunk
    want = stats.t.ppf(0.975, 2) * statistics.stdev(values) / math.sqrt(3)
    assert table.data.loc[0, "m-sharpness m=2 rho=0.5_ci95"] == pytest.approx(want, rel=1e-9)

