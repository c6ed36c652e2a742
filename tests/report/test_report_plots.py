"""sam_repro.report.plots: the numbers behind each figure match the fixture runs; file stems, order, the saved PNG."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from tests.report.conftest_report import FIX, cells, curve_for, assert_valid_png, plotted, runs_root, write_run  # noqa: F401  (fixtures)
from matplotlib.colors import to_hex
from scipy import stats

from sam_repro.report import plots
from sam_repro.report.load import load_runs

def test_learning_curves_data_is_the_seed_mean_min_and_max(plotted) -> None:
    data = plotted.plots["learning curves"].data
    fig = data[data["figure"] == "curves_cifar10_wrn28_10_basic_200ep"]
    assert sorted(set(fig["line"])) == ["SAM rho=0.05", "SGD"]
    sam = fig[fig["line"] == "SAM rho=0.05"].set_index("epoch")
    curves = np.array([curve_for(e) for e in FIX["t1_c10_sam"]])  # seeds x epochs
    assert list(sam.index) == [1, 2, 3, 4]
    assert np.allclose(sam["mean"], curves.mean(axis=0))
    assert np.allclose(sam["min"], curves.min(axis=0)) and np.allclose(sam["max"], curves.max(axis=0))
    assert (sam["n"] == 3).all()  # the duplicate seed-0 run wrote no curve and is dropped anyway
    sgd = fig[fig["line"] == "SGD"].set_index("epoch")
    assert sgd.loc[4, "mean"] == pytest.approx(np.mean(FIX["t1_c10_sgd"])) and sgd.loc[4, "n"] == 5
    # Synthetic runs are never plotted as results.
    assert not data["figure"].str.contains("synthetic").any()


def test_label_noise_data_has_ours_and_the_papers_points(plotted) -> None:
    data = plotted.plots["label noise"].data.set_index(["who", "method", "noise"])
    sam = FIX["t4_sam_acc"]
    assert data.loc[("ours", "sam", 20), "acc"] == pytest.approx(np.mean(sam))
    half = stats.t.ppf(0.975, 2) * np.std(sam, ddof=1) / np.sqrt(3)
    assert data.loc[("ours", "sam", 20), "ci95"] == pytest.approx(half)
    assert data.loc[("ours", "sgd", 20), "acc"] == pytest.approx(np.mean(FIX["t4_sgd_acc"]))
    assert data.loc[("ours", "sam", 80), "n"] == 0  # the rho-0.1 run at 80 % is not the paper's
    paper = {20: (95.1, 84.8), 40: (93.4, 68.8), 60: (90.5, 48.2), 80: (77.9, 26.2)}
    for noise, (s, g) in paper.items():
        assert (data.loc[("paper", "sam", noise), "acc"], data.loc[("paper", "sgd", noise), "acc"]) == (s, g)


def test_rho_sweep_data_per_rho_with_the_sgd_baseline(plotted) -> None:
    data = plotted.plots["rho sweep"].data
    assert set(data["figure"]) == {"rho_cifar10_wrn28_10_basic_15ep"}
    sam = data[data["optimizer"] == "sam"].set_index("rho")
    assert list(sam.index) == [0.05, 0.1, 0.2]
    for rho, errs in FIX["budget_15ep"].items():
        assert sam.loc[rho, "mean"] == pytest.approx(np.mean(errs))
        assert (sam.loc[rho, "n"], sam.loc[rho, "min"], sam.loc[rho, "max"]) == (len(errs), min(errs), max(errs))
    sgd = data[data["optimizer"] == "sgd"]
    assert list(sgd["mean"]) == FIX["budget_15ep_sgd"]


def test_no_rho_sweep_or_curves_without_the_runs(tmp_path: Path) -> None:
    empty = load_runs(tmp_path / "none").runs
    assert plots.rho_sweep(empty, tmp_path).files == []
    assert plots.learning_curves(empty, tmp_path).data.empty
    assert list(tmp_path.iterdir()) == []


def test_file_stems_name_the_setting_and_every_departure_from_the_defaults() -> None:
    base = {"dataset": "cifar10", "model": "wrn28_10", "augment": "basic", "epochs": 200, "batch_size": 256,
            "data.source": "torchvision", "label_noise": 0.0}
    assert plots._stem(base) == "cifar10_wrn28_10_basic_200ep"
    assert plots._stem({**base, "label_noise": None}) == "cifar10_wrn28_10_basic_200ep"  # logged as null: none
    assert plots._stem({**base, "label_noise": 0.4}) == "cifar10_wrn28_10_basic_200ep_noise40"
    assert plots._stem({**base, "label_noise": 0.285}) == "cifar10_wrn28_10_basic_200ep_noise28"  # round(28.499...)
    assert plots._stem({**base, "batch_size": 128}) == "cifar10_wrn28_10_basic_200ep_bs128"
    assert plots._stem({**base, "data.source": "folder"}) == "cifar10_wrn28_10_basic_200ep_folder"
    timm = {**base, "model": "timm/tf_efficientnet_b7.ra_in1k", "label_noise": 0.2, "batch_size": 64,
            "data.source": "folder"}
    assert plots._stem(timm) == "cifar10_timm-tf_efficientnet_b7.ra_in1k_basic_200ep_noise20_bs64_folder"
    keys = [json.dumps({**base, "lr": lr}, sort_keys=True) for lr in (0.1, 0.2)] + [json.dumps(base, sort_keys=True)]
    stems = plots.unique_stems(keys[:2] + [json.dumps({**base, "epochs": 15}, sort_keys=True)])
    assert stems[keys[0]] == "cifar10_wrn28_10_basic_200ep_" + hashlib.sha1(keys[0].encode()).hexdigest()[:6]
    assert stems[keys[1]].endswith(hashlib.sha1(keys[1].encode()).hexdigest()[:6]) and stems[keys[0]] != stems[keys[1]]
    assert list(stems.values())[2] == "cifar10_wrn28_10_basic_15ep"  # unique: no hash


def _captured(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Figures by file stem, captured instead of rendered."""
    figures: dict = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.setdefault(Path(path).stem, fig) and Path(path))
    return figures


