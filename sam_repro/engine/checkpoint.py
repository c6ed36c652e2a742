"""Atomic files: a checkpoint or a JSON file is either the old one or the new one, never half.

Write to a temporary file in the same directory, flush and fsync it, then os.replace() it over
the target (atomic on POSIX), then fsync the directory so the rename itself survives a crash.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

CHECKPOINT = "checkpoint.pt"


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call write(file) on a temporary file, then move it over `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: Path, data: Any) -> None:
    """JSON, atomically, keys in a stable order."""
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"), mode="w")


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """The training state (model, optimizer, epoch, history ...) as run_dir/checkpoint.pt."""
    atomic_write(Path(run_dir) / CHECKPOINT, lambda f: torch.save(state, f))


def load_checkpoint(run_dir: Path, map_location: Any = "cpu") -> dict[str, Any] | None:
    """The last checkpoint of a run, or None if there is none."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    return torch.load(path, map_location=map_location, weights_only=False)
