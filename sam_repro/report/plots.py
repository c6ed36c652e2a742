"""Plots next to the tables: learning curves, label noise, rho sweeps, the methods side by side
(PNG, byte-reproducible).

Each function returns a `Plot`: the DataFrame it drew (so tests can check the numbers behind a
figure) and the files it wrote. Figures are plain `matplotlib.figure.Figure`s saved through the Agg
renderer (no pyplot: no global backend switch, no display needed), drawn and saved under the default
style (a user's matplotlibrc cannot change the bytes) and saved without the PNG 'Software' tag, which
carries the matplotlib version.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.style
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator, MaxNLocator, NullLocator

from sam_repro.report.budget import epochs_at, file_part
from sam_repro.report.load import load_curve
from sam_repro.report.tables import Table, t_interval

PNG_METADATA = {"Software": None}
COLORS = {"sgd": "tab:blue", "sam": "tab:red", "asam": "tab:green"}
# Further lines of one optimizer (several rho values in one figure) take the next color in line.
MORE_COLORS = ("tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
# Fields that tell SAM and SGD apart within one setting (SGD logs them as null).
OPTIMIZER_FIELDS = ("optimizer", "rho", "p", "adaptive", "m", "bn_stats")  # SAM-only fields: null for SGD
MARKED_POINTS = 1  # a learning curve of this many logged points marks them (one point draws no line)


@dataclass
class Plot:
    """What a plot function drew (`data`) and the PNG files it wrote."""

    data: pd.DataFrame
    files: list[Path] = field(default_factory=list)


def save_figure(fig: Figure, path: Path) -> Path:
    # savefig reads rcParams (savefig.bbox, .transparent, .facecolor, ...) at save time: pin the defaults
    with matplotlib.style.context("default"):
        fig.savefig(path, format="png", dpi=100, metadata=PNG_METADATA)
    return path


def _new_figure(ncols: int = 1) -> tuple[Figure, Any]:
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        return fig, fig.subplots(1, ncols)


def real_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Synthetic-data runs are pipeline checks: never plotted as results."""
    return runs[runs["data.source"] != "synthetic"] if "data.source" in runs else runs


def _stem(setting: dict[str, Any]) -> str:
    """A readable file stem for a setting: cifar10_wrn28_10_basic_200ep[_noise20][_bs128][_folder]
    (a run counted in steps: _150steps, its training done, in place of _200ep)."""
    model = str(setting.get("model")).replace("/", "-")
    stem = f"{setting.get('dataset')}_{model}_{setting.get('augment')}_{file_part(setting)}"
    noise = setting.get("label_noise") or 0.0
    if noise:
        stem += f"_noise{round(noise * 100)}"
    if setting.get("batch_size") != 256:
        stem += f"_bs{setting.get('batch_size')}"
    if setting.get("data.source") != "torchvision":
        stem += f"_{setting.get('data.source')}"
    return stem


def unique_stems(keys: list[str]) -> dict[str, str]:
    """Stems per setting key; settings that differ only in fields the stem omits get a short hash."""
    stems = {k: _stem(json.loads(k)) for k in keys}
    counts = pd.Series(list(stems.values())).value_counts()
    return {k: s if counts[s] == 1 else f"{s}_{hashlib.sha1(k.encode()).hexdigest()[:6]}"
            for k, s in stems.items()}


def without(key: str, fields: tuple[str, ...]) -> str:
    setting = json.loads(key)
    return json.dumps({k: v for k, v in setting.items() if k not in fields}, sort_keys=True)


def trained_note(runs: pd.DataFrame) -> str:
    """'' when the runs trained their configured epochs (the file stem says it); else the training
    done, for a title: 'trained 0.38 epochs (150 steps, 19,200 images)'."""
    if "trained.label" not in runs or runs["trained.on_schedule"].astype(bool).all():
        return ""
    return "trained " + " / ".join(sorted(set(runs["trained.label"])))


def _titled(name: str, note: str) -> str:
    return f"{name}\n{note}" if note else name


def _line_label(setting: dict[str, Any]) -> str:
    opt = str(setting.get("optimizer"))
    return opt.upper() if setting.get("rho") is None else f"{opt.upper()} rho={setting['rho']:g}"


