"""What each report figure draws, read from the matplotlib artists, against the fixture runs.

`test_report_plots.py` checks the DataFrame a plot function returns, `test_report_generate.py` that
each PNG generate writes is the figure drawn; here the figure itself is captured (the module's one
save function is replaced: conftest_report.plotted) and its lines, bands, error bars and baselines
are compared with numbers computed in the test from the fixture values.
"""
from __future__ import annotations


import numpy as np
import pytest
from scipy import stats
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from tests.report.conftest_report import FIX, cells, curve_for, plotted, runs_root  # noqa: F401  (fixtures)


@pytest.fixture
def drawn(plotted) -> dict[str, Figure]:
    """file stem -> the Figure drawn for it (test_report_generate.py checks that the PNG is this figure)."""
    return plotted.figures


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
    assert fig.axes[0].get_xlabel() == "epochs trained" and fig.axes[0].get_ylabel() == "test error (%)"


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


def describe(fig: Figure) -> dict:
    """What a reader sees of a figure, as plain values: size, texts, scales, and every artist's style."""
    ax = fig.axes[0]
    legend = ax.get_legend()

    def face(line) -> str:
        mfc = line.get_markerfacecolor()
        return mfc if mfc == "none" else to_hex(mfc)

    return {
        "size": [float(v) for v in fig.get_size_inches()], "layout": type(fig.get_layout_engine()).__name__,
        "title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(), "xscale": ax.get_xscale(),
        "xticks": [t.get_text() for t in ax.get_xticklabels()],
        "legend": [legend.get_title().get_text(), [t.get_text() for t in legend.get_texts()],
                   float(legend.get_texts()[0].get_fontsize())],
        "lines": [[ln.get_label(), to_hex(ln.get_color()), ln.get_linestyle(), ln.get_marker(),
                   float(ln.get_linewidth()), float(ln.get_markersize()), face(ln)] for ln in ax.get_lines()],
        "bands": [[to_hex(c.get_facecolor()[0], keep_alpha=True), float(c.get_linewidth()[0])]
                  for c in ax.collections if isinstance(c, PolyCollection)],
    }


RED, BLUE, ORANGE, PURPLE = "#d62728", "#1f77b4", "#ff7f0e", "#9467bd"  # tab: SAM, SGD, then more SAM lines
FRAME = {"size": [6.4, 4.2], "layout": "ConstrainedLayoutEngine"}
SMALL = 8.33  # fontsize="small" of the default 10 pt
CAPS = 6.0  # capsize 3 -> cap markers of size 6


def curve_line(label: str, color: str) -> list:
    return [label, color, "-", "None", 1.2, 6.0, color]


def bar_lines(color: str, fmt_marker: str) -> list:  # an errorbar: its line, then the two caps
    return [["_nolegend_", color, "-", fmt_marker, 1.5, 6.0, color],
            ["_nolegend_", color, "None", "_", 1.5, CAPS, color], ["_nolegend_", color, "None", "_", 1.5, CAPS, color]]


FIGURES = {
    "curves_cifar10_wrn28_10_basic_200ep": {
        **FRAME, "title": "cifar10_wrn28_10_basic_200ep", "xlabel": "epochs trained", "ylabel": "test error (%)",
        "xscale": "linear", "xticks": ["0", "1", "2", "3", "4", "5"],
        "legend": ["mean, min-max band over seeds", ["SAM rho=0.05 (n=3)", "SGD (n=5)"], SMALL],
        "lines": [curve_line("SAM rho=0.05 (n=3)", RED), curve_line("SGD (n=5)", BLUE)],
        "bands": [[RED + "33", 0.0], [BLUE + "33", 0.0]]},  # alpha 0.2, no edge
    "curves_cifar10_wrn28_10_basic_15ep": {  # three SAM rho values: red, then the spare colors in turn
        **FRAME, "title": "cifar10_wrn28_10_basic_15ep", "xlabel": "epochs trained", "ylabel": "test error (%)",
        "xscale": "linear", "xticks": ["0", "1", "2", "3", "4", "5"],
        "legend": ["mean, min-max band over seeds", ["SAM rho=0.05 (n=2)", "SAM rho=0.1 (n=2)", "SAM rho=0.2 (n=1)",
                                                    "SGD (n=1)"], SMALL],
        "lines": [curve_line("SAM rho=0.05 (n=2)", RED), curve_line("SAM rho=0.1 (n=2)", ORANGE),
                  curve_line("SAM rho=0.2 (n=1)", PURPLE), curve_line("SGD (n=1)", BLUE)],
        "bands": [[c + "33", 0.0] for c in (RED, ORANGE, PURPLE, BLUE)]},
    "label_noise": {
        **FRAME, "title": "CIFAR-10, ResNet-32: label noise", "xlabel": "label noise (%)",
        "ylabel": "clean test accuracy (%)", "xscale": "linear", "xticks": ["20", "40", "60", "80"],
        "legend": ["", ["SAM (paper)", "SGD (paper)", "SAM (ours, 95% CI)", "SGD (ours, 95% CI)"], SMALL],
        "lines": [*bar_lines(RED, "s"), *bar_lines(BLUE, "s"),  # ours: solid squares with caps
                  ["SAM (paper)", RED, "--", "o", 1.5, 6.0, "none"],  # the paper: dashed, hollow circles
                  ["SGD (paper)", BLUE, "--", "o", 1.5, 6.0, "none"]],
        "bands": []},
    "rho_cifar10_wrn28_10_basic_15ep": {
        **FRAME, "title": "cifar10_wrn28_10_basic_15ep", "xlabel": "rho", "ylabel": "final test error (%)",
        "xscale": "log", "xticks": ["0.05", "0.1", "0.2"],  # a tick at each rho run, none between
        "legend": ["", ["SGD (n=1)", "SAM (mean ± 95% CI)"], SMALL],
        "lines": [*bar_lines(RED, "o"), ["SGD (n=1)", BLUE, "--", "None", 1.5, 6.0, BLUE]],
        "bands": []},
}


@pytest.mark.parametrize("stem", sorted(FIGURES))
def test_each_figure_is_drawn_as_specified(drawn, stem: str) -> None:
    assert describe(drawn[stem]) == FIGURES[stem]
    if FIGURES[stem]["xscale"] == "log":  # a log axis would add minor ticks between the rho values
        assert len(drawn[stem].axes[0].xaxis.get_minorticklocs()) == 0


def test_the_figures_are_exactly_these(drawn) -> None:
    assert sorted(drawn) == sorted(FIGURES)
