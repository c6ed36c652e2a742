"""The end of a sweep (`sam-train -m ...`): one line per job with its status, and an exit status
that scripts and SLURM pipelines can trust (0 only when every job completed).

A Hydra callback (configs/train.yaml `hydra.callbacks`): at the sweep's start it picks a manifest
folder below the sweep directory; every job, wherever the launcher runs it (in-process, joblib
workers, SLURM nodes: the callback travels with the job), records its run directory and exit code
there; at the end the launching process reads each job's metrics.json status.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sam_repro.errors import EXIT_BAD_INPUT
from sam_repro.rundir import read_summary, write_json

MANIFESTS = ".sweeps"  # below the sweep directory (runs_root): <stamp>/<job num>.json
exit_code = 0  # of the last sweep in this process; sam-train exits with it (sam_repro.cli)


def job_status(record: dict[str, Any]) -> tuple[str, str]:
    """(status, why) of one job: its metrics.json status, else what its record says."""
    summary = read_summary(Path(record["run_dir"]))
    if summary is not None:
        return summary.get("status", "unknown"), summary.get("error") or ""
    if record.get("error"):
        return "failed", record["error"]
    if record.get("exit") == EXIT_BAD_INPUT:
        return "invalid", "bad input (exit 2): see the job's error lines above"
    return "failed", "no metrics.json" if "exit" in record else "the job never finished"


class SweepSummary(Callback):
    def __init__(self) -> None:
        self.manifest: Optional[Path] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global exit_code
        exit_code = 0
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        self.manifest = Path(str(config.hydra.sweep.dir)).expanduser().resolve() / MANIFESTS / stamp
        self.manifest.mkdir(parents=True, exist_ok=True)

    def _record(self, config: DictConfig, **fields: Any) -> None:
        if self.manifest is None or os.environ.get("RANK", "0") != "0":
            return  # not a sweep (or a torchrun replica of a job)
        path = self.manifest / f"{config.hydra.job.num}.json"
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {}
        record.update(num=int(config.hydra.job.num), run_dir=str(config.hydra.runtime.output_dir),
                      overrides=list(config.hydra.overrides.task), **fields)
        write_json(path, record)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._record(config)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        value = job_return._return_value  # not .return_value: that re-raises a failed job's exception
        if isinstance(value, BaseException):
            self._record(config, exit=1, error=f"{type(value).__name__}: {value}")
        else:
            self._record(config, exit=int(value or 0))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global exit_code
        if self.manifest is None:
            return
        records = sorted((json.loads(p.read_text()) for p in self.manifest.glob("*.json")), key=lambda r: r["num"])
        # name each job by the overrides that tell it apart from the others (all of them for a lone job)
        common = set.intersection(*(set(r["overrides"]) for r in records)) if len(records) > 1 else set()
        bad = []
        for record in records:
            status, why = job_status(record)
            record["label"] = ",".join(o for o in record["overrides"] if o not in common) or "(no overrides)"
            print(f"sam-train: sweep job {record['num']} {status}: {record['label']}"
                  + (f" ({why})" if status != "completed" and why else "") + f" -> {record['run_dir']}")
            if status != "completed":
                bad.append((record, status))
        print(f"sam-train: sweep: {len(records) - len(bad)} of {len(records)} jobs completed")
        if bad:
            names = "; ".join(f"job {r['num']} {r['label']} {status}" for r, status in bad)
            print(f"sam-train: error: sweep: {len(bad)} of {len(records)} jobs did not complete: {names}", file=sys.stderr)
            exit_code = EXIT_BAD_INPUT if all(status == "invalid" for _, status in bad) else 1
        sys.stdout.flush()
