"""sam_repro.report.tables: aggregation, matching to paper cells, the budget table, rendering (no plots, no README: test_report_generate.py)."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tests.report.conftest_report import FIX, cells, ours_cell, row, runs_root, tabled, write_run  # noqa: F401
from scipy import stats

from sam_repro.report.paper import paper_csv
from sam_repro.report.tables import t_interval

# t_{0.975, n-1} for n = 3 and 5, hard-coded. They agree with the exact values (scipy; for n = 3
# 0.95 * sqrt(2 / (1 - 0.95**2)) = 4.30265272974946) to ~4e-11 relative, hence rel=1e-9 below.
T3 = 4.302652729911275
T5 = 2.7764451051977987
REL = 1e-9


def ci(values: list[float], t: float) -> tuple[float, float]:
    """Mean and 95% half-width, computed independently of the report."""
    x = np.array(values)
    return float(x.mean()), t * float(x.std(ddof=1)) / math.sqrt(len(x))






def test_t_interval_matches_scipy_and_the_hard_coded_quantiles() -> None:
    for values, t in ((FIX["t1_c10_sam"], T3), (FIX["t1_c10_sgd"], T5)):
        n = len(values)
        mean, half = ci(values, t)
        s = t_interval(values)
        assert (s.n, s.mean) == (n, pytest.approx(mean, abs=1e-12))
        assert s.ci95 == pytest.approx(half, rel=REL)
        exact = stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n)
        assert s.ci95 == pytest.approx(exact, rel=1e-14)
    assert s.std == pytest.approx(float(np.std(FIX["t1_c10_sgd"], ddof=1)), rel=1e-12)  # the last case's
    one = t_interval([3.0])  # no spread and no interval from one seed: NaN (a float), not None
    assert (one.n, one.mean) == (1, 3.0) and math.isnan(one.std) and math.isnan(one.ci95)
    none = t_interval([None, math.nan, math.inf])
    assert none.n == 0 and all(isinstance(v, float) and math.isnan(v) for v in (none.mean, none.std, none.ci95))


def test_table1_cell_means_cis_n_and_differences(tabled) -> None:
    t1 = tabled.tables[0].data
    r = row(t1, dataset="cifar10", model="wrn28_10", epochs=200, augment="basic")
    sam_mean, sam_ci = ci(FIX["t1_c10_sam"], T3)
    sgd_mean, sgd_ci = ci(FIX["t1_c10_sgd"], T5)  # the 2x-epoch runs (3.85) are worse: not shown
    assert (r["sam_n"], r["sgd_n"]) == (3, 5)  # the duplicate counted once; folder/15-epoch runs not at all
    assert r["sam_mean"] == pytest.approx(sam_mean, abs=1e-12)
    assert r["sam_ci95"] == pytest.approx(sam_ci, rel=REL)
    assert r["sgd_mean"] == pytest.approx(sgd_mean, abs=1e-12)
    assert r["sgd_ci95"] == pytest.approx(sgd_ci, rel=REL)
    assert r["diff_ours"] == pytest.approx(sam_mean - sgd_mean, abs=1e-12)
    assert (r["sam_paper"], r["sgd_paper"], r["sam_paper_ci95"]) == (2.7, 3.5, "0.1")
    assert r["diff_paper"] == pytest.approx(-0.8)
    disp = tabled.tables[0].display.iloc[0]
    assert disp["SAM (ours)"] == f"{sam_mean:.2f} ± {sam_ci:.2f} (n=3)" == "2.75 ± 0.37 (n=3)"
    assert (disp["SAM (paper)"], disp["SGD (paper)"]) == ("2.7 ± 0.1", "3.5 ± 0.1")
    assert (disp["SAM-SGD (ours)"], disp["SAM-SGD (paper)"]) == ("-0.75", "-0.8")


def test_sgd_cell_shows_the_better_of_1x_and_2x_epochs(tabled) -> None:
    t1 = tabled.tables[0]
    r = row(t1.data, dataset="cifar100", model="wrn28_10", epochs=200, augment="basic")
    mean, half = ci(FIX["t1_c100_sgd_400"], stats.t.ppf(0.975, 1))
    assert (r["sgd_n"], r["sgd_mean"]) == (2, pytest.approx(mean))
    assert r["sgd_ci95"] == pytest.approx(half, rel=1e-12)
    assert t1.display.iloc[1]["SGD (ours)"] == "18.70 ± 1.27 (n=2, 400 ep)"
    assert r["sam_n"] == 0 and math.isnan(r["diff_ours"])
    assert any("also 19.10 ± 1.27 (n=2) with epochs 200" in n for n in t1.notes)


def test_table4_label_noise_accuracy(tabled) -> None:
    t4 = tabled.tables[3].data
    r = row(t4, label_noise=0.2)
    sam_mean, sam_ci = ci(FIX["t4_sam_acc"], T3)
    sgd_mean, _ = ci(FIX["t4_sgd_acc"], T3)
    assert r["sam_mean"] == pytest.approx(sam_mean) and r["sam_ci95"] == pytest.approx(sam_ci, rel=REL)
    assert r["diff_ours"] == pytest.approx(sam_mean - sgd_mean)
    assert (r["sam_paper"], r["sgd_paper"]) == (95.1, 84.8)
    # The 80 % run used rho 0.1 (the paper: 0.05): never merged into the cell.
    assert row(t4, label_noise=0.8)["sam_n"] == 0


def test_table5_fashion_mnist_cutout_fills_the_autoaugment_column_with_n1(tabled) -> None:
    t5 = tabled.tables[4]
    r = row(t5.data, dataset="fashion_mnist", model="wrn28_10", augment="autoaugment")
    assert (r["sam_n"], r["sam_mean"], r["sam_paper"]) == (1, 3.70, 3.61)
    assert math.isnan(r["sam_ci95"])
    i = t5.data.index[(t5.data["dataset"] == "fashion_mnist") & (t5.data["model"] == "wrn28_10")
                      & (t5.data["augment"] == "autoaugment")][0]
    assert t5.display.loc[i, "SAM (ours)"] == "3.70 (n=1)"
    assert row(t5.data, dataset="fashion_mnist", model="wrn28_10", augment="basic")["sam_n"] == 0


def test_table2_top1_and_top5_from_one_run(tabled) -> None:
    t2 = tabled.tables[1].data
    top1 = row(t2, model="resnet50", epochs=100, metric="top1_err")
    top5 = row(t2, model="resnet50", epochs=100, metric="top5_err")
    assert top1["sam_mean"] == pytest.approx(np.mean(FIX["t2_r50_top1"]))
    assert top5["sam_mean"] == pytest.approx(np.mean(FIX["t2_r50_top5"]))
    assert (top1["sam_paper"], top5["sam_paper"]) == (22.5, 6.28)


def test_budget_runs_are_listed_with_their_differences_and_never_merged(tabled) -> None:
    b = tabled.budget.data
    folder = row(b, **{"data.source": "folder"})
    assert folder["differences"] == "data folder (paper torchvision)"
    assert (folder["n"], folder["mean"], folder["paper"]) == (1, 3.10, 2.7)
    short = row(b, epochs_trained=15, rho=0.05, optimizer="sam")
    assert short["differences"] == "epochs 15 (paper 200)"
    assert row(b, epochs_trained=15, rho=0.1, optimizer="sam")["differences"] == "rho 0.1 (paper 0.05); epochs 15 (paper 200)"
    assert row(b, epochs_trained=15, optimizer="sgd")["differences"] == "epochs 15 (paper 200 or 400)"
    assert row(b, label_noise=0.8)["differences"] == "rho 0.1 (paper 0.05)"
    md = tabled.markdown("budget")
    assert "| epochs 15 (paper 200) " in md and "data folder (paper torchvision)" in md
    # Budget numbers say where they came from: the device and code version of their runs.
    assert short["ran_on"] == "NVIDIA GeForce RTX 4090 @ abc"
    assert "NVIDIA GeForce RTX 4090 @ abc" in md


def test_synthetic_runs_are_labelled_and_never_results(tabled) -> None:
    b = tabled.budget.data
    synth = row(b, kind="synthetic")
    assert synth["data.source"] == "synthetic" and synth["differences"] == ""
    md = tabled.markdown("budget")
    assert "## Synthetic-data runs (pipeline checks, not results)" in md
    assert "synthetic data: a pipeline check, not a result" in md
    for n in range(1, 6):
        assert "synthetic" not in tabled.markdown(f"table{n}")


def test_fill_commands_for_empty_cells(tabled) -> None:
    t1 = tabled.markdown("table1")
    assert "`sam-train -m experiment=t1_cifar10_wrn28_10_1800ep augment=cutout optim=sam,sgd seed=0,1,2,3,4`" in t1
    assert "`sam-train -m experiment=t1_cifar10_pyramidnet_shakedrop augment=autoaugment optim=sam,sgd " \
           "seed=0,1,2,3,4`" in t1
    assert "`bash scripts/table1.sh`" in t1
    # A row with SAM filled and SGD empty asks for SGD only; a full row asks for nothing.
    assert "experiment=t1_cifar100_wrn28_10_200ep augment=basic optim=sam seed=" in t1
    assert "t1_cifar10_wrn28_10_200ep augment=basic" not in t1
    t5 = tabled.markdown("table5")
    assert "`sam-train -m experiment=t5_fashion_mnist_wrn28_10 augment=cutout optim=sgd seed=0,1,2,3,4`" in t5
    assert "`sam-train -m experiment=t5_svhn_shakeshake augment=autoaugment_svhn optim=sam,sgd seed=0,1,2,3,4`" in t5
    t4 = tabled.markdown("table4")
    assert "`sam-train -m experiment=t4_cifar10_resnet32_noise80 optim=sam,sgd seed=0,1,2,3,4`" in t4
    assert "noise20 optim" not in t4
    t2 = tabled.markdown("table2")
    assert t2.count("experiment=t2_imagenet_resnet152_400ep optim=sam,sgd") == 1  # one per row, not per metric
    t3 = tabled.markdown("table3")
    assert "experiment=t3_flowers102_efficientnet_l2 optim=sam,sgd" in t3


# sha256 of the paper's numbers as committed; a change to the CSV must change this line on purpose.
PAPER_CSV_SHA256 = "519b31289558ba76b92e3f1c79edf2db901a4a615f35d6206b6ba87a8346dd7f"


def test_paper_csv_is_the_committed_copy_byte_for_byte() -> None:
    ours = Path(__file__).resolve().parents[2] / "sam_repro/report/paper_tables.csv"
    assert hashlib.sha256(ours.read_bytes()).hexdigest() == PAPER_CSV_SHA256
    df = paper_csv()
    assert len(df) == 214 and set(df["table"]) == {1, 2, 3, 4, 5}


def test_finetuning_cells_count_steps_and_birdsnap_is_an_image_folder() -> None:
    from sam_repro.report.paper import expected
    from sam_repro.report.tables import differences, paper_cells

    cells = paper_cells()
    cell = lambda ds, model: cells[(cells["table"] == 3) & (cells["dataset"] == ds) & (cells["model"] == model)  # noqa: E731
                                   & (cells["method"] == "sam")].iloc[0]
    base = {"dataset": "flowers102", "model": "timm/tf_efficientnet_l2.ns_jft_in1k_475", "augment": "none",
            "label_noise": 0.0, "optimizer": "sam", "rho": 0.05, "p": 2, "batch_size": 512, "epochs": 200,
            "data.source": "torchvision", "val_fraction": 0.0}
    # L2: the paper counts steps but does not say how many: any step count fills, epochs do not.
    assert differences({**base, "train_steps": 12345}, expected(cell("flowers102", "efficientnet_l2"))) == []
    assert differences({**base, "train_steps": None}, expected(cell("flowers102", "efficientnet_l2"))) == \
        ["epochs 200 (paper counts steps)"]
    b7 = {**base, "model": "timm/tf_efficientnet_b7.ra_in1k", "batch_size": 1024}
    assert differences({**b7, "train_steps": 4000}, expected(cell("flowers102", "efficientnet_b7"))) == \
        ["train_steps 4000 (paper 5000)"]
    bird = {**b7, "dataset": "birdsnap", "train_steps": 5000}
    assert differences({**bird, "data.source": "folder"}, expected(cell("birdsnap", "efficientnet_b7"))) == []
    assert differences(b7 | {"train_steps": 5000, "data.source": "folder"}, expected(cell("flowers102", "efficientnet_b7"))) == \
        ["data folder (paper torchvision)"]


def _cell_runs(groups: dict[str, list[float]], column: str = "final.test_err") -> pd.DataFrame:
    """Runs of one cell: setting_key (a JSON setting with its epochs and lr) -> the seeds' values."""
    rows = [{"setting_key": key, column: v} for key, values in groups.items() for v in values]
    return pd.DataFrame(rows)


