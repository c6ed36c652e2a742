"""Each tracker adapter (sam_repro/trackers/tensorboard.py, wandb.py, mlflow.py) driven in this
process by the fan-out, exactly as a RunLog drives it, against the real library (TensorBoard event
files, W&B offline files, an MLflow file store), read back with each tool's own reader
(tests/trackers/test_trackers.py): a fresh run, a killed and resumed one (each epoch once, one tracker
run), the status and error of a failed run, and W&B's run-file reader on a file written here."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from sam_repro.trackers import Trackers, flat_hparams
from sam_repro.trackers.mlflow import MAX_PARAM_CHARS, tracking_uri
from sam_repro.trackers.wandb import BLOCK, offline_steps, read_records
from tests.conftest import composed_copy
from tests.trackers.test_trackers import offline_env, read_mlflow, read_tensorboard, read_wandb


def config(tmp_path: Path, tracker: str, **settings: Any) -> DictConfig:
    cfg = composed_copy(["experiment=smoke", f"logger={tracker}"])
    cfg.runs_root = str(tmp_path / "runs")
    for key, value in settings.items():
        cfg.logger[tracker][key] = value
    return cfg


def rows(*epochs: int) -> list[dict[str, Any]]:
    return [{"epoch": e, "lr": 0.1 / e, "test_err": 50.0 - e, "train_loss": 2.0 / e, "note": "text"} for e in epochs]


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)


@pytest.fixture(autouse=True)
def tensorboard_files_in_session_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """An event file's name is events.out.tfevents.<second>.<host>.<pid>.<n>, n counting the writers
    of the process, unpadded; TensorBoard reads a directory's files in name order. The sessions a
    test plays in one process share a second and a pid, so n alone orders them: counted from 0 in
    each test, a test's few writers sort in the order they were opened (as separate processes,
    seconds apart, do), whatever number of writers the tests before it opened (9 then 10 would not)."""
    from tensorboard.summary.writer import event_file_writer

    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(0))


def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "runs" / "smoke" / "seed=0"
    d.mkdir(parents=True, exist_ok=True)
    return d


def killed_then_resumed(cfg: DictConfig, where: Path, status: str = "completed", summary: dict | None = None) -> None:
    """Session 1 logs epoch 1 and is killed (no finish); session 2 resumes with the checkpoint's
    history (epochs 1-2: epoch 2 was checkpointed, not logged), logs epoch 3 and finishes."""
    first = Trackers(cfg, where)
    first.start([])
    first.log_row(rows(1)[0])
    second = Trackers(cfg, where)
    second.start(rows(1, 2))
    second.log_row(rows(3)[0])
    second.finish(status, summary or {})


# -- TensorBoard ------------------------------------------------------------------------------------

def test_tensorboard_holds_each_epoch_once_the_hparams_and_the_status(tmp_path: Path) -> None:
    where = run_dir(tmp_path)
    cfg = config(tmp_path, "tensorboard", dir="tb")
    killed_then_resumed(cfg, where)
    tb = read_tensorboard(where / "tb")
    for key in ("lr", "test_err", "train_loss"):
        assert tb["scalars"][key] == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in rows(1, 2, 3)], key
    assert "note" not in tb["scalars"] and "epoch" not in tb["scalars"]
    assert tb["hparams"]["optim.rho"] == pytest.approx(cfg.optim.rho) and tb["hparams"]["name"] == "smoke"
    assert tb["hparams"]["train_steps"] == "None"  # HParams take bool, int, float, str: the rest as text
    assert tb["status"] == ["completed"] and status_steps(where / "tb") == [3]  # at the last epoch logged
    assert json.loads((where / "trackers.json").read_text())["tensorboard"] == {
        "log_dir": str(where / "tb"), "logged_epoch": 3, "hparams_logged": True, "status": "completed"}


def status_steps(log_dir: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return [e.step for e in acc.Tensors("status/text_summary")]


def test_tensorboard_hparams_keep_scalars_and_write_the_rest_as_text(tmp_path: Path) -> None:
    where = run_dir(tmp_path)
    cfg = config(tmp_path, "tensorboard")
    OmegaConf.set_struct(cfg, False)
    cfg.extra = {"flag": True, "count": 3, "ratio": 0.5, "word": "w", "nothing": None, "list": [1, 2],
                 "path": Path("/data/x")}  # OmegaConf keeps a Path a Path: it reaches the tracker as one
    t = Trackers(cfg, where)
    t.start([])
    t.finish("completed", {})
    hp = read_tensorboard(where / "tensorboard")["hparams"]
    assert {k: hp[k] for k in hp if k.startswith("extra.")} == {
        "extra.flag": True, "extra.count": 3.0, "extra.ratio": 0.5, "extra.word": "w", "extra.nothing": "None",
        "extra.list": "[1, 2]", "extra.path": "/data/x"}
    assert status_steps(where / "tensorboard") == [0]  # nothing logged: the status sits at step 0


def test_tensorboard_status_of_a_resume_with_nothing_new_sits_at_the_last_epoch(tmp_path: Path) -> None:
    """Interrupted after epoch 2 was logged; the resumed session has no row left to log before it
    ends: its status goes at epoch 2, where the run stopped, and the scalars stay as they were."""
    where = run_dir(tmp_path)
    cfg = config(tmp_path, "tensorboard")
    first = Trackers(cfg, where)
    first.start([])
    for row in rows(1, 2):
        first.log_row(row)
    first.finish("interrupted", {"error": "interrupted (KeyboardInterrupt) after epoch 2"})
    second = Trackers(cfg, where)
    second.start(rows(1, 2))
    second.finish("completed", {})
    assert status_steps(where / "tensorboard") == [2]
    assert read_tensorboard(where / "tensorboard")["scalars"]["test_err"] == [(1, 49.0), (2, 48.0)]


@pytest.mark.parametrize("killed_at", [1, 2])
def test_tensorboard_purges_an_epoch_written_but_not_recorded_from_the_first_on(tmp_path: Path, killed_at: int) -> None:
    """Killed after epoch `killed_at`'s event reached the file but before trackers.json said so:
    the resumed writer starts at that epoch and TensorBoard discards the earlier copy."""
    where = run_dir(tmp_path)
    cfg = config(tmp_path, "tensorboard")
    first = Trackers(cfg, where)
    first.start([])
    for row in rows(*range(1, killed_at)):
        first.log_row(row)
    saved = (where / "trackers.json").read_text()
    first.log_row({**rows(killed_at)[0], "test_err": 99.0})  # the copy that must go
    first.active["tensorboard"].writer.flush()
    (where / "trackers.json").write_text(saved)
    second = Trackers(cfg, where)
    second.start(rows(*range(1, killed_at + 1)))
    second.finish("completed", {})
    assert read_tensorboard(where / "tensorboard")["scalars"]["test_err"] == [(e, 50.0 - e) for e in range(1, killed_at + 1)]


def test_tensorboard_purges_an_epoch_written_but_not_recorded(tmp_path: Path) -> None:
    """Killed after epoch 2's event reached the file but before trackers.json said so: the resumed
    writer starts at epoch 2 and TensorBoard discards the earlier copy (purge_step)."""
    where = run_dir(tmp_path)
    cfg = config(tmp_path, "tensorboard")
    first = Trackers(cfg, where)
    first.start([])
    first.log_row(rows(1)[0])
    saved = (where / "trackers.json").read_text()
    first.log_row({**rows(2)[0], "test_err": 99.0})  # the copy that must go
    (where / "trackers.json").write_text(saved)
    second = Trackers(cfg, where)
    second.start(rows(1, 2))
    second.finish("diverged", {"error": "loss is nan"})
    tb = read_tensorboard(where / "tensorboard")
    assert tb["scalars"]["test_err"] == [(1, 49.0), (2, 48.0)]
    assert tb["status"] == ["diverged: loss is nan"] and status_steps(where / "tensorboard") == [2]


@pytest.mark.parametrize("status", ["running", "interrupted"])
def test_tensorboard_writes_no_status_for_an_interrupted_run(tmp_path: Path, status: str) -> None:
    where = run_dir(tmp_path)
    t = Trackers(config(tmp_path, "tensorboard"), where)
    t.start([])
    t.log_row(rows(1)[0])
    t.finish(status, {"error": "interrupted (KeyboardInterrupt) after epoch 1"})
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(where / "tensorboard"))
    acc.Reload()
    assert "test_err" in acc.Tags()["scalars"] and not any("status" in tag for tag in acc.Tags()["tensors"])


# -- MLflow -----------------------------------------------------------------------------------------

def test_mlflow_one_run_every_epoch_once_params_and_status(tmp_path: Path) -> None:
    where = run_dir(tmp_path)
    cfg = config(tmp_path, "mlflow")
    killed_then_resumed(cfg, where)
    uri = (tmp_path / "runs" / "mlruns").resolve().as_uri()
    assert tracking_uri(cfg.logger.mlflow, cfg.runs_root) == uri
    [run] = read_mlflow(uri, "smoke")
    for key in ("lr", "test_err", "train_loss"):
        assert run["history"][key] == [(r["epoch"], pytest.approx(r[key], rel=1e-12)) for r in rows(1, 2, 3)], key
    assert "note" not in run["history"] and "epoch" not in run["history"]
    assert run["params"]["optim.rho"] == str(cfg.optim.rho) and run["params"]["name"] == "smoke"
    assert run["tags"]["status"] == "completed" and "error" not in run["tags"] and run["status"] == "FINISHED"
    assert run["tags"]["mlflow.runName"] == "smoke/seed=0" and run["tags"]["sam_repro.run_dir"] == str(where.resolve())
    state = json.loads((where / "trackers.json").read_text())["mlflow"]
    assert state == {"run_id": run["id"], "tracking_uri": uri, "logged_epoch": 3, "hparams_logged": True,
                     "status": "completed"}


def test_mlflow_opts_in_to_its_file_store_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is true: with nothing set in the
    environment, the tracker sets it, and the default store (file:) takes the run."""
    from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    where = run_dir(tmp_path)
    cfg = config(tmp_path, "mlflow")
    t = Trackers(cfg, where)
    t.start([])
    assert "mlflow" in t.active and MLFLOW_ALLOW_FILE_STORE.get() is True  # not switched off
    t.finish("completed", {})
    [run] = read_mlflow(tracking_uri(cfg.logger.mlflow, cfg.runs_root), "smoke")
    assert run["status"] == "FINISHED"


