"""The report's loss-landscape figure (sam_repro.report.landscape), read from the matplotlib artists
and checked against numbers computed here from the sharpness.json files the tests write: the
contour levels, the one scale the runs share, the 3D clip, the lowest point's marker, the title."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import LogNorm, to_rgba
from matplotlib.layout_engine import ConstrainedLayoutEngine
from mpl_toolkits.mplot3d import Axes3D
from tests.report.conftest_report import write_run
from tests.mutation_scope import module_scope
from tests.report.test_report_sharpness import ON_512, put, sdoc

from sam_repro.report import landscape as L
from sam_repro.report import sharpness as S
from sam_repro.report.load import load_runs

C10 = "cifar10_wrn28_10_basic_200ep"
C100 = "cifar100_wrn28_10_basic_200ep"
ALPHA, BETA = [-1.0, 0.0, 1.0], [-0.5, 0.5]


def landscape(d1_loss: list[float], d2_loss: list[list[float]] | None = None, span: float | None = 1.0) -> dict:
    out: dict = {"d1": {"alpha": ALPHA, "loss": d1_loss}}
    if span is not None:
        out["span"] = span
    if d2_loss is not None:
        out["d2"] = {"alpha": ALPHA, "beta": BETA, "loss": d2_loss}
    return out


def capture_figures(monkeypatch: pytest.MonkeyPatch, save: bool = False) -> list:
    """Record each figure landscape_figures saves (and write it only when `save`)."""
    figures = []
    real = L.save_figure

    def record(fig, path):
        figures.append(fig)
        return real(fig, path) if save else path

    monkeypatch.setattr(L, "save_figure", record)
    return figures


def check_line(line, x, y, color, *, marker="o", ls="-", ms=3.0, label=None) -> None:
    np.testing.assert_array_equal(np.asarray(line.get_xdata(), dtype=float), x)
    np.testing.assert_array_equal(np.asarray(line.get_ydata(), dtype=float), y)
    assert to_rgba(line.get_color()) == to_rgba(color)
    assert (line.get_marker(), line.get_linestyle()) == (marker, ls)
    if marker == "o":
        assert line.get_markersize() == ms
    if label is not None:
        assert line.get_label() == label


def legend(ax) -> list[str]:
    texts = ax.get_legend().get_texts()
    assert all(t.get_fontsize() == pytest.approx(8.33) for t in texts)  # "small" in the default style
    return [t.get_text() for t in texts]


def panels(fig) -> list[list]:
    """The axes of each row (subfigure), top to bottom."""
    return [list(sub.axes) for sub in fig.subfigs]


# -- the shared scale, the lowest point, the colour bar's ticks -------------------------------------

def test_shared_scale_is_log_spaced_over_every_grid_and_clips_at_the_median() -> None:
    a = np.array([[1.0, np.nan], [2.0, 300.0]])
    b = np.array([[np.nan, 7.5], [0.5, 4.0]])
    for grids in ([a, b], [b, a]):  # the order of the runs does not matter
        scale = L.shared_scale(grids)
        assert (scale.lo, scale.hi) == (0.5, 300.0)
        levels = scale.levels
        assert levels[0] == pytest.approx(0.5, rel=1e-12) and levels[-1] == pytest.approx(300.0, rel=1e-12)
        ratios = levels[1:] / levels[:-1]
        np.testing.assert_allclose(ratios, (300.0 / 0.5) ** (1 / (len(levels) - 1)), rtol=1e-12)  # log-spaced
        assert len(levels) == L.LEVELS
        assert scale.clip == statistics.median([1.0, 2.0, 300.0, 7.5, 0.5, 4.0])  # 3.0: NaN left out
        assert isinstance(scale.norm, LogNorm) and (scale.norm.vmin, scale.norm.vmax) == (0.5, 300.0)


def test_shared_scale_of_a_flat_or_a_non_positive_landscape() -> None:
    flat = L.shared_scale([np.full((2, 2), 2.0), np.array([[2.0, np.nan]])])
    assert len(flat.levels) == 2 and flat.levels[0] == 2.0 and flat.levels[1] > 2.0  # one band, still drawable
    assert flat.clip == 2.0
    zeros = L.shared_scale([np.array([[0.0, 4.0], [1.0, 2.0]])])  # a loss of 0 has no log: levels from 1
    assert (zeros.lo, zeros.hi) == (1.0, 4.0) and zeros.clip == statistics.median([0.0, 4.0, 1.0, 2.0])
    none = L.shared_scale([np.array([[0.0, np.nan]])])
    assert none.levels[0] < none.levels[-1]  # nothing positive: still a valid log scale


def test_minimum_is_the_lowest_measured_grid_point() -> None:
    section = {"alpha": ALPHA, "beta": BETA, "loss": [[3.0, None], [2.0, 0.25], [0.5, 9.0]]}
    assert L.minimum(section) == (0.0, 0.5, 0.25)
    section["loss"][2][0] = 0.1
    assert L.minimum(section) == (1.0, -0.5, 0.1)


def test_nice_ticks_are_1_2_5_values_inside_the_range() -> None:
    assert L.nice_ticks(1.42, 1277.0) == pytest.approx([2, 5, 10, 20, 50, 100, 200, 500, 1000])
    assert L.nice_ticks(0.9, 200.0) == pytest.approx([1, 2, 5, 10, 20, 50, 100, 200])
    assert L.nice_ticks(0.003, 0.004) == [0.003, 0.004]  # no 1-2-5 value inside: the ends


# -- the figure ----------------------------------------------------------------------------------

SGD_GRID = [[40.0, 8.0], [1.5, 3.0], [200.0, 20.0]]  # lowest at alpha 0, beta -0.5
SAM_GRID = [[10.0, None], [2.0, 0.9], [30.0, 5.0]]  # JSON null: a point not measured; lowest at alpha 0, beta 0.5
INTERP = {"t": [0.0, 0.5, 1.0], "loss": [0.5, 1.5, 0.6], "other": {"optimizer": "sam"}}
STEPS, BATCH = 150, 128  # the runs of the figure test are step-limited: 150 steps of batch 128 of 50,000 images
C10S = "cifar10_wrn28_10_basic_150steps_bs128"


def write_figure_runs(root: Path) -> pd.DataFrame:
    budget = {"train_steps": STEPS, "batch_size": BATCH}
    put(write_run(root, "z_sgd", test_err=3.0, optimizer="sgd", **budget),
        sdoc(40, 8, 300, landscape=landscape([2.0, 0.5, 2.5], SGD_GRID), interpolation=INTERP))
    put(write_run(root, "a_sam1", test_err=2.5, seed=1, **budget),
        sdoc(20, 5, 150, landscape=landscape([1.5, 0.4, 1.6]),
             interpolation={"t": [0.0, 1.0], "loss": [9.0, 9.0], "other": {"optimizer": "sgd"}}))
    put(write_run(root, "b_sam0", test_err=2.6, seed=0, **budget),
        sdoc(21, 5, 155, landscape=landscape([1.4, 0.3, 1.7], SAM_GRID)))
    put(write_run(root, "c_adam", test_err=4.0, optimizer="adam", seed=0, **budget),
        sdoc(50, 9, 400, landscape=landscape([3.0, 1.0, 3.0])))
    put(write_run(root, "d_sam2", test_err=2.7, seed=2, **budget), sdoc(22, 5, 156, landscape={"d1": {}}))  # not drawn
    put(write_run(root, "e_sam3", test_err=2.8, seed=3, **budget), sdoc(23, 5, 157))  # no landscape: not drawn
    # cifar100 sorts first and has no 1D slice: no figure for it, and cifar10's still comes.
    put(write_run(root, "y_c100", test_err=19.0, optimizer="sgd", dataset="cifar100"),
        sdoc(30, 3, 200, landscape={"d2": {"alpha": ALPHA, "beta": BETA, "loss": SGD_GRID}}, interpolation=INTERP))
    return load_runs(root).runs


@pytest.fixture(scope=module_scope)
def drawn(tmp_path_factory: pytest.TempPathFactory):
    """(the Plot, its one Figure, the out folder) of the figure runs, drawn under a hostile rc
    (module scope: drawn once for the tests that read it)."""
    _, rows = S.sharpness_table(write_figure_runs(tmp_path_factory.mktemp("runs")))
    out = tmp_path_factory.mktemp("out")
    with pytest.MonkeyPatch.context() as mp:
        figures = capture_figures(mp)  # drawn, not rendered: the PNG bytes are tested in test_report_sharpness.py
        with matplotlib.rc_context({"axes.facecolor": "yellow", "image.cmap": "plasma", "legend.fontsize": "large"}):
            plot = L.landscape_figures(rows, out)
    assert len(figures) == 1
    return plot, figures[0], out


def test_the_figure_has_3d_contour_and_1d_rows(drawn) -> None:
    plot, fig, out = drawn
    assert plot.files == [out / f"sharpness_{C10S}.png"]
    assert isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)
    surfaces, contours, bottom = panels(fig)
    assert len(surfaces) == 2 and all(isinstance(ax, Axes3D) for ax in surfaces)
    assert len(contours) == 3  # two contour maps and their one colour bar
    assert len(bottom) == 2  # the 1D slices and the interpolation
    assert tuple(fig.get_size_inches()) == pytest.approx((L.PANEL_IN * 2 + 0.9, 4.0 + 4.0 + 3.2 + 0.8))
    assert to_rgba(bottom[0].get_facecolor()) == to_rgba("white")  # the default style, not the caller's rcParams


def test_contour_maps_share_log_levels_colours_and_mark_the_lowest_point(drawn) -> None:
    _, fig, _ = drawn
    _, (sgd2d, sam2d, cbar), _ = panels(fig)
    finite = [v for grid in (SGD_GRID, SAM_GRID) for row in grid for v in row if v is not None]
    lo, hi = min(finite), max(finite)  # 0.9 (SAM) and 200 (SGD): one scale for both runs
    want_levels = np.geomspace(lo, hi, L.LEVELS)
    for ax, grid, who in ((sgd2d, SGD_GRID, "SGD seed 0"), (sam2d, SAM_GRID, "SAM seed 0")):
        filled, lines = ax.collections
        assert filled.filled and not lines.filled
        for cs in (filled, lines):
            np.testing.assert_allclose(cs.levels, want_levels, rtol=1e-12)
        assert filled.cmap.name == "viridis" and isinstance(filled.norm, LogNorm)
        assert (filled.norm.vmin, filled.norm.vmax) == (lo, hi)
        # the lowest measured point, found here by scanning the grid
        points = [(v, ALPHA[i], BETA[j]) for i, row in enumerate(grid) for j, v in enumerate(row) if v is not None]
        low, a, b = min(points)
        (star,) = ax.get_lines()
        assert star.get_marker() == "*" and (star.get_xdata().tolist(), star.get_ydata().tolist()) == ([b], [a])
        assert ax.get_title() == f"{who}: lowest loss {low:g} (star) at alpha {a:g}, beta {b:g}"
        assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_aspect()) == ("beta", "alpha", 1.0)
        assert ax.get_xlim() == (-0.5, 0.5) and ax.get_ylim() == (-1.0, 1.0)  # x: beta, y: alpha
    assert sam2d.collections[0].colorbar.ax is cbar and sgd2d.collections[0].colorbar is None
    assert cbar.get_ylabel() == "training loss (log scale; same levels for every run)"
    ticks = cbar.get_yticks()
    assert ticks.tolist() == pytest.approx([1, 2, 5, 10, 20, 50, 100, 200])  # in loss units, inside [0.9, 200]
    fmt = cbar.yaxis.get_major_formatter()
    assert [fmt(t, i) for i, t in enumerate(ticks)] == ["1", "2", "5", "10", "20", "50", "100", "200"]


def test_surfaces_share_axes_and_z_range_clipped_at_the_median_loss(drawn) -> None:
    _, fig, _ = drawn
    (sgd3d, sam3d), _, _ = panels(fig)
    finite = [v for grid in (SGD_GRID, SAM_GRID) for row in grid for v in row if v is not None]
    clip = statistics.median(finite)  # 8.0: the corners (up to 200) would flatten the basin
    assert clip == 8.0
    for ax, grid, who in ((sgd3d, SGD_GRID, "SGD seed 0"), (sam3d, SAM_GRID, "SAM seed 0")):
        assert ax.get_zlim() == (0.0, clip) and ax.get_xlim() == (-0.5, 0.5) and ax.get_ylim() == (-1.0, 1.0)
        assert ax.get_title() == f"{who}: surface (z clipped at 8, the median loss)"
        assert ax.get_zlabel() == "training loss, clipped at 8"
        surface, star = ax.collections
        # each face's colour value is the mean height of its measured corners, the heights clipped
        z = np.minimum(np.array(grid, dtype=float), clip)
        faces = [np.nanmean([z[i, j], z[i, j + 1], z[i + 1, j], z[i + 1, j + 1]])
                 for i in range(len(ALPHA) - 1) for j in range(len(BETA) - 1)]
        np.testing.assert_allclose(surface.get_array(), faces, rtol=1e-12)
        assert surface.get_array().max() <= clip
        points = [(v, ALPHA[i], BETA[j]) for i, row in enumerate(grid) for j, v in enumerate(row) if v is not None]
        low, a, b = min(points)
        xs, ys, zs = (np.asarray(c, dtype=float).tolist() for c in star._offsets3d)
        assert (xs, ys, zs) == ([b], [a], [min(low, clip)])


def test_title_says_what_was_measured_and_the_training_done(drawn) -> None:
    _, fig, _ = drawn
    per_epoch = 50000 // BATCH  # write_run's training set: 50,000 images; the loader drops the partial batch
    trained = f"{STEPS / per_epoch:.2f} epochs ({STEPS} steps, {STEPS * BATCH:,} images)"
    assert trained == "0.38 epochs (150 steps, 19,200 images)"
    assert fig._suptitle.get_text() == (
        f"Loss landscape around the SGD, SAM and ADAM solutions: {C10S}\n"
        f"trained {trained}; training loss on {ON_512}\n"
        "filter-normalized random directions (Li et al. 2018), alpha and beta in [-span, span], span 1")


def test_1d_slices_interpolation_and_the_numbers_behind_the_figure(drawn) -> None:
    plot, fig, _ = drawn
    _, _, (one, lin) = panels(fig)
    # 1D: every run with a slice, in method order (SGD, SAM, others), then seed.
    assert (one.get_title(), one.get_xlabel(), one.get_ylabel()) == (
        "1D slice", "alpha (one filter-normalized direction)", "training loss")
    lines = one.get_lines()
    assert len(lines) == 4
    check_line(lines[0], ALPHA, [2.0, 0.5, 2.5], "tab:blue", label="SGD seed 0")
    check_line(lines[1], ALPHA, [1.4, 0.3, 1.7], "tab:red", label="SAM seed 0")
    check_line(lines[2], ALPHA, [1.5, 0.4, 1.6], "tab:red", label="SAM seed 1")
    check_line(lines[3], ALPHA, [3.0, 1.0, 3.0], "tab:gray", label="ADAM seed 0")
    assert legend(one) == ["SGD seed 0", "SAM seed 0", "SAM seed 1", "ADAM seed 0"]
    # Interpolation: the first run in method order that has one (SGD at t = 0, the other run at t = 1).
    assert (lin.get_title(), lin.get_xlabel(), lin.get_ylabel()) == (
        "linear interpolation", "t: weights (1 - t) w_SGD + t w_SAM", "training loss")
    curve, v0, v1 = lin.get_lines()
    check_line(curve, [0.0, 0.5, 1.0], [0.5, 1.5, 0.6], "black")
    check_line(v0, [0, 0], [0, 1], "tab:blue", marker="None", ls="--", label="SGD (t=0)")
    check_line(v1, [1, 1], [0, 1], "tab:red", marker="None", ls="--", label="SAM (t=1)")
    assert legend(lin) == ["SGD (t=0)", "SAM (t=1)"]
    name, nan = f"sharpness_{C10S}", math.nan
    want = [(name, "z_sgd", "sgd", "1d", a, nan, v) for a, v in zip(ALPHA, [2.0, 0.5, 2.5])]
    want += [(name, "b_sam0", "sam", "1d", a, nan, v) for a, v in zip(ALPHA, [1.4, 0.3, 1.7])]
    want += [(name, "a_sam1", "sam", "1d", a, nan, v) for a, v in zip(ALPHA, [1.5, 0.4, 1.6])]
    want += [(name, "c_adam", "adam", "1d", a, nan, v) for a, v in zip(ALPHA, [3.0, 1.0, 3.0])]
    for run, opt, grid in [("z_sgd", "sgd", SGD_GRID), ("b_sam0", "sam", SAM_GRID)]:
        want += [(name, run, opt, "2d", a, b, nan if grid[i][j] is None else grid[i][j])
                 for i, a in enumerate(ALPHA) for j, b in enumerate(BETA)]
    want += [(name, "z_sgd", "sgd", "interpolation", t, nan, v) for t, v in zip([0.0, 0.5, 1.0], [0.5, 1.5, 0.6])]
    expected = pd.DataFrame(want, columns=["figure", "run_dir", "optimizer", "panel", "x", "y", "loss"])
    pd.testing.assert_frame_equal(plot.data, expected, check_dtype=False)


def test_landscape_figures_1d_and_interpolation_without_colors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    interp = {"t": [0.0, 1.0], "loss": [1.0, 2.0]}  # the other run not named
    put(write_run(tmp_path, "a", test_err=4.0, optimizer="adam", seed=5),
        sdoc(50, 9, 400, landscape=landscape([3.0, 1.0, 3.0], span=None), interpolation=interp))
    put(write_run(tmp_path, "b", test_err=4.0, optimizer="adam", seed=6),
        sdoc(50, 9, 400, landscape=landscape([3.0, 2.0, 3.0], span=0.5), interpolation={"t": [], "loss": []}))
    _, rows = S.sharpness_table(load_runs(tmp_path).runs)
    figures = capture_figures(monkeypatch)
    plot = L.landscape_figures(rows, tmp_path)
    assert plot.files == [tmp_path / f"sharpness_{C10}.png"]
    (fig,) = figures
    assert tuple(fig.get_size_inches()) == pytest.approx((L.PANEL_IN * 2, 3.4 + 0.8))
    ((one, lin),) = panels(fig)  # no 2D slice: no surface, no contour map, no colour bar
    assert [line.get_label() for line in one.get_lines()] == ["ADAM seed 5", "ADAM seed 6"]
    curve, v0, v1 = lin.get_lines()
    check_line(curve, [0.0, 1.0], [1.0, 2.0], "black")
    check_line(v0, [0, 0], [0, 1], "gray", marker="None", ls="--", label="ADAM (t=0)")
    check_line(v1, [1, 1], [0, 1], "gray", marker="None", ls="--", label="NONE (t=1)")
    assert fig._suptitle.get_text().endswith("span 0.5 / ?")  # each run's span; one not recorded
    assert "trained 200 epochs;" in fig._suptitle.get_text()
    assert list(plot.data["panel"]) == ["1d"] * 6 + ["interpolation"] * 2
    assert list(plot.data["run_dir"]) == ["a"] * 3 + ["b"] * 3 + ["a"] * 2


def test_landscape_figures_1d_only_one_figure_per_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # In method order cifar10's SGD run comes first; the figures still come in the settings' order.
    put(write_run(tmp_path, "a", test_err=4.0, optimizer="sgd"), sdoc(50, 9, 400, landscape=landscape([3.0, 1.0, 3.0])))
    put(write_run(tmp_path, "b", test_err=4.0, dataset="cifar100"), sdoc(50, 9, 400, landscape=landscape([5.0, 4.0, 6.0])))
    _, rows = S.sharpness_table(load_runs(tmp_path).runs)
    figures = capture_figures(monkeypatch)
    plot = L.landscape_figures(rows, tmp_path)
    assert plot.files == [tmp_path / f"sharpness_{C100}.png", tmp_path / f"sharpness_{C10}.png"]
    assert [fig._suptitle.get_text().split("\n")[0] for fig in figures] == [
        f"Loss landscape around the SAM solutions: {C100}", f"Loss landscape around the SGD solutions: {C10}"]
    for fig, label, loss in zip(figures, ["SAM seed 0", "SGD seed 0"], [[5.0, 4.0, 6.0], [3.0, 1.0, 3.0]]):
        ((ax,),) = panels(fig)
        assert tuple(fig.get_size_inches()) == pytest.approx((L.PANEL_IN, 3.4 + 0.8))
        assert legend(ax) == [label] and ax.get_lines()[0].get_ydata().tolist() == loss
    assert list(plot.data.columns) == ["figure", "run_dir", "optimizer", "panel", "x", "y", "loss"]
    assert plot.data[["figure", "run_dir", "optimizer", "panel"]].drop_duplicates().values.tolist() == [
        [f"sharpness_{C100}", "b", "sam", "1d"], [f"sharpness_{C10}", "a", "sgd", "1d"]]
    assert plot.data["x"].tolist() == ALPHA * 2 and plot.data["loss"].tolist() == [5.0, 4.0, 6.0, 3.0, 1.0, 3.0]
    assert plot.data["y"].isna().all()


def test_landscape_figures_without_rows_or_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = capture_figures(monkeypatch)
    plot = L.landscape_figures(pd.DataFrame(), tmp_path)
    assert plot.files == [] and plot.data.empty
    assert list(plot.data.columns) == ["figure", "run_dir", "optimizer", "panel", "x", "y", "loss"]
    put(write_run(tmp_path / "runs", "a", test_err=4.0), sdoc(50, 9, 400))
    _, rows = S.sharpness_table(load_runs(tmp_path / "runs").runs)
    plot = L.landscape_figures(rows, tmp_path)
    assert plot.files == [] and plot.data.empty and figures == []
    assert list(plot.data.columns) == ["figure", "run_dir", "optimizer", "panel", "x", "y", "loss"]


def test_generate_replaces_stale_figures_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for stale in ("sharpness_old.png", "sharpness_x_y.png"):
        (out / stale).write_bytes(b"old")
    for keep in ("sharpness.png", "sharpness.md", "sharpness_old.csv", "curves_a.png", "xsharpness_a.png"):
        (out / keep).write_bytes(b"keep")
    root = tmp_path / "runs"
    put(write_run(root, "a", test_err=4.0, optimizer="sgd"), sdoc(50, 9, 400, landscape=landscape([3.0, 1.0, 3.0])))
    write_run(root, "b", test_err=4.0)
    figures = capture_figures(monkeypatch, save=True)
    table, plot = L.generate(load_runs(root).runs, out)
    assert table.display[["setting", "method", "n", "lambda_max"]].values.tolist() == [[C10, "SGD", "1", "50"]]
    assert plot.files == [out / f"sharpness_{C10}.png"] and len(figures) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["sharpness.png", "sharpness.md", "sharpness_old.csv", "curves_a.png", "xsharpness_a.png", f"sharpness_{C10}.png"])
    assert all((out / k).read_bytes() == b"keep" for k in ("sharpness.png", "sharpness.md", "curves_a.png"))
    # Nothing measured any more: the old figure goes too.
    (root / "a" / "sharpness.json").unlink()
    table, plot = L.generate(load_runs(root).runs, out)
    assert table.display.empty and plot.files == [] and not (out / f"sharpness_{C10}.png").exists()


def test_malformed_sections_are_left_out_and_never_crash_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run directory cannot crash the report: a malformed m-sharpness cell or landscape section is
    left out, the rest of that run's document is still shown."""
    figures = capture_figures(monkeypatch)
    runs = tmp_path / "runs"
    good_d1 = {"alpha": [-1.0, 0.0, 1.0], "loss": [2.0, 1.0, 2.0]}
    bad_cells = [{"m": 16, "rho": None, "value": 0.1}, "not a cell", {"m": 16, "rho": "0.05", "value": 0.2},
                 {"m": 32, "rho": 0.05, "value": 0.3}]
    put(write_run(runs, "a", test_err=4.0, seed=0), sdoc(50, 9, 400, bad_cells, landscape={
        "d1": good_d1, "d2": {"alpha": [0.0, 1.0], "beta": [0.0, 1.0], "loss": [[1.0, 2.0], [3.0]]}},
        interpolation={"t": [0.0, 1.0], "loss": [1.0]}))
    put(write_run(runs, "b", test_err=4.0, seed=1), sdoc(50, 9, 400, landscape={"d1": {"alpha": [0.0], "loss": None}}))
    rows = S.sharpness_rows(load_runs(runs).runs)
    assert [c for c in rows.columns if c.startswith("m-sharpness")] == ["m-sharpness m=32 rho=0.05"]
    table, rows = S.sharpness_table(load_runs(runs).runs)
    plot = L.landscape_figures(rows, tmp_path)
    assert len(figures) == 1 and panels(figures[0]) == [[figures[0].subfigs[0].axes[0]]]  # the 1D slice of run a only
    assert set(plot.data["panel"]) == {"1d"} and set(plot.data["run_dir"]) == {"a"}
    assert L._grid({"alpha": [0.0], "beta": [0.0, 1.0], "loss": [[1.0, None]]})  # a null point is drawn as a gap
    assert not L._grid({"alpha": [0.0], "beta": [0.0], "loss": [["x"]]})
    assert not L._curve({"alpha": [], "loss": []}, "alpha")


def test_a_drawable_section_holds_lists_of_matching_lengths() -> None:
    """`_curve`/`_grid` decide what landscape_figures draws: JSON lists only, one point is enough."""
    assert L._curve({"alpha": [0.0], "loss": [1.0]}, "alpha")  # a single point is still a curve
    assert not L._curve({"alpha": [0.0, 1.0], "loss": [1.0]}, "alpha")
    assert not L._curve({"alpha": "01", "loss": [1.0, 2.0]}, "alpha")
    grid = {"alpha": [0.0, 1.0], "beta": [0.0, 1.0], "loss": [[1.0, 2.0], [3.0, 4.0]]}
    assert L._grid(grid)
    for key, bad in (("alpha", "01"), ("beta", "01"), ("alpha", []), ("beta", [])):
        assert not L._grid({**grid, key: bad}), (key, bad)  # a string has a length, but it is not a list of values
    assert not L._grid({**grid, "loss": [[1.0, 2.0]]})
