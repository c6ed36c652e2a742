"""The methods table: SGD, SAM and the SAM-family methods (docs/methods.md) side by side, per setting.

A setting here is what the runs share apart from the optimizer (dataset, model, augmentation, label
noise, batch, data source, the training done): every optimizer run on it gets one row with its test
error over seeds, its time relative to SGD's on the same hardware, and its forward/backward passes
per step. Runs of a method never fill a paper cell (tables.match_setting requires the cell's own
optimizer); this table is where they are compared.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from omegaconf import OmegaConf

from sam_repro.report.tables import DASH, Table, fmt_ours, ran_on, t_interval, trained

# What a methods setting is: the budget table's fields without the optimizer and its radius.
SETTING_FIELDS = ("dataset", "model", "augment", "label_noise", "batch_size", "data.source")
BASELINES = ("sgd", "sam", "asam")  # the paper's optimizers; every other name is a SAM-family method


def passes_of(run_dir: str | Path) -> Optional[tuple[float, float]]:
    """(forwards, backwards) per step of a run, from its config.yaml and the method's own rule
    (optim.factory.passes_per_step); None when the run directory does not say."""
    from sam_repro.config import OptimConfig
    from sam_repro.optim.factory import passes_per_step

    try:
        optim = OmegaConf.merge(OmegaConf.structured(OptimConfig), OmegaConf.load(Path(run_dir) / "config.yaml").optim)
        return passes_per_step(OmegaConf.to_object(optim))
    except Exception:  # an old or hand-made run directory: the column says it is unknown
        return None


def _fmt_passes(p: Optional[tuple[float, float]]) -> str:
    return DASH if p is None else " / ".join(f"{v:.2f}".rstrip("0").rstrip(".") for v in p)


def _order(name: str) -> tuple[int, str]:
    return (BASELINES.index(name), "") if name in BASELINES else (len(BASELINES), name)


def _setting(row: pd.Series) -> str:
    return json.dumps({f: (None if pd.isna(row.get(f)) else row.get(f)) for f in SETTING_FIELDS},
                      sort_keys=True, default=str)


def methods_table(runs: pd.DataFrame) -> Table:
    """Every setting with at least one SAM-family method run: one row per optimizer run on it."""
    rows: list[dict[str, str]] = []
    data: list[dict[str, Any]] = []
    real = runs[runs["data.source"] != "synthetic"] if "data.source" in runs else runs
    if real.empty:
        return Table("methods", "SAM-family methods beside SGD and SAM", pd.DataFrame(), pd.DataFrame(), [])
    keyed = real.assign(_setting=[_setting(r) for _, r in real.iterrows()])
    for key in sorted(set(keyed["_setting"])):
        group = keyed[keyed["_setting"] == key]
        names = sorted(set(group["optimizer"]), key=_order)
        if all(n in BASELINES for n in names):
            continue
        setting, (label, _) = json.loads(key), trained(group)
        sgd = group[group["optimizer"] == "sgd"]
        sgd_devices = set(sgd["env.device"]) if "env.device" in sgd else set()
        sgd_speed = sgd["images_per_s"].astype(float).mean() if len(sgd) else math.nan
        title = ", ".join(f"{setting[f]}" for f in SETTING_FIELDS if setting.get(f) is not None)
        for name in names:
            g = group[group["optimizer"] == name]
            s = t_interval(g["final.test_err"].astype(float))
            same_hardware = len(sgd_devices) == 1 and set(g["env.device"]) == sgd_devices
            speed = g["images_per_s"].astype(float).mean()
            rel = sgd_speed / speed if same_hardware and speed > 0 and sgd_speed > 0 else math.nan
            passes = {passes_of(d) for d in g["abs_dir"]}
            p = passes.pop() if len(passes) == 1 else None
            rows.append({"setting": f"{title}: {label}", "optimizer": name, "test error (%)": fmt_ours(s),
                         "time / SGD's": "n/a" if math.isnan(rel) else f"{rel:.2f}x",
                         "passes per step (fwd / bwd)": _fmt_passes(p), "ran on (device @ git sha)": ran_on(g)})
            data.append({**setting, "trained": label, "optimizer": name, "n": s.n, "mean": s.mean, "ci95": s.ci95,
                         "time_over_sgd": rel, "forwards": p[0] if p else math.nan,
                         "backwards": p[1] if p else math.nan})
    notes = ["Test error: mean ± 95% CI over seeds (Student t; one seed shows its value alone). Time / SGD's: "
             "the run's images per second against the SGD runs' of the same setting, only where both ran "
             "on the same device (else n/a). Passes: forward and backward passes per step on average, "
             "from each method's rule (an interval method's SAM steps counted over its cycle).",
             "These runs differ from the paper's cells by their optimizer: they never enter Tables 1-5."]
    return Table("methods", "SAM-family methods beside SGD and SAM", pd.DataFrame(rows), pd.DataFrame(data), notes)
