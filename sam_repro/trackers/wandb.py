"""Weights & Biases: project/entity/group/tags from `logger.wandb.*`; files under <run dir>/wandb.

`logger.wandb.mode=offline` (or WANDB_MODE=offline) needs no network: `wandb sync <run dir>/wandb/offline-run-*`
uploads later. A resumed run continues the same W&B run id (kept in trackers.json).
"""
from __future__ import annotations

import uuid
from typing import Any

from sam_repro.trackers import Tracker

EXIT_CODES = {"completed": 0, "running": 0}  # anything else (diverged, failed) exits the W&B run with 1


class WandbTracker(Tracker):
    def start(self, state: dict[str, Any], first_epoch: int) -> dict[str, Any]:
        import wandb

        s = self.settings
        run_id = state.get("run_id") or uuid.uuid4().hex[:12]
        self.run = wandb.init(
            project=s.project, entity=s.entity, group=s.group or self.cfg.name, tags=list(s.tags) or None,
            name=f"{self.run_dir.parent.name}/{self.run_dir.name}", id=run_id, resume="allow",
            dir=str(self.run_dir), mode=s.mode, reinit="create_new",  # one W&B run per run directory
            settings=wandb.Settings(console="off"),  # train.log already keeps the console
        )
        return {"run_id": self.run.id, "mode": s.mode}

    def log_hparams(self, hparams: dict[str, Any]) -> None:
        self.run.config.update(hparams, allow_val_change=True)

    def log_row(self, epoch: int, metrics: dict[str, float]) -> None:
        self.run.log({**metrics, "epoch": epoch}, step=epoch)

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        self.run.summary["status"] = status
        if summary.get("error"):
            self.run.summary["error"] = summary["error"]
        self.run.finish(exit_code=EXIT_CODES.get(status, 1))
