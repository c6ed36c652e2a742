"""A run under faults, end to end: a second writer, SIGTERM, a damaged checkpoint, a full disk.

Each fault is made at a fixed point of the run (a patched function of the run's own process, a lock
the test holds, a file the test truncates), so no verdict depends on when a signal or a line arrives.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sam_repro.engine import loop as loop_module
from sam_repro.engine.loop import fit, fit_pack
from sam_repro.rundir import CHECKPOINT, PREVIOUS_CHECKPOINT, DiskFull, RunDirBusy, RunDirLock, load_checkpoint
from tests.conftest import compose_config, sam_train
from tests.helpers import fill_disk, rows

TINY = ["experiment=smoke", "model.name=wrn10_1", "dataset.image_size=8", "dataset.train_size=128",
        "dataset.test_size=64", "batch_size=32", "engine.progress=false"]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_a_second_writer_exits_2_naming_the_holder_or_waits_for_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*TINY, "epochs=1", f"hydra.run.dir={run_dir}"]
    lock = RunDirLock(run_dir).acquire()  # a first process that is still training into it
    second = sam_train(args, cwd=tmp_path)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("sam-train: error:")]
    assert errors == [f"sam-train: error: {run_dir} is in use by pid {os.getpid()} on {os.uname().nodename} "
                      f"(training since {json.loads((run_dir / '.lock').read_text())['since']}): one process at a "
                      f"time writes a run directory (wait_for_lock=true waits for it)"]
    assert not (run_dir / "metrics.jsonl").exists()  # it wrote nothing
    exe = Path(sys.executable).parent / "sam-train"
    waiting = subprocess.Popen([str(exe), *args, "wait_for_lock=true"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "SAM_DATA": str(tmp_path)})
    for line in waiting.stdout:  # it says it waits before it blocks; then the first writer finishes
        if "waiting for it" in line:
            break
    lock.release()
    out, _ = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, out[-2000:]
    assert summary(run_dir)["status"] == "completed" and len(rows(run_dir)) == 1


def test_a_pack_and_sam_sharpness_respect_the_lock(tmp_path: Path) -> None:
    from sam_repro.sharpness.cli import main as sharpness_main

    cfgs = [compose_config([*TINY, "epochs=1", f"seed={s}"]) for s in (0, 1)]
    assert fit(cfgs[0], tmp_path / "done") == 0
    with RunDirLock(tmp_path / "b"):
        with pytest.raises(RunDirBusy):
            fit_pack([(cfgs[0], tmp_path / "a"), (cfgs[1], tmp_path / "b")])
        assert not (tmp_path / "a" / "metrics.json").exists()
    RunDirLock(tmp_path / "a").acquire().release()  # the pack let go of the member it had locked
    with RunDirLock(tmp_path / "done"):
        assert sharpness_main([str(tmp_path / "done"), "--parts", "hessian", "--subset", "8"]) == 2


# Runs sam-train with RunLog.log_epoch patched to send the process SIGTERM right after epoch
# TERM_AT's row is logged: `kill -TERM` mid-run, at a fixed point.
TERMINATOR = """
import os, signal, sys
from sam_repro import runlog
original = runlog.RunLog.log_epoch
def log_epoch(self, row, history, wall_s):
    original(self, row, history, wall_s)
    if row["epoch"] == int(os.environ["TERM_AT_EPOCH"]):
        os.kill(os.getpid(), signal.SIGTERM)
runlog.RunLog.log_epoch = log_epoch
from sam_repro.cli import train_main
sys.argv = ["sam-train", *sys.argv[1:]]
train_main()
"""


def test_sigterm_records_the_interruption_and_the_run_resumes_exactly(tmp_path: Path) -> None:
    args = [*TINY, "epochs=4", "engine.deterministic=true"]
    straight = sam_train([*args, f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    term = subprocess.run([sys.executable, "-c", TERMINATOR, *args, f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SAM_DATA": str(tmp_path), "TERM_AT_EPOCH": "2"})
    assert term.returncode == 128 + signal.SIGTERM, term.stderr[-2000:]
    assert "Traceback" not in term.stderr
    stopped = summary(tmp_path / "b")
    assert stopped["status"] == "interrupted" and stopped["epochs_done"] == 2
    assert stopped["error"] == "interrupted (Terminated) after epoch 2; re-run the same command to resume"
    resumed = sam_train([*args, f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert rows(tmp_path / "b") == rows(tmp_path / "a") and summary(tmp_path / "b")["status"] == "completed"


def test_a_damaged_checkpoint_falls_back_or_is_one_line_exit_2(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*TINY, "epochs=2", "engine.deterministic=true", f"hydra.run.dir={run_dir}"]
    assert sam_train(args, cwd=tmp_path).returncode == 0
    finished = rows(run_dir)
    with open(run_dir / CHECKPOINT, "r+b") as f:
        f.truncate(1000)
    again = sam_train(args, cwd=tmp_path)  # the same command: epoch 2 again, from the previous checkpoint
    assert again.returncode == 0, again.stderr[-2000:]
    log = (run_dir / "train.log").read_text()
    assert f"{CHECKPOINT} is damaged" in log and f"resuming from {PREVIOUS_CHECKPOINT} instead" in log
    assert rows(run_dir) == finished
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        with open(run_dir / name, "r+b") as f:
            f.truncate(1000)
    broken = sam_train(args, cwd=tmp_path)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    errors = [line for line in broken.stderr.splitlines() if line.startswith("sam-train: error:")]
    assert len(errors) == 1 and f"{run_dir}: {CHECKPOINT} is damaged" in errors[0] and "resume=never" in errors[0]


def test_a_full_disk_stops_the_run_keeping_its_checkpoint_and_it_resumes_once_space_is_freed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_config([*TINY, "epochs=3", "engine.deterministic=true"])
    assert fit(cfg, tmp_path / "straight") == 0
    real_save, saves = loop_module.save_checkpoint, []

    def save_until_the_disk_fills(run_dir: Path, state: dict) -> None:
        saves.append(state["progress"]["epoch"])
        if len(saves) == 2:  # the disk is full from epoch 2's checkpoint on, for every file
            fill_disk(monkeypatch, room=4096)
        real_save(run_dir, state)

    monkeypatch.setattr(loop_module, "save_checkpoint", save_until_the_disk_fills)
    with pytest.raises(DiskFull, match=f"no space left on the device of {tmp_path / 'full'} while writing {CHECKPOINT}"):
        fit(cfg, tmp_path / "full")
    monkeypatch.undo()  # space freed
    assert load_checkpoint(tmp_path / "full")["progress"]["epoch"] == 1  # the last good checkpoint, untouched
    assert not [p for p in (tmp_path / "full").iterdir() if p.name.endswith(".tmp")]
    assert fit(cfg, tmp_path / "full") == 0
    assert rows(tmp_path / "full") == rows(tmp_path / "straight")
    straight, full = (torch.load(d / CHECKPOINT, weights_only=False)["model"] for d in (tmp_path / "straight", tmp_path / "full"))
    assert all(torch.equal(straight[k], full[k]) for k in straight)