def _key(epochs: int, lr: float) -> str:
    return json.dumps({"epochs": epochs, "lr": lr}, sort_keys=True)


def test_cell_stats_show_the_largest_group_and_name_the_others() -> None:
    from sam_repro.report.tables import _cell_stats

    runs = _cell_runs({_key(200, 0.2): [3.0, 3.2], _key(200, 0.1): [4.0, 4.4, 4.2], _key(200, 0.05): [1.0, 1.4]})
    stats_, extra, notes = _cell_stats(runs, "top1_err", False, 200)
    assert (stats_.n, stats_.mean, extra) == (3, pytest.approx(4.2), "")  # most seeds wins, not the best mean
    assert notes == [f"also {fmt} with lr {lr} (not shown)" for fmt, lr in
                     (("1.20 ± 2.54 (n=2)", 0.05), ("3.10 ± 1.27 (n=2)", 0.2))]  # in setting-key order
    tie = _cell_runs({_key(200, 0.2): [3.0, 3.2], _key(200, 0.1): [4.0, 4.4]})
    assert _cell_stats(tie, "top1_err", False, 200)[0].mean == pytest.approx(4.2)  # a tie: the first key ("lr": 0.1)


def test_cell_stats_best_of_two_budgets_by_the_metrics_direction() -> None:
    from sam_repro.report.tables import _cell_stats

    runs = _cell_runs({_key(200, 0.1): [80.0, 82.0], _key(400, 0.1): [85.0, 86.0]}, "final.test_acc")
    s, extra, notes = _cell_stats(runs, "top1_acc", True, 200)  # accuracy: higher is better
    assert (s.mean, extra) == (85.5, ", 400 ep") and notes == ["also 81.00 ± 12.71 (n=2) with epochs 200 (not shown)"]
    runs = _cell_runs({_key(200, 0.1): [20.0, 18.0], _key(400, 0.1): [15.0, 14.0]})
    s, extra, _ = _cell_stats(runs, "top1_err", True, 200)  # error: lower is better
    assert (s.mean, extra) == (14.5, ", 400 ep")
    s, extra, _ = _cell_stats(runs, "top1_err", False, 200)  # no allowance: the paper's budget (first key)
    assert (s.mean, extra) == (19.0, "")
    tie = _cell_runs({_key(400, 0.1): [15.0, 14.0], _key(200, 0.1): [14.0, 15.0], _key(200, 0.2): [1.0]})
    s, extra, notes = _cell_stats(tie, "top1_err", True, 200)  # equal means: the first setting key wins
    assert (s.mean, extra) == (14.5, "")
    assert notes == ["also 14.50 ± 6.35 (n=2) with epochs 400 (not shown)", "also 1.00 (n=1) with lr 0.2 (not shown)"]
    two = _cell_runs({_key(200, 0.1): [3.0, 3.0], _key(400, 0.2): [9.0]})
    assert _cell_stats(two, "top1_err", False, 200)[2] == ["also 9.00 (n=1) with epochs 400, lr 0.2 (not shown)"]


