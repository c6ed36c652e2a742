"""The training a run actually did: optimizer steps, epochs (fractional) and training images seen.

A run's `config.epochs` is what it was configured with, not always what it trained: `train_steps`
replaces it (the run stops after that many optimizer steps, wherever in an epoch that falls), and
an unfinished run stopped at its last checkpoint. The report labels rows, titles and file names
with the training done, derived here from metrics.json alone (docs/run_directory.md), the way the
training loop counts (engine/loop.py, data/loaders.py):

- one epoch is `train_size // (batch_size // devices * devices)` steps: each of the `devices`
  processes takes `batch_size // devices` examples a step and the loader drops the last partial
  batch; a step sees `batch_size // devices * devices` images;
- the schedule is `train_steps` steps when set, else `epochs` epochs of steps;
- a completed run did the whole schedule; an unfinished one what it checkpointed: `epochs_done`
  epochs, capped by the schedule (the last epoch of a `train_steps` run is a partial one).

Older run directories lack keys: no `devices` means one process; without `data.train_size` the
steps are still known from `train_steps` but not the fraction of an epoch (reported as unknown).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional


def _count(x: Any) -> Optional[int]:
    """A logged count (an integer >= 0, also as 4.0), else None: bools, fractions, negatives, text."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x != int(x) or x < 0:
        return None
    return int(x)


def fmt_epochs(epochs: float) -> str:
    """'4', '0.38', '12.5': whole epochs as integers, fractions to two decimals."""
    text = f"{epochs:.2f}".rstrip("0").rstrip(".")
    return text if text != "0" else f"{epochs:.2g}"  # a few steps of a huge epoch: 0.0013, not 0


@dataclass(frozen=True)
class Budget:
    """What one run trained (None: not derivable from what the run directory logged)."""

    configured_epochs: Optional[int]  # config.epochs
    train_steps: Optional[int]  # config.train_steps: the schedule counted in steps
    steps_per_epoch: Optional[int]
    images_per_step: Optional[int]
    steps: Optional[int]  # optimizer steps done
    whole_epochs: Optional[int] = None  # epochs done as logged: the fallback without steps_per_epoch

    @property
    def epochs(self) -> Optional[float]:
        """Epochs done, fractional: steps / steps per epoch (an epoch schedule logged without the
        data size: the whole epochs it logged as done)."""
        if self.steps is not None and self.steps_per_epoch:
            return self.steps / self.steps_per_epoch
        if self.train_steps is None and self.whole_epochs is not None:
            return float(self.whole_epochs)
        return None

    @property
    def images(self) -> Optional[int]:
        """Training images seen (augmented, counted with repeats)."""
        return self.steps * self.images_per_step if self.steps is not None and self.images_per_step else None

    @property
    def on_schedule(self) -> bool:
        """True when the run trained exactly its configured whole epochs: then `epochs` alone says it."""
        return self.epochs is not None and self.configured_epochs is not None and \
            math.isclose(self.epochs, self.configured_epochs)

    def parts(self) -> list[str]:
        """The known measures of the training done: '0.38 epochs', '150 steps', '19,200 images'."""
        out = []
        if self.epochs is not None:
            out.append(f"{fmt_epochs(self.epochs)} epoch{'' if self.epochs == 1 else 's'}")
        if self.steps is not None:
            out.append(f"{self.steps:,} steps")
        if self.images is not None:
            out.append(f"{self.images:,} images")
        return out

    def label(self) -> str:
        """'4 epochs' on schedule; else '0.38 epochs (150 steps, 19,200 images)'."""
        parts = self.parts()
        if self.on_schedule or len(parts) < 2:
            return parts[0] if parts else "training unknown"
        return f"{parts[0]} ({', '.join(parts[1:])})"

    def progress(self) -> str:
        """An unfinished run: how far it got in its schedule's own unit, then the other measures,
        e.g. '3 of 200 epochs: 585 steps, 149,760 images' or '150 of 300 steps: 0.38 epochs, ...'."""
        if self.train_steps is not None:
            head = f"{'?' if self.steps is None else f'{self.steps:,}'} of {self.train_steps:,} steps"
            rest = [p for p in self.parts() if not p.endswith(" steps")]
        else:
            done = "?" if self.epochs is None else fmt_epochs(self.epochs)
            head = f"{done} of {self.configured_epochs} epochs"
            rest = [p for p in self.parts() if " epoch" not in p]
        return head + (f": {', '.join(rest)}" if rest else "")


def budget_of(doc: dict[str, Any]) -> Budget:
    """The training done by the run whose metrics.json is `doc` (any dict: never raises)."""
    config = doc.get("config") if isinstance(doc.get("config"), dict) else {}
    data = doc.get("data") if isinstance(doc.get("data"), dict) else {}
    epochs, train_steps = _count(config.get("epochs")), _count(config.get("train_steps")) or None
    batch, devices = _count(config.get("batch_size")), _count(config.get("devices")) or 1
    images_per_step = (batch // devices) * devices or None if batch else None
    train_size = _count(data.get("train_size"))
    # None, not 0, when a batch is larger than the training set (such a run trains nothing)
    per_epoch = (train_size // images_per_step or None) if train_size and images_per_step else None
    planned = train_steps or (epochs * per_epoch if epochs and per_epoch else None)
    completed = doc.get("status") == "completed"
    done = _count(doc.get("epochs_done"))
    if completed:
        steps, whole = planned, epochs
    else:
        steps = None if done is None or per_epoch is None else min(done * per_epoch, planned or done * per_epoch)
        whole = done
    return Budget(epochs, train_steps, per_epoch, images_per_step, steps, whole)


def file_part(setting: dict[str, Any]) -> str:
    """The budget part of a figure's file stem for a completed run's setting: '150steps' when the
    schedule counts steps (config.epochs does not apply then), else '200ep'."""
    steps = _count(setting.get("train_steps"))
    return f"{steps}steps" if steps else f"{setting.get('epochs')}ep"


def epochs_at(epoch: Any, steps_per_epoch: Any, steps: Any) -> float:
    """The epochs done when a run logged its metrics.jsonl row of `epoch` (1-based): that many
    whole epochs, except where the run's steps ran out inside it (train_steps). Without the
    run's steps per epoch (not logged): the epoch itself."""
    per_epoch, total = _count(steps_per_epoch), _count(steps)
    if not per_epoch:
        return float(epoch)
    done = epoch * per_epoch if total is None else min(epoch * per_epoch, total)
    return done / per_epoch


def columns(budget: Budget) -> dict[str, Any]:
    """The `trained.*` columns of a run's row in the report (load.load_runs)."""
    return {"trained.epochs": budget.epochs, "trained.steps": budget.steps, "trained.images": budget.images,
            "trained.steps_per_epoch": budget.steps_per_epoch, "trained.images_per_step": budget.images_per_step,
            "trained.on_schedule": budget.on_schedule,
            "trained.label": budget.label()}


COLUMNS = tuple(columns(Budget(None, None, None, None, None)))
