"""Runs -> the paper's Tables 1-5 and the budget / non-paper table, as data and as markdown/CSV.

Flow: `match_runs` decides, per setting (a config without its seed), which paper cells it fills
(every checked field equals the paper's, see `paper.Expected`) or, if none, how it differs from
the nearest cell. `paper_table` aggregates the seeds of each cell (mean and Student-t 95% CI) and
puts the paper's value beside ours; `budget_table` lists everything else, differences spelled
out. Every table is a `Table` and one function renders them all.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from scipy import stats as sps
from tabulate import tabulate

from sam_repro.report import paper

DASH = "—"  # an empty cell
METRIC_COLUMN = {"top1_err": "final.test_err", "top5_err": "final.test_top5_err", "top1_acc": "final.test_acc"}
HIGHER_IS_BETTER = {"top1_acc"}


@dataclass(frozen=True)
class Spec:
    """How one paper table is laid out: its title and which CSV columns identify a row."""

    title: str
    metric: str
    row_columns: tuple[str, ...]
    notes: tuple[str, ...] = ()


SPECS: dict[int, Spec] = {
    1: Spec("Table 1: CIFAR-10 and CIFAR-100, trained from scratch", "test error (%), lower is better",
            ("dataset", "model", "epochs", "augment"),
            ("Epochs marked * are not in the paper (it gives none for Shake-Shake and plain PyramidNet): "
             "we expect 1800, as the PyramidNet+ShakeDrop row; our presets run it "
             "(docs/paper.md#what-the-presets-assume).",
             "SGD cells also accept runs with 2x the SAM epochs (the paper's baseline was allowed 2x "
             "epochs, best of the two reported); where both exist the better mean is shown and its "
             "epochs are named in the cell.")),
    2: Spec("Table 2: ImageNet (ResNet)", "top-1 / top-5 error (%), lower is better",
            ("model", "epochs", "metric"),
            ("The augment label is not checked (the paper's Inception crop has no label among ours).",)),
    3: Spec("Table 3: finetuning (EfficientNet)", "top-1 error (%), lower is better", ("dataset", "model"),
            ("rho is checked only for ImageNet (0.05), the one value our sources give "
             "(docs/paper.md#table-3-finetuning); B7 runs must log train_steps 5000 and batch 1024 "
             "(ImageNet: 10 epochs); L2: batch 512, steps not checked.",
             "Augmentation: autoaugment on CIFAR, none elsewhere.")),
    4: Spec("Table 4: label noise (CIFAR-10, ResNet-32, 200 epochs)",
            "clean test accuracy (%), higher is better", ("label_noise",),
            ("rho 0.1 (0.05 at 80 % noise). The paper's other methods (Bootstrap, MentorMix, ...) "
             "are in paper_tables.csv.",)),
    5: Spec("Table 5: SVHN and Fashion-MNIST", "test error (%), lower is better",
            ("dataset", "model", "augment"),
            ("'autoaugment' means the SVHN policy + Cutout for SVHN (runs logged with augment "
             "autoaugment_svhn fill it), and Cutout only for Fashion-MNIST (runs logged with augment cutout).",
             "Epochs marked * are not in the paper: we expect 200 for both models, the CIFAR WRN recipe "
             "our presets use.")),
}
MATCH_NOTE = (
    "A run fills a cell only in the paper's setting: data.source torchvision, the paper's epochs, "
    "rho (SAM), p=2, batch size, label noise, no validation hold-out, optimizer sam or sgd, and for "
    "Tables 1, 4 and 5 the per-device batch of the official runs (device_batch 32: BatchNorm per 32 "
    "examples; SAM's m 32). Every other run is in [budget.md](budget.md), never merged."
)


@dataclass
class Missing:
    """A table row with empty cells and the sweep that fills them."""

    table: int
    row: str
    methods: list[str]
    command: str


@dataclass
class Table:
    """One output table: `display` (strings) renders to markdown, `data` (numbers) to CSV."""

    name: str
    title: str
    display: pd.DataFrame
    data: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    missing: list[Missing] = field(default_factory=list)
    sections: list[tuple[str, pd.DataFrame]] = field(default_factory=list)  # more markdown tables


@dataclass
class Stats:
    """Aggregate over seeds: mean, sample std and 95% CI half-width (NaN for n < 2)."""

    n: int
    mean: float
    std: float
    ci95: float


def t_interval(values: Iterable[float]) -> Stats:
    """Mean ± t_{0.975, n-1} * s / sqrt(n) (Student t over seeds); no CI for n = 1."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Stats(0, math.nan, math.nan, math.nan)
    if n == 1:
        return Stats(1, float(x[0]), math.nan, math.nan)
    std = float(np.std(x, ddof=1))
    return Stats(n, float(np.mean(x)), std, float(sps.t.ppf(0.975, n - 1) * std / math.sqrt(n)))


