"""`sam-train` end to end on the CPU: the run directory, resume after a kill, divergence, bad input,
missing data, sweeps, and a real image-folder dataset written by the test."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sam_repro.engine.loop import Run
from tests.conftest import RESUMABLE, compose_config, only_run_dir, rows_without_timing, sam_train
from tests.helpers import train

pytestmark = pytest.mark.slow
TINY = ["experiment=smoke", "dataset.train_size=256", "dataset.test_size=128", "batch_size=64"]
ROW_KEYS = {"epoch", "lr", "train_loss", "train_err", "test_loss", "test_err", "epoch_s", "images_per_s"}
FLAT_KEYS = {"dataset", "model", "augment", "optimizer", "rho", "p", "adaptive", "m", "label_noise", "epochs",
             "batch_size", "seed", "precision"}


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_smoke_preset_writes_the_run_directory(tmp_path: Path) -> None:
    start = time.perf_counter()
    result = sam_train(["experiment=smoke", f"runs_root={tmp_path}"], cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "smoke"
    assert {"config.yaml", "metrics.json", "metrics.jsonl", "checkpoint.pt", "train.log"} <= {p.name for p in run.iterdir()}
    rows = read_rows(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all(ROW_KEYS <= set(r) for r in rows)
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_done"] == 3
    assert FLAT_KEYS <= set(summary["config"]) and summary["config"]["optimizer"] == "sam"
    assert summary["final"]["test_err"] == rows[-1]["test_err"]
    assert summary["final"]["test_acc"] == pytest.approx(100 - rows[-1]["test_err"])
    assert summary["best"]["test_err"] == min(r["test_err"] for r in rows)
    assert summary["data"]["source"] == "synthetic" and summary["data"]["train_size"] == 1024
    assert summary["env"]["torch"] == torch.__version__ and summary["env"]["git_sha"]
    # It learns: the synthetic problem is easy, chance is 90 % error.
    assert rows[-1]["test_err"] < 60
    print(f"smoke run: {elapsed:.1f} s")


# Runs sam-train with RunLog.log_epoch patched to SIGKILL the process after epoch KILL_AT's row is
# appended to metrics.jsonl and before metrics.json is rewritten: the worst moment (the checkpoint,
# metrics.jsonl and metrics.json disagree), reached deterministically, with no polling or timer.
KILLER = """
import os, signal, sys
from sam_repro import runlog
KILL_AT = int(os.environ["KILL_AT_EPOCH"])
original = runlog.RunLog.write_summary
def write_summary(self):
    if self.summary.get("status") == "running" and self.jsonl.exists() and \\
            len(self.jsonl.read_text().splitlines()) == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    original(self)
