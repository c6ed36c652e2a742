"""Sweeps on a SLURM cluster: our launcher preset composes onto hydra-submitit-launcher, and a run that
submitit preempts (SIGUSR2, as SLURM sends it before a time limit or a preemption) is requeued, resumes
from its checkpoint and ends with the metrics of an uninterrupted run.

No SLURM here: the preemption runs through submitit's local executor (`hydra/launcher=submitit_local`),
which installs the same signal handler and requeues the same way (a restart of the job's process).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.conftest import RESUMABLE, only_run_dir, rows_without_timing, sam_train


def test_slurm_launcher_preset_composes_onto_submitit(tmp_path: Path) -> None:
    result = sam_train(["--cfg", "hydra", "hydra/launcher=slurm", "experiment=smoke"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    launcher = yaml.safe_load(result.stdout)["hydra"]["launcher"]
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["gpus_per_node"] == 1 and launcher["tasks_per_node"] == 1
    assert launcher["timeout_min"] == 1440 and launcher["max_num_timeout"] == 20 and launcher["signal_delay_s"] == 120
    assert launcher["partition"] is None  # the user's
    assert launcher["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    # a user's values win over the preset's
    custom = sam_train(["--cfg", "hydra", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                        "hydra.launcher.timeout_min=60"], cwd=tmp_path)
    launcher = yaml.safe_load(custom.stdout)["hydra"]["launcher"]
    assert (launcher["partition"], launcher["timeout_min"]) == ("gpu", 60)


# A sitecustomize for the submitit job process only (the task submitit's controller starts; it sets
# SUBMITIT_LOCAL_JOB_ID): right after epoch PREEMPT_AFTER_EPOCH's row is logged, the job sends itself
# SIGUSR2, what SLURM sends before a time limit or on preemption. Python runs submitit's handler as
# soon as os.kill returns, so the preemption lands at that point of the program on every machine and
# under any load, not when a poller happens to look. The mark file keeps the requeued job from
# preempting itself again.
PREEMPTER = """
import os
if os.environ.get("SUBMITIT_LOCAL_JOB_ID") and not os.path.exists(os.environ["PREEMPT_MARK"]):
    import signal
    from sam_repro import runlog
    AT = int(os.environ["PREEMPT_AFTER_EPOCH"])
    log_epoch = runlog.RunLog.log_epoch
    def preempting_log_epoch(self, row, history, wall_s):
        log_epoch(self, row, history, wall_s)
        if row["epoch"] == AT:
            open(os.environ["PREEMPT_MARK"], "w").close()
            os.kill(os.getpid(), signal.SIGUSR2)
    runlog.RunLog.log_epoch = preempting_log_epoch
"""


@pytest.mark.slow
def test_preempted_job_is_requeued_and_resumes_to_the_uninterrupted_result(tmp_path: Path,
                                                                           uninterrupted_runs: Path) -> None:
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(PREEMPTER)
    path = os.pathsep.join([str(tmp_path / "hook"), *filter(None, [os.environ.get("PYTHONPATH")])])
    runs = tmp_path / "preempted"
    preempted = sam_train(["-m", "hydra/launcher=submitit_local", *RESUMABLE, f"runs_root={runs}"], cwd=tmp_path,
                          env={"PYTHONPATH": path, "PREEMPT_AFTER_EPOCH": "1", "PREEMPT_MARK": str(tmp_path / "preempted.mark")})
    assert preempted.returncode == 0, preempted.stderr[-3000:]
    assert (tmp_path / "preempted.mark").exists(), "the job never logged epoch 1"

    run = only_run_dir(runs)
    log = (run / "train.log").read_text()
    assert "Caught signal SIGUSR2" in log and "Requeued job" in log, log[-2000:]
    resumed_at = [line for line in log.splitlines() if "resuming" in line]
    assert len(resumed_at) == 1 and " after epoch 1 " in resumed_at[0], resumed_at
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_done"] == 3
    reference = only_run_dir(uninterrupted_runs)
    assert rows_without_timing(run) == rows_without_timing(reference)
    assert summary["final"] == json.loads((reference / "metrics.json").read_text())["final"]
