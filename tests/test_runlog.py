"""sam_repro.runlog: what metrics.json says about progress, best and final, when evaluation is sparse.

With engine.eval_every = k, metrics.jsonl gets one row every k epochs: the number of rows is not
the number of epochs done. The report's "status running (E of N epochs)" reads epochs_done.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from sam_repro import runlog
from sam_repro.runlog import RunLog, cpu_name, environment, summary_config, git_state, summary_block
from tests.conftest import compose_config


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


# ---- the documented metrics.json (docs/run_directory.md) -------------------------------------

DOC_KEYS = {"schema", "status", "experiment", "started_at", "updated_at", "config", "final", "best",
            "epochs_done", "wall_s", "images_per_s", "env", "data", "error"}


def utc_second(stamp: str) -> datetime.datetime:
    """An ISO timestamp as the doc shows it: UTC offset, whole seconds."""
    t = datetime.datetime.fromisoformat(stamp)
    assert t.utcoffset() == datetime.timedelta(0) and t.microsecond == 0 and stamp.endswith("+00:00"), stamp
    return t


def test_a_new_run_directory_says_running_with_every_documented_key(tmp_path: Path) -> None:
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    config, env, data = {"epochs": 10, "optimizer": "sam"}, {"device": "cpu", "git_sha": None}, {"source": "synthetic"}
    RunLog(tmp_path, "exp", config, env, data).write_summary()
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert set(doc) == DOC_KEYS
    assert {k: doc[k] for k in DOC_KEYS - {"started_at", "updated_at"}} == {
        "schema": 1, "status": "running", "experiment": "exp", "config": config, "final": None, "best": None,
        "epochs_done": 0, "wall_s": 0.0, "images_per_s": None, "env": env, "data": data, "error": None}
    after = datetime.datetime.now(datetime.timezone.utc)
    for key in ("started_at", "updated_at"):
        assert before <= utc_second(doc[key]) <= after


def test_summary_block_passes_finite_losses_and_the_optional_metrics_through() -> None:
    r = {**row(7, 12.5), "test_loss": 0.25, "train_loss": 0.125, "test_top5_err": 1.5, "val_err": 13.0,
         "val_loss": 0.5, "epoch_s": 3.0}
    assert summary_block(r) == {"test_err": 12.5, "test_acc": 87.5, "test_loss": 0.25, "train_loss": 0.125,
                                "train_err": 20.0, "test_top5_err": 1.5, "val_err": 13.0, "val_loss": 0.5}


class Recorder:
    """A stand-in for sam_repro.trackers.Trackers that records what the run log hands it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def start(self, history: list) -> None:
        self.calls.append(("start", len(history)))

    def log_row(self, r: dict) -> None:
        self.calls.append(("log_row", r["epoch"]))

    def finish(self, status: str, summary: dict) -> None:
        self.calls.append(("finish", status, summary["epochs_done"]))


def test_trackers_see_the_restore_every_row_and_the_end(tmp_path: Path) -> None:
    rec = Recorder()
    log = RunLog(tmp_path, "t", {}, {}, {}, trackers=rec)
    history = [row(1, 30.0)]
    log.restore(history, started_at=None, wall_s=1.0)
    history.append(row(2, 20.0))
    log.log_epoch(history[-1], history, wall_s=2.0)
    log.finish("completed")
    assert rec.calls == [("start", 1), ("log_row", 2), ("finish", "completed", 2)]


# ---- the flat config block and the environment -----------------------------------------------

