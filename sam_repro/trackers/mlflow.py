"""MLflow: a local file store at <runs_root>/mlruns by default (`MLFLOW_ALLOW_FILE_STORE=true mlflow ui
--backend-store-uri file:runs/mlruns`; the UI needs `pip install mlflow`), or `logger.mlflow.tracking_uri=...`
(e.g. sqlite:///runs/mlflow.db, MLflow's recommended local backend, or a tracking server's http(s) URL).
One MLflow experiment per sam-repro experiment name; one MLflow run per run directory."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

from sam_repro.trackers import Tracker

RUN_STATUS = {"completed": "FINISHED", "interrupted": "KILLED", "running": "KILLED"}  # diverged, failed: FAILED
MAX_PARAMS, MAX_METRICS, MAX_PARAM_CHARS = 100, 1000, 500  # MLflow's limits per batch and per value


def tracking_uri(settings: Any, runs_root: str) -> str:
    if settings.tracking_uri:
        return str(settings.tracking_uri)
    return (Path(runs_root).expanduser().resolve() / "mlruns").as_uri()


class MlflowTracker(Tracker):
    def start(self, state: dict[str, Any], first_epoch: int) -> dict[str, Any]:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(self.settings, self.cfg.runs_root)
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode and refuses it unless this is set;
            # the issue asks for a local store that needs nothing else (sqlite:///... needs full mlflow).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        run_id = state.get("run_id") if state.get("tracking_uri") == uri else None
        if run_id:
            self.client.update_run(run_id, status="RUNNING")  # resumed: the same MLflow run goes on
        else:
            name = self.settings.experiment or self.cfg.name
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                try:
                    experiment_id = self.client.create_experiment(name)
                except MlflowException:  # created meanwhile by another job of the sweep
                    experiment_id = self.client.get_experiment_by_name(name).experiment_id
            else:
                experiment_id = experiment.experiment_id
            run = self.client.create_run(experiment_id, run_name=f"{self.run_dir.parent.name}/{self.run_dir.name}",
                                         tags={"sam_repro.run_dir": str(self.run_dir.resolve())})
            run_id = run.info.run_id
        self.run_id = run_id
        return {"run_id": run_id, "tracking_uri": uri}

    def last_logged(self) -> Optional[int]:
        """The last epoch MLflow holds (a run killed after logging but before trackers.json was saved)."""
        history = self.client.get_metric_history(self.run_id, "test_err")
        return max((m.step for m in history), default=None)

    def log_hparams(self, hparams: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow params are write-once: a resumed run (whose keys such as `resume` may differ) adds only new ones
        held = self.client.get_run(self.run_id).data.params
        params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in hparams.items() if k not in held]
        for i in range(0, len(params), MAX_PARAMS):
            self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS])

    def log_row(self, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, epoch) for k, v in metrics.items()]
        for i in range(0, len(batch), MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=batch[i:i + MAX_METRICS])

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        self.client.set_tag(self.run_id, "status", status)
        if summary.get("error"):
            self.client.set_tag(self.run_id, "error", str(summary["error"])[:5000])
        self.client.set_terminated(self.run_id, RUN_STATUS.get(status, "FAILED"))
