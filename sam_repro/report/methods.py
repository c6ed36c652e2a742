"""SAM's follow-ups side by side: per setting, one row per optimizer run in it (SGD, SAM, GSAM, ...).

A setting is a run's setting without its optimizer fields (plots.OPTIMIZER_FIELDS, the grouping the
learning curves overlay): the same data, model, augmentation, training done, batch, lr, decay. Only
settings with at least one SAM-family run (optim/methods/registry.py) get a table; SGD against SAM
alone is what the paper and budget tables show. Within a setting each optimizer is a row; runs of one
optimizer that differ in a logged field (rho, m) or in the method's own hyperparameters (in
config.yaml only: gsam_alpha, sam_interval, ...) are separate rows named by what differs, never pooled.

Per row: the final test error over seeds (tables.t_interval), the training time per epoch (per step for
a schedule counted in steps) from the runs' throughput, its ratio to SGD's on the same device (n/a
across devices: a ratio of two GPUs' speeds says nothing about the method), and the forward/backward
passes per step, from optim.factory (the one statement of them) for the run's config.yaml.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from omegaconf import OmegaConf

from sam_repro.config import OptimConfig
from sam_repro.optim.factory import METHODS
from sam_repro.optim.methods.registry import METHOD_SPECS
from sam_repro.report.plots import OPTIMIZER_FIELDS, real_runs, unique_stems, without
from sam_repro.report.tables import DASH, Table, fmt_ours, t_interval, trained

NA = "n/a"
ORDER = {name: i for i, name in enumerate(METHODS)}  # SGD, SAM, ASAM, then the registry's methods
COLUMNS = ["setting", "dataset", "model", "augment", "label_noise", "trained", "batch_size", "data.source",
           "optimizer", "method", "rho", "n", "mean", "ci95", "time_per_step_s", "time_per_epoch_s",
           "time_vs_sgd", "forwards", "backwards", "devices"]


@dataclass(frozen=True)
class RunOptim:
    """One run's optimizer config as config.yaml gives it (schema-complete), and its passes per step."""

    block: Optional[dict[str, Any]]  # None: no readable config.yaml
    passes: Optional[tuple[float, float]]


def read_optim(run_dir: Path, optimizer: str) -> RunOptim:
    """The `optim` block of a run's config.yaml merged into the schema (keys added since the run get
    their defaults) and its passes per step. Never raises: a missing or damaged file gives None, and
    then SGD's and SAM's passes still follow from the name, a method's (which depend on its
    hyperparameters) do not."""
    method = METHODS.get(optimizer)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(OptimConfig), OmegaConf.load(run_dir / "config.yaml").optim)
        block = OmegaConf.to_container(cfg)
    except Exception:  # absent, unparsable, or off the schema: the report lists the row, passes n/a
        cfg, block = None, None
    if method is None:
        return RunOptim(block, None)
    if cfg is None:
        return RunOptim(None, method.passes_per_step(OptimConfig(name=optimizer)) if method.spec is None else None)
    try:
        return RunOptim(block, method.passes_per_step(cfg))
    except Exception:  # hyperparameters this code's builder refuses: the row stays, its passes n/a
        return RunOptim(block, None)


def method_name(optimizer: str) -> str:
    """How a row is named: the method's class in the registry (GSAM, FriendlySAM, IntervalSAM, ...)."""
    spec = METHOD_SPECS.get(optimizer)
    return spec.optimizer.__name__ if spec else optimizer.upper()