def test_cell_stats_of_no_runs_or_no_values() -> None:
    from sam_repro.report.tables import _cell_stats

    for runs in (pd.DataFrame({"setting_key": []}), _cell_runs({_key(200, 0.1): [math.nan, math.inf]})):
        s, extra, notes = _cell_stats(runs, "top1_err", True, 200)
        assert (s.n, extra, notes) == (0, "", [])


def test_number_formats_of_the_tables() -> None:
    from sam_repro.report.tables import DASH, Stats, _decimals, _g, _num, _same, fmt_diff, fmt_ours, fmt_paper

    assert fmt_ours(Stats(0, math.nan, math.nan, math.nan)) == DASH == "—"
    assert fmt_ours(Stats(1, 2.714, math.nan, math.nan)) == "2.71 (n=1)"
    assert fmt_ours(Stats(5, 2.714, 0.1, 0.0849), ", 400 ep") == "2.71 ± 0.08 (n=5, 400 ep)"
    assert (fmt_paper("2.1", "<0.1"), fmt_paper("84.8", "")) == ("2.1 ± <0.1", "84.8")
    assert (fmt_diff(-0.754), fmt_diff(0.05, 1), fmt_diff(0.0), fmt_diff(math.nan), fmt_diff(None)) == \
        ("-0.75", "+0.1", "+0.00", DASH, DASH)
    assert (_decimals("2.75"), _decimals("3"), _decimals("0.1")) == (2, 0, 1)
    assert (_g(None), _g(0.05), _g(200.0), _g(math.inf)) == ("null", "0.05", "200", "inf")
    assert (_num(None), _num("inf"), _num("x"), _num([1]), _num(3)) == (None, math.inf, None, None, 3.0)
    assert _same(0.1, 0.1 + 1e-12) and not _same(0.1, 0.1001) and _same(0.0, 1e-13) and not _same(0.0, 1e-11)
    assert not _same(None, 0.1) and not _same(0.1, None) and not _same(None, None)


