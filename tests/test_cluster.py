"""Sweeps on a SLURM cluster: our launcher preset composes onto hydra-submitit-launcher, and a run that
submitit preempts (SIGUSR2, as SLURM sends it before a time limit or a preemption) is requeued, resumes
from its checkpoint and ends with the metrics of an uninterrupted run.

No SLURM here: the preemption runs through submitit's local executor (`hydra/launcher=submitit_local`),
which installs the same signal handler and requeues the same way (a restart of the job's process).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import sam_train

RUN = ["experiment=smoke", "dataset.train_size=512", "dataset.test_size=128", "batch_size=64", "epochs=6",
       "engine.deterministic=true", "engine.progress=false"]
TIMING = {"epoch_s", "images_per_s"}


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


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc: no psutil)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def rows_without_timing(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def one_run_dir(root: Path) -> Path:
    found = [p.parent for p in root.rglob("metrics.json")]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the job's process through /proc")
def test_preempted_job_is_requeued_and_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    straight = sam_train(["-m", *RUN, f"runs_root={tmp_path / 'straight'}"], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    exe = Path(sys.executable).parent / "sam-train"
    runs = tmp_path / "preempted"
    proc = subprocess.Popen([str(exe), "-m", "hydra/launcher=submitit_local", *RUN, f"runs_root={runs}"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "SAM_DATA": str(tmp_path / "no-data")})
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            done = list(runs.rglob("metrics.jsonl"))
            if done and len(done[0].read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        jobs = [pid for pid in descendants(proc.pid) if "submitit.core._submit" in cmdline(pid)]
        assert len(jobs) == 1, "the submitit job process"
        os.kill(jobs[0], signal.SIGUSR2)  # what SLURM sends signal_delay_s before the end, or on preemption
        assert proc.wait(timeout=240) == 0
    finally:
        if proc.poll() is None:
            proc.kill()

    run = one_run_dir(runs)
    log = (run / "train.log").read_text()
    assert "Caught signal SIGUSR2" in log and "Requeued job" in log, log[-2000:]
    resumed_at = [line for line in log.splitlines() if "resuming" in line]
    assert len(resumed_at) == 1 and " after epoch 6 " not in resumed_at[0], "the signal must land mid-run"
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_done"] == 6
    reference = one_run_dir(tmp_path / "straight")
    assert rows_without_timing(run) == rows_without_timing(reference)
    assert summary["final"] == json.loads((reference / "metrics.json").read_text())["final"]