# ---- matching runs to paper cells -------------------------------------------------------------

def paper_cells() -> pd.DataFrame:
    """The CSV's SAM and SGD cells (the ones our runs can fill), in the paper's order."""
    df = paper.paper_csv()
    df = df[df["method"].isin(paper.OUR_METHODS)].reset_index(drop=True)
    df["order"] = range(len(df))
    df["expected"] = [paper.expected(r) for _, r in df.iterrows()]
    return df


def _num(x: Any) -> float | None:
    """A logged number (p may be the string 'inf') as float; None when absent."""
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _same(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _g(x: float | None) -> str:
    """A logged number as written in a difference: 0.05, 200, inf."""
    return "null" if x is None else f"{x:g}"


IDENTITY_FIELDS = ("dataset", "model", "augment", "label_noise")  # what a cell is about, not how it was run


def diff_fields(setting: dict[str, Any], exp: paper.Expected) -> list[tuple[str, str]]:
    """(field, phrase) for each way a run's setting departs from a paper cell's; [] = it is the paper's."""
    out: list[tuple[str, str]] = []

    def add(name: str, phrase: str) -> None:
        out.append((name, phrase))

    if setting.get("dataset") != exp.dataset:
        add("dataset", f"dataset {setting.get('dataset')} (paper {exp.dataset})")
    if paper.normalize_model(str(setting.get("model"))) != exp.model:
        add("model", f"model {setting.get('model')} (paper {exp.model})")
    if exp.augment is not None and setting.get("augment") != exp.augment:
        add("augment", f"augment {setting.get('augment')} (paper {exp.augment})")
    noise = _num(setting.get("label_noise")) or 0.0
    if not _same(noise, exp.label_noise):
        add("label_noise", f"label_noise {noise:g} (paper {exp.label_noise:g})")
    elif noise > 0 and setting.get("noise_kind", "symmetric") != "symmetric":  # Table 4 is symmetric noise
        add("noise_kind", f"noise_kind {setting.get('noise_kind')} (paper symmetric)")
    if setting.get("optimizer") != exp.optimizer:
        add("optimizer", f"optimizer {setting.get('optimizer')} (paper {exp.optimizer})")
    if exp.rho is not None and not _same(_num(setting.get("rho")), exp.rho):
        add("rho", f"rho {_g(_num(setting.get('rho')))} (paper {exp.rho:g})")
    if exp.p is not None and not _same(_num(setting.get("p")), exp.p):
        add("p", f"p {_g(_num(setting.get('p')))} (paper {exp.p:g})")
    steps = setting.get("train_steps")
    if exp.counts_steps:
        if steps is None:
            add("train_steps", f"epochs {setting.get('epochs')} (paper counts steps)")
        elif exp.train_steps is not None and steps != exp.train_steps:
            add("train_steps", f"train_steps {steps} (paper {exp.train_steps})")
    elif steps is not None:
        add("train_steps", f"train_steps {steps} (paper counts epochs)")
    elif exp.epochs is not None and setting.get("epochs") not in exp.epochs:
        wanted = " or ".join(str(e) for e in exp.epochs)
        add("epochs", f"epochs {setting.get('epochs')} (paper {wanted})")
    if exp.batch_size is not None and setting.get("batch_size") != exp.batch_size:
        add("batch_size", f"batch_size {setting.get('batch_size')} (paper {exp.batch_size})")
    if exp.device_batch is not None and _num(setting.get("device_batch")) != exp.device_batch:
        add("device_batch", f"device_batch {_g(_num(setting.get('device_batch')))} "
                            f"(paper {exp.device_batch}: BatchNorm per device)")
    if exp.m is not None and _num(setting.get("m")) != exp.m:
        add("m", f"m {_g(_num(setting.get('m')))} (paper {exp.m})")
    if setting.get("data.source") != exp.source:
        add("data.source", f"data {setting.get('data.source')} (paper {exp.source})")
    val = _num(setting.get("val_fraction")) or 0.0
    if not _same(val, exp.val_fraction):
        add("val_fraction", f"val_fraction {val:g} (paper 0, the whole training set)")
    return out


def differences(setting: dict[str, Any], exp: paper.Expected) -> list[str]:
    """How a run's setting departs from a paper cell's, one phrase per field; [] = it is the paper's."""
    return [phrase for _, phrase in diff_fields(setting, exp)]


@dataclass
class Match:
    """Where one setting lands: the cells it fills, or the nearest cell and how it differs."""

    cells: list[int]  # `order` of the paper cells it fills
    nearest: int | None = None
    diffs: list[str] = field(default_factory=list)
    synthetic: bool = False


def _epoch_distance(setting: dict[str, Any], exp: paper.Expected) -> float:
    e = _num(setting.get("epochs"))
    if not exp.epochs or not e or e <= 0:
        return 0.0
    return min(abs(math.log(e / want)) for want in exp.epochs)


def match_setting(setting: dict[str, Any], cells: pd.DataFrame) -> Match:
    """The paper cells a setting fills, else its nearest cell (same dataset, model and method family)."""
    if setting.get("data.source") == "synthetic":
        return Match([], synthetic=True)
    # asam and the SAM family (gsam, esam, ...) are compared with SAM's cells for the nearest one, and
    # never fill one: diff_fields names their optimizer as a departure (report/methods.py shows them)
    family = "sgd" if setting.get("optimizer") == "sgd" else "sam"
    model = paper.normalize_model(str(setting.get("model")))
    cands = [(r["order"], r["expected"]) for _, r in cells.iterrows()
             if r["method"] == family and r["expected"].dataset == setting.get("dataset")
             and r["expected"].model == model]
    if not cands:
        return Match([], diffs=[f"no paper cell for dataset {setting.get('dataset')}, "
                                f"model {setting.get('model')}"])
    scored = [(diff_fields(setting, exp), _epoch_distance(setting, exp), order) for order, exp in cands]
    filled = [order for diffs, _, order in scored if not diffs]
    if filled:
        return Match(filled)

    # Nearest: first the cell about the same thing (dataset, model, augment, noise), then the one
    # with the fewest other differences, then the closest epoch budget, then the paper's order.
    def rank(s: tuple) -> tuple:
        identity = sum(name in IDENTITY_FIELDS for name, _ in s[0])
        return identity, len(s[0]), s[1], s[2]

    diffs, _, order = min(scored, key=rank)
    return Match([], nearest=order, diffs=[phrase for _, phrase in diffs])


def match_runs(runs: pd.DataFrame, cells: pd.DataFrame) -> dict[str, Match]:
    """setting_key -> Match, for every distinct setting among the runs."""
    return {key: match_setting(json.loads(key), cells) for key in sorted(set(runs["setting_key"]))}


# ---- formatting -------------------------------------------------------------------------------

def fmt_ours(s: Stats, extra: str = "") -> str:
    """'2.71 ± 0.08 (n=5)'; '2.71 (n=1)'; a dash when there are no runs."""
    if s.n == 0:
        return DASH
    ci = "" if math.isnan(s.ci95) else f" ± {s.ci95:.2f}"
    return f"{s.mean:.2f}{ci} (n={s.n}{extra})"


def fmt_paper(value: str, ci: str) -> str:
    """The paper's value and CI as printed ('2.1 ± <0.1')."""
    return f"{value} ± {ci}" if ci else value


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def fmt_diff(x: float, decimals: int = 2) -> str:
    return DASH if x is None or math.isnan(x) else f"{x:+.{decimals}f}"


# ---- the paper tables -------------------------------------------------------------------------

def _cell_stats(group: pd.DataFrame, metric: str, allow_best_of: bool,
                paper_epochs: int | None) -> tuple[Stats, str, list[str]]:
    """Aggregate a cell's runs: (shown stats, annotation for the cell, notes on other groups).

    Runs of one cell that differ in unchecked fields (m, lr, ...) are never pooled: the largest
    group is shown. SGD cells with the 2x-epoch allowance show the better of the epoch budgets.
    """
    col = METRIC_COLUMN[metric]
    if col not in group:
        return t_interval([]), "", []
    groups = []
    for key, g in group.groupby("setting_key", sort=True):
        s = t_interval(g[col].astype(float))
        if s.n:
            groups.append((key, json.loads(key), s))
    if not groups:
        return t_interval([]), "", []
    groups.sort(key=lambda t: (-t[2].n, t[0]))
    chosen = groups[0]
    if allow_best_of:
        reps: dict[Any, tuple] = {}
        for g in groups:
            reps.setdefault(g[1].get("epochs"), g)
        sign = -1 if metric in HIGHER_IS_BETTER else 1
        chosen = min(reps.values(), key=lambda t: (sign * t[2].mean, t[0]))
    # Name the epochs when the shown SGD runs used the 2x budget, so the cell says what it is.
    shown = chosen[1].get("epochs")
    extra = f", {shown} ep" if paper_epochs is not None and shown != paper_epochs else ""
    # m is not named: every run logs it, and the cells whose paper states it (32) only take that m
    notes = []
    for key, setting, s in groups:
        if key == chosen[0]:
            continue
        diff = [f"{k} {setting.get(k)}" for k in sorted(setting) if setting.get(k) != chosen[1].get(k)]
        notes.append(f"also {fmt_ours(s)} with {', '.join(diff)} (not shown)")
    return chosen[2], extra, notes


def _row_label(row: pd.Series, cols: tuple[str, ...], assumed: bool) -> dict[str, str]:
    out = {}
    for c in cols:
        if c == "model":
            out[c] = paper.our_model(row["model"])
        elif c == "epochs":
            e, _ = paper.paper_epochs(int(row["table"]), row["model"], row["epochs"], row["dataset"])
            out[c] = DASH if e is None else f"{e}{'*' if assumed else ''}"
        elif c == "label_noise":
            out[c] = f"{round(row['label_noise'] * 100)}%"
        else:
            out[c] = str(row[c])
    return out


def paper_table(number: int, runs: pd.DataFrame, cells: pd.DataFrame, matches: dict[str, Match]) -> Table:
    """One paper table: per row, ours (mean ± CI, n) and the paper's, for SAM and SGD, and SAM - SGD."""
    spec = SPECS[number]
    mine = cells[cells["table"] == number]
    row_keys = ["dataset", "model", "epochs", "augment", "label_noise", "metric"]
    display_rows, data_rows, notes, missing = [], [], [], []
    for _, row_cells in mine.groupby(row_keys, sort=False):  # groupby keeps the paper's row order
        first = row_cells.iloc[0]
        _, assumed = paper.paper_epochs(number, first["model"], first["epochs"], first["dataset"])
        label = _row_label(first, spec.row_columns, assumed)
        expected_epochs = first["expected"].epochs
        disp = dict(label)
        data: dict[str, Any] = {  # raw values in the CSV (the plots read them too)
            "dataset": first["dataset"], "model": paper.our_model(first["model"]),
            "epochs": expected_epochs[0] if expected_epochs else None,
            "augment": first["augment"], "label_noise": first["label_noise"], "metric": first["metric"]}
        per: dict[str, Stats] = {}
        paper_val: dict[str, tuple[str, str, float]] = {}
        by_method = {c["method"]: c for _, c in row_cells.iterrows()}
        for method in paper.OUR_METHODS:  # SAM first in every table (the CSV's order varies)
            cell = by_method[method]
            keys = [k for k, m in matches.items() if cell["order"] in m.cells]
            # most cells are empty: skip the boolean selection (a copy of every column) for them
            group = runs[runs["setting_key"].isin(keys)] if keys else runs.iloc[:0]
            epochs = cell["expected"].epochs or ()
            s, extra, cell_notes = _cell_stats(group, cell["metric"], len(epochs) > 1,
                                               epochs[0] if epochs else None)
            per[method] = s
            paper_val[method] = (cell["value"], cell["ci95"], cell["paper_value"])
            disp[f"{method.upper()} (ours)"] = fmt_ours(s, extra)
            disp[f"{method.upper()} (paper)"] = fmt_paper(cell["value"], cell["ci95"])
            data.update({f"{method}_mean": s.mean, f"{method}_ci95": s.ci95, f"{method}_n": s.n,
                         f"{method}_paper": cell["paper_value"], f"{method}_paper_ci95": cell["ci95"]})
            where = " ".join(label.values())
            notes.extend(f"{method.upper()} {where}: {n}" for n in cell_notes)
        ours_diff = per["sam"].mean - per["sgd"].mean
        paper_diff = paper_val["sam"][2] - paper_val["sgd"][2]
        dec = max(_decimals(paper_val["sam"][0]), _decimals(paper_val["sgd"][0]))
        disp["SAM-SGD (ours)"] = fmt_diff(ours_diff)
        disp["SAM-SGD (paper)"] = fmt_diff(paper_diff, dec)
        data.update({"diff_ours": ours_diff, "diff_paper": round(paper_diff, 6)})
        display_rows.append(disp)
        data_rows.append(data)
        empty = [m for m in paper.OUR_METHODS if per[m].n == 0]
        if empty:
            missing.append(Missing(number, " ".join(label.values()), empty,
                                   paper.fill_command(number, first, empty)))
    # A Table 2 row per metric repeats the command: keep each command once.
    seen: set[str] = set()
    missing = [m for m in missing if not (m.command in seen or seen.add(m.command))]
    all_notes = [f"Ours: final-epoch {spec.metric}; mean ± 95% CI over seeds (Student t: "
                 "t_{0.975,n-1}·s/√n; no CI for n=1), n = seeds. SAM-SGD: difference of the means.",
                 MATCH_NOTE, *spec.notes, *notes]
    frame = pd.DataFrame(data_rows)
    frame["epochs"] = frame["epochs"].astype("Int64")  # integers in the CSV, blank where unknown
    return Table(f"table{number}", f"{spec.title} — {spec.metric}", pd.DataFrame(display_rows),
                 frame, all_notes, missing)


# ---- budget / non-paper runs ------------------------------------------------------------------

BUDGET_FIELDS = ("dataset", "model", "augment", "label_noise", "optimizer", "rho", "trained",
                 "batch_size", "data.source")
# The training done, as the CSV gives it (config.epochs is only what was configured: train_steps
# or an interruption may cut it; report/budget.py derives these from each run's metrics.json).
TRAINED_COLUMNS = {"epochs_trained": "trained.epochs", "steps": "trained.steps", "images": "trained.images"}


def _sort_key(setting: dict[str, Any]) -> tuple:
    def k(v: Any) -> tuple:
        return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))
    return tuple(k(setting.get(f)) for f in BUDGET_FIELDS)