def test_ran_on_names_each_device_and_short_sha_once() -> None:
    from sam_repro.report.tables import ran_on

    group = pd.DataFrame({"env.device": ["H100", "H100", None], "env.git_sha": ["0123456789", "0123456789", None]})
    assert ran_on(group) == "? @ ?, H100 @ 0123456"
    assert ran_on(pd.DataFrame({"x": [1, 2]})) == "? @ ?"  # runs that log neither
    assert ran_on(pd.DataFrame({"env.device": ["", "A"], "env.git_sha": ["", "abcdef0123"]})) == "? @ ?, A @ abcdef0"


def test_markdown_rendering_of_a_table() -> None:
    from sam_repro.report.tables import Missing, Table, markdown_table, to_markdown

    assert markdown_table(pd.DataFrame()) == "_(none)_"
    t = Table("t", "Title", pd.DataFrame([{"a": "1.50", "b": "x"}]), pd.DataFrame(), notes=["n1", "n2"],
              missing=[Missing(4, "20%", ["sam", "sgd"], "sam-train -m x"), Missing(4, "40%", ["sgd"], "sam-train -m y")],
              sections=[("More", pd.DataFrame([{"c": "0.10"}]))])
    assert to_markdown(t) == (
        "# Title\n\n| a    | b   |\n|------|-----|\n| 1.50 | x   |\n\n- n1\n- n2\n\n## More\n\n| c    |\n|------|\n| 0.10 |\n\n"
        "## Empty cells: the commands that fill them\n\nThe whole table: `bash scripts/table4.sh`\n\n"
        "| row   | empty    | command          |\n|-------|----------|------------------|\n"
        "| 20%   | sam, sgd | `sam-train -m x` |\n| 40%   | sgd      | `sam-train -m y` |\n")
    assert to_markdown(Table("t", "T", pd.DataFrame(), pd.DataFrame())) == "# T\n\n_(none)_\n"
    one = Table("t", "T", pd.DataFrame(), pd.DataFrame(), missing=[Missing(2, "r", ["sgd"], "sam-train -m z")])
    assert to_markdown(one).endswith("The whole table: `bash scripts/table2.sh`\n\n| row   | empty   | command          |\n"
                                     "|-------|---------|------------------|\n| r     | sgd     | `sam-train -m z` |\n")