def _fmt_count(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def fmt_passes(passes: Optional[tuple[float, float]]) -> str:
    """'2 / 2', '1.25 / 1.25' (forwards / backwards); n/a when unknown."""
    return NA if passes is None else f"{_fmt_count(passes[0])} / {_fmt_count(passes[1])}"


def _step_time(r: pd.Series) -> float:
    """Seconds of training per optimizer step: the images of a step over the run's training
    throughput (metrics.json images_per_s, evaluation excluded); NaN where either is not logged."""
    ips, per_step = r.get("images_per_s"), r.get("trained.images_per_step")
    if not (pd.notna(ips) and pd.notna(per_step) and ips > 0):
        return math.nan
    return float(per_step) / float(ips)


def _device(r: pd.Series) -> str:
    d = r.get("env.device")
    return str(d) if pd.notna(d) and d else "unknown device"


def _differing(dicts: list[dict[str, Any]]) -> list[str]:
    """For each dict, 'key=value' of the keys whose values differ among the dicts ('' if none)."""
    keys = sorted({k for d in dicts for k in d if len({json.dumps(e.get(k), default=str) for e in dicts}) > 1})
    return [", ".join(f"{k}={d.get(k)}" for k in keys) for d in dicts]


@dataclass
class Row:
    """One optimizer's runs in one setting."""

    optimizer: str
    label: str
    runs: pd.DataFrame
    passes: Optional[tuple[float, float]]


def _rows(group: pd.DataFrame) -> list[Row]:
    """The rows of one setting: runs split by setting_key and by the config.yaml hyperparameters that
    differ among runs of one setting_key; SGD first, then SAM, ASAM and the registry's order."""
    optims = {r["abs_dir"]: read_optim(Path(r["abs_dir"]), str(r["optimizer"])) for _, r in group.iterrows()}
    parts: list[tuple[str, dict[str, Any], pd.DataFrame]] = []
    for key, g in group.groupby("setting_key", sort=True):
        blocks = [optims[d].block for d in g["abs_dir"]]
        readable = [b for b in blocks if b is not None]
        split = sorted({k for b in readable for k in b
                        if len({json.dumps(x.get(k), default=str) for x in readable}) > 1})
        # a run without a readable config.yaml joins the row when nothing splits it, else its own row
        unknown = {"config.yaml": "unreadable"} if split else {}
        sigs = [json.dumps(unknown if b is None else {k: b.get(k) for k in split}, sort_keys=True, default=str)
                for b in blocks]
        for sig, sub in g.groupby(pd.Series(sigs, index=g.index), sort=True):
            setting = json.loads(key)
            shown = {f: setting.get(f) for f in OPTIMIZER_FIELDS if f != "optimizer"}
            parts.append((str(setting.get("optimizer")), {**shown, **json.loads(sig)}, sub))
    rows = []
    for opt in sorted({p[0] for p in parts}, key=lambda o: (ORDER.get(o, len(ORDER)), o)):
        mine = [p for p in parts if p[0] == opt]
        for (_, _, sub), extra in zip(mine, _differing([p[1] for p in mine])):
            passes = {optims[d].passes for d in sub["abs_dir"]}
            label = method_name(opt) + (f" ({extra})" if extra else "")
            rows.append(Row(opt, label, sub, passes.pop() if len(passes) == 1 else None))
    return rows


def _timing(row: Row, sgd: pd.DataFrame) -> tuple[float, str, float, str]:
    """(mean step time in s, why it is n/a, its ratio to SGD's on the same device, why that is n/a)."""
    devices = sorted({_device(r) for _, r in row.runs.iterrows()})
    times = [_step_time(r) for _, r in row.runs.iterrows()]
    if len(devices) > 1:
        why = f"{NA}: runs on {len(devices)} devices"
        return math.nan, why, math.nan, why
    if any(math.isnan(t) for t in times):
        why = f"{NA}: throughput not logged"
        return math.nan, why, math.nan, why
    mean = sum(times) / len(times)
    same = [_step_time(r) for _, r in sgd.iterrows() if _device(r) == devices[0]]
    same = [t for t in same if not math.isnan(t)]
    if not same:
        where = "no SGD run" if sgd.empty else f"no SGD run on {devices[0]}"
        return mean, "", math.nan, f"{NA}: {where}"
    return mean, "", mean / (sum(same) / len(same)), ""


def _steps_per_epoch(runs: pd.DataFrame) -> float:
    """The row's steps per epoch (NaN unless every run logged the same: its data size and batch)."""
    per_epoch = runs["trained.steps_per_epoch"]
    return float(per_epoch.iloc[0]) if per_epoch.notna().all() and per_epoch.nunique() == 1 else math.nan


def _cells(row: Row, sgd: pd.DataFrame, in_steps: bool) -> tuple[dict[str, str], dict[str, Any]]:
    """One row of a setting's section: (markdown cells, CSV numbers). `in_steps`: the schedule is
    counted in steps, so the time is shown per step (ms), else per epoch (s)."""
    s = t_interval(row.runs["final.test_err"].astype(float))
    step_s, why, ratio, why_ratio = _timing(row, sgd)
    epoch_s = step_s * _steps_per_epoch(row.runs)
    shown_time = step_s * 1000 if in_steps else epoch_s
    rho = row.runs["rho"].iloc[0]
    devices = ", ".join(sorted({_device(r) for _, r in row.runs.iterrows()}))
    shown = {"method": row.label, "optim": row.optimizer, "rho": DASH if pd.isna(rho) else f"{rho:g}",
             "seeds": str(s.n), "test error (%)": fmt_ours(s),
             "train time per step (ms)" if in_steps else "train time per epoch (s)":
                 why or (NA if math.isnan(shown_time) else f"{shown_time:.{1 if in_steps else 2}f}"),
             "time vs SGD": why_ratio or f"{ratio:.2f}x",
             "passes per step (fwd / bwd)": fmt_passes(row.passes), "ran on": devices}
    numbers = {"optimizer": row.optimizer, "method": row.label, "rho": None if pd.isna(rho) else float(rho),
               "n": s.n, "mean": s.mean, "ci95": s.ci95, "time_per_step_s": step_s, "time_per_epoch_s": epoch_s,
               "time_vs_sgd": ratio, "forwards": row.passes[0] if row.passes else math.nan,
               "backwards": row.passes[1] if row.passes else math.nan, "devices": devices}
    return shown, numbers


def methods_table(runs: pd.DataFrame) -> Table:
    """Per setting with a SAM-family run: each optimizer's test error (mean ± 95% CI over seeds),
    seeds, training time per epoch or per step, time relative to SGD on the same device, passes."""
    runs = real_runs(runs)
    runs = runs.assign(_setting=[without(k, OPTIMIZER_FIELDS) for k in runs["setting_key"]])
    keys = sorted(k for k, g in runs.groupby("_setting") if g["optimizer"].isin(list(METHOD_SPECS)).any())
    stems = unique_stems(keys)
    index, sections, data = [], [], []
    for key in sorted(keys, key=lambda k: (stems[k], k)):
        group, setting = runs[runs["_setting"] == key], json.loads(key)
        label, _ = trained(group)  # report/budget.py's label of the training done: '0.51 epochs (200 steps, ...)'
        in_steps = setting.get("train_steps") is not None
        rows = _rows(group)
        sgd = group[group["optimizer"] == "sgd"]
        place = {"setting": stems[key], "dataset": setting.get("dataset"), "model": setting.get("model"),
                 "augment": setting.get("augment"), "label_noise": setting.get("label_noise"), "trained": label,
                 "batch_size": setting.get("batch_size"), "data.source": setting.get("data.source")}
        index.append({**{k: DASH if v is None else str(v) for k, v in place.items()},
                      "optimizers": ", ".join(r.label for r in rows)})
        cells = [_cells(row, sgd, in_steps) for row in rows]
        data += [{**place, **numbers} for _, numbers in cells]
        heading = (f"{stems[key]}: {setting.get('dataset')} {setting.get('model')} {setting.get('augment')}, "
                   f"{label}, batch {setting.get('batch_size')}, data {setting.get('data.source')}")
        sections.append((heading, pd.DataFrame([shown for shown, _ in cells])))
    notes = [
        "One section per setting with at least one SAM-family run (docs/methods.md); a setting is "
        "everything a run logs but its optimizer fields (the data, model, augmentation, training done, "
        "batch, lr, decay). Rows of one optimizer that differ in rho, m or the method's own "
        "hyperparameters (config.yaml) are separate rows, named by what differs.",
        "Test error: final epoch, mean ± 95% CI over seeds (Student t: t_{0.975,n-1}·s/√n; no CI for "
        "n=1), n = seeds. These runs never fill the paper tables' SAM or SGD cells (budget.md lists them).",
        "Train time: images per step / the run's training throughput (metrics.json images_per_s, "
        "evaluation excluded), per epoch (steps per epoch x that) or, for a schedule counted in steps, "
        "per step; the mean over the row's seeds. Time vs SGD: that over the mean of the setting's SGD "
        "runs on the same device (env.device); n/a when there is none, or when the row's runs ran on "
        "several devices.",
        "Passes per step: forwards / backwards per optimizer step on average, extra no-grad forwards "
        "counted (interval SAM and LookSAM perturb every k-th step: 1 + 1/k), from each run's "
        "config.yaml; n/a where config.yaml is unreadable and the count depends on it.",
    ]
    if not sections:  # say how to get one, as the paper tables print the commands for empty cells
        notes.insert(0, "No setting has a SAM-family run yet: e.g. `sam-train -m experiment=t1_cifar10_wrn28_10_200ep "
                        "optim=sgd,sam,gsam,looksam seed=0,1,2` fills one.")
    frame = pd.DataFrame(data, columns=COLUMNS)
    frame["n"] = frame["n"].astype("Int64")
    return Table("methods", "SAM-family methods side by side, per setting", pd.DataFrame(index), frame,
                 notes, sections=sections)
