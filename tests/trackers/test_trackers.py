"""Trackers (logger=tensorboard / wandb / mlflow): what each one holds, read back with its own reader,
equals metrics.jsonl; a killed and resumed run continues the same tracker runs with every epoch once;
a missing extra is one line and exit 2. CPU only, no network (W&B offline, MLflow file store)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from sam_repro.trackers import TRACKERS, chosen, flat_hparams, not_installed
from sam_repro.trackers.wandb import read_records
from tests.conftest import compose_config, sam_train

TINY = ["experiment=smoke", "dataset.train_size=128", "dataset.test_size=64", "batch_size=64", "engine.progress=false"]
ALL = "logger=[tensorboard,wandb,mlflow]"
METRICS = ("lr", "train_loss", "train_err", "test_loss", "test_err", "grad_norm", "perturbation_norm")


def offline_env(tmp_path: Path) -> dict[str, str]:
    """W&B without network or a home directory of its own; nothing here may reach a server."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wandb-dir"),
            "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
            "WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "WANDB_DISABLE_GIT": "true",
            "MLFLOW_TRACKING_URI": "", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}


def only_run_dir(root: Path) -> Path:
    dirs = [p.parent for p in root.rglob(".hydra")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- each tracker's own reader ----------------------------------------------------------------------
def read_tensorboard(log_dir: Path) -> dict[str, Any]:
    """Scalars (step -> value per tag, every event kept so a duplicate would show), hparams, status."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    status = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("status/text_summary")]
    return {"scalars": scalars, "hparams": hparams, "status": status}


def read_mlflow(uri: str, experiment: str) -> list[dict[str, Any]]:
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    out = []
    for run in client.search_runs([exp.experiment_id]):
        history = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                           key=lambda m: (m.step, m.timestamp))]
                   for key in run.data.metrics}
        out.append({"id": run.info.run_id, "status": run.info.status, "params": run.data.params,
                    "tags": run.data.tags, "history": history})
    return out


def read_wandb(run_dir: Path) -> dict[str, Any]:
    """Every offline run directory below <run dir>/wandb, in order: run ids, history steps, config, summary.
    W&B's files are LevelDB-style logs of its protobuf records; wandb ships no Python reader for them
    any more, so sam_repro.trackers.wandb.read_records reads them (with wandb's own protobuf classes)."""
    ids, steps, history, config, summary = [], [], {}, {}, {}
    for run_file in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in read_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.append(record.run.run_id)
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "config":
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                steps.append(record.history.step.num)
                for key, value in items.items():
                    history.setdefault(key, []).append((record.history.step.num, value))
            elif kind == "summary":
                summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.summary.update})
    return {"ids": ids, "steps": steps, "history": history, "config": config, "summary": summary}


def assert_trackers_hold(run_dir: Path, runs_root: Path, epochs: int) -> None:
    """Each tracker holds exactly the rows of metrics.jsonl, each epoch once, in one tracker run."""
    rows = read_rows(run_dir)
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    state = json.loads((run_dir / "trackers.json").read_text())
    assert {name: s["logged_epoch"] for name, s in state.items()} == {n: epochs for n in ("tensorboard", "wandb", "mlflow")}

    tb = read_tensorboard(run_dir / "tensorboard")
    for key in METRICS:
        assert [step for step, _ in tb["scalars"][key]] == [r["epoch"] for r in rows], key  # each epoch once
        assert [v for _, v in tb["scalars"][key]] == pytest.approx([r[key] for r in rows], rel=1e-6), key  # float32
    assert tb["hparams"]["optim.rho"] == pytest.approx(0.05) and tb["hparams"]["model.name"] == "resnet20"
    assert tb["status"] == ["completed"]

    runs = read_mlflow((runs_root / "mlruns").as_uri(), "smoke")
    assert len(runs) == 1 and runs[0]["id"] == state["mlflow"]["run_id"]
    run = runs[0]
    for key in METRICS:
        assert run["history"][key] == [(r["epoch"], pytest.approx(r[key], rel=1e-12)) for r in rows], key
    assert run["params"]["optim.rho"] == "0.05" and run["params"]["optim.name"] == "sam"
    assert not any(k.startswith("logger") for k in run["params"])
    assert run["tags"]["status"] == "completed" and run["status"] == "FINISHED"

    wb = read_wandb(run_dir)
    assert set(wb["ids"]) == {state["wandb"]["run_id"]}  # resumed: the same W&B run id
    assert wb["steps"] == [r["epoch"] for r in rows]  # each epoch once, in order
    for key in METRICS:
        assert wb["history"][key] == [(r["epoch"], pytest.approx(r[key], rel=1e-12)) for r in rows], key
    assert wb["config"]["optim.rho"] == 0.05 and wb["summary"]["status"] == "completed"