def test_epoch_distance_is_the_log_ratio_to_the_nearest_allowed_budget() -> None:
    from sam_repro.report.paper import Expected
    from sam_repro.report.tables import _epoch_distance

    exp = Expected("cifar10", "wrn28_10", "basic", 0.0, "sgd", None, (200, 400), None, 256)
    assert _epoch_distance({"epochs": 100}, exp) == pytest.approx(math.log(2))
    assert _epoch_distance({"epochs": 1600}, exp) == pytest.approx(math.log(4))  # nearest of 200 and 400
    assert _epoch_distance({"epochs": 1}, exp) == pytest.approx(math.log(200))
    assert _epoch_distance({"epochs": "300"}, exp) == pytest.approx(math.log(4 / 3))
    for unknown in ({}, {"epochs": None}, {"epochs": 0}, {"epochs": -3}):
        assert _epoch_distance(unknown, exp) == 0.0
    assert _epoch_distance({"epochs": 100}, Expected("c", "m", None, 0.0, "sam", 0.05, None, None, 256)) == 0.0


def test_nearest_cell_prefers_the_closer_epoch_budget(cells) -> None:
    from sam_repro.report.tables import match_setting

    run = {"dataset": "cifar10", "model": "wrn28_10", "augment": "basic", "label_noise": 0.0, "optimizer": "sam",
           "rho": 0.05, "p": 2, "batch_size": 256, "device_batch": 32, "m": 32, "data.source": "torchvision"}
    by = cells.set_index("order")
    for epochs, want in ((250, 200), (1500, 1800)):
        m = match_setting({**run, "epochs": epochs}, cells)
        assert m.cells == [] and by.loc[m.nearest, "expected"].epochs == (want,)
        assert m.diffs == [f"epochs {epochs} (paper {want})"]


def test_row_labels_name_our_model_the_epochs_and_the_noise_in_percent(cells) -> None:
    from sam_repro.report.tables import _row_label

    first = lambda **kw: cells[pd.concat([cells[k] == v for k, v in kw.items()], axis=1).all(axis=1)].iloc[0]  # noqa: E731
    row = first(table=1, dataset="cifar10", model="pyramidnet", augment="basic")
    assert _row_label(row, ("dataset", "model", "epochs", "augment"), True) == {
        "dataset": "cifar10", "model": "pyramidnet272", "epochs": "1800*", "augment": "basic"}
    assert _row_label(first(table=1, dataset="cifar10", model="wrn28_10", epochs="200"), ("epochs",), False) == {"epochs": "200"}
    assert _row_label(first(table=4, label_noise=0.6), ("label_noise",), False) == {"label_noise": "60%"}
    assert _row_label(first(table=3, dataset="flowers102"), ("dataset", "epochs"), False) == {"dataset": "flowers102", "epochs": "—"}
    assert _row_label(first(table=3, dataset="imagenet"), ("epochs",), False) == {"epochs": "10"}  # paper App. C: 10 epochs


def test_budget_rows_sort_numbers_as_numbers_and_nulls_after_them() -> None:
    from sam_repro.report.tables import BUDGET_FIELDS, _sort_key

    base = {"dataset": "cifar10", "model": "resnet20", "augment": "basic", "label_noise": 0.0, "optimizer": "sam",
            "rho": 0.05, "trained": 15, "batch_size": 128, "data.source": "folder"}  # trained: the epochs done
    settings = [{**base, "trained": 15}, {**base, "trained": 9}, {**base, "rho": None, "optimizer": "sgd"},
                {**base, "dataset": "cifar100"}, {**base, "trained": True}, {**base, "trained": 0.38}]
    order = sorted(settings, key=_sort_key)
    assert [(s["dataset"], s["trained"], s["rho"]) for s in order] == [
        ("cifar10", 0.38, 0.05), ("cifar10", 9, 0.05), ("cifar10", 15, 0.05), ("cifar10", True, 0.05),  # 9 < 15 as
        ("cifar10", 15, None), ("cifar100", 15, 0.05)]  # numbers ("15" < "9" as text); a bool and a null sort as text, after numbers
    assert _sort_key(base)[BUDGET_FIELDS.index("trained")] == (0, 15, "")
    assert _sort_key({})[0] == (1, 0, "None")


