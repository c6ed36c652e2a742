"""The loss-landscape figure of a setting, from the runs' sharpness.json (`sam-sharpness` writes
the slices: sam_repro/sharpness/landscape.py; the report only draws them).

One PNG per setting, in three rows:
- 3D surfaces, one per run with a 2D slice (the SAM paper's Figure 1 view): the same axes and
  z-range for every run, z clipped at one stated level (the median loss over all the runs' grids)
  so that the corners of the grid, hundreds of times the minimum, do not flatten the basin;
- the same 2D slices as filled contours with contour lines at log-spaced levels (as Li et al.
  2018 draw them), the same levels and colours for every run and one colour bar in loss units,
  the lowest grid point marked;
- the 1D slices of every run on one axis, and the linear path between two runs where measured.
The title says what was measured (subset, BatchNorm mode, span, the runs' training done).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.style
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

from sam_repro.report.plots import COLORS, Plot, save_figure
from sam_repro.report.sharpness import FIGURE_GLOB, lookup, read_sharpness, sharpness_table
from sam_repro.report.tables import Table

LEVELS = 20  # contour levels from the lowest to the highest loss of the grids, log-spaced
CMAP = "viridis"
PANEL_IN = 4.6  # width of one 2D/3D panel (inches at 100 dpi): two runs fit README width
COLUMNS = ["figure", "run_dir", "optimizer", "panel", "x", "y", "loss"]


def _curve(section: Any, x: str) -> bool:
    """A drawable 1D section: non-empty lists `x` and `loss` of one length (else it is not drawn)."""
    xs, loss = lookup(section, x), lookup(section, "loss")
    return isinstance(xs, list) and isinstance(loss, list) and 0 < len(xs) == len(loss)


def _grid(section: Any) -> bool:
    """A drawable 2D section: `loss` is a len(alpha) x len(beta) grid of numbers or nulls."""
    alpha, beta, loss = lookup(section, "alpha"), lookup(section, "beta"), lookup(section, "loss")
    if not (isinstance(alpha, list) and isinstance(beta, list) and isinstance(loss, list) and alpha and beta):
        return False
    try:
        return np.asarray(loss, dtype=float).shape == (len(alpha), len(beta))
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class Scale:
    """One scale for every 2D/3D panel of a figure: contour levels, colours and the 3D z-range."""

    lo: float  # the lowest positive loss of the grids (log levels start there)
    hi: float  # the highest
    levels: np.ndarray  # LEVELS log-spaced values from lo to hi (two when the grids are flat)
    clip: float  # the 3D surfaces' z is min(loss, clip), clip the median loss; z runs from 0 to clip

    @property
    def norm(self) -> LogNorm:
        return LogNorm(vmin=self.lo, vmax=self.hi)


def shared_scale(grids: list[np.ndarray]) -> Scale:
    """The scale of a figure's grids (NaN: points not measured; losses <= 0 have no log and are
    left out of the levels, drawn as gaps)."""
    values = np.concatenate([g[np.isfinite(g)].ravel() for g in grids])
    positive = values[values > 0]
    if positive.size == 0:
        return Scale(1.0, 10.0, np.geomspace(1.0, 10.0, LEVELS), 1.0)
    lo, hi = float(positive.min()), float(positive.max())
    if hi <= lo * (1 + 1e-9):  # a flat landscape: one band around its value
        hi = lo * (1 + 1e-6)
        levels = np.array([lo, hi])
    else:
        levels = np.geomspace(lo, hi, LEVELS)
    # the 3D clip: the median of every measured point (not below the lowest level: a z-range to draw)
    return Scale(lo, hi, levels, max(float(np.median(values)), lo))


def minimum(section: dict[str, Any]) -> tuple[float, float, float]:
    """(alpha, beta, loss) of the lowest measured point of a 2D slice."""
    grid = np.asarray(section["loss"], dtype=float)
    i, j = np.unravel_index(np.nanargmin(grid), grid.shape)
    return float(section["alpha"][i]), float(section["beta"][j]), float(grid[i, j])


def nice_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 values in [lo, hi] for a log colour bar; the ends themselves when none fall inside."""
    ticks = [m * 10.0 ** k for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5)]
    inside = [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
    return inside if len(inside) >= 2 else [lo, hi]


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _method(r: Any) -> str:
    return f"{str(r.optimizer).upper()} seed {r.seed}"


def _draw_surface(ax: Any, r: Any, section: dict[str, Any], scale: Scale, extent: tuple) -> None:
    grid = np.asarray(section["loss"], dtype=float)
    b, a = np.meshgrid(np.asarray(section["beta"], float), np.asarray(section["alpha"], float))
    # colour follows height here (0 to the clip): the z axis is this panel's scale
    ax.plot_surface(b, a, np.minimum(grid, scale.clip), cmap=CMAP, norm=Normalize(0.0, scale.clip),
                    rstride=1, cstride=1, linewidth=0.3, edgecolor=(0, 0, 0, 0.35), antialiased=True)
    ma, mb, ml = minimum(section)
    ax.computed_zorder = False  # the star is drawn over the surface, not sorted behind it by depth
    ax.scatter([mb], [ma], [min(ml, scale.clip)], marker="*", s=110, color="red", edgecolors="black",
               linewidths=0.5, depthshade=False, zorder=5)
    ax.set(xlim=extent[:2], ylim=extent[2:], zlim=(0.0, scale.clip), xlabel="beta", ylabel="alpha",
           zlabel=f"training loss, clipped at {_fmt(scale.clip)}")
    for axis in (ax.xaxis, ax.yaxis):  # few, short tick labels: the two axes meet at a corner
        axis.set_major_locator(MaxNLocator(4))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_title(f"{_method(r)}: surface (z clipped at {_fmt(scale.clip)}, the median loss)", fontsize="medium")
    ax.view_init(elev=30, azim=-55)


def _draw_contours(ax: Any, r: Any, section: dict[str, Any], scale: Scale, extent: tuple) -> Any:
    grid = np.asarray(section["loss"], dtype=float)
    beta, alpha = section["beta"], section["alpha"]
    filled = ax.contourf(beta, alpha, grid, levels=scale.levels, cmap=CMAP, norm=scale.norm)
    ax.contour(beta, alpha, grid, levels=scale.levels, colors="black", linewidths=0.5, alpha=0.5)
    ma, mb, ml = minimum(section)
    ax.plot([mb], [ma], marker="*", ms=13, color="red", mec="black", mew=0.6, ls="none")
    ax.set(xlim=extent[:2], ylim=extent[2:], xlabel="beta", ylabel="alpha", aspect="equal")
    ax.set_title(f"{_method(r)}: lowest loss {_fmt(ml)} (star) at alpha {_fmt(ma)}, beta {_fmt(mb)}",
                 fontsize="medium")
    return filled


def _draw_1d(ax: Any, docs: list) -> list[dict[str, Any]]:
    long = []
    for r, d in docs:
        s = d["landscape"]["d1"]
        ax.plot(s["alpha"], s["loss"], "o-", ms=3, color=COLORS.get(r.optimizer, "tab:gray"), label=_method(r))
        long += [{"run_dir": r.run_dir, "optimizer": r.optimizer, "panel": "1d", "x": a, "y": math.nan, "loss": v}
                 for a, v in zip(s["alpha"], s["loss"])]
    ax.set(xlabel="alpha (one filter-normalized direction)", ylabel="training loss", title="1D slice")
    ax.legend(fontsize="small")
    return long


def _draw_interpolation(ax: Any, r: Any, d: dict[str, Any]) -> list[dict[str, Any]]:
    """The first run in method order (SGD) is t = 0, the other run t = 1."""
    s = d["interpolation"]
    other = str(lookup(s, "other", "optimizer"))
    ax.plot(s["t"], s["loss"], "o-", ms=3, color="black")
    ax.axvline(0, color=COLORS.get(r.optimizer, "gray"), ls="--", lw=1, label=f"{r.optimizer.upper()} (t=0)")
    ax.axvline(1, color=COLORS.get(other, "gray"), ls="--", lw=1, label=f"{other.upper()} (t=1)")
    ax.set(xlabel=f"t: weights (1 - t) w_{r.optimizer.upper()} + t w_{other.upper()}", ylabel="training loss",
           title="linear interpolation")
    ax.legend(fontsize="small")
    return [{"run_dir": r.run_dir, "optimizer": r.optimizer, "panel": "interpolation", "x": t, "y": math.nan,
             "loss": v} for t, v in zip(s["t"], s["loss"])]


def _joined(values: Any) -> str:
    return " / ".join(sorted({str(v) for v in values}))


def title(setting: str, g: pd.DataFrame, docs: list) -> str:
    """What was measured, for the figure's title: methods, setting and training done, then the data,
    BatchNorm mode, the directions and their span."""
    names = list(dict.fromkeys(str(r.optimizer).upper() for r, _ in docs))
    methods = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    trained = _joined(g["trained"]) if "trained" in g else "?"
    spans = _joined(_fmt(float(lookup(d, "landscape", "span"))) if isinstance(lookup(d, "landscape", "span"), (int, float))
                    else "?" for _, d in docs)
    return (f"Loss landscape around the {methods} solutions: {setting}\n"
            f"trained {trained}; training loss on {_joined(g['measured_on'])}\n"
            f"filter-normalized random directions (Li et al. 2018), alpha and beta in [-span, span], span {spans}")


def landscape_figures(rows: pd.DataFrame, out: Path) -> Plot:
    """One PNG per setting that has a 1D slice (sharpness.rows order: method, then seed): see the
    module docstring. Returns the numbers drawn, one row per point and panel."""
    if rows.empty:
        return Plot(pd.DataFrame(columns=COLUMNS))
    long, files = [], []
    for setting, g in rows.sort_values(["_order", "seed", "run_dir"], kind="stable").groupby("setting", sort=True):
        docs = [(r, read_sharpness(r.abs_dir)) for r in g.itertuples()]
        docs = [(r, d) for r, d in docs if _curve(lookup(d, "landscape", "d1"), "alpha")]
        if not docs:
            continue
        name = f"sharpness_{setting}"
        two_d = [(r, d) for r, d in docs if _grid(lookup(d, "landscape", "d2"))]
        interp = [(r, d) for r, d in docs if _curve(lookup(d, "interpolation"), "t")]
        drawn_rows = g[g["run_dir"].isin([r.run_dir for r, _ in docs])]
        fig, points = _figure(setting, drawn_rows, docs, two_d, interp)
        long += [{"figure": name, **p} for p in points]
        files.append(save_figure(fig, out / f"{name}.png"))
    return Plot(pd.DataFrame(long, columns=COLUMNS), files)


def _figure(setting: str, g: pd.DataFrame, docs: list, two_d: list, interp: list) -> tuple[Figure, list]:
    n2 = len(two_d)
    bottom = 1 + (1 if interp else 0)
    width = PANEL_IN * max(n2, bottom) + (0.9 if n2 else 0)
    heights = [4.0, 4.0, 3.2] if n2 else [3.4]
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(width, sum(heights) + 0.8), layout="constrained")
        subs = list(np.atleast_1d(fig.subfigures(len(heights), 1, height_ratios=heights)))
        points: list[dict[str, Any]] = []
        if n2:
            points += _grids_rows(subs[0], subs[1], two_d)
        axes = list(np.atleast_1d(subs[-1].subplots(1, bottom)))
        points[:0] = _draw_1d(axes[0], docs)  # the 1D slices first in the data, as before
        if interp:
            points += _draw_interpolation(axes[1], *interp[0])
        fig.suptitle(title(setting, g, docs), fontsize="large")
    return fig, points