# -- config and validation (fast) --------------------------------------------------------------------
def test_logger_group_takes_any_subset_and_is_typed() -> None:
    assert chosen(compose_config([])) == []
    assert chosen(compose_config(["logger=mlflow"])) == ["mlflow"]
    cfg = compose_config([ALL, "logger.wandb.tags=[a,b]", "logger.mlflow.tracking_uri=file:/x"])
    assert chosen(cfg) == ["tensorboard", "wandb", "mlflow"]
    assert list(cfg.logger.wandb.tags) == ["a", "b"] and cfg.logger.mlflow.tracking_uri == "file:/x"
    with pytest.raises(Exception, match="logger.wandb.projekt"):
        compose_config(["logger=wandb", "logger.wandb.projekt=x"])  # misspelt: fails at composition
    with pytest.raises(Exception, match="logger/neptune"):
        compose_config(["logger=neptune"])


def test_hyperparameters_are_the_resolved_config_in_flat_dotted_keys() -> None:
    hp = flat_hparams(compose_config(["experiment=smoke", "optim.rho=0.1", "logger=tensorboard"]))
    assert hp["optim.rho"] == 0.1 and hp["optim.name"] == "sam" and hp["dataset.name"] == "synthetic"
    assert hp["epochs"] == 3 and hp["name"] == "smoke"
    assert all(not isinstance(v, (dict, list)) for v in hp.values())
    assert not any(k.startswith("logger") for k in hp)


def test_every_tracker_is_installed_by_the_dev_extra() -> None:
    assert all(spec.installed() for spec in TRACKERS.values())
    assert not_installed(compose_config([ALL])) == []


def test_a_missing_extra_is_one_line_and_exit_2_before_any_data_is_read(tmp_path: Path) -> None:
    # An interpreter where wandb is not installed: find_spec and import both see it missing.
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")
    env = {"PYTHONPATH": str(tmp_path / "shim"), **offline_env(tmp_path)}
    # cifar10 is not on this machine: reading data first would fail with a data error instead
    result = sam_train(["dataset=cifar10", "logger=[tensorboard,wandb]", f"runs_root={tmp_path / 'runs'}"],
                       cwd=tmp_path, env=env, timeout=240)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("sam-train: error:")]
    assert errors == ["sam-train: error: logger='wandb' is invalid: the wandb package is not installed: "
                      "pip install 'sam-repro[wandb]'"], result.stderr[-2000:]
    assert not list((tmp_path / "runs").rglob("metrics.json"))


# -- end to end (slow) ---------------------------------------------------------------------------------
KILLER = textwrap.dedent("""
    # Deterministic hard kill: SIGKILL at a fixed point of the program, not after a timer. Epoch KILL_AT
    # is checkpointed, then the process dies before its row reaches metrics.jsonl and the trackers.
    import os, signal, sys
    from sam_repro import runlog
    from sam_repro.cli import train_main
    KILL_AT = int(os.environ["KILL_AT_EPOCH"])
    log_epoch = runlog.RunLog.log_epoch
    def dying_log_epoch(self, row, history, wall_s):
        if row["epoch"] == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        log_epoch(self, row, history, wall_s)
    runlog.RunLog.log_epoch = dying_log_epoch
    sys.argv = ["sam-train", *sys.argv[1:]]
    train_main()
""")


@pytest.mark.slow
def test_a_killed_and_resumed_run_logs_every_row_to_every_tracker_once_in_the_same_tracker_runs(tmp_path: Path) -> None:
    """One run for both: a fresh start (epoch 1 logged; killed once epoch 2 is checkpointed, before its
    row reaches metrics.jsonl and the trackers), a resume (epochs 2-3), and at the end each tracker
    holds exactly metrics.jsonl, each epoch once, in the tracker run it started with."""
    runs = tmp_path / "runs"
    args = [*TINY, "epochs=3", ALL, f"runs_root={runs}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SAM_DATA": str(tmp_path / "no-data"), **offline_env(tmp_path),
           "KILL_AT_EPOCH": "2"}
    killed = subprocess.run([sys.executable, "-c", KILLER, *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    run_dir = only_run_dir(runs)
    assert "logger" not in run_dir.name  # trackers do not change the run (nor its directory)
    state = json.loads((run_dir / "trackers.json").read_text())
    assert {s["logged_epoch"] for s in state.values()} == {1}  # epoch 2 was checkpointed, not logged

    resumed = sam_train(args, cwd=tmp_path, env=offline_env(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in (run_dir / "train.log").read_text()
    after = json.loads((run_dir / "trackers.json").read_text())
    assert {name: s["run_id"] for name, s in after.items() if "run_id" in s} == \
        {name: s["run_id"] for name, s in state.items() if "run_id" in s}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2  # two sessions, one W&B run id
    rows = read_rows(run_dir)
    assert all(r["perturbation_norm"] == pytest.approx(0.05, rel=1e-5) and r["grad_norm"] > 0 for r in rows)
    assert_trackers_hold(run_dir, runs, epochs=3)