def trained(group: pd.DataFrame) -> tuple[str, dict[str, Any]]:
    """The training the runs of one setting did: its label ('4 epochs', '0.38 epochs (150 steps,
    19,200 images)') and its numbers for the CSV. Runs of one setting that trained differently
    (another training-set size) show every label and no numbers."""
    labels = sorted(set(group["trained.label"])) if "trained.label" in group else []
    if len(labels) != 1:
        return " / ".join(labels) or DASH, {c: None for c in TRAINED_COLUMNS}
    first = group.iloc[0]
    return labels[0], {c: first[col] if _logged(first[col]) else None for c, col in TRAINED_COLUMNS.items()}


def ran_on(group: pd.DataFrame) -> str:
    """Where a group of runs came from: device and short git sha of each (budget runs must say)."""
    devices = group["env.device"] if "env.device" in group else pd.Series([None] * len(group), index=group.index)
    shas = group["env.git_sha"] if "env.git_sha" in group else pd.Series([None] * len(group), index=group.index)
    return ", ".join(sorted({f"{d if _logged(d) else '?'} @ {str(sha)[:7] if _logged(sha) else '?'}"
                             for d, sha in zip(devices, shas)}))


def _logged(value: Any) -> bool:
    """A value a run logged: not None, not empty, and not the NaN pandas puts where a run logged nothing."""
    return bool(pd.notna(value) and value)