runlog.RunLog.write_summary = write_summary
from sam_repro.cli import train_main
sys.argv = ["sam-train", *sys.argv[1:]]
train_main()
"""


def test_killed_run_resumes_to_the_same_result(tmp_path: Path, uninterrupted_runs: Path) -> None:
    uninterrupted_run = only_run_dir(uninterrupted_runs)
    killed = subprocess.run([sys.executable, "-c", KILLER, *RESUMABLE, f"runs_root={tmp_path}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "SAM_DATA": str(tmp_path / "elsewhere"), "KILL_AT_EPOCH": "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = only_run_dir(tmp_path)
    # killed between the two writes: the checkpoint and metrics.jsonl have epoch 2, metrics.json epoch 1
    assert len(read_rows(run)) == 2
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["status"] == "running" and summary["epochs_done"] == 1
    assert torch.load(run / "checkpoint.pt", weights_only=False)["progress"]["epoch"] == 2

    # data moved (SAM_DATA elsewhere for the killed run): resuming still finds it by fingerprint
    resumed = sam_train([*RESUMABLE, f"runs_root={tmp_path}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in (run / "train.log").read_text() and "after epoch 2" in (run / "train.log").read_text()
    assert rows_without_timing(run) == rows_without_timing(uninterrupted_run)
    sa, sb = (json.loads((d / "metrics.json").read_text()) for d in (uninterrupted_run, run))
    assert sa["final"] == sb["final"] and sa["best"] == sb["best"] and sb["status"] == "completed"
    assert sb["epochs_done"] == 3 == len(read_rows(run))
    wa = torch.load(uninterrupted_run / "checkpoint.pt", weights_only=False)["model"]
    wb = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_completed_run_is_not_trained_again_and_its_directory_refuses_another_config(
        tmp_path: Path, uninterrupted_runs: Path) -> None:
    shutil.copytree(uninterrupted_runs, tmp_path / "runs")
    reference = only_run_dir(uninterrupted_runs)
    run = tmp_path / "runs" / reference.relative_to(uninterrupted_runs)
    checkpoint = (run / "checkpoint.pt").read_bytes()
    # the same command finds the same directory, sees it completed and trains nothing
    again = sam_train([*RESUMABLE, f"runs_root={tmp_path / 'runs'}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert only_run_dir(tmp_path / "runs") == run
    assert read_rows(run) == read_rows(reference), "re-running a completed configuration must not train again"
    assert (run / "checkpoint.pt").read_bytes() == checkpoint
    assert json.loads((run / "metrics.json").read_text())["status"] == "completed"

    other = sam_train([*RESUMABLE, "optim.lr=0.2", f"hydra.run.dir='{run}'"], cwd=tmp_path)  # quoted: the name has = and ,
    assert other.returncode == 2 and "another config" in other.stderr and "optim.lr" in other.stderr
    assert "Traceback" not in other.stderr
    assert read_rows(run) == read_rows(reference) and (run / "checkpoint.pt").read_bytes() == checkpoint


def test_divergence_stops_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    cfg = compose_config([*TINY, "epochs=3"])
    run, calls = Run(cfg, tmp_path), []

    def poisoned(real_step):
        def step(x: torch.Tensor, y: torch.Tensor):
            calls.append(1)
            if len(calls) == run.steps_per_epoch + 2:  # in epoch 2
                with torch.no_grad():
                    next(run.model.parameters()).fill_(float("nan"))
            return real_step(x, y)
        return step

    assert train(run, poisoned) == 1
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["status"] == "diverged" and "non-finite" in summary["error"] and summary["epochs_done"] == 1
    assert len(read_rows(tmp_path)) == 1
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["progress"]["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_bad_input_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    result = sam_train(["experiment=smoke", "optim.rho=-1", "optim.m=7", f"runs_root={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("sam-train: error:")]
    assert len(errors) == 2
    assert errors[0].startswith("sam-train: error: optim.rho=-1.0 is invalid: must be >= 0")
    assert "optim.m=7" in errors[1] and "per-device batch (128)" in errors[1]
    assert not list(tmp_path.rglob("metrics.json")), "nothing may run before validation"


def test_missing_dataset_names_the_path_and_both_remedies(tmp_path: Path) -> None:
    # A hang fails by the subprocess timeout; "no download attempt" is test_data_sources' (every
    # dataset, with connections refused): here nothing may be written where the data was looked for.
    result = sam_train(["dataset=cifar10", "model=resnet20", "engine=cpu", "epochs=1", f"runs_root={tmp_path}"],
                       cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    message = result.stderr
    assert str(tmp_path / "no-data" / "cifar10") in message
    assert "dataset.download=true" in message and "dataset.source=folder" in message
    assert not (tmp_path / "no-data").exists()


def write_image_folder(root: Path, per_class_train: int = 3, per_class_test: int = 1) -> None:
    """A CIFAR-10-shaped image folder: 10 class folders of 32x32 PNG files, class = mean colour."""
    rng = np.random.default_rng(0)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for split, count in (("train", per_class_train), ("test", per_class_test)):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                base = np.full((32, 32, 3), index * 25, dtype=np.int16)
                img = np.clip(base + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:04d}.png")


def test_real_data_path_on_an_image_folder(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "imgs")
    result = sam_train(["dataset=cifar10", "dataset.source=folder", f"dataset.root={tmp_path / 'imgs'}",
                        "model=resnet20", "engine=cpu", "epochs=2", "batch_size=10", "engine.eval_batch_size=10",
                        f"runs_root={tmp_path / 'runs'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(next((tmp_path / "runs").rglob("metrics.json")).read_text())
    assert summary["status"] == "completed" and summary["data"]["source"] == "folder"
    assert (summary["data"]["train_size"], summary["data"]["test_size"]) == (30, 10)
    assert summary["data"]["root"] == str(tmp_path / "imgs")


def test_a_joblib_sweep_writes_one_directory_per_configuration_and_every_job_reports_back(tmp_path: Path) -> None:
    """The basic launcher's sweep is tests/test_sweep_summary.py's; here jobs run in joblib's worker processes."""
    result = sam_train(["-m", *TINY, "epochs=1", "optim=sgd,sam", f"runs_root={tmp_path}", "hydra/launcher=joblib",
                        "hydra.launcher.n_jobs=2"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    found = {json.loads(p.read_text())["config"]["optimizer"]: p.parent.name
             for p in (tmp_path / "smoke").glob("*/metrics.json")}
    assert set(found) == {"sgd", "sam"}
    assert "optim=sgd" in found["sgd"] and "optim=sam" in found["sam"]
    for p in (tmp_path / "smoke").glob("*/metrics.json"):
        assert json.loads(p.read_text())["status"] == "completed"
    assert "sam-train: sweep: 2 of 2 jobs completed" in result.stdout, result.stdout[-2000:]


def test_help_and_cfg_job(tmp_path: Path) -> None:
    help_text = sam_train(["--help"], cwd=tmp_path)
    assert help_text.returncode == 0 and "sam-train" in help_text.stdout and "experiment" in help_text.stdout
    job = sam_train(["--cfg", "job", "experiment=t1_cifar100_wrn28_10_200ep", "optim=sgd"], cwd=tmp_path)
    assert job.returncode == 0
    assert "name: t1_cifar100_wrn28_10_200ep" in job.stdout and "name: sgd" in job.stdout


@pytest.mark.parametrize("cadence, rows", [(["engine.eval_every=2"], [2, 4, 5]),
                                           (["train_steps=20", "engine.eval_every_steps=7"], [2, 4, 5])])
def test_evaluation_cadence_in_epochs_or_steps(tmp_path: Path, cadence: list[str], rows: list[int]) -> None:
    """Rows (and checkpoints) come every eval_every epochs / eval_every_steps steps and at the end;
    a row's training loss covers every step since the previous row."""
    cfg = compose_config([*TINY, "epochs=5", *cadence])  # 4 steps per epoch
    losses: list[float] = []

    def recording(real_step):
        def step(x: torch.Tensor, y: torch.Tensor):
            stats = real_step(x, y)
            losses.append(float(stats.loss_sum) / stats.count)
            return stats
        return step

    assert train(Run(cfg, tmp_path), recording) == 0
    got = read_rows(tmp_path)
    assert [r["epoch"] for r in got] == rows and len(losses) == 20
    assert got[0]["train_loss"] == pytest.approx(sum(losses[:8]) / 8, rel=1e-6)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["progress"]["step"] == 20


def test_interrupted_run_stays_resumable_not_failed(tmp_path: Path) -> None:
    run, calls = Run(compose_config([*TINY, "epochs=3"]), tmp_path), []

    def interrupted(real_step):
        def step(x: torch.Tensor, y: torch.Tensor):
            calls.append(1)
            if len(calls) == run.steps_per_epoch + 1:
                raise KeyboardInterrupt
            return real_step(x, y)
        return step

    with pytest.raises(KeyboardInterrupt):
        train(run, interrupted)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["status"] == "interrupted" and "interrupted (KeyboardInterrupt) after epoch 1" in summary["error"] and summary["epochs_done"] == 1
