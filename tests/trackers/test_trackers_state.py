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


class Second(Recording):
    """A second recording tracker, to see that one tracker's fate leaves the other's alone."""

    fail_in: str = ""

    def start(self, state, first_epoch):
        if Second.fail_in == "start":
            raise RuntimeError("start broke")
        CALLS.append(("b.start", state.get("run_id"), first_epoch))
        return {"run_id": state.get("run_id") or "b-1"}

    def last_logged(self):
        if Second.fail_in == "last_logged":
            raise RuntimeError("last_logged broke")
        return None

    def log_hparams(self, hparams):
        if Second.fail_in == "log_hparams":
            raise RuntimeError("log_hparams broke")
        CALLS.append(("b.hparams", self.settings.get("tag"), self.cfg.name))

    def log_row(self, epoch, metrics):
        CALLS.append(("b.row", epoch, sorted(metrics)))

    def finish(self, status, summary):
        if Second.fail_in == "finish":
            raise RuntimeError("finish broke")
        CALLS.append(("b.finish", status, summary.get("error")))


@pytest.fixture
def two(monkeypatch: pytest.MonkeyPatch):
    """The registry holds two trackers, `b` (Second) first, then `rec`; both chosen."""
    CALLS.clear()
    Recording.holds, Recording.fail_in, Second.fail_in = None, "", ""
    monkeypatch.setattr(trackers_module, "TRACKERS", {"b": TrackerSpec(f"{__name__}:Second", "json", "b"),
                                                      "rec": TrackerSpec(f"{__name__}:Recording", "json", "rec")})
    cfg = OmegaConf.create({"name": "x", "optim": {"rho": 0.05}, "logger": {"b": {"tag": "t"}, "rec": {}}})
    return lambda run_dir: Trackers(cfg, run_dir)


def test_each_tracker_gets_its_own_settings_and_the_run_config(two, tmp_path: Path) -> None:
    t = two(tmp_path)
    assert t  # trackers chosen: the RunLog feeds them
    t.start([])
    t.log_row(rows(1)[0])
    t.finish("failed", {"error": "boom"})
    assert ("b.hparams", "t", "x") in CALLS
    assert ("b.row", 1, ["lr", "test_err"]) in CALLS  # numbers only, never the epoch (the step)
    assert ("b.finish", "failed", "boom") in CALLS  # the summary reaches the tracker


@pytest.mark.parametrize("phase", ["start", "last_logged", "log_hparams", "finish"])
def test_a_tracker_failing_in_any_phase_is_switched_off_alone_and_named(two, tmp_path: Path, caplog, phase: str) -> None:
    Second.fail_in = phase
    t = two(tmp_path)
    t.start(rows(1))
    t.log_row(rows(2)[0])
    t.finish("failed", {"error": "boom"})
    assert [c for c in CALLS if not c[0].startswith("b.")] == [
        ("start", None, 1), ("hparams", 0.05), ("row", 1, 49.0), ("row", 2, 48.0), ("finish", "failed")]
    assert not any(c[0] in ("b.row", "b.finish") for c in CALLS) or phase == "finish"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"logger b failed in {phase} (RuntimeError: {phase} broke); it is switched off for this run, "
                      "the run goes on"]
    state = json.loads((tmp_path / "trackers.json").read_text())
    assert state["rec"] == {"run_id": "run-1", "logged_epoch": 2, "hparams_logged": True, "status": "failed"}
    if phase == "finish":  # it got as far as the end: its rows are recorded, its status too
        assert state["b"]["logged_epoch"] == 2 and state["b"]["status"] == "failed"
    else:
        assert "status" not in state.get("b", {}) and state.get("b", {}).get("logged_epoch", 0) == 0
        assert "hparams_logged" not in state.get("b", {})  # never recorded as logged when it failed


def test_a_row_failing_during_the_catch_up_names_the_tracker(rec, tmp_path: Path, caplog) -> None:
    Recording.fail_in = "log_row"
    t = rec(tmp_path)
    t.start(rows(1, 2))
    assert [r.getMessage() for r in caplog.records] == [
        "logger rec failed in log_row (RuntimeError: log_row broke); it is switched off for this run, the run goes on"]
    assert json.loads((tmp_path / "trackers.json").read_text())["rec"]["logged_epoch"] == 0


def test_the_catch_up_records_each_row_it_logs(rec, tmp_path: Path) -> None:
    t = rec(tmp_path)
    t.start(rows(1, 2))
    assert json.loads((tmp_path / "trackers.json").read_text())["rec"]["logged_epoch"] == 2
    t.log_row(rows(2)[0])  # a row already logged is not logged again
    assert [c for c in CALLS if c[0] == "row"] == [("row", 1, 49.0), ("row", 2, 48.0)]


def test_a_completed_tracker_is_skipped_alone_and_its_state_kept(two, tmp_path: Path) -> None:
    done = {"run_id": "run-1", "logged_epoch": 2, "hparams_logged": True, "status": "completed"}
    (tmp_path / "trackers.json").write_text(json.dumps({"b": done}))
    t = two(tmp_path)
    t.start(rows(1, 2))
    assert [c[0] for c in CALLS] == ["start", "hparams", "row", "row"]  # rec runs; b is complete
    assert json.loads((tmp_path / "trackers.json").read_text())["b"] == done


@pytest.mark.parametrize("logged, history, skipped", [(0, [], True), (2, [1, 2, 3], False), (3, [1, 2, 3], True)])
def test_a_completed_tracker_resumes_only_when_the_history_goes_further(rec, tmp_path: Path, logged: int,
                                                                         history: list, skipped: bool) -> None:
    state = {"run_id": "run-1", "logged_epoch": logged, "hparams_logged": True, "status": "completed"}
    (tmp_path / "trackers.json").write_text(json.dumps({"rec": state}))
    t = rec(tmp_path)
    t.start(rows(*history))
    assert (CALLS == []) is skipped
    saved = json.loads((tmp_path / "trackers.json").read_text())["rec"]
    if not skipped:  # reopened: the old status goes until this session ends
        assert CALLS == [("start", "run-1", logged + 1), ("row", 3, 47.0)] and "status" not in saved


def test_after_finish_there_is_nothing_left_to_log(rec, tmp_path: Path) -> None:
    t = rec(tmp_path)
    t.start([])
    t.finish("completed", {})
    assert not t
    t.log_row(rows(1)[0])
    assert [c[0] for c in CALLS] == ["start", "hparams", "finish"]


def test_hparams_are_flat_resolved_scalars_without_the_logger() -> None:
    cfg = OmegaConf.create({"a": {"b": 1, "c": [1, 2], "d": "${a.b}"}, "e": None, "t": (3, 4)})
    assert trackers_module.flat_hparams(cfg) == {"a.b": 1, "a.c": "[1, 2]", "a.d": 1, "e": None, "t": "[3, 4]"}
    cfg.logger = {"wandb": {"project": "p"}}
    assert "logger.wandb.project" not in trackers_module.flat_hparams(cfg)


def test_row_metrics_are_the_numbers_but_the_epoch() -> None:
    row = {"epoch": 3, "lr": 0.1, "n": 7, "ok": True, "note": "x", "none": None}
    assert trackers_module.row_metrics(row) == {"lr": 0.1, "n": 7.0}