@pytest.mark.parametrize("overrides, world", [
    ([], 1),
    (["optim=sgd"], 1),
    (["optim=asam", "optim.m=16", "device_batch=64"], 2),
    (["optim.p=inf", "optim.sync_perturbation=true"], 4),
])
def test_flat_config_is_the_documented_block(overrides: list[str], world: int) -> None:
    cfg = compose_config(["experiment=smoke", "batch_size=128", *overrides])
    o = cfg.optim
    sam = o.name != "sgd"
    device_batch = cfg.device_batch if cfg.device_batch else cfg.batch_size // world
    want = {
        "dataset": cfg.dataset.name, "model": cfg.model.name, "augment": cfg.augment.name, "optimizer": o.name,
        "rho": o.rho if sam else None,
        "p": (2 if o.p == 2 else "inf") if sam else None,
        "adaptive": (o.name == "asam") if sam else None,
        "m": (None if o.sync_perturbation else (o.m or device_batch)) if sam else None,
        "device_batch": device_batch, "devices": world,
        "label_noise": cfg.dataset.label_noise, "noise_kind": cfg.dataset.noise_kind, "epochs": cfg.epochs,
        "batch_size": 128, "seed": cfg.seed, "precision": "bf16", "lr": o.lr, "weight_decay": o.weight_decay,
        "wd_mode": o.wd_mode, "bn_stats": o.bn_stats if sam else None, "label_smoothing": o.label_smoothing,
        "grad_clip": o.grad_clip, "val_fraction": cfg.dataset.val_fraction, "train_steps": cfg.train_steps,
    }
    got = summary_config(cfg, "bf16", world)
    assert got == want
    if world == 1:
        assert summary_config(cfg, "bf16") == want  # one process unless told otherwise
    assert type(got["device_batch"]) is int  # metrics.json says 64, not 64.0
    json.dumps(got, allow_nan=False)  # what metrics.json can hold: p = inf is the string "inf"


def test_git_state_is_the_checkouts_head_and_dirty_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = Path(runlog.__file__).resolve().parent
    git = lambda *a: subprocess.run(["git", "-C", str(here), *a], capture_output=True, text=True)  # noqa: E731
    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    assert git_state() == (head.stdout.strip(), dirty)
    monkeypatch.setattr(runlog, "__file__", str(tmp_path / "runlog.py"))  # a copy outside any checkout
    assert git_state() == (None, None)


def test_git_state_dirty_means_a_tracked_file_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a checkout of our own: clean, then an untracked file (still clean), then a modified tracked file."""
    repo = tmp_path / "checkout"
    (repo / "sam_repro").mkdir(parents=True)
    code = repo / "sam_repro" / "runlog.py"
    code.write_text("# tracked\n")
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True, check=True)  # noqa: E731
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    sha = git("rev-parse", "HEAD").stdout.strip()
    monkeypatch.setattr(runlog, "__file__", str(code))
    assert git_state() == (sha, False)
    (repo / "notes.txt").write_text("untracked")
    assert git_state() == (sha, False)
    code.write_text("# changed\n")
    assert git_state() == (sha, True)


def test_write_config_writes_the_resolved_config(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"a": {"lr": 0.1}, "b": "${a.lr}", "name": "x"})
    new_log(tmp_path).write_config(cfg)
    assert OmegaConf.to_container(OmegaConf.load(tmp_path / "config.yaml")) == {"a": {"lr": 0.1}, "b": 0.1, "name": "x"}


def test_restore_writes_one_line_per_history_row(tmp_path: Path) -> None:
    history = [row(1, 30.0), row(2, 20.0), row(3, 10.0)]
    new_log(tmp_path).restore(history, started_at=None, wall_s=3.0)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in history)


def test_cpu_name_and_the_environment_block() -> None:
    name = cpu_name()
    assert name.startswith("CPU ") and name.endswith(f"({os.cpu_count()} cores)") and "  " not in name
    cpuinfo = Path("/proc/cpuinfo")
    models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
              if ln.startswith("model name")] if cpuinfo.is_file() else []
    if models:
        assert name == f"CPU {models[0]} ({os.cpu_count()} cores)"
    env = environment(torch.device("cpu"))
    assert env == {"torch": torch.__version__, "cuda": None, "device": name, "device_type": "cpu",
                   "git_sha": git_state()[0], "git_dirty": git_state()[1],
                   "python": platform.python_version(), "hostname": socket.gethostname()}


def test_the_environment_block_of_a_cuda_device_names_that_gpu_and_the_cuda_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA branch, on a CPU-only machine: torch.cuda.get_device_name stands in for the driver."""
    asked = []

    def device_name(device: Any = None) -> str:
        asked.append(device)
        return f"Fake GPU {device.index}"

    monkeypatch.setattr(torch.cuda, "get_device_name", device_name)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    env = environment(torch.device("cuda", 1))
    assert asked == [torch.device("cuda", 1)]  # the run's own device, not the current one
    assert (env["device"], env["device_type"], env["cuda"]) == ("Fake GPU 1", "cuda", "12.8")
    assert env["torch"] == torch.__version__ and env["git_sha"] == git_state()[0]


