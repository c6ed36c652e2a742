"""Shared fixtures: composing the Hydra config in-process, and running `sam-train` for real."""
from __future__ import annotations

import json
import os

# One OpenMP thread, in this process and in every `sam-train` it starts (set before torch loads, which
# reads it once), unless the caller chose a number. On 2 cores that other work shares, each parallel
# region of a 2-thread op waits until the OS has scheduled both threads: on such a machine the
# float-heavy unit test files took 401 s with 2 threads and 219 s with 1, the PyHessian test up to
# 159 s and 19 s, a PyramidNet-272 step 24 s and 2.3 s. The second core pays only on a quiet machine.
# No verdict depends on it (tests compare runs on one machine with one setting, or in float64).
os.environ.setdefault("OMP_NUM_THREADS", "1")
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from sam_repro.config import config_dir, register_configs

REPO = Path(__file__).resolve().parent.parent


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The config `sam-train <overrides>` would run, composed in-process (no run)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


_COMPOSED: dict[tuple[str, ...], DictConfig] = {}


def composed_copy(overrides: Sequence[str] = ()) -> DictConfig:
    """compose_config(overrides), composed once per process; each call returns a fresh copy to change."""
    return composed_shared(overrides).copy()


def composed_shared(overrides: Sequence[str] = ()) -> DictConfig:
    """compose_config(overrides), composed once per process, the cached object itself: a caller that
    changes it must undo the change (tests/test_validate.py's `problems_after`)."""
    key = tuple(overrides)
    if key not in _COMPOSED:
        _COMPOSED[key] = compose_config(key)
    return _COMPOSED[key]


def sam_train(args: Sequence[str], cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed `sam-train` console script (as a user would), capture its output."""
    exe = Path(sys.executable).parent / "sam-train"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "SAM_DATA": str(cwd / "no-data"), **(env or {})}
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture
def composed():
    return compose_config


# The run that interrupted runs are compared with: 3 epochs of 4 steps, deterministic, with label
# noise (a resumed run must redraw the same noisy labels). tests/test_cli.py kills it after epoch 2,
# tests/engine/test_cluster.py preempts it after epoch 1; both must end with this run's rows and weights.
RESUMABLE = ["experiment=smoke", "dataset.train_size=256", "dataset.test_size=128", "batch_size=64", "epochs=3",
             "engine.deterministic=true", "dataset.label_noise=0.2", "engine.progress=false"]
TIMING_KEYS = {"epoch_s", "images_per_s"}


@pytest.fixture(scope="session")
def uninterrupted_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runs_root of `sam-train RESUMABLE runs_root=...` trained straight through, made once per
    session (its run directory: only_run_dir). Read it, never write into it (copy it to change it)."""
    root = tmp_path_factory.mktemp("uninterrupted") / "runs"
    result = sam_train([*RESUMABLE, f"runs_root={root}"], cwd=root.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def only_run_dir(root: Path) -> Path:
    """The one run directory below `root` (the directory of its one metrics.json)."""
    found = [p.parent for p in root.rglob("metrics.json")]
    assert len(found) == 1, found
    return found[0]


def rows_without_timing(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows without the wall-clock fields (which no two runs share)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `make mutate` only: a mutant runs its module's tests, cheapest first (tests/mutation_scope.py)."""
    from tests.mutation_scope import scope_items

    scope_items(config, items)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Under `make mutate` only: mutmut's fork server collects once, then forks a process per mutant;
    lazy one-time costs paid here are paid once (tests/mutation_scope.py)."""
    from tests.mutation_scope import warm_fork_server

    warm_fork_server(session.config)
