"""Helpers the tests of several packages share: the fast in-process run, its rows and their comparison,
training one run with its step intercepted, a disk that fills up."""
from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path
from typing import Callable

import pytest

from sam_repro import rundir
from sam_repro.engine.loop import Run, Trainer
from tests.conftest import rows_without_timing


def train(run: Run, wrap_step: Callable | None = None) -> int:
    """Train one run to its end (engine/loop.py's Trainer); `wrap_step(step)` returns what is called in
    place of the run's step (x, y) -> StepStats, to watch or disturb it. The run's exit code."""
    if wrap_step is not None:
        real = run.solo_step

        def watched():  # what the loop reads of its step besides calling it travels with the wrapper
            step = real()
            wrapped = wrap_step(step)
            wrapped.counts_statistics = step.counts_statistics
            return wrapped

        run.solo_step = watched  # type: ignore[method-assign]
    return Trainer([run]).fit()[0]


# a WRN-10-1 on 64 synthetic 8 px images: 2 steps of 32 per epoch, 32 test images; float64
FAST = ["experiment=smoke", "model.name=wrn10_1", "dataset.image_size=8", "dataset.train_size=64",
        "dataset.test_size=32", "batch_size=32", "engine.progress=false", "engine.precision=fp64", "augment=none",
        "engine.pack_execution=pack"]


def rows(run_dir: Path, timing: bool = False) -> list[dict]:
    """metrics.jsonl's rows, with the wall-clock fields only if `timing`."""
    if not timing:
        return rows_without_timing(run_dir)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_rows(a: list[dict], b: list[dict]) -> None:
    """float64 rows of a run and its packed twin: errors (counts) equal, the rest to 1e-12 relative (a pack
    sums its members' norms in another order)."""
    assert [set(r) for r in a] == [set(r) for r in b]
    for x, y in zip(a, b):
        for key in x:
            if key.endswith("_err") or key == "epoch":
                assert x[key] == y[key], key
            else:
                assert x[key] == pytest.approx(y[key], rel=1e-12), key


class FullDisk(io.RawIOBase):
    """A file on a disk with `room` bytes left: a write past them raises ENOSPC, as the kernel's would."""

    def __init__(self, real: io.BufferedWriter, room: int) -> None:
        self.real, self.room = real, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.real.write(data)

    def flush(self) -> None:
        self.real.flush()

    def fileno(self) -> int:
        return self.real.fileno()

    def close(self) -> None:
        self.real.close()
        super().close()


def fill_disk(monkeypatch: pytest.MonkeyPatch, room: int) -> None:
    """Every file sam_repro.rundir writes from now on has `room` bytes left."""
    real_fdopen = os.fdopen
    monkeypatch.setattr(rundir.os, "fdopen", lambda fd, mode="r", *a, **k: FullDisk(real_fdopen(fd, "wb"), room)
                        if "w" in mode else real_fdopen(fd, mode, *a, **k))
