"""Run directories -> pandas: one row per completed run, and a list of what was skipped and why.

The only input is the run-directory contract (docs/run_directory.md): every `metrics.json` below
the runs root, found recursively. Directory names are never parsed. Nothing in a run directory
can crash the report: an unreadable, partial or unfinished run becomes a row of `skipped`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from sam_repro.report import budget

REQUIRED_CONFIG = ("dataset", "model", "augment", "optimizer", "epochs", "batch_size", "seed")
SKIPPED_COLUMNS = ["run_dir", "status", "reason"]
# The columns an empty `runs` frame still has, so that callers need no special case.
RUN_COLUMNS = ["run_dir", "abs_dir", "status", "setting_key", "run_key", *REQUIRED_CONFIG,
               "final.test_err", "final.test_acc", "env.device", "data.source", *budget.COLUMNS]
# Sorts runs without a parsable updated_at before every real one (oldest).
_NO_TIME = datetime.min.replace(tzinfo=timezone.utc)


@dataclass
class Loaded:
    """`runs`: completed, de-duplicated runs. `skipped`: run_dir, status, reason."""

    runs: pd.DataFrame
    skipped: pd.DataFrame


class _Skip(Exception):
    """A run directory that is not a final result; the message is the reason shown."""

    def __init__(self, reason: str, status: str = "") -> None:
        super().__init__(reason)
        self.status = status


def _flatten(block: dict[str, Any], prefix: str) -> dict[str, Any]:
    """{'label_noise': {'rate': 0.2}} with prefix 'data' -> {'data.label_noise.rate': 0.2}."""
    out: dict[str, Any] = {}
    for key, value in block.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def _parse_time(text: Any) -> datetime:
    try:
        t = datetime.fromisoformat(str(text))
    except ValueError:
        return _NO_TIME
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _parse(doc: Any) -> dict[str, Any]:
    """One metrics.json document -> one flat row, or _Skip with the reason it is not final."""
    if not isinstance(doc, dict):
        raise _Skip(f"not a JSON object ({type(doc).__name__})")
    if doc.get("schema", 1) != 1:
        raise _Skip(f"unknown schema {doc.get('schema')!r} (this report reads schema 1)")
    status = doc.get("status")
    if status is None:
        raise _Skip("missing key 'status'")
    if status != "completed":
        reason = f"status {status}"
        if status == "running":  # interrupted or killed: how far it got
            reason += f" ({budget.budget_of(doc).progress()})"
        if doc.get("error"):
            reason += f": {doc['error']}"
        raise _Skip(reason, str(status))
    for key in ("config", "final", "env", "data"):
        if not isinstance(doc.get(key), dict):
            raise _Skip(f"missing key '{key}'", status)
    config, final = doc["config"], doc["final"]
    for key in REQUIRED_CONFIG:
        if key not in config:
            raise _Skip(f"missing key 'config.{key}'", status)
    if not _finite(final.get("test_err")):
        raise _Skip(f"final.test_err is {final.get('test_err')!r}", status)
    final = dict(final)
    final.setdefault("test_acc", 100.0 - final["test_err"])  # accuracy = 100 - error, in percent
    data = doc["data"]
    identity = {k: v for k, v in config.items() if k != "seed"}
    identity["data.source"] = data.get("source")
    row: dict[str, Any] = {
        "status": status,
        "experiment": doc.get("experiment"),
        "updated_at": doc.get("updated_at"),
        "epochs_done": doc.get("epochs_done"),
        "wall_s": doc.get("wall_s"),
        "images_per_s": doc.get("images_per_s"),
        # setting_key: everything but the seed (runs that are seeds of one setting share it);
        # run_key: the setting, the seed and the exact data (a rerun of the same run shares it).
        "setting_key": json.dumps(identity, sort_keys=True, default=str),
        "run_key": json.dumps(
            {**identity, "seed": config["seed"], "data.fingerprint": data.get("fingerprint")},
            sort_keys=True, default=str,
        ),
    }
    row.update(config)
    for name in ("final", "best", "env", "data"):
        block = final if name == "final" else doc.get(name)
        row.update(_flatten(block if isinstance(block, dict) else {}, name))
    # the training done (config.epochs is only what was configured: train_steps may cut it)
    row.update(budget.columns(budget.budget_of(doc)))
    return row


def _read_one(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _Skip(f"unreadable metrics.json: {type(err).__name__}: {err}") from None
    return _parse(doc)


def _rel(path: Path, root: Path) -> str:
    """The run directory relative to the runs root, '/'-separated: outputs never hold absolute paths."""
    return path.relative_to(root).as_posix()


def _orphans(root: Path, with_metrics: set[Path]) -> list[Path]:
    """Run directories that logged something but have no metrics.json (killed before it was written)."""
    found = {p.parent for name in ("metrics.jsonl", "config.yaml") for p in root.rglob(name)}
    # Hydra keeps its own config.yaml in <run>/.hydra: not a run directory.
    found = {d for d in found if not any(part.startswith(".") for part in d.relative_to(root).parts)}
    return sorted(found - with_metrics)


def load_runs(root: str | Path) -> Loaded:
    """Read every metrics.json below `root`; keep completed runs, the latest of each duplicate."""
    root = Path(root)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    paths = sorted(root.rglob("metrics.json")) if root.is_dir() else []
    for path in paths:
        run_dir = _rel(path.parent, root)
        try:
            row = _read_one(path)
        except _Skip as skip:
            skipped.append({"run_dir": run_dir, "status": skip.status, "reason": str(skip)})
            continue
        rows.append({"run_dir": run_dir, "abs_dir": str(path.parent), **row})
    if root.is_dir():
        for d in _orphans(root, {p.parent for p in paths}):
            skipped.append({"run_dir": _rel(d, root), "status": "",
                            "reason": "no metrics.json (the run never got past its start)"})

    runs = pd.DataFrame(rows, columns=None if rows else RUN_COLUMNS)
    if not runs.empty:
        runs, dups = _deduplicate(runs)
        skipped.extend(dups)
    skipped_df = pd.DataFrame(skipped, columns=SKIPPED_COLUMNS).sort_values("run_dir", kind="stable")
    return Loaded(runs=runs, skipped=skipped_df.reset_index(drop=True))


def _deduplicate(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """The same config, seed and data counts once: the latest `updated_at` wins (run_dir breaks ties)."""
    runs = runs.assign(_t=[_parse_time(t) for t in runs["updated_at"]])
    runs = runs.sort_values(["run_key", "_t", "run_dir"], kind="stable")
    keep = ~runs.duplicated("run_key", keep="last")
    latest = runs[keep].set_index("run_key")["run_dir"]
    dups = [
        {"run_dir": r.run_dir, "status": "completed",
         "reason": f"duplicate of {latest[r.run_key]} (same config and seed; that one is newer)"}
        for r in runs[~keep].itertuples()
    ]
    kept = runs[keep].drop(columns="_t").sort_values("run_dir", kind="stable").reset_index(drop=True)
    return kept, dups


def load_curve(run_dir: str | Path) -> pd.DataFrame:
    """metrics.jsonl of one run -> one row per epoch. Broken lines (a run killed mid-write) are
    dropped; an epoch logged twice (a resumed run) keeps its last line."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and _finite(rec.get("epoch")) and _finite(rec.get("test_err")):
            records.append(rec)
    df = pd.DataFrame(records, columns=None if records else ["epoch", "test_err"])
    if df.empty:
        return df
    df = df.drop_duplicates("epoch", keep="last").sort_values("epoch", kind="stable")
    return df.reset_index(drop=True)
