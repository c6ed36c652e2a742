"""sam_repro/rundir.py under faults: a damaged checkpoint, a full disk, two writers, a holder killed.

Every fault is made deterministically: a file truncated by the test, ENOSPC raised by the file the
write goes to after a given number of bytes (what a full disk does to a write), a lock held by the
test itself or by a child process that says so on its stdout before it is killed with SIGKILL.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sam_repro import rundir
from sam_repro.errors import UserError
from sam_repro.rundir import (CHECKPOINT, PREVIOUS_CHECKPOINT, CheckpointError, DiskFull, RunDirBusy, RunDirLock,
                              load_checkpoint, save_checkpoint, write_json)
from tests.helpers import fill_disk


def state(epoch: int) -> dict:
    return {"epoch": epoch, "model": {"w": torch.full((2000,), float(epoch))}}


def test_saving_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, state(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]
    save_checkpoint(tmp_path, state(2))
    save_checkpoint(tmp_path, state(3))
    assert {p.name for p in tmp_path.iterdir()} == {CHECKPOINT, PREVIOUS_CHECKPOINT}
    assert load_checkpoint(tmp_path)["epoch"] == 3
    assert torch.load(tmp_path / PREVIOUS_CHECKPOINT, weights_only=False)["epoch"] == 2


def test_a_damaged_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path: Path, caplog) -> None:
    save_checkpoint(tmp_path, state(1))
    save_checkpoint(tmp_path, state(2))
    with open(tmp_path / CHECKPOINT, "r+b") as f:  # damaged after the fact, as in a truncated copy
        f.truncate(1000)
    with caplog.at_level("WARNING", logger="sam_repro"):
        got = load_checkpoint(tmp_path)
    assert got["epoch"] == 1
    assert f"{CHECKPOINT} is damaged" in caplog.text and f"resuming from {PREVIOUS_CHECKPOINT}" in caplog.text


def test_a_crash_between_the_two_renames_still_resumes_from_the_previous_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, state(1))
    save_checkpoint(tmp_path, state(2))
    (tmp_path / CHECKPOINT).unlink()  # what a crash after `checkpoint.pt -> checkpoint.prev.pt` leaves
    assert load_checkpoint(tmp_path)["epoch"] == 1


@pytest.mark.parametrize("previous", ["damaged", "missing"])
def test_no_readable_checkpoint_is_one_line_naming_the_file_and_what_to_do(tmp_path: Path, previous: str) -> None:
    save_checkpoint(tmp_path, state(1))
    save_checkpoint(tmp_path, state(2))
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        with open(tmp_path / name, "r+b") as f:
            f.truncate(1000)
    if previous == "missing":
        (tmp_path / PREVIOUS_CHECKPOINT).unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    message = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in message
    assert f"{tmp_path}: {CHECKPOINT} is damaged" in message and "resume=never" in message
    assert (f"{PREVIOUS_CHECKPOINT} is damaged" in message) == (previous == "damaged")


@pytest.mark.parametrize("what", ["checkpoint", "json"])
def test_a_full_disk_is_one_line_and_leaves_the_old_file_and_no_partial_one(tmp_path: Path, monkeypatch, what: str) -> None:
    save_checkpoint(tmp_path, state(1))
    write_json(tmp_path / "metrics.json", {"epoch": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    fill_disk(monkeypatch, room=600)
    with pytest.raises(DiskFull) as err:
        if what == "checkpoint":
            save_checkpoint(tmp_path, state(2))
        else:
            write_json(tmp_path / "metrics.json", {"epoch": 2, "padding": "x" * 2000})
    message = str(err.value)
    assert "\n" not in message and f"no space left on the device of {tmp_path}" in message
    assert ("checkpoint.pt" if what == "checkpoint" else "metrics.json") in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # untouched, nothing left behind
    monkeypatch.undo()
    save_checkpoint(tmp_path, state(2))  # space freed: the next write works
    assert load_checkpoint(tmp_path)["epoch"] == 2


def test_another_writer_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    with RunDirLock(tmp_path):
        with pytest.raises(RunDirBusy) as err:
            RunDirLock(tmp_path).acquire()
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message and "wait_for_lock=true" in message
    RunDirLock(tmp_path).acquire().release()  # released: the next writer gets in


HOLDER = """
import sys, time
from sam_repro.rundir import RunDirLock
lock = RunDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_lock_whose_holder_was_killed_does_not_block(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # it holds the lock now
        with pytest.raises(RunDirBusy, match=f"pid {holder.pid}"):
            RunDirLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: no cleanup runs in the holder
        holder.wait()
    assert (tmp_path / rundir.LOCK).exists()  # the file stays behind; without its holder it holds nothing
    RunDirLock(tmp_path).acquire().release()