def learning_curves(runs: pd.DataFrame, out: Path) -> Plot:
    """Test error vs epochs trained, one figure per setting, SAM and SGD overlaid: mean over seeds
    and a min-max band. Returns one row per (figure, line, epoch): mean, min, max, n; `epoch` is
    the epochs done at that logged row (a fraction where train_steps ended inside an epoch)."""
    runs = real_runs(runs)
    rows, runs_of = [], {}  # runs_of: figure key -> the runs drawn in it (their titles say what they trained)
    for _, r in runs.iterrows():  # iterrows: the trained.* columns keep their names
        curve = load_curve(r["abs_dir"])
        if curve.empty:
            continue
        setting = json.loads(r["setting_key"])
        key = without(r["setting_key"], OPTIMIZER_FIELDS)
        runs_of.setdefault(key, []).append(r)
        for epoch, err in zip(curve["epoch"], curve["test_err"]):
            # the x of a logged row is the epochs done by then: the last epoch of a train_steps run is partial
            rows.append({"figure_key": key, "optimizer": setting.get("optimizer"), "rho": setting.get("rho"),
                         "line": _line_label(setting),
                         "epoch": epochs_at(epoch, r.get("trained.steps_per_epoch"), r.get("trained.steps")),
                         "test_err": float(err)})
    columns = ["figure", "optimizer", "rho", "line", "epoch", "mean", "min", "max", "n"]
    if not rows:
        return Plot(pd.DataFrame(columns=columns))
    long = pd.DataFrame(rows)
    stems = unique_stems(sorted(set(long["figure_key"])))
    long["figure"] = "curves_" + long["figure_key"].map(stems)
    agg = (long.groupby(["figure", "line", "epoch"], sort=True)
           .agg(optimizer=("optimizer", "first"), rho=("rho", "first"), mean=("test_err", "mean"),
                min=("test_err", "min"), max=("test_err", "max"), n=("test_err", "size"))
           .reset_index()[columns])
    by_figure = {("curves_" + stems[k]): pd.DataFrame(v) for k, v in runs_of.items()}
    files = []
    for name, fig_data in agg.groupby("figure", sort=True):
        fig, ax = _new_figure()
        spare = iter(MORE_COLORS * 10)
        used: set[str] = set()
        for line, d in fig_data.groupby("line", sort=True):
            opt = str(d["optimizer"].iloc[0])
            color = COLORS.get(opt) if opt not in used else next(spare)
            used.add(opt)
            marker = {"marker": "o", "ms": 4} if len(d) <= MARKED_POINTS else {}
            ax.plot(d["epoch"], d["mean"], label=f"{line} (n={int(d['n'].max())})", color=color, lw=1.2, **marker)
            ax.fill_between(d["epoch"], d["min"], d["max"], color=color, alpha=0.2, lw=0)
        if (fig_data["epoch"] >= 1).all():
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(left=0)  # training starts at 0: a run of a fraction of an epoch shows as one
        ax.set(xlabel="epochs trained", ylabel="test error (%)",
               title=_titled(name.removeprefix("curves_"), trained_note(by_figure[name])))
        ax.legend(title="mean, min-max band over seeds", fontsize="small")
        files.append(save_figure(fig, out / f"{name}.png"))
    return Plot(agg, files)


def label_noise(table4: Table, out: Path) -> Plot:
    """Clean test accuracy vs noise rate, SAM vs SGD: ours (mean ± CI, from Table 4's paper-setting
    cells) and the paper's points. Always drawn: with no runs it shows the paper alone."""
    rows = []
    for r in table4.data.itertuples():
        for method in ("sam", "sgd"):
            noise = round(r.label_noise * 100)
            rows.append({"noise": noise, "method": method, "who": "paper",
                         "acc": getattr(r, f"{method}_paper"), "ci95": math.nan, "n": 0})
            rows.append({"noise": noise, "method": method, "who": "ours",
                         "acc": getattr(r, f"{method}_mean"), "ci95": getattr(r, f"{method}_ci95"),
                         "n": getattr(r, f"{method}_n")})
    data = pd.DataFrame(rows).sort_values(["who", "method", "noise"], kind="stable").reset_index(drop=True)
    fig, ax = _new_figure()
    for (who, method), d in data.groupby(["who", "method"], sort=True):
        color = COLORS[method]
        if who == "paper":
            ax.plot(d["noise"], d["acc"], "o--", color=color, mfc="none", label=f"{method.upper()} (paper)")
            continue
        d = d[d["n"] > 0]
        if len(d):
            ax.errorbar(d["noise"], d["acc"], yerr=d["ci95"].fillna(0), fmt="s-", color=color,
                        capsize=3, label=f"{method.upper()} (ours, 95% CI)")
    ax.set(xlabel="label noise (%)", ylabel="clean test accuracy (%)", xticks=[20, 40, 60, 80],
           title="CIFAR-10, ResNet-32: label noise")
    ax.legend(fontsize="small")
    return Plot(data, [save_figure(fig, out / "label_noise.png")])


