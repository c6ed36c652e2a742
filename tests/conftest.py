"""Shared fixtures: composing the Hydra config in-process, and running `sam-train` for real."""
from __future__ import annotations

import os
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `make mutate` only: a mutant runs its module's tests, cheapest first (tests/mutation_scope.py)."""
    from tests.mutation_scope import scope_items

    scope_items(config, items)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Under `make mutate` only: mutmut's fork server collects once, then forks a process per mutant;
    lazy one-time costs paid here are paid once (tests/mutation_scope.py)."""
    from tests.mutation_scope import warm_fork_server

    warm_fork_server(session.config)
