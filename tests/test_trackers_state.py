"""The fan-out that feeds trackers from a RunLog (sam_repro.trackers.Trackers), with a recording
tracker in the registry: what is logged at start, on each row, at the end, across restarts."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pytest
from omegaconf import OmegaConf

import sam_repro.trackers as trackers_module
from sam_repro.trackers import Tracker, TrackerSpec, Trackers

CALLS: list[tuple] = []


class Recording(Tracker):
    holds: Optional[int] = None  # what the tracker itself says it holds (None: it cannot tell)
    fail_in: str = ""

    def _maybe_fail(self, what: str) -> None:
        if self.fail_in == what:
            raise RuntimeError(f"{what} broke")

    def start(self, state: dict[str, Any], first_epoch: int) -> dict[str, Any]:
        self._maybe_fail("start")
        CALLS.append(("start", state.get("run_id"), first_epoch))
        return {"run_id": state.get("run_id") or "run-1"}

    def last_logged(self) -> Optional[int]:
        return Recording.holds

    def log_hparams(self, hparams: dict[str, Any]) -> None:
        CALLS.append(("hparams", hparams["optim.rho"]))

    def log_row(self, epoch: int, metrics: dict[str, float]) -> None:
        self._maybe_fail("log_row")
        CALLS.append(("row", epoch, metrics["test_err"]))

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        CALLS.append(("finish", status))


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch):
    CALLS.clear()
    Recording.holds, Recording.fail_in = None, ""
    monkeypatch.setattr(trackers_module, "TRACKERS", {"rec": TrackerSpec(f"{__name__}:Recording", "json", "rec")})
    cfg = OmegaConf.create({"name": "x", "optim": {"rho": 0.05}, "logger": {"rec": {}}})
    return lambda run_dir: Trackers(cfg, run_dir)


def rows(*epochs: int) -> list[dict[str, Any]]:
    return [{"epoch": e, "lr": 0.1, "test_err": 50.0 - e, "note": "text is not a metric"} for e in epochs]


def test_a_fresh_run_logs_hparams_rows_and_status(rec, tmp_path: Path) -> None:
    t = rec(tmp_path)
    t.start([])
    for row in rows(1, 2):
        t.log_row(row)
    t.finish("completed", {})
    assert CALLS == [("start", None, 1), ("hparams", 0.05), ("row", 1, 49.0), ("row", 2, 48.0), ("finish", "completed")]
    state = json.loads((tmp_path / "trackers.json").read_text())
    assert state == {"rec": {"run_id": "run-1", "logged_epoch": 2, "hparams_logged": True, "status": "completed"}}


def test_a_resumed_run_continues_the_run_and_logs_only_what_is_missing(rec, tmp_path: Path) -> None:
    t = rec(tmp_path)
    t.start([])
    t.log_row(rows(1)[0])  # killed after epoch 2 was checkpointed, before it was logged: no finish
    CALLS.clear()
    t = rec(tmp_path)
    t.start(rows(1, 2))  # the checkpoint's history
    t.log_row(rows(3)[0])
    assert CALLS == [("start", "run-1", 2), ("row", 2, 48.0), ("row", 3, 47.0)]  # same run, hparams once


def test_the_trackers_own_record_wins_over_trackers_json(rec, tmp_path: Path) -> None:
    t = rec(tmp_path)
    t.start([])
    t.log_row(rows(1)[0])
    CALLS.clear()
    Recording.holds = 0  # e.g. a W&B session killed before it flushed: it holds nothing
    rec(tmp_path).start(rows(1, 2))
    assert [c for c in CALLS if c[0] == "row"] == [("row", 1, 49.0), ("row", 2, 48.0)]


def test_re_running_a_completed_run_leaves_its_tracker_run_alone(rec, tmp_path: Path) -> None:
    t = rec(tmp_path)
    t.start([])
    t.log_row(rows(1)[0])
    t.finish("completed", {})
    CALLS.clear()
    t = rec(tmp_path)
    t.start(rows(1))
    t.finish("completed", {})
    assert CALLS == []


def test_a_failing_tracker_is_switched_off_and_the_run_goes_on(rec, tmp_path: Path, caplog) -> None:
    Recording.fail_in = "log_row"
    t = rec(tmp_path)
    t.start([])
    t.log_row(rows(1)[0])
    t.log_row(rows(2)[0])
    t.finish("completed", {})
    assert CALLS == [("start", None, 1), ("hparams", 0.05)]
    assert "logger rec failed in log_row (RuntimeError: log_row broke)" in caplog.text


def test_state_of_a_tracker_not_chosen_this_time_is_kept(rec, tmp_path: Path) -> None:
    (tmp_path / "trackers.json").write_text(json.dumps({"wandb": {"run_id": "abc", "logged_epoch": 3}}))
    rec(tmp_path).start([])
    state = json.loads((tmp_path / "trackers.json").read_text())
    assert state["wandb"] == {"run_id": "abc", "logged_epoch": 3} and state["rec"]["run_id"] == "run-1"
