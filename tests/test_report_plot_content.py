"""What each report figure draws, read from the matplotlib artists, against the fixture runs.

`test_report_plots.py` checks the DataFrame a plot function returns; here the figure itself is
captured (the module's one save function is wrapped) and its lines, bands, error bars and
baselines are compared with numbers computed in the test from the fixture values. The PNG on
disk is then checked to be that figure: rendering the captured figure again gives its bytes.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from tests.conftest_report import FIX, curve_for, runs_root  # noqa: F401  (fixture)

from sam_repro.report import generate, plots


@pytest.fixture(scope="module")
def drawn(runs_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Figure]:
    """file stem -> the Figure that was saved under it, for one generation of the report."""
    figures: dict[str, Figure] = {}
    save = plots._save

    def capture(fig: Figure, path: Path) -> Path:
        figures[Path(path).stem] = fig
        return save(fig, path)

    mp = pytest.MonkeyPatch()
    mp.setattr(plots, "_save", capture)
    try:
        out = tmp_path_factory.mktemp("plots")
        generate(runs_root, out)
    finally:
        mp.undo()
    for stem, fig in figures.items():  # each file on disk is the captured figure, byte for byte
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, metadata=plots.PNG_METADATA)
        assert (out / f"{stem}.png").read_bytes() == buf.getvalue(), stem
    return figures


def lines_by_label(fig: Figure) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    ax = fig.axes[0]
    return {ln.get_label(): (np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float))
            for ln in ax.get_lines() if not ln.get_label().startswith("_")}


def errorbars(fig: Figure) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """label -> (x, y, half-width of each error bar) of every errorbar drawn."""
    out = {}
    for c in fig.axes[0].containers:
        line, _, (bars,) = c.lines
        segs = bars.get_segments()
        out[c.get_label()] = (np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float),
                              np.array([(s[1][1] - s[0][1]) / 2 for s in segs]))
    return out


def test_learning_curve_lines_are_the_seed_means_and_the_bands_span_min_to_max(drawn) -> None:
    fig = drawn["curves_cifar10_wrn28_10_basic_200ep"]
    lines = lines_by_label(fig)
    assert set(lines) == {"SAM rho=0.05 (n=3)", "SGD (n=5)"}
    for label, finals in (("SAM rho=0.05 (n=3)", FIX["t1_c10_sam"]), ("SGD (n=5)", FIX["t1_c10_sgd"])):
        curves = np.array([curve_for(e) for e in finals])  # seeds x epochs
        x, y = lines[label]
        assert list(x) == [1, 2, 3, 4]
        np.testing.assert_allclose(y, curves.mean(axis=0), rtol=1e-12)
    bands = [c for c in fig.axes[0].collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2
    want = [np.array([curve_for(e) for e in FIX[k]]) for k in ("t1_c10_sam", "t1_c10_sgd")]
    for band, curves in zip(bands, want):  # lines are drawn in label order: SAM, then SGD
        v = band.get_paths()[0].vertices
        for epoch, lo, hi in zip([1, 2, 3, 4], curves.min(axis=0), curves.max(axis=0)):
            ys = v[np.isclose(v[:, 0], epoch), 1]
            assert ys.min() == pytest.approx(lo) and ys.max() == pytest.approx(hi)
    assert fig.axes[0].get_xlabel() == "epoch" and fig.axes[0].get_ylabel() == "test error (%)"


def test_label_noise_figure_shows_the_papers_points_and_our_means_with_their_intervals(drawn) -> None:
    fig = drawn["label_noise"]
    lines = lines_by_label(fig)
    paper = {"SAM (paper)": [95.1, 93.4, 90.5, 77.9], "SGD (paper)": [84.8, 68.8, 48.2, 26.2]}
    for label, acc in paper.items():
        x, y = lines[label]
        assert list(x) == [20, 40, 60, 80] and list(y) == acc
    # ours: only the 20 % cell has runs (n = 3 each): the mean, and the Student-t 95 % interval
    bars = errorbars(fig)
    assert set(bars) == {"SAM (ours, 95% CI)", "SGD (ours, 95% CI)"}
    for method, accs in (("SAM", FIX["t4_sam_acc"]), ("SGD", FIX["t4_sgd_acc"])):
        x, y, half = bars[f"{method} (ours, 95% CI)"]
        assert list(x) == [20] and y == pytest.approx([np.mean(accs)])
        assert half == pytest.approx([stats.t.ppf(0.975, 2) * np.std(accs, ddof=1) / np.sqrt(3)])


def test_rho_sweep_figure_plots_mean_error_per_rho_and_the_sgd_baseline(drawn) -> None:
    fig = drawn["rho_cifar10_wrn28_10_basic_15ep"]
    lines = lines_by_label(fig)
    x, y, half = errorbars(fig)["SAM (mean ± 95% CI)"]
    rhos = sorted(FIX["budget_15ep"])
    assert list(x) == rhos
    np.testing.assert_allclose(y, [np.mean(FIX["budget_15ep"][r]) for r in rhos], rtol=1e-12)
    errs = [FIX["budget_15ep"][r] for r in rhos]  # n = 2, 2, 1: no interval for one seed (drawn as 0)
    want = [stats.t.ppf(0.975, len(e) - 1) * np.std(e, ddof=1) / np.sqrt(len(e)) if len(e) > 1 else 0.0 for e in errs]
    np.testing.assert_allclose(half, want, rtol=1e-9)
    _, base = lines["SGD (n=1)"]
    assert set(base) == {FIX["budget_15ep_sgd"][0]}  # a horizontal line at the SGD error
    assert fig.axes[0].get_xscale() == "log"
