"""The run directory (docs/run_directory.md): config.yaml, metrics.jsonl, metrics.json.

Everything the report and external tools read is written here, atomically. metrics.jsonl is
rewritten from the checkpoint's history on resume, so a run killed between its checkpoint and
its log line never shows an epoch twice.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from sam_repro.rundir import CONFIG, METRICS, SUMMARY, atomic_write, write_json
from sam_repro.optim.factory import METHODS

if TYPE_CHECKING:
    from sam_repro.trackers import Trackers

SCHEMA_VERSION = 1
# interrupted: Ctrl-C, SIGTERM, a preemption or a full disk stopped it; re-running the command resumes it
STATUSES = ("running", "completed", "interrupted", "diverged", "failed")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def summary_config(cfg: DictConfig, precision: str, world_size: int = 1) -> dict[str, Any]:
    """metrics.json's `config` block: the keys the report groups runs by.

    `device_batch` is the number of examples per device, real or emulated (BatchNorm normalizes over
    it): `device_batch`, else the batch of one process. `m` is the number of examples per
    perturbation actually used: optim.m, else the device batch (each device perturbs with its own
    gradient), or null when one synchronized e(w) covers the whole batch. `devices` counts processes.
    """
    method = METHODS[cfg.optim.name]
    sam = method.uses_sam
    device_batch = cfg.device_batch or cfg.batch_size // world_size
    m = None if cfg.optim.sync_perturbation else (cfg.optim.m or device_batch)
    return {
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "augment": cfg.augment.name,
        "optimizer": cfg.optim.name,
        "rho": cfg.optim.rho if sam else None,
        "p": (2 if cfg.optim.p == 2 else "inf") if sam else None,
        "adaptive": method.adaptive if sam else None,
        "m": m if sam else None,
        "device_batch": device_batch,
        "devices": world_size,
        "label_noise": cfg.dataset.label_noise,
        "noise_kind": cfg.dataset.noise_kind,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "precision": precision,
        "lr": cfg.optim.lr,
        "weight_decay": cfg.optim.weight_decay,
        "wd_mode": cfg.optim.wd_mode,
        "bn_stats": cfg.optim.bn_stats if sam else None,
        "label_smoothing": cfg.optim.label_smoothing,
        "grad_clip": cfg.optim.grad_clip,
        "val_fraction": cfg.dataset.val_fraction,
        "train_steps": cfg.train_steps,
    }


def git_state() -> tuple[Optional[str], Optional[bool]]:
    """(sha, dirty) of the sam-repro checkout this code runs from; (None, None) outside git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None, None
        status = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        return sha.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def cpu_name() -> str:
    """'CPU <model> (<n> cores)', from /proc/cpuinfo where there is one."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model} ({os.cpu_count()} cores)".replace("CPU  (", "CPU (")


def environment(device: torch.device) -> dict[str, Any]:
    """What produced the numbers: software versions, the device, the code's git sha."""
    sha, dirty = git_state()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "device": name,
        "device_type": device.type,
        "git_sha": sha,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "hostname": socket.gethostname(),
    }


def _finite(value: float) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None


def summary_block(row: dict[str, Any], epoch_key: bool = False) -> dict[str, Any]:
    """final/best block from one epoch row of metrics.jsonl."""
    block = {
        "test_err": row["test_err"],
        "test_acc": round(100.0 - row["test_err"], 6),
        "test_loss": _finite(row["test_loss"]),
        "train_loss": _finite(row["train_loss"]),
        "train_err": row["train_err"],
    }
    for key in ("test_top5_err", "val_err", "val_loss"):
        if key in row:
            block[key] = row[key]
    if epoch_key:
        block["epoch"] = row["epoch"]
    return block


class RunLog:
    """Writes the files of one run directory. Only rank 0 of a distributed run owns one."""

    def __init__(self, run_dir: Path, experiment: str, config: dict[str, Any], env: dict[str, Any], data: dict[str, Any],
                 trackers: Optional["Trackers"] = None) -> None:
        self.run_dir = Path(run_dir)
        self.trackers = trackers  # TensorBoard/W&B/MLflow views of this run directory (sam_repro.trackers)
        self.summary: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "status": "running",
            "experiment": experiment,
            "started_at": now_iso(),
            "updated_at": now_iso(),
            "config": config,
            "final": None,
            "best": None,
            "epochs_done": 0,
            "wall_s": 0.0,
            "images_per_s": None,
            "env": env,
            "data": data,
            "error": None,
        }

    @property
    def jsonl(self) -> Path:
        return self.run_dir / METRICS

    def write_config(self, cfg: DictConfig) -> None:
        atomic_write(self.run_dir / CONFIG, lambda f: f.write(OmegaConf.to_yaml(cfg, resolve=True)), mode="w")

    def restore(self, history: list[dict[str, Any]], started_at: Optional[str], wall_s: float) -> None:
        """Resume: the history in the checkpoint is the truth; rewrite metrics.jsonl from it."""
        text = "".join(json.dumps(row) + "\n" for row in history)
        atomic_write(self.jsonl, lambda f: f.write(text), mode="w")
        if started_at:
            self.summary["started_at"] = started_at
        self._update_from_history(history, wall_s)
        if self.trackers:
            self.trackers.start(history)

    def log_epoch(self, row: dict[str, Any], history: list[dict[str, Any]], wall_s: float) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._update_from_history(history, wall_s)
        self.write_summary()
        if self.trackers:
            self.trackers.log_row(row)

    def _update_from_history(self, history: list[dict[str, Any]], wall_s: float) -> None:
        if not history:
            return
        best = min(history, key=lambda r: (r["test_err"], r["epoch"]))
        self.summary.update(
            final=summary_block(history[-1]),
            best=summary_block(best, epoch_key=True),
            epochs_done=history[-1]["epoch"],
            wall_s=round(wall_s, 3),
            images_per_s=round(sum(r["images_per_s"] for r in history) / len(history), 1),
        )

    def finish(self, status: str, error: Optional[str] = None) -> None:
        assert status in STATUSES
        self.summary["status"] = status
        self.summary["error"] = error
        self.write_summary()
        if self.trackers:
            self.trackers.finish(status, self.summary)

    def write_summary(self) -> None:
        self.summary["updated_at"] = now_iso()
        write_json(self.run_dir / SUMMARY, self.summary)