def _grids_rows(top: Any, mid: Any, two_d: list) -> list[dict[str, Any]]:
    """The 3D row and the contour row of the runs with a 2D slice, on one Scale."""
    grids = [np.asarray(d["landscape"]["d2"]["loss"], dtype=float) for _, d in two_d]
    scale = shared_scale(grids)
    sections = [d["landscape"]["d2"] for _, d in two_d]
    extent = (min(min(s["beta"]) for s in sections), max(max(s["beta"]) for s in sections),
              min(min(s["alpha"]) for s in sections), max(max(s["alpha"]) for s in sections))
    surfaces = list(np.atleast_1d(top.subplots(1, len(two_d), subplot_kw={"projection": "3d"})))
    contours = list(np.atleast_1d(mid.subplots(1, len(two_d))))
    points, filled = [], None
    for (r, d), s, grid, ax3, ax2 in zip(two_d, sections, grids, surfaces, contours):
        _draw_surface(ax3, r, s, scale, extent)
        filled = _draw_contours(ax2, r, s, scale, extent)
        points += [{"run_dir": r.run_dir, "optimizer": r.optimizer, "panel": "2d", "x": a, "y": b,
                    "loss": grid[i, j]} for i, a in enumerate(s["alpha"]) for j, b in enumerate(s["beta"])]
    bar = mid.colorbar(filled, ax=contours, label="training loss (log scale; same levels for every run)")
    bar.ax.yaxis.set_major_locator(FixedLocator(nice_ticks(scale.lo, scale.hi)))
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    bar.ax.yaxis.set_minor_locator(NullLocator())
    return points


def generate(runs: pd.DataFrame, out: Path) -> tuple[Table, Plot]:
    """The sharpness table and the landscape figures of every run that has a sharpness.json (the
    figures of settings no longer measured are removed)."""
    for stale in out.glob(FIGURE_GLOB):
        stale.unlink()
    table, rows = sharpness_table(runs)
    return table, landscape_figures(rows, out)
