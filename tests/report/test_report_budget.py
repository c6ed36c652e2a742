"""The training a run did (sam_repro.report.budget), and the report's labels of it: a run cut by
`train_steps` or an interruption is shown with its steps, fractional epochs and images seen,
never with the configured `epochs`. Expected values are counted here the way the training loop
counts: a step takes batch_size // devices examples on each device, an epoch is the training set's
full batches (the loader drops the partial one). The committed step-limited runs' labels:
tests/test_results.py."""
from __future__ import annotations

from typing import Any

import pytest

from sam_repro.report import budget as B


def doc(status: str = "completed", epochs_done: Any = None, train_size: Any = 50000, **config: Any) -> dict:
    """A metrics.json document with the keys the budget reads (epochs_done: the epochs, unless given)."""
    cfg = {"epochs": 30, "batch_size": 128, "devices": 1, "train_steps": None, **config}
    return {"status": status, "epochs_done": cfg["epochs"] if epochs_done is None else epochs_done,
            "config": cfg, "data": {"train_size": train_size}}


def full_batches(train_size: int, batch: int, devices: int = 1) -> tuple[int, int]:
    """(steps per epoch, images per step), counted the loader's way."""
    per_step = (batch // devices) * devices
    return train_size // per_step, per_step


def test_a_step_limited_run_trained_a_fraction_of_an_epoch() -> None:
    b = B.budget_of(doc(epochs=200, train_steps=150, epochs_done=1))
    per_epoch, per_step = full_batches(50000, 128)
    assert (per_epoch, per_step) == (390, 128)
    assert (b.steps, b.steps_per_epoch, b.images) == (150, per_epoch, 150 * per_step)
    assert b.epochs == pytest.approx(150 / per_epoch, rel=1e-15) and not b.on_schedule
    assert b.label() == "0.38 epochs (150 steps, 19,200 images)"


def test_a_run_that_trained_its_epochs_is_labelled_by_them() -> None:
    b = B.budget_of(doc(epochs=4))
    assert (b.steps, b.images, b.epochs, b.on_schedule) == (4 * 390, 4 * 390 * 128, 4.0, True)
    assert b.label() == "4 epochs"
    assert B.budget_of(doc(epochs=1)).label() == "1 epoch"
    # train_steps equal to the configured epochs' steps: the configured epochs are what it trained
    assert B.budget_of(doc(epochs=2, train_steps=780)).label() == "2 epochs"
    # more steps than the configured epochs: the steps decide (config.epochs does not apply)
    assert B.budget_of(doc(epochs=2, train_steps=1000)).label() == "2.56 epochs (1,000 steps, 128,000 images)"


def test_processes_share_the_batch_and_the_loader_drops_the_partial_batch() -> None:
    b = B.budget_of(doc(epochs=10, batch_size=256, devices=3, train_size=50000))
    per_epoch, per_step = full_batches(50000, 256, 3)  # 85 examples on each of 3 processes: 255 a step
    assert (b.steps_per_epoch, b.images_per_step, b.steps) == (per_epoch, per_step, 10 * per_epoch)
    assert (per_epoch, per_step) == (196, 255)


def test_an_interrupted_run_reports_what_it_checkpointed() -> None:
    epochs = B.budget_of(doc(status="running", epochs=30, epochs_done=3))
    assert (epochs.steps, epochs.epochs, epochs.on_schedule) == (3 * 390, 3.0, False)
    assert epochs.label() == f"3 epochs ({3 * 390:,} steps, {3 * 390 * 128:,} images)"
    assert epochs.progress() == f"3 of 30 epochs: {3 * 390:,} steps, {3 * 390 * 128:,} images"
    steps = B.budget_of(doc(status="running", epochs=200, train_steps=1000, epochs_done=2))
    assert steps.steps == 2 * 390 and steps.progress() == f"780 of 1,000 steps: 2 epochs, {780 * 128:,} images"
    last = B.budget_of(doc(status="running", train_steps=1000, epochs_done=3))  # the last epoch is partial
    assert last.steps == 1000
    nothing = B.budget_of(doc(status="running", epochs_done=0))
    assert nothing.progress() == "0 of 30 epochs: 0 steps, 0 images"


def test_old_run_directories_without_devices_or_the_data_size_still_load() -> None:
    old = doc(epochs=200)
    del old["config"]["devices"], old["config"]["train_steps"]
    assert B.budget_of(old).label() == "200 epochs" and B.budget_of(old).steps == 200 * 390
    no_size = doc(epochs=200, train_size=None)
    assert B.budget_of(no_size).label() == "200 epochs" and B.budget_of(no_size).steps is None
    steps_only = doc(epochs=200, train_steps=150, train_size=None)
    assert B.budget_of(steps_only).label() == "150 steps (19,200 images)"  # the epochs are not known
    assert B.budget_of(doc(status="running", epochs=30, epochs_done=3, train_size=None)).progress() == "3 of 30 epochs"
    assert B.budget_of({}).label() == "training unknown"
    for bad in ({"config": "x", "data": [1]}, {"config": {"epochs": "200", "batch_size": True, "train_steps": 1.5},
                                              "data": {"train_size": -1}, "epochs_done": "3"}):
        assert B.budget_of(bad).label() == "training unknown"


def test_epochs_at_a_logged_row_and_the_file_stem_part() -> None:
    assert B.epochs_at(1, 390, 150) == pytest.approx(150 / 390)  # the one row of a 150-step run
    assert (B.epochs_at(3, 390, 39000), B.epochs_at(3, 390, None), B.epochs_at(2, None, 150)) == (3.0, 3.0, 2.0)
    assert B.epochs_at(1, float("nan"), 150) == 1.0  # pandas' NaN where a run logged no data size
    assert B.file_part({"epochs": 200, "train_steps": 150}) == "150steps"
    assert B.file_part({"epochs": 200, "train_steps": None}) == B.file_part({"epochs": 200}) == "200ep"
    assert [B.fmt_epochs(e) for e in (4.0, 150 / 390, 12.5, 0.0013, 2.999)] == ["4", "0.38", "12.5", "0.0013", "3"]