# -- cpu_name where /proc/cpuinfo is missing, unreadable or says no model ----------------------
class FakeCpuinfo:
    """Stands in for runlog.Path: /proc/cpuinfo holds `text`, or cannot be read (text None)."""

    def __init__(self, text: Any) -> None:
        self.text = text

    def __call__(self, path: str) -> "FakeCpuinfo":
        assert str(path) == "/proc/cpuinfo"
        return self

    def read_text(self) -> str:
        if self.text is None:
            raise FileNotFoundError("/proc/cpuinfo")
        return self.text


@pytest.mark.parametrize("text, processor, model", [
    (None, "x86_64", "x86_64"),  # no /proc/cpuinfo (macOS, Windows): platform.processor()
    (None, "", None),  # nor a processor name: just the core count
    ("processor\t: 0\nBogoMIPS\t: 50.00\n", "aarch64", "aarch64"),  # cpuinfo without a model name (ARM)
    ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz: rev 7\nmodel name\t: other\n", "x86_64",
     "Intel(R) Xeon(R) CPU @ 2.20GHz: rev 7"),  # the first model name, whole (colons in it kept)
], ids=["no-cpuinfo", "nothing", "no-model-line", "model-with-colon"])
def test_cpu_name_falls_back_to_the_platform_and_keeps_the_whole_model(
        monkeypatch: pytest.MonkeyPatch, text: Any, processor: str, model: Any) -> None:
    monkeypatch.setattr(runlog, "Path", FakeCpuinfo(text))
    monkeypatch.setattr(runlog.platform, "processor", lambda: processor)
    monkeypatch.setattr(runlog.os, "cpu_count", lambda: 6)
    assert cpu_name() == (f"CPU {model} (6 cores)" if model else "CPU (6 cores)")


# -- metrics.json's wall_s and images_per_s: the documented precision -------------------------
def test_wall_s_to_the_millisecond_and_images_per_s_the_rows_mean_to_one_decimal(tmp_path: Path) -> None:
    """docs/run_directory.md: wall_s to 3 decimals, images_per_s the mean of the rows to 1 decimal."""
    wall = 1234.56789
    history = [row(1, 30.0, ips=1000.0), row(2, 20.0, ips=1000.0), row(3, 10.0, ips=1001.0)]  # mean 1000.333..
    log = new_log(tmp_path)
    log.log_epoch(history[-1], history, wall_s=wall)
    mean = sum(r["images_per_s"] for r in history) / len(history)
    for doc in (json.loads((tmp_path / "metrics.json").read_text()), log.summary):
        assert isinstance(doc["wall_s"], float) and abs(doc["wall_s"] - wall) <= 0.0005 + 1e-9
        assert doc["wall_s"] == float(f"{doc['wall_s']:.3f}")  # no more than 3 decimals
        assert isinstance(doc["images_per_s"], float) and abs(doc["images_per_s"] - mean) <= 0.05 + 1e-9
        assert doc["images_per_s"] == float(f"{doc['images_per_s']:.1f}")  # no more than 1 decimal