def test_mlflow_failed_run_its_error_and_an_experiment_of_its_own(tmp_path: Path) -> None:
    where = run_dir(tmp_path)
    uri = (tmp_path / "store").resolve().as_uri()
    cfg = config(tmp_path, "mlflow", tracking_uri=uri, experiment="mine")
    cfg.name = "x" * 600  # a long value: MLflow keeps 500 characters of a parameter
    OmegaConf.set_struct(cfg, False)
    cfg.extra = {f"k{i}": i for i in range(40)}  # over 100 parameters: MLflow takes 100 per call
    t = Trackers(cfg, where)
    t.start([])
    t.log_row(rows(1)[0])
    t.finish("failed", {"error": "RuntimeError: " + "e" * 6000})
    [run] = read_mlflow(uri, "mine")
    assert run["status"] == "FAILED" and run["tags"]["status"] == "failed"
    assert run["tags"]["error"] == ("RuntimeError: " + "e" * 6000)[:5000]
    assert run["params"]["name"] == "x" * MAX_PARAM_CHARS
    assert run["params"] == {k: str(v)[:MAX_PARAM_CHARS] for k, v in flat_hparams(cfg).items()}  # every one, once
    assert len(run["params"]) > 100


def test_mlflow_sends_parameters_and_metrics_in_as_few_batches_as_its_limits_allow(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """MLflow takes 100 parameters and 1000 metrics per call: 250 parameters are 3 calls, each
    parameter once; a row's metrics carry the step and the wall-clock time in milliseconds."""
    import time

    from mlflow.tracking import MlflowClient

    calls = []
    real = MlflowClient.log_batch

    def counted(self, run_id, metrics=(), params=(), tags=(), **kw):
        calls.append((len(metrics), len(params)))
        return real(self, run_id, metrics=metrics, params=params, tags=tags, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", counted)
    where = run_dir(tmp_path)
    cfg = config(tmp_path, "mlflow")
    OmegaConf.set_struct(cfg, False)
    cfg.extra = {f"k{i}": i for i in range(250 - len(flat_hparams(config(tmp_path, "mlflow"))))}
    t = Trackers(cfg, where)
    before = int(time.time() * 1000)
    t.start([])
    t.log_row(rows(1)[0])
    after = int(time.time() * 1000) + 1
    assert calls == [(0, 100), (0, 100), (0, 50), (3, 0)]
    from mlflow.tracking import MlflowClient as Client

    client = Client(tracking_uri=tracking_uri(cfg.logger.mlflow, cfg.runs_root))
    [metric] = client.get_metric_history(t.state["mlflow"]["run_id"], "test_err")
    assert metric.step == 1 and before <= metric.timestamp <= after


def test_mlflow_a_new_store_gets_a_new_run(tmp_path: Path) -> None:
    """trackers.json holds a run of another tracking URI (the store moved): this store gets a run of its own."""
    where = run_dir(tmp_path)
    old = config(tmp_path, "mlflow", tracking_uri=(tmp_path / "old").resolve().as_uri())
    t = Trackers(old, where)
    t.start([])
    t.log_row(rows(1)[0])
    new_uri = (tmp_path / "new").resolve().as_uri()
    again = Trackers(config(tmp_path, "mlflow", tracking_uri=new_uri), where)
    again.start(rows(1))
    again.finish("completed", {})
    [run] = read_mlflow(new_uri, "smoke")
    assert run["id"] != t.state["mlflow"]["run_id"] and run["status"] == "FINISHED"
    assert again.state["mlflow"]["tracking_uri"] == new_uri and "mlflow" in again.state


def test_mlflow_joins_an_experiment_another_job_created_meanwhile(tmp_path: Path, monkeypatch) -> None:
    """Two jobs of a sweep start together: this one does not see the experiment, the other creates it
    first, this one's create fails and it joins the other's experiment."""
    from mlflow.tracking import MlflowClient

    cfg = config(tmp_path, "mlflow")
    uri = tracking_uri(cfg.logger.mlflow, cfg.runs_root)
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    existing = MlflowClient(tracking_uri=uri).create_experiment("smoke")
    real = MlflowClient.get_experiment_by_name
    seen = []

    def late(self, name):
        seen.append(name)
        return None if len(seen) == 1 else real(self, name)  # the first look comes before the other's create

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", late)
    t = Trackers(cfg, run_dir(tmp_path))
    t.start([])
    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", real)
    assert seen == ["smoke", "smoke"]
    run = MlflowClient(tracking_uri=uri).get_run(t.state["mlflow"]["run_id"])
    assert run.info.experiment_id == existing


def test_mlflow_interrupted_run_is_killed_then_resumed_as_running(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    where = run_dir(tmp_path)
    cfg = config(tmp_path, "mlflow")
    t = Trackers(cfg, where)
    t.start([])
    t.finish("running", {})  # interrupted (Ctrl-C): the resumed run says how it ended
    uri = tracking_uri(cfg.logger.mlflow, cfg.runs_root)
    [run] = read_mlflow(uri, "smoke")
    assert run["status"] == "KILLED"
    again = Trackers(cfg, where)
    again.start(rows(1))
    assert MlflowClient(tracking_uri=uri).get_run(run["id"]).info.status == "RUNNING"
    assert [r["id"] for r in read_mlflow(uri, "smoke")] == [run["id"]]


def test_mlflow_its_own_history_wins_over_trackers_json(tmp_path: Path) -> None:
    """Killed after MLflow stored epoch 2 but before trackers.json said so: nothing is logged twice."""
    where = run_dir(tmp_path)
    cfg = config(tmp_path, "mlflow")
    first = Trackers(cfg, where)
    first.start([])
    first.log_row(rows(1)[0])
    saved = (where / "trackers.json").read_text()
    first.log_row(rows(2)[0])
    (where / "trackers.json").write_text(saved)
    second = Trackers(cfg, where)
    second.start(rows(1, 2))
    second.finish("completed", {})
    [run] = read_mlflow(tracking_uri(cfg.logger.mlflow, cfg.runs_root), "smoke")
    assert [step for step, _ in run["history"]["test_err"]] == [1, 2]


def test_a_second_run_directory_joins_the_experiment(tmp_path: Path) -> None:
    cfg = config(tmp_path, "mlflow")
    for seed in (0, 1):
        where = tmp_path / "runs" / "smoke" / f"seed={seed}"
        where.mkdir(parents=True)
        t = Trackers(cfg, where)
        t.start([])
        t.finish("completed", {})
    runs = read_mlflow(tracking_uri(cfg.logger.mlflow, cfg.runs_root), "smoke")
    assert sorted(r["tags"]["mlflow.runName"] for r in runs) == ["smoke/seed=0", "smoke/seed=1"]


# -- Weights & Biases (offline) ---------------------------------------------------------------------

def flushed() -> None:
    """W&B's service writes the run files in the background, after run.finish() returns; teardown
    waits for it to exit, so the files are complete (what a process's exit does)."""
    import wandb

    wandb.teardown()


def test_wandb_one_run_id_every_epoch_once_config_and_summary(tmp_path: Path, offline) -> None:
    """Session 1 logs epoch 1 and ends without a status (a process that died after W&B wrote its
    files); session 2 resumes the same W&B run with the checkpoint's history."""
    where = run_dir(tmp_path)
    cfg = config(tmp_path, "wandb", mode="offline", tags=["a", "b"])
    first = Trackers(cfg, where)
    first.start([])
    first.log_row(rows(1)[0])
    flushed()
    second = Trackers(cfg, where)
    second.start(rows(1, 2))
    second.log_row(rows(3)[0])
    second.finish("diverged", {"error": "loss is nan"})
    flushed()
    wb = read_wandb(where)
    state = json.loads((where / "trackers.json").read_text())["wandb"]
    assert set(wb["ids"]) == {state["run_id"]} and len(list((where / "wandb").glob("offline-run-*"))) == 2
    assert wb["steps"] == [1, 2, 3]
    for key in ("lr", "test_err", "train_loss", "epoch"):
        assert wb["history"][key] == [(r["epoch"], pytest.approx(r[key], rel=1e-12)) for r in rows(1, 2, 3)], key
    assert wb["config"]["optim.rho"] == cfg.optim.rho and wb["config"]["name"] == "smoke"
    assert wb["summary"]["status"] == "diverged" and wb["summary"]["error"] == "loss is nan"
    assert offline_steps(where, state["run_id"]) == [1, 2, 3]
    records = [r for f in sorted((where / "wandb").glob("offline-run-*/run-*.wandb")) for r in read_records(f)]
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert {(r.project, r.run_group, r.display_name, tuple(r.tags)) for r in runs} == {
        ("sam-repro", "smoke", "smoke/seed=0", ("a", "b"))}
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert exits[-1] == 1  # diverged: the W&B run exits with 1


def test_wandb_completed_run_exits_0_and_logs_no_error(tmp_path: Path, offline) -> None:
    where = run_dir(tmp_path)
    cfg = config(tmp_path, "wandb", mode="offline", group="g", entity="me")
    t = Trackers(cfg, where)
    t.start([])
    print("console output stays in train.log")  # W&B's console capture is off
    t.log_row(rows(1)[0])
    t.finish("completed", {"error": None})
    flushed()
    records = [r for f in (where / "wandb").glob("offline-run-*/run-*.wandb") for r in read_records(f)]
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [0]
    assert {(r.run.run_group, r.run.entity) for r in records if r.WhichOneof("record_type") == "run"} == {("g", "me")}
    assert not list((where / "wandb").glob("offline-run-*/files/output.log"))
    wb = read_wandb(where)
    assert wb["summary"]["status"] == "completed" and "error" not in wb["summary"]


def test_wandb_offline_files_say_what_a_killed_session_held(tmp_path: Path, offline) -> None:
    """trackers.json says epoch 1, but the offline files of the run (an earlier session killed after
    W&B wrote epoch 2, written here) hold 1 and 2: the resumed session logs neither again."""
    where = run_dir(tmp_path)
    (where / "trackers.json").write_text(json.dumps({"wandb": {"run_id": "abc", "logged_epoch": 1,
                                                               "hparams_logged": True}}))
    earlier = where / "wandb" / "offline-run-20260101_000000-abc"
    earlier.mkdir(parents=True)
    write_run_file(earlier / "run-abc.wandb", [history_record(s).SerializeToString() for s in (1, 2)])
    t = Trackers(config(tmp_path, "wandb", mode="offline"), where)
    t.start(rows(1, 2))
    assert t.active["wandb"].last_logged() == 2 and t.state["wandb"]["logged_epoch"] == 2
    t.log_row(rows(3)[0])
    t.finish("completed", {})
    flushed()
    new = [f for f in (where / "wandb").glob("offline-run-*-abc/run-abc.wandb") if f.parent != earlier]
    assert len(new) == 1 and [r.history.step.num for r in read_records(new[0])
                              if r.WhichOneof("record_type") == "history"] == [3]


def test_a_fresh_wandb_run_reads_no_earlier_files(tmp_path: Path, offline) -> None:
    where = run_dir(tmp_path)
    stray = where / "wandb" / "offline-run-20260101_000000-zzz"
    stray.mkdir(parents=True)
    write_run_file(stray / "run-zzz.wandb", [history_record(5).SerializeToString()])
    t = Trackers(config(tmp_path, "wandb", mode="offline"), where)
    t.start([])
    assert t.active["wandb"].last_logged() == 0 and t.state["wandb"]["run_id"] != "zzz"
    t.finish("completed", {})
    flushed()


def test_wandb_dryrun_is_offline_and_a_missing_folder_holds_nothing(tmp_path: Path, offline) -> None:
    """mode=dryrun (W&B's old name for offline) reads the offline files too; a run id whose files
    are gone (deleted, or an earlier online session) holds nothing, so every row is logged again."""
    where = run_dir(tmp_path)
    (where / "trackers.json").write_text(json.dumps({"wandb": {"run_id": "abc", "logged_epoch": 2}}))
    t = Trackers(config(tmp_path, "wandb", mode="dryrun"), where)
    t.start(rows(1, 2))
    assert t.active["wandb"].run.settings.mode == "dryrun" and t.active["wandb"].last_logged() == 0
    t.finish("completed", {})
    flushed()
    assert offline_steps(where, "abc") == [1, 2]


def test_wandb_online_resume_trusts_the_servers_step() -> None:
    """Online, W&B's resumed run says where its history stops (starting_step: the next step)."""
    from sam_repro.trackers.wandb import WandbTracker

    tracker = WandbTracker.__new__(WandbTracker)
    for starting_step, held in ((6, 5), (1, 0), (0, 0)):
        tracker.run = type("Run", (), {"settings": type("S", (), {"mode": "online"})(), "starting_step": starting_step})()
        assert tracker.last_logged() == held


class FakeRun:
    """What WandbTracker calls on a W&B run, recorded (wandb.init replaced: no files, no service).
    Its config is W&B's own Config class, which refuses a changed value unless told to allow it."""

    def __init__(self, mode: str = "offline", starting_step: int = 0, run_id: str = "fake1") -> None:
        from wandb.sdk.wandb_config import Config

        self.id, self.settings, self.starting_step = run_id, type("S", (), {"mode": mode})(), starting_step
        self.config, self.summary, self.logged, self.exit_codes = Config(), {}, [], []

    def log(self, data: dict, step: Any = None, commit: Any = None) -> None:
        self.logged.append((data, step, commit))

    def finish(self, exit_code: Any = None) -> None:
        self.exit_codes.append(exit_code)


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """wandb.init records its arguments and returns a FakeRun; the list holds each call's arguments."""
    import wandb

    inits: list[dict[str, Any]] = []

    def init(**kwargs: Any) -> FakeRun:
        inits.append(kwargs)
        return FakeRun(mode=kwargs["mode"], run_id=kwargs["id"])

    monkeypatch.setattr(wandb, "init", init)
    return inits


def fake_tracker(run: FakeRun, held: int = 0) -> Any:
    from sam_repro.trackers.wandb import WandbTracker

    tracker = WandbTracker.__new__(WandbTracker)
    tracker.run, tracker.held = run, held
    return tracker


def test_wandb_init_gets_the_run_directorys_run_and_each_row_is_committed_at_its_epoch(tmp_path: Path,
                                                                                       fake_wandb) -> None:
    """The W&B run of this run directory: its project, entity, group, tags and name, the id kept in
    trackers.json (resume="allow": a resume continues it), the console left to train.log; then each
    row at its epoch, committed at once (not held until the next row), the epoch among its values."""
    from sam_repro.trackers import row_metrics

    where = run_dir(tmp_path)
    cfg = config(tmp_path, "wandb", mode="offline", tags=["a", "b"], entity="me")
    t = Trackers(cfg, where)
    t.start(rows(1))
    t.log_row(rows(2)[0])
    run = t.active["wandb"].run
    t.finish("completed", {})
    [kwargs] = fake_wandb
    assert kwargs.pop("settings").console == "off"
    assert kwargs == {"project": "sam-repro", "entity": "me", "group": "smoke", "tags": ["a", "b"],
                      "name": "smoke/seed=0", "id": t.state["wandb"]["run_id"], "resume": "allow",
                      "dir": str(where), "mode": "offline", "reinit": "create_new"}
    assert run.logged == [({**row_metrics(r), "epoch": r["epoch"]}, r["epoch"], True) for r in rows(1, 2)]
    assert run.config["optim.rho"] == cfg.optim.rho


def test_wandb_init_without_tags_passes_none(tmp_path: Path, fake_wandb) -> None:
    t = Trackers(config(tmp_path, "wandb", mode="offline", group="g"), run_dir(tmp_path))
    t.start([])
    assert fake_wandb[0]["tags"] is None and fake_wandb[0]["group"] == "g"


def test_wandb_hparams_of_a_resumed_run_may_change_a_value() -> None:
    """A resumed W&B run holds the config of its earlier session (online: the server's), and some
    keys differ on resume (`resume` itself): the update takes the new value instead of failing."""
    tracker = fake_tracker(FakeRun())
    tracker.run.config.update({"resume": False, "optim.rho": 0.05})
    tracker.log_hparams({"resume": True, "optim.rho": 0.05})
    assert tracker.run.config["resume"] is True


def test_wandb_offline_and_dryrun_trust_the_offline_files_not_the_servers_step() -> None:
    for mode in ("offline", "dryrun"):
        assert fake_tracker(FakeRun(mode=mode, starting_step=0), held=2).last_logged() == 2, mode


@pytest.mark.parametrize("status, error, code", [
    ("completed", None, 0), ("interrupted", "interrupted (KeyboardInterrupt) after epoch 1", 0), ("running", None, 0),
    ("diverged", "loss is nan", 1), ("failed", "RuntimeError: boom", 1)])
def test_wandb_finish_writes_the_status_and_error_and_exits_with_its_code(status: str, error: Any, code: int) -> None:
    tracker = fake_tracker(FakeRun())
    tracker.finish(status, {"status": status, "error": error})
    assert tracker.run.exit_codes == [code]
    assert tracker.run.summary == ({"status": status, "error": error} if error else {"status": status})


def test_two_run_directories_log_to_two_wandb_runs_at_once(tmp_path: Path, offline) -> None:
    """Packed members: one process, one W&B run per run directory, open side by side."""
    cfg = config(tmp_path, "wandb", mode="offline")
    dirs = [tmp_path / "runs" / "smoke" / f"member={i}" for i in range(2)]
    fans = []
    for d in dirs:
        d.mkdir(parents=True)
        fans.append(Trackers(cfg, d))
        fans[-1].start([])
    for epoch in (1, 2):
        for i, fan in enumerate(fans):
            fan.log_row({"epoch": epoch, "test_err": 10.0 * i + epoch})
    for fan in fans:
        fan.finish("completed", {})
    flushed()
    for i, d in enumerate(dirs):
        assert read_wandb(d)["history"]["test_err"] == [(1, 10.0 * i + 1), (2, 10.0 * i + 2)]
    assert fans[0].state["wandb"]["run_id"] != fans[1].state["wandb"]["run_id"]


def test_wandb_disabled_mode_trusts_trackers_json(tmp_path: Path, offline) -> None:
    where = run_dir(tmp_path)
    t = Trackers(config(tmp_path, "wandb", mode="disabled"), where)
    t.start(rows(1))
    assert t.active["wandb"].last_logged() is None
    t.finish("completed", {})
    assert json.loads((where / "trackers.json").read_text())["wandb"]["logged_epoch"] == 1


def write_run_file(path: Path, records: list[bytes], cut: int = 0, zero_chunk_after: int = -1) -> list[int]:
    """The LevelDB-style log W&B writes, written here from its description: a 7-byte header
    (':W&B', 0xBEE1, version 0), then 32 KiB blocks of chunks (crc32, length, type 1 full, 2 first,
    3 middle, 4 last); a block's tail shorter than a chunk header is zero-padded, a tail of exactly
    one header gets an empty first chunk. `zero_chunk_after`: a type-0 chunk after that record.
    Returns the sizes of the block tails it padded."""
    out = bytearray(struct.pack("<4sHB", b":W&B", 0xBEE1, 0))
    pads = []
    for n, data in enumerate(records):
        first = True
        while True:
            left = BLOCK - len(out) % BLOCK
            if left < 7:
                out += b"\0" * left
                pads.append(left)
                continue
            piece, data = data[:left - 7], data[left - 7:]
            kind = (1 if not data else 2) if first else (4 if not data else 3)
            out += struct.pack("<IHB", zlib.crc32(piece), len(piece), kind) + piece
            first = False
            if not data:
                break
        if n == zero_chunk_after:
            out += struct.pack("<IHB", 0, 5, 0) + b"\0" * 5
    path.write_bytes(bytes(out[:len(out) - cut]))
    return pads


def history_record(step: int, text_bytes: int = 10) -> Any:
    from wandb.proto import wandb_internal_pb2

    r = wandb_internal_pb2.Record()
    r.history.step.num = step
    item = r.history.item.add()
    item.key, item.value_json = "note", json.dumps("n" * text_bytes)
    return r


def sized(step: int, payload: int) -> Any:
    """A history record whose serialized size is exactly `payload` bytes."""
    r = history_record(step, payload)
    while len(r.SerializeToString()) > payload:
        r = history_record(step, len(r.history.item[0].value_json) - 2 - (len(r.SerializeToString()) - payload))
    assert len(r.SerializeToString()) == payload
    return r


def test_run_file_reader_follows_chunks_across_blocks(tmp_path: Path) -> None:
    """Records that end a block leaving tails of 0-7 bytes (padding below a chunk header; an empty
    first chunk in a tail of exactly one header), one record spanning three blocks (first, middle,
    last chunks), an empty record, a type-0 chunk; then a file cut inside its last chunk."""
    records = []
    for tail in range(8):  # record k fills block k up to `tail` bytes before its end
        records.append(sized(100 + tail, BLOCK - (7 if records else 14) - tail))
    big = history_record(2, 2 * BLOCK + 100)
    records += [big, history_record(3)]
    from wandb.proto import wandb_internal_pb2

    records.append(wandb_internal_pb2.Record())  # serializes to nothing: a zero-length chunk
    f = tmp_path / "run-x.wandb"
    pads = write_run_file(f, [r.SerializeToString() for r in records], zero_chunk_after=8)
    assert sorted(pads) == [1, 2, 3, 4, 5, 6]  # the writer really padded every tail below 7 bytes
    got = list(read_records(f))
    assert [r.SerializeToString() for r in got] == [r.SerializeToString() for r in records]  # whole records
    write_run_file(f, [r.SerializeToString() for r in records[8:10]], cut=3)
    assert [r.history.step.num for r in read_records(f)] == [2]


@pytest.mark.parametrize("content, raises", [
    (b":W&", False), (b":W&B" + struct.pack("<HB", 0xBEE1, 0), False),  # too short / only the header
    (b"LEVELDB", True), (b"LEVELDB" + b"\0" * 20, True),
    (b":W&B" + struct.pack("<HB", 0xBEE2, 0) + b"\0" * 20, True),  # the right name, another magic
    (b":W&C" + struct.pack("<HB", 0xBEE1, 0) + b"\0" * 20, True),  # another name, the right magic
])
def test_run_file_reader_checks_the_header(tmp_path: Path, content: bytes, raises: bool) -> None:
    f = tmp_path / "run-x.wandb"
    f.write_bytes(content)
    if raises:
        with pytest.raises(ValueError, match="not a W&B run file"):
            list(read_records(f))
    else:
        assert list(read_records(f)) == []


def test_offline_steps_read_every_session_of_one_run_id(tmp_path: Path) -> None:
    for session, steps in (("20260101_000000", (1, 2)), ("20260101_000100", (3,))):
        d = tmp_path / "wandb" / f"offline-run-{session}-abc"
        d.mkdir(parents=True)
        write_run_file(d / "run-abc.wandb", [history_record(s).SerializeToString() for s in steps])
    other = tmp_path / "wandb" / "offline-run-20260101_000200-zzz"
    other.mkdir()
    write_run_file(other / "run-zzz.wandb", [history_record(9).SerializeToString()])
    assert offline_steps(tmp_path, "abc") == [1, 2, 3] and offline_steps(tmp_path, "none") == []
