"""`sam-train -m` (the basic launcher): one directory per job, one line per job status at the end, and a
non-zero exit naming the jobs that did not complete."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sam_repro.sweep import job_status
from tests.conftest import sam_train

TINY = ["experiment=smoke", "dataset.train_size=128", "dataset.test_size=64", "batch_size=64", "engine.progress=false",
        "epochs=1"]


def test_job_status_reads_metrics_json_else_the_jobs_record(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text(json.dumps({"status": "diverged", "error": "non-finite"}))
    assert job_status({"run_dir": str(tmp_path / "a"), "exit": 1}) == ("diverged", "non-finite")
    assert job_status({"run_dir": str(tmp_path / "b"), "exit": 2})[0] == "invalid"
    assert job_status({"run_dir": str(tmp_path / "b"), "exit": 1, "error": "RuntimeError: x"}) == ("failed", "RuntimeError: x")
    assert job_status({"run_dir": str(tmp_path / "b")}) == ("failed", "the job never finished")


@pytest.mark.slow
def test_a_sweep_writes_one_directory_per_job_names_the_jobs_that_diverged_and_exits_nonzero(tmp_path: Path) -> None:
    # lr 1e30 on the smoke preset overflows the logits within the first epoch: status diverged
    result = sam_train(["-m", *TINY, "optim=sgd,sam", "optim.lr=0.05,1e30", f"runs_root={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("sam-train: sweep")]
    assert len(lines) == 5, result.stdout[-3000:]
    labels = ["optim=sgd,optim.lr=0.05", "optim=sgd,optim.lr=1e+30", "optim=sam,optim.lr=0.05", "optim=sam,optim.lr=1e+30"]
    for num, (line, label) in enumerate(zip(lines, labels)):
        status = "diverged" if label.endswith("1e+30") else "completed"
        prefix = f"sam-train: sweep job {num} {status}: {label}" + (" (non-finite training loss" if status == "diverged" else " -> ")
        assert line.startswith(prefix), (line, prefix)
    assert lines[4] == "sam-train: sweep: 2 of 4 jobs completed"
    assert ("sam-train: error: sweep: 2 of 4 jobs did not complete: job 1 optim=sgd,optim.lr=1e+30 diverged; "
            "job 3 optim=sam,optim.lr=1e+30 diverged") in result.stderr
    # one directory per job, named by its overrides, holding the status the line reported
    run_dirs = [Path(line.rsplit(" -> ", 1)[1]) for line in lines[:4]]
    assert len(set(run_dirs)) == 4 and all(d.parent == tmp_path / "smoke" for d in run_dirs)
    for run_dir, label in zip(run_dirs, labels):
        optim, lr = label.split(",")
        assert optim in run_dir.name and lr in run_dir.name, run_dir.name
        summary = json.loads((run_dir / "metrics.json").read_text())
        assert summary["status"] == ("diverged" if lr.endswith("1e+30") else "completed")
        assert summary["config"]["optimizer"] == optim.split("=")[1]
    sgd_rows, sam_rows = ([json.loads(r) for r in (run_dirs[i] / "metrics.jsonl").read_text().splitlines()] for i in (0, 2))
    assert sgd_rows and all("grad_norm" not in r for r in sgd_rows)  # SAM's norms only for SAM
    assert sam_rows and all(r["grad_norm"] > 0 for r in sam_rows)
