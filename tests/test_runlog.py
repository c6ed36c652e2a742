"""sam_repro.runlog: what metrics.json says about progress, best and final, when evaluation is sparse.

With engine.eval_every = k, metrics.jsonl gets one row every k epochs: the number of rows is not
the number of epochs done. The report's "status running (E of N epochs)" reads epochs_done.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sam_repro.runlog import RunLog, summary_block


def row(epoch: int, test_err: float, ips: float = 100.0) -> dict[str, Any]:
    return {"epoch": epoch, "lr": 0.1, "train_loss": 1.0, "train_err": 20.0, "test_loss": 0.5,
            "test_err": test_err, "epoch_s": 1.0, "images_per_s": ips}


def new_log(tmp_path: Path) -> RunLog:
    return RunLog(tmp_path, "t", {"epochs": 10}, {"device": "cpu"}, {"source": "synthetic"})


def test_epochs_done_is_the_last_logged_epoch_not_the_number_of_rows(tmp_path: Path) -> None:
    log = new_log(tmp_path)
    history: list[dict[str, Any]] = []
    for epoch, err in ((3, 50.0), (6, 30.0), (9, 40.0)):  # eval_every=3
        history.append(row(epoch, err))
        log.log_epoch(history[-1], history, wall_s=float(epoch))
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["epochs_done"] == 9
    assert doc["final"]["test_err"] == 40.0 and doc["best"]["test_err"] == 30.0 and doc["best"]["epoch"] == 6
    assert doc["wall_s"] == 9.0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [3, 6, 9]


def test_best_breaks_ties_by_the_earlier_epoch_and_speed_is_the_mean_over_rows(tmp_path: Path) -> None:
    log = new_log(tmp_path)
    history = [row(1, 30.0, ips=100.0), row(2, 30.0, ips=200.0), row(3, 35.0, ips=600.0)]
    log.log_epoch(history[-1], history, wall_s=3.0)
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["best"]["epoch"] == 1
    assert doc["images_per_s"] == 300.0


def test_restore_rewrites_the_log_from_the_checkpoint_history(tmp_path: Path) -> None:
    log = new_log(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row(2, 9.0)) + "\n" + json.dumps(row(4, 8.0)) + "\n{broken")
    history = [row(2, 9.0)]  # the checkpoint was taken at epoch 2: epoch 4's line is dropped
    log.restore(history, started_at="2026-01-01T00:00:00+00:00", wall_s=5.0)
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == history
    assert log.summary["epochs_done"] == 2 and log.summary["started_at"] == "2026-01-01T00:00:00+00:00"


def test_summary_block_keeps_errors_and_replaces_non_finite_losses_with_null() -> None:
    block = summary_block({**row(5, 12.5), "test_loss": float("nan"), "train_loss": float("inf")}, epoch_key=True)
    assert block == {"test_err": 12.5, "test_acc": 87.5, "test_loss": None, "train_loss": None,
                     "train_err": 20.0, "epoch": 5}


def test_finish_records_status_and_error(tmp_path: Path) -> None:
    log = new_log(tmp_path)
    log.finish("diverged", "non-finite loss at epoch 3")
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert (doc["status"], doc["error"], doc["epochs_done"]) == ("diverged", "non-finite loss at epoch 3", 0)
