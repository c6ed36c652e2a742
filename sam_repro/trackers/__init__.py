"""Trackers: the run's metrics shown where researchers already look (TensorBoard, W&B, MLflow).

The run directory stays the source of truth; a tracker is a view of it, fed by the RunLog at the
points where metrics.jsonl and metrics.json are written:

    start(history)  the run (re)starts: open or continue each tracker's run, log the resolved config
                    once as flat hyperparameters (`optim.rho`), then the history rows not yet logged
    log_row(row)    a metrics.jsonl row was appended (step = its epoch)
    finish(status)  metrics.json got its status (completed | diverged | failed | interrupted)

Each tracker's own run id and the last epoch it logged live in <run dir>/trackers.json (written
atomically), so a resumed run continues the same tracker run and logs each epoch once. Everything
is keyed by the run directory: one tracker run per run directory (a packed member, when packed runs
exist, gets its own through its own RunLog). Only rank 0 has a RunLog, so only rank 0 logs.

Choose trackers with the `logger` config group: `logger=tensorboard`, `logger=[tensorboard,wandb,mlflow]`.
A tracker that fails while the run trains is switched off with one error in train.log; the run goes on.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from sam_repro.config import flatten
from sam_repro.rundir import write_json

log = logging.getLogger("sam_repro")
STATE_FILE = "trackers.json"


class Tracker:
    """One tracker's view of one run directory. Subclasses implement the four calls."""

    # log the hyperparameters at every (re)start, not once: for a tracker that may lose a killed session
    hparams_every_start = False

    def __init__(self, settings: DictConfig, cfg: DictConfig, run_dir: Path) -> None:
        self.settings, self.cfg, self.run_dir = settings, cfg, Path(run_dir)

    def start(self, state: dict[str, Any], first_epoch: int) -> dict[str, Any]:
        """Open (or continue, from `state`) the tracker's run; the next row logged is `first_epoch`.
        Returns what must be kept in trackers.json to continue it (a run id)."""
        raise NotImplementedError

    def last_logged(self) -> Optional[int]:
        """The last epoch the tracker itself holds, where it can tell (None: trust trackers.json)."""
        return None

    def log_hparams(self, hparams: dict[str, Any]) -> None:
        raise NotImplementedError

    def log_row(self, epoch: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class TrackerSpec:
    target: str  # module:Class, imported only when the tracker is used
    package: str  # the import that must be installed
    extra: str  # pip install sam-repro[<extra>]

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def load(self) -> type[Tracker]:
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)


TRACKERS: dict[str, TrackerSpec] = {
    "tensorboard": TrackerSpec("sam_repro.trackers.tensorboard:TensorBoardTracker", "tensorboard", "tensorboard"),
    "wandb": TrackerSpec("sam_repro.trackers.wandb:WandbTracker", "wandb", "wandb"),
    "mlflow": TrackerSpec("sam_repro.trackers.mlflow:MlflowTracker", "mlflow", "mlflow"),
}


def chosen(cfg: DictConfig) -> list[str]:
    """The trackers `cfg.logger` asks for, in registry order."""
    logger = cfg.get("logger")
    return [name for name in TRACKERS if logger is not None and logger.get(name) is not None]


def not_installed(cfg: DictConfig) -> list[tuple[str, TrackerSpec]]:
    """The chosen trackers whose package is missing (validate turns each into one line)."""
    return [(name, TRACKERS[name]) for name in chosen(cfg) if not TRACKERS[name].installed()]


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as flat dotted keys (`optim.rho`), scalars only (lists become strings).
    The `logger` node is left out: it says where the run is shown, not what it is."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("logger", None)
    return {k: str(v) if isinstance(v, (list, tuple)) else v for k, v in flatten(container, whole=()).items()}


def row_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as tracker metrics: every numeric field but the epoch (the step)."""
    return {k: float(v) for k, v in row.items() if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Trackers:
    """The chosen trackers of one run directory, driven by its RunLog."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.active: dict[str, Tracker] = {name: TRACKERS[name].load()(cfg.logger[name], cfg, self.run_dir)
                                           for name in chosen(cfg)}
        self.state: dict[str, dict[str, Any]] = {}

    def __bool__(self) -> bool:
        return bool(self.active)

    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE_FILE

    def _read_state(self) -> dict[str, dict[str, Any]]:
        import json

        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    def _save(self) -> None:
        write_json(self.state_path, self.state)

    def _guard(self, name: str, what: str, fn: Any, *args: Any) -> Any:
        """A tracker is a view: if it fails, say so once and switch it off; the run goes on."""
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - any tracker error, reported and contained
            log.error("logger %s failed in %s (%s: %s); it is switched off for this run, the run goes on",
                      name, what, type(err).__name__, err)
            self.active.pop(name, None)
            return None

    def start(self, history: list[dict[str, Any]]) -> None:
        """Open or continue every tracker's run, then catch it up on the rows it has not logged."""
        saved = self._read_state()
        self.state = {name: dict(state) for name, state in saved.items()}  # kept for trackers not chosen this time
        for name, tracker in list(self.active.items()):
            state = dict(saved.get(name, {}))
            logged = int(state.get("logged_epoch", 0))
            if state.get("status") == "completed" and logged >= (history[-1]["epoch"] if history else 0):
                self.active.pop(name)  # re-running a completed command: that tracker run is complete too
                self.state[name] = state
                continue
            opened = self._guard(name, "start", tracker.start, state, logged + 1)
            if opened is None:
                continue
            state.update(opened)
            state.pop("status", None)
            held = self._guard(name, "last_logged", tracker.last_logged)
            if name not in self.active:
                continue
            if held is not None:  # the tracker's own record wins (a kill between its write and ours)
                logged = held
            state["logged_epoch"] = logged
            self.state[name] = state
            if not state.get("hparams_logged") or tracker.hparams_every_start:
                if self._guard(name, "log_hparams", tracker.log_hparams, flat_hparams(self.cfg)) is None and name not in self.active:
                    continue
                state["hparams_logged"] = True
            for row in history:
                if row["epoch"] > logged and name in self.active:
                    self._log(name, tracker, row)
        self._save()

    def _log(self, name: str, tracker: Tracker, row: dict[str, Any]) -> None:
        self._guard(name, "log_row", tracker.log_row, int(row["epoch"]), row_metrics(row))
        if name in self.active:
            self.state[name]["logged_epoch"] = int(row["epoch"])

    def log_row(self, row: dict[str, Any]) -> None:
        for name, tracker in list(self.active.items()):
            if row["epoch"] > self.state[name]["logged_epoch"]:
                self._log(name, tracker, row)
        if self.active:
            self._save()

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        for name, tracker in list(self.active.items()):
            self._guard(name, "finish", tracker.finish, status, summary)
            self.state[name]["status"] = status
        self.active = {}
        self._save()
