"""sam_repro.report.plots: valid PNGs, and the numbers behind each figure match the fixture runs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tests.conftest_report import FIX, curve_for, report, runs_root  # noqa: F401  (fixtures)
from PIL import Image
from scipy import stats

from sam_repro.report import plots
from sam_repro.report.load import load_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000  # a drawn figure, not an empty canvas
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size == (640, 420)
        assert "Software" not in im.info  # no version string: the bytes do not change with matplotlib


def test_every_plot_file_is_a_valid_png(report) -> None:
    files = [f for p in report.plots.values() for f in p.files]
    assert sorted(f.name for f in files) == [
        "curves_cifar10_wrn28_10_basic_15ep.png",
        "curves_cifar10_wrn28_10_basic_200ep.png",
        "label_noise.png",
        "rho_cifar10_wrn28_10_basic_15ep.png",
    ]
    for f in files:
        assert_valid_png(f)


def test_learning_curves_data_is_the_seed_mean_min_and_max(report) -> None:
    data = report.plots["learning curves"].data
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


def test_label_noise_data_has_ours_and_the_papers_points(report) -> None:
    data = report.plots["label noise"].data.set_index(["who", "method", "noise"])
    sam = FIX["t4_sam_acc"]
    assert data.loc[("ours", "sam", 20), "acc"] == pytest.approx(np.mean(sam))
    half = stats.t.ppf(0.975, 2) * np.std(sam, ddof=1) / np.sqrt(3)
    assert data.loc[("ours", "sam", 20), "ci95"] == pytest.approx(half)
    assert data.loc[("ours", "sgd", 20), "acc"] == pytest.approx(np.mean(FIX["t4_sgd_acc"]))
    assert data.loc[("ours", "sam", 80), "n"] == 0  # the rho-0.1 run at 80 % is not the paper's
    paper = {20: (95.1, 84.8), 40: (93.4, 68.8), 60: (90.5, 48.2), 80: (77.9, 26.2)}
    for noise, (s, g) in paper.items():
        assert (data.loc[("paper", "sam", noise), "acc"], data.loc[("paper", "sgd", noise), "acc"]) == (s, g)


def test_rho_sweep_data_per_rho_with_the_sgd_baseline(report) -> None:
    data = report.plots["rho sweep"].data
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