def rho_sweep(runs: pd.DataFrame, out: Path) -> Plot:
    """Test error vs rho for each setting with SAM runs at two or more rho values; the SGD runs of
    the same setting, where present, as a dashed line. Returns one row per (figure, rho)."""
    runs = real_runs(runs)
    columns = ["figure", "optimizer", "rho", "mean", "ci95", "min", "max", "n"]
    sam = runs[runs["optimizer"].isin(["sam", "asam"])]
    if sam.empty:
        return Plot(pd.DataFrame(columns=columns))
    sam = sam.assign(sweep_key=[without(k, ("rho",)) for k in sam["setting_key"]])
    sweeps = [k for k, g in sam.groupby("sweep_key", sort=True) if g["rho"].nunique() >= 2]
    stems = unique_stems(sweeps)
    sgd_keys = runs[runs["optimizer"] == "sgd"]["setting_key"].map(lambda k: without(k, OPTIMIZER_FIELDS))
    rows, files = [], []
    for key in sweeps:
        name = "rho_" + stems[key]
        g = sam[sam["sweep_key"] == key]
        for rho, d in g.groupby("rho", sort=True):
            s = t_interval(d["final.test_err"].astype(float))
            rows.append({"figure": name, "optimizer": g["optimizer"].iloc[0], "rho": float(rho),
                         "mean": s.mean, "ci95": s.ci95, "min": d["final.test_err"].min(),
                         "max": d["final.test_err"].max(), "n": s.n})
        base = runs[runs["optimizer"] == "sgd"][sgd_keys == without(key, OPTIMIZER_FIELDS)]
        if len(base):
            s = t_interval(base["final.test_err"].astype(float))
            rows.append({"figure": name, "optimizer": "sgd", "rho": 0.0, "mean": s.mean, "ci95": s.ci95,
                         "min": base["final.test_err"].min(), "max": base["final.test_err"].max(), "n": s.n})
        d = pd.DataFrame([r for r in rows if r["figure"] == name])
        fig, ax = _new_figure()
        pts = d[d["optimizer"] != "sgd"]
        opt = str(pts["optimizer"].iloc[0])
        ax.errorbar(pts["rho"], pts["mean"], yerr=pts["ci95"].fillna(0), fmt="o-", color=COLORS[opt],
                    capsize=3, label=f"{opt.upper()} (mean ± 95% CI)")
        for r in d[d["optimizer"] == "sgd"].itertuples():
            ax.axhline(r.mean, ls="--", color=COLORS["sgd"], label=f"SGD (n={r.n})")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(sorted(pts["rho"])))
        ax.xaxis.set_major_formatter(FixedFormatter([f"{r:g}" for r in sorted(pts["rho"])]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set(xlabel="rho", ylabel="final test error (%)", title=_titled(stems[key], trained_note(g)))
        ax.legend(fontsize="small")
        files.append(save_figure(fig, out / f"{name}.png"))
    return Plot(pd.DataFrame(rows, columns=columns), files)


def methods_comparison(methods: Table, out: Path) -> Plot:
    """Beside each section of the methods table (report/methods.py): test error, mean ± 95% CI over
    seeds, per row, and the training time relative to SGD on the same device (no bar where n/a).
    Returns one row per (figure, method) with the numbers drawn."""
    columns = ["figure", "method", "optimizer", "mean", "ci95", "n", "time_vs_sgd"]
    d = methods.data
    data = pd.DataFrame({"figure": "methods_" + d["setting"], "method": d["method"], "optimizer": d["optimizer"],
                         "mean": d["mean"], "ci95": d["ci95"], "n": d["n"], "time_vs_sgd": d["time_vs_sgd"]},
                        columns=columns)
    files = []
    for name, fig_data in data.groupby("figure", sort=True):
        fig, (err_ax, time_ax) = _new_figure(ncols=2)
        x = list(range(len(fig_data)))
        colors = [COLORS.get(str(o), MORE_COLORS[i % len(MORE_COLORS)]) for i, o in enumerate(fig_data["optimizer"])]
        for xi, (r, color) in enumerate(zip(fig_data.itertuples(), colors)):
            err_ax.errorbar([xi], [r.mean], yerr=[0 if pd.isna(r.ci95) else r.ci95], fmt="o", color=color, capsize=3)
        labels = [f"{m}\n(n={n})" for m, n in zip(fig_data["method"], fig_data["n"])]
        err_ax.set(ylabel="final test error (%), mean ± 95% CI", xticks=x)
        err_ax.set_xticklabels(labels, rotation=60, ha="right", fontsize="x-small")
        ratio = fig_data["time_vs_sgd"].astype(float)
        shown = ratio.notna().to_numpy()
        time_ax.bar([xi for xi, ok in zip(x, shown) if ok], ratio[shown], color=[c for c, ok in zip(colors, shown) if ok])
        for xi in (xi for xi, ok in zip(x, shown) if not ok):  # no SGD on the same device, or several devices
            time_ax.text(xi, 0.05, "n/a", ha="center", va="bottom", rotation=90, fontsize="x-small")
        time_ax.axhline(1.0, ls="--", color=COLORS["sgd"], lw=1)
        time_ax.set(ylabel="train time vs SGD (same device)", xticks=x, xlim=(-0.6, len(x) - 0.4))
        time_ax.set_xticklabels(list(fig_data["method"]), rotation=60, ha="right", fontsize="x-small")
        fig.suptitle(name.removeprefix("methods_"), fontsize="small")
        files.append(save_figure(fig, out / f"{name}.png"))
    return Plot(data.reset_index(drop=True), files)