def test_budget_table_rows_columns_and_order(tabled) -> None:
    b = tabled.budget
    h100, rtx = "NVIDIA H100 80GB HBM3 @ abc", "NVIDIA GeForce RTX 4090 @ abc"
    wrn15 = ["cifar10", "wrn28_10", "basic", "0.0"]
    assert list(b.display.columns) == ["dataset", "model", "augment", "label_noise", "optimizer", "rho", "trained",
                                       "batch_size", "data.source", "metric", "ours", "paper (nearest cell)",
                                       "differences from the paper", "ran on (device @ git sha)"]
    assert b.display.values.tolist() == [  # sorted by dataset, model, augment, noise, optimizer, rho, epochs, ...
        ["cifar10", "resnet32", "basic", "0.8", "sam", "0.1", "200 epochs", "256", "torchvision", "top1_acc",
         ours_cell([100 - 30.0]), "Table 4 SAM: 77.9", "rho 0.1 (paper 0.05)", h100],
        [*wrn15, "sam", "0.05", "15 epochs", "256", "torchvision", "top1_err", ours_cell(FIX["budget_15ep"][0.05]),
         "Table 1 SAM: 2.7 ± 0.1", "epochs 15 (paper 200)", rtx],
        [*wrn15, "sam", "0.05", "200 epochs", "256", "folder", "top1_err", ours_cell(FIX["budget_folder"]),
         "Table 1 SAM: 2.7 ± 0.1", "data folder (paper torchvision)", h100],
        [*wrn15, "sam", "0.1", "15 epochs", "256", "torchvision", "top1_err", ours_cell(FIX["budget_15ep"][0.1]),
         "Table 1 SAM: 2.7 ± 0.1", "rho 0.1 (paper 0.05); epochs 15 (paper 200)", rtx],
        [*wrn15, "sam", "0.2", "15 epochs", "256", "torchvision", "top1_err", ours_cell(FIX["budget_15ep"][0.2]),
         "Table 1 SAM: 2.7 ± 0.1", "rho 0.2 (paper 0.05); epochs 15 (paper 200)", rtx],
        [*wrn15, "sgd", "—", "15 epochs", "256", "torchvision", "top1_err", ours_cell(FIX["budget_15ep_sgd"]),
         "Table 1 SGD: 3.5 ± 0.1", "epochs 15 (paper 200 or 400)", rtx]]
    assert list(b.data.columns) == ["kind", "dataset", "model", "augment", "label_noise", "optimizer", "rho",
                                    "epochs_trained", "steps", "images", "batch_size", "data.source", "metric", "n",
                                    "mean", "ci95", "paper_table", "paper", "differences", "ran_on"]
    # the training done, counted here: epochs x (50,000 // 256 = 195 steps of 256 images); synthetic: 2 epochs
    epochs = [200, 2, 15, 200, 15, 15, 15]
    assert b.data["epochs_trained"].tolist() == epochs
    assert b.data["steps"].tolist() == [e * 195 for e in epochs]
    assert b.data["images"].tolist() == [e * 195 * 256 for e in epochs]
    assert b.data["kind"].tolist() == ["budget", "synthetic", "budget", "budget", "budget", "budget", "budget"]
    assert b.data["paper_table"].tolist() == ["4", "", "1", "1", "1", "1", "1"]
    assert b.data["paper"].tolist()[:1] + b.data["paper"].tolist()[2:] == [77.9, 2.7, 2.7, 2.7, 2.7, 3.5]
    assert math.isnan(b.data["paper"].iloc[1]) and pd.isna(b.data["rho"].iloc[-1])  # SGD: empty, not "None"
    budget = b.data[b.data["kind"] == "budget"]
    values = [[70.0], FIX["budget_15ep"][0.05], FIX["budget_folder"], FIX["budget_15ep"][0.1], FIX["budget_15ep"][0.2],
              FIX["budget_15ep_sgd"]]
    assert budget["metric"].tolist() == ["top1_acc"] + ["top1_err"] * 5 and budget["n"].tolist() == [len(v) for v in values]
    assert budget["mean"].tolist() == pytest.approx([np.mean(v) for v in values])
    half = [stats.t.ppf(0.975, len(v) - 1) * np.std(v, ddof=1) / math.sqrt(len(v)) if len(v) > 1 else math.nan for v in values]
    assert budget["ci95"].tolist() == pytest.approx(half, nan_ok=True)
    assert budget["differences"].tolist() == [r[12] for r in b.display.values.tolist()]
    assert budget["ran_on"].tolist() == [r[13] for r in b.display.values.tolist()]
    synth_row = b.data[b.data["kind"] == "synthetic"].iloc[0]
    assert (synth_row["metric"], synth_row["n"], synth_row["mean"], synth_row["differences"]) == ("top1_err", 1, 50.0, "")
    heading, synth = b.sections[0]
    assert heading == "Synthetic-data runs (pipeline checks, not results)"
    assert synth.values.tolist() == [["cifar10", "wrn28_10", "basic", "0.0", "sam", "0.05", "2 epochs", "256", "synthetic", "1",
                                      "50.00 (n=1)", "synthetic data: a pipeline check, not a result"]]
    assert list(synth.columns)[-3:] == ["n", "final test error (%)", "what"]