def budget_table(runs: pd.DataFrame, cells: pd.DataFrame, matches: dict[str, Match]) -> Table:
    """Every setting that fills no paper cell, with how it differs from the nearest one.
    Synthetic-data runs get their own section: pipeline checks, never results."""
    by_order = cells.set_index("order")
    rows, data, synth = [], [], []
    done = {k: trained(runs[runs["setting_key"] == k]) for k, m in matches.items() if not m.cells}
    settings = {k: {**json.loads(k), "trained": numbers["epochs_trained"]} for k, (_, numbers) in done.items()}
    for key in sorted(settings, key=lambda k: (_sort_key(settings[k]), k)):
        m, setting = matches[key], settings[key]
        group = runs[runs["setting_key"] == key]
        cell = by_order.loc[m.nearest] if m.nearest is not None else None
        metric = cell["metric"] if cell is not None else "top1_err"
        s = t_interval(group[METRIC_COLUMN[metric]].astype(float)) if METRIC_COLUMN[metric] in group \
            else t_interval([])
        trained_label, trained_numbers = done[key]
        label = {f: trained_label if f == "trained" else DASH if setting.get(f) is None else f"{setting.get(f)}"
                 for f in BUDGET_FIELDS}
        raw: dict[str, Any] = {}  # for the CSV: empty where null
        for f in BUDGET_FIELDS:
            raw.update(trained_numbers if f == "trained" else {f: setting.get(f)})
        if m.synthetic:
            synth.append({**label, "n": str(s.n), "final test error (%)": fmt_ours(s),
                          "what": "synthetic data: a pipeline check, not a result"})
            data.append({"kind": "synthetic", **raw, "metric": metric, "n": s.n, "mean": s.mean,
                         "ci95": s.ci95, "paper_table": "", "paper": math.nan, "differences": ""})
            continue
        where = f"Table {cell['table']} {cell['method'].upper()}: {fmt_paper(cell['value'], cell['ci95'])}" \
            if cell is not None else DASH
        rows.append({**label, "metric": metric, "ours": fmt_ours(s), "paper (nearest cell)": where,
                     "differences from the paper": "; ".join(m.diffs), "ran on (device @ git sha)": ran_on(group)})
        data.append({"kind": "budget", **raw, "metric": metric, "n": s.n, "mean": s.mean, "ci95": s.ci95,
                     "paper_table": "" if cell is None else str(cell["table"]),
                     "paper": math.nan if cell is None else cell["paper_value"],
                     "differences": "; ".join(m.diffs), "ran_on": ran_on(group)})
    notes = ["Runs outside the paper's setting (fewer epochs, another rho, the JPEG folder copy of a "
             "dataset, ...). They are never merged into the paper tables; each row says how it "
             "differs from the nearest paper cell. Ours: mean ± 95% CI over seeds (Student t).",
             "Trained: the training the runs did, from their metrics.json. Where `train_steps` or an "
             "interruption cut the configured epochs: the epochs done (fractional), the optimizer steps "
             "and the training images seen (steps x batch; one epoch is train_size // batch steps)."]
    sections = [("Synthetic-data runs (pipeline checks, not results)", pd.DataFrame(synth))] if synth else []
    fields = [c for f in BUDGET_FIELDS for c in (TRAINED_COLUMNS if f == "trained" else (f,))]
    columns = ["kind", *fields, "metric", "n", "mean", "ci95", "paper_table", "paper", "differences", "ran_on"]
    frame = pd.DataFrame(data, columns=columns)
    for c in ("steps", "images"):
        frame[c] = frame[c].astype("Int64")  # integers in the CSV, blank where unknown
    return Table("budget", "Budget / non-paper runs", pd.DataFrame(rows), frame,
                 notes,
                 sections=sections)


