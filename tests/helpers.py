"""Helpers the tests share: training one run with its step intercepted."""
from __future__ import annotations

from typing import Callable

from sam_repro.engine.loop import Run, Trainer


def train(run: Run, wrap_step: Callable | None = None) -> int:
    """Train one run to its end (engine/loop.py's Trainer); `wrap_step(step)` returns what is called in
    place of the run's step (x, y) -> StepStats, to watch or disturb it. The run's exit code."""
    if wrap_step is not None:
        real = run.solo_step
        run.solo_step = lambda: wrap_step(real())  # type: ignore[method-assign]
    return Trainer([run]).fit()[0]