def test_a_run_with_no_paper_cell_is_listed_without_a_nearest_cell(tmp_path: Path, cells) -> None:
    from sam_repro.report.load import load_runs
    from sam_repro.report.tables import budget_table, match_runs

    write_run(tmp_path, "svhn", test_err=5.0, dataset="svhn", model="resnet20")
    runs = load_runs(tmp_path).runs
    b = budget_table(runs, cells, match_runs(runs, cells))
    row = b.display.iloc[0]
    assert (row["paper (nearest cell)"], row["differences from the paper"], row["metric"]) == (
        "—", "no paper cell for dataset svhn, model resnet20", "top1_err")
    assert b.data["paper_table"].tolist() == [""] and math.isnan(b.data["paper"].iloc[0])
    assert b.notes == ["Runs outside the paper's setting (fewer epochs, another rho, the JPEG folder copy of a dataset, "
                       "...). They are never merged into the paper tables; each row says how it differs from the "
                       "nearest paper cell. Ours: mean ± 95% CI over seeds (Student t).",
                       "Trained: the training the runs did, from their metrics.json. Where `train_steps` or an "
                       "interruption cut the configured epochs: the epochs done (fractional), the optimizer steps "
                       "and the training images seen (steps x batch; one epoch is train_size // batch steps)."]
    assert b.sections == [] and (b.name, b.title) == ("budget", "Budget / non-paper runs")


def test_paper_tables_title_columns_notes_and_empty_cells(tabled) -> None:
    from sam_repro.report.tables import MATCH_NOTE, SPECS

    t1, t4 = tabled.tables[0], tabled.tables[3]
    assert t1.title == "Table 1: CIFAR-10 and CIFAR-100, trained from scratch — test error (%), lower is better"
    methods = ["SAM (ours)", "SAM (paper)", "SGD (ours)", "SGD (paper)", "SAM-SGD (ours)", "SAM-SGD (paper)"]
    assert list(t1.display.columns) == ["dataset", "model", "epochs", "augment", *methods]
    assert list(t4.display.columns) == ["label_noise", *methods]
    assert list(t1.data.columns) == list(t4.data.columns) == [
        "dataset", "model", "epochs", "augment", "label_noise", "metric", "sam_mean", "sam_ci95", "sam_n", "sam_paper",
        "sam_paper_ci95", "sgd_mean", "sgd_ci95", "sgd_n", "sgd_paper", "sgd_paper_ci95", "diff_ours", "diff_paper"]
    assert str(t1.data["epochs"].dtype) == "Int64"
    assert t4.notes[0] == ("Ours: final-epoch clean test accuracy (%), higher is better; mean ± 95% CI over seeds "
                           "(Student t: t_{0.975,n-1}·s/√n; no CI for n=1), n = seeds. SAM-SGD: difference of the means.")
    assert t1.notes[1] == MATCH_NOTE and t1.notes[2:4] == list(SPECS[1].notes)
    assert t1.notes[4:] == [f"SGD cifar10 wrn28_10 200 basic: also {ours_cell(FIX['t1_c10_sgd_400'])} with epochs 400 (not shown)",
                            f"SGD cifar100 wrn28_10 200 basic: also {ours_cell(FIX['t1_c100_sgd'])} with epochs 200 (not shown)"]
    assert [(m.table, m.row, m.methods) for m in t4.missing] == [(4, f"{n}%", ["sam", "sgd"]) for n in (40, 60, 80)]
    assert t1.missing[0].methods == ["sam"] and t1.missing[0].row == "cifar100 wrn28_10 200 basic"
    assert len({m.command for m in tabled.tables[1].missing}) == len(tabled.tables[1].missing)  # top-1/top-5 once


def test_write_table_writes_markdown_and_a_four_decimal_csv(tmp_path: Path) -> None:
    from sam_repro.report.tables import Table, to_markdown, write_table

    t = Table("x", "X", pd.DataFrame([{"a": "1"}]), pd.DataFrame({"m": [1 / 3, math.nan, math.inf], "k": ["s", None, "t"]}))
    assert write_table(t, tmp_path) == [tmp_path / "x.md", tmp_path / "x.csv"]
    assert (tmp_path / "x.csv").read_bytes() == b"m,k\n0.3333,s\n,\ninf,t\n"  # no index, blank for missing, '\n' ends
    assert (tmp_path / "x.md").read_bytes() == to_markdown(t).encode()