# ---- rendering --------------------------------------------------------------------------------

def markdown_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(none)_"
    return tabulate(df.values.tolist(), headers=list(df.columns), tablefmt="github", disable_numparse=True)


def to_markdown(table: Table) -> str:
    """The one renderer: title, table, notes, extra sections, empty cells with their commands."""
    parts = [f"# {table.title}", markdown_table(table.display)]
    if table.notes:
        parts.append("\n".join(f"- {n}" for n in table.notes))
    for heading, df in table.sections:
        parts += [f"## {heading}", markdown_table(df)]
    if table.missing:
        number = table.missing[0].table
        cmds = pd.DataFrame([{"row": m.row, "empty": ", ".join(m.methods), "command": f"`{m.command}`"}
                             for m in table.missing])
        parts += ["## Empty cells: the commands that fill them",
                  f"The whole table: `bash {paper.sweep_script(number)}`", markdown_table(cmds)]
    return "\n\n".join(parts) + "\n"


def write_table(table: Table, out: Path) -> list[Path]:
    """Write <name>.md and <name>.csv (fixed float format, '\\n' line ends: byte-reproducible)."""
    md, csv = out / f"{table.name}.md", out / f"{table.name}.csv"
    md.write_text(to_markdown(table), encoding="utf-8", newline="\n")
    csv.write_text(table.data.to_csv(index=False, float_format="%.4f", lineterminator="\n"),
                   encoding="utf-8", newline="\n")
    return [md, csv]