def test_learning_curves_are_sorted_whatever_order_the_runs_load_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Directories that load SGD first, a one-epoch curve and a second figure that sorts first."""
    runs = tmp_path / "runs"
    write_run(runs, "a/sgd", test_err=5.0, optimizer="sgd", curve=[5.0])
    write_run(runs, "b/sam", test_err=4.0, rho=0.1, curve=[4.0])
    write_run(runs, "c/short", test_err=9.0, epochs=15, curve=[9.0, 8.0])
    figures = _captured(monkeypatch)
    plot = plots.learning_curves(load_runs(runs).runs, tmp_path)
    assert list(plot.data.columns) == ["figure", "optimizer", "rho", "line", "epoch", "mean", "min", "max", "n"]
    assert plot.data[["figure", "line", "epoch", "optimizer"]].values.tolist() == [
        ["curves_cifar10_wrn28_10_basic_15ep", "SAM rho=0.05", 1, "sam"],
        ["curves_cifar10_wrn28_10_basic_15ep", "SAM rho=0.05", 2, "sam"],
        ["curves_cifar10_wrn28_10_basic_200ep", "SAM rho=0.1", 1, "sam"],
        ["curves_cifar10_wrn28_10_basic_200ep", "SGD", 1, "sgd"]]
    assert plot.data["rho"].tolist()[:3] == [0.05, 0.05, 0.1] and math.isnan(plot.data["rho"].iloc[3])  # SGD: none
    assert [f.name for f in plot.files] == ["curves_cifar10_wrn28_10_basic_15ep.png", "curves_cifar10_wrn28_10_basic_200ep.png"]
    ax = figures["curves_cifar10_wrn28_10_basic_200ep"].axes[0]
    assert [ln.get_label() for ln in ax.get_lines()] == ["SAM rho=0.1 (n=1)", "SGD (n=1)"]
    assert [to_hex(ln.get_color()) for ln in ax.get_lines()] == ["#d62728", "#1f77b4"]  # each optimizer's own color


def test_no_curves_or_sweep_keep_their_columns(tmp_path: Path) -> None:
    empty = load_runs(tmp_path / "none").runs
    assert list(plots.learning_curves(empty, tmp_path).data.columns) == [
        "figure", "optimizer", "rho", "line", "epoch", "mean", "min", "max", "n"]
    assert list(plots.rho_sweep(empty, tmp_path).data.columns) == ["figure", "optimizer", "rho", "mean", "ci95", "min",
                                                                  "max", "n"]


def test_label_noise_draws_a_one_seed_cell_with_no_interval(tmp_path: Path, cells, monkeypatch: pytest.MonkeyPatch) -> None:
    from sam_repro.report.tables import match_runs, paper_table

    write_run(tmp_path / "runs", "one", test_err=20.0, model="resnet32", label_noise=0.4, rho=0.1)
    runs = load_runs(tmp_path / "runs").runs
    table4 = paper_table(4, runs, cells, match_runs(runs, cells))
    figures = _captured(monkeypatch)
    data = plots.label_noise(table4, tmp_path).data
    assert list(data.columns) == ["noise", "method", "who", "acc", "ci95", "n"]
    assert list(data.index) == list(range(16))
    assert data[data["who"] == "paper"]["n"].tolist() == [0] * 8 and data[data["who"] == "paper"]["ci95"].isna().all()
    (c,) = figures["label_noise"].axes[0].containers  # SAM at 40 %, one seed: a point, a zero-length bar
    line, _, (bars,) = c.lines
    assert c.get_label() == "SAM (ours, 95% CI)" and list(line.get_xdata()) == [40] and list(line.get_ydata()) == [80.0]
    (seg,) = bars.get_segments()
    assert seg[0][1] == seg[1][1] == 80.0


def test_rho_sweep_data_row_by_row_whatever_order_the_runs_load_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sweeps (an ASAM one that loads first but sorts second), rho values loading out of order,
    an SGD baseline of two seeds, and a SAM setting run at one rho only (no sweep)."""
    runs = tmp_path / "runs"
    for name, rho, err in (("0b/1", 1.0, 31.0), ("0b/2", 0.5, 30.0)):
        write_run(runs, name, test_err=err, dataset="cifar100", optimizer="asam", adaptive=True, rho=rho, epochs=15)
    write_run(runs, "a1", test_err=9.0, rho=0.2, epochs=15)
    write_run(runs, "a2", test_err=8.0, rho=0.05, epochs=15)
    write_run(runs, "a3/0", test_err=10.0, optimizer="sgd", epochs=15, seed=0)
    write_run(runs, "a3/1", test_err=12.0, optimizer="sgd", epochs=15, seed=1)
    write_run(runs, "c/one_rho", test_err=7.0, rho=0.05, epochs=30)
    figures = _captured(monkeypatch)
    plot = plots.rho_sweep(load_runs(runs).runs, tmp_path)
    half = float(stats.t.ppf(0.975, 1) * np.std([10.0, 12.0], ddof=1) / np.sqrt(2))
    a, b = "rho_cifar10_wrn28_10_basic_15ep", "rho_cifar100_wrn28_10_basic_15ep"
    want = pd.DataFrame([
        [a, "sam", 0.05, 8.0, math.nan, 8.0, 8.0, 1], [a, "sam", 0.2, 9.0, math.nan, 9.0, 9.0, 1],
        [a, "sgd", 0.0, 11.0, half, 10.0, 12.0, 2],
        [b, "asam", 0.5, 30.0, math.nan, 30.0, 30.0, 1], [b, "asam", 1.0, 31.0, math.nan, 31.0, 31.0, 1]],
        columns=["figure", "optimizer", "rho", "mean", "ci95", "min", "max", "n"])
    pd.testing.assert_frame_equal(plot.data, want, check_dtype=False)
    assert [f.name for f in plot.files] == [f"{a}.png", f"{b}.png"]
    ax = figures[a].axes[0]
    (baseline,) = [ln for ln in ax.get_lines() if ln.get_label() == "SGD (n=2)"]
    assert to_hex(baseline.get_color()) == "#1f77b4" and set(baseline.get_ydata()) == {11.0}
    assert [c.get_label() for c in figures[b].axes[0].containers] == ["ASAM (mean ± 95% CI)"]
    assert to_hex(figures[b].axes[0].containers[0].lines[0].get_color()) == "#2ca02c"  # tab:green


def test_a_saved_plot_ignores_the_callers_savefig_settings(tmp_path: Path) -> None:
    """The PNG's pixel size is fixed by the figure (6.4 x 4.2 in at 100 dpi), whatever a user's
    matplotlibrc says about saving (dpi, transparency, cropping)."""
    fig, ax = plots._new_figure()
    ax.plot([0, 1], [0, 1])
    with matplotlib.rc_context({"savefig.dpi": 50, "savefig.format": "svg", "savefig.bbox": "tight"}):
        path = plots.save_figure(fig, tmp_path / "f.png")
    assert_valid_png(path)


def test_sam_runs_at_one_rho_each_draw_no_sweep_and_keep_the_columns(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "a", test_err=5.0, rho=0.05, epochs=15)
    write_run(runs, "b", test_err=6.0, rho=0.1, epochs=30)  # another setting, also one rho
    plot = plots.rho_sweep(load_runs(runs).runs, tmp_path)
    assert plot.files == [] and plot.data.empty
    assert list(plot.data.columns) == ["figure", "optimizer", "rho", "mean", "ci95", "min", "max", "n"]