def test_match_runs_matches_each_setting_once(cells) -> None:
    from sam_repro.report.tables import match_runs

    a = json.dumps({"dataset": "cifar10", "data.source": "synthetic"})
    b = json.dumps({"dataset": "svhn", "model": "resnet20", "optimizer": "sam"})
    got = match_runs(pd.DataFrame({"setting_key": [b, a, b]}), cells)
    assert list(got) == sorted([a, b]) and got[a].synthetic and got[a].cells == []
    assert got[b].diffs == ["no paper cell for dataset svhn, model resnet20"] and got[b].nearest is None


def test_synthetic_seeds_are_aggregated_like_any_other_run(tmp_path: Path, cells) -> None:
    from sam_repro.report.load import load_runs
    from sam_repro.report.tables import budget_table, match_runs

    for seed, err in enumerate((50.0, 54.0)):
        write_run(tmp_path, f"s{seed}", test_err=err, seed=seed, source="synthetic", epochs=2)
    runs = load_runs(tmp_path).runs
    b = budget_table(runs, cells, match_runs(runs, cells))
    row = b.data.iloc[0]
    assert (row["kind"], row["n"], row["mean"], row["paper_table"], row["differences"]) == ("synthetic", 2, 52.0, "", "")
    assert row["ci95"] == pytest.approx(stats.t.ppf(0.975, 1) * np.std([50.0, 54.0], ddof=1) / math.sqrt(2))
    assert math.isnan(row["paper"]) and b.display.empty and b.sections[0][1]["final test error (%)"].tolist() == [
        ours_cell([50.0, 54.0])]


def _printed_decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def test_the_papers_sam_minus_sgd_has_the_precision_of_the_printed_values(tabled, cells) -> None:
    """Every row of Tables 1-5: the paper's SAM - SGD, to as many decimals as the more precise of
    the two printed values (Table 2's ResNet-101 row prints a CI of '<0.01' beside '19.0': still 1)."""
    checked = 0
    for number, table in zip(range(1, 6), tabled.tables):
        mine = cells[cells["table"] == number]
        by_row = mine.groupby(["dataset", "model", "epochs", "augment", "label_noise", "metric"], sort=False)
        shown = table.display["SAM-SGD (paper)"].tolist()
        assert len(shown) == by_row.ngroups
        for text, (_, pair) in zip(shown, by_row):
            value = {r["method"]: r["value"] for _, r in pair.iterrows()}
            decimals = max(_printed_decimals(value["sam"]), _printed_decimals(value["sgd"]))
            assert text == f"{float(value['sam']) - float(value['sgd']):+.{decimals}f}", (number, value)
            checked += 1
    assert checked == 156 // 2


def test_epochs_the_paper_does_not_state_are_marked_as_ours_in_the_row_labels(tabled) -> None:
    """The paper gives no epochs for Table 1's Shake-Shake and PyramidNet rows: our 1800 is marked '1800*'."""
    t1 = tabled.tables[0].display
    marked = {(r["model"], r["epochs"]) for _, r in t1.iterrows() if r["epochs"].endswith("*")}
    assert marked == {("shakeshake26_2x96d", "1800*"), ("pyramidnet272", "1800*")}
    assert set(t1.loc[t1["model"] == "pyramidnet272_shakedrop", "epochs"]) == {"1800"}  # stated by the paper
    assert set(t1.loc[t1["model"] == "wrn28_10", "epochs"]) == {"200", "1800"}


def test_the_paper_cells_frame_has_the_csv_columns_and_the_order_and_expected_setting() -> None:
    from sam_repro.report.paper import paper_csv
    from sam_repro.report.tables import paper_cells

    cells = paper_cells()
    assert list(cells.columns) == [*paper_csv().columns, "order", "expected"]
    assert list(cells.index) == list(range(len(cells))) == cells["order"].tolist()
    assert set(cells["method"]) == {"sam", "sgd"} and len(cells) == 156


def test_budget_table_of_no_runs_keeps_its_columns(cells) -> None:
    from sam_repro.report.load import load_runs
    from sam_repro.report.tables import budget_table

    runs = load_runs(Path("/nonexistent/runs")).runs
    b = budget_table(runs, cells, {})
    assert list(b.data.columns) == ["kind", "dataset", "model", "augment", "label_noise", "optimizer", "rho",
                                    "epochs_trained", "steps", "images", "batch_size", "data.source", "metric", "n",
                                    "mean", "ci95", "paper_table", "paper", "differences", "ran_on"]
    assert b.data.empty and b.display.empty

