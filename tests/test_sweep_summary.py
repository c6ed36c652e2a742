"""`sam-train -m`: one line per job status at the end, and a non-zero exit naming the jobs that did not complete."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sam_repro.sweep import job_status
from tests.conftest import sam_train

TINY = ["experiment=smoke", "dataset.train_size=128", "dataset.test_size=64", "batch_size=64", "engine.progress=false",
        "epochs=1", "optim=sgd"]


def test_job_status_reads_metrics_json_else_the_jobs_record(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text(json.dumps({"status": "diverged", "error": "non-finite"}))
    assert job_status({"run_dir": str(tmp_path / "a"), "exit": 1}) == ("diverged", "non-finite")
    assert job_status({"run_dir": str(tmp_path / "b"), "exit": 2})[0] == "invalid"
    assert job_status({"run_dir": str(tmp_path / "b"), "exit": 1, "error": "RuntimeError: x"}) == ("failed", "RuntimeError: x")
    assert job_status({"run_dir": str(tmp_path / "b")}) == ("failed", "the job never finished")


@pytest.mark.slow
def test_a_sweep_with_a_diverging_job_exits_nonzero_and_names_it(tmp_path: Path) -> None:
    # lr 1e30 on the smoke preset overflows the logits within the first epoch: status diverged
    result = sam_train(["-m", *TINY, "optim.lr=0.05,1e30", f"runs_root={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("sam-train: sweep")]
    assert len(lines) == 3, result.stdout[-3000:]
    assert lines[0].startswith("sam-train: sweep job 0 completed: optim.lr=0.05 -> ")
    assert lines[1].startswith("sam-train: sweep job 1 diverged: optim.lr=1e+30 (non-finite training loss")
    assert lines[2] == "sam-train: sweep: 1 of 2 jobs completed"
    assert "sam-train: error: sweep: 1 of 2 jobs did not complete: job 1 optim.lr=1e+30 diverged" in result.stderr
    run_dir = Path(lines[1].rsplit(" -> ", 1)[1])
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "diverged"
    sgd_rows = (Path(lines[0].rsplit(" -> ", 1)[1]) / "metrics.jsonl").read_text().splitlines()
    assert sgd_rows and all("grad_norm" not in json.loads(r) for r in sgd_rows)  # SAM's norms only for SAM
