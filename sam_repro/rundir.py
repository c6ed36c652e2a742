"""The run directory's files, below everything that reads or writes them (docs/run_directory.md).

- Atomic files: a checkpoint or a JSON document is either the old one or the new one, never half:
  written to a temporary file in the same directory, flushed and fsynced, moved over the target
  with os.replace (atomic on POSIX), the directory fsynced so that the rename survives a crash. A
  full disk is one `DiskFull` line naming the file; the temporary file is removed and the target
  left as it was.
- Checkpoints are rotated: the previous one is kept as `checkpoint.prev.pt`, and a damaged
  `checkpoint.pt` (a truncated copy, a bad sector) falls back to it with a warning.
- One writer per run directory: `RunDirLock` holds an exclusive flock on `.lock` while a process
  trains into (or measures) a run directory. The kernel drops the lock when its holder dies
  (kill -9 included), so a lock never outlives its process; a second writer gets one line naming
  the holder (pid, host) and exit status 2, or waits when asked to.
- `read_summary` is the one reader of metrics.json.
"""
from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from sam_repro.errors import UserError

log = logging.getLogger("sam_repro")

CONFIG, METRICS, SUMMARY = "config.yaml", "metrics.jsonl", "metrics.json"
CHECKPOINT, PREVIOUS_CHECKPOINT, LOCK = "checkpoint.pt", "checkpoint.prev.pt", ".lock"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(UserError):
    """A file of the run directory could not be written for lack of space."""


class CheckpointError(UserError):
    """No checkpoint of the run directory can be read."""


class RunDirBusy(UserError):
    """Another process is writing the run directory."""


def _disk_full(err: BaseException) -> bool:
    """Whether `err`, or an exception it was raised from or during, is a full disk (torch.save reports
    a failed write as a RuntimeError whose context is the OSError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            return True
        err = err.__cause__ or err.__context__
    return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temporary(path: Path, write: Callable[[Any], None], mode: str) -> Path:
    """write(file) into a fsynced temporary file beside `path`; removed again if anything fails."""
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
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if _disk_full(err):
            raise DiskFull(f"no space left on the device of {path.parent} while writing {path.name}: free space "
                           f"there and re-run the same command (what was written before is intact)") from None
        raise
    return Path(tmp)


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call write(file) on a temporary file, then move it over `path` atomically."""
    path = Path(path)
    tmp = _write_temporary(path, write, mode)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json(path: Path, data: Any) -> None:
    """JSON, atomically, keys in the order given."""
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"), mode="w")


def read_summary(run_dir: Path) -> Optional[dict[str, Any]]:
    """A run directory's metrics.json, or None when it has none or it cannot be read as a JSON object."""
    try:
        doc = json.loads((Path(run_dir) / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


# -- checkpoints ------------------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """The training state as run_dir/checkpoint.pt; the one it replaces becomes checkpoint.prev.pt.

    A crash between the two renames leaves checkpoint.prev.pt (and no checkpoint.pt): still resumable."""
    run_dir = Path(run_dir)
    current, previous = run_dir / CHECKPOINT, run_dir / PREVIOUS_CHECKPOINT
    tmp = _write_temporary(current, lambda f: torch.save(state, f), "wb")
    if current.exists():
        os.replace(current, previous)
    os.replace(tmp, current)
    _fsync_dir(run_dir)


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run directory holds a checkpoint (the current or the previous one)."""
    return any((Path(run_dir) / name).is_file() for name in (CHECKPOINT, PREVIOUS_CHECKPOINT))


def load_checkpoint(run_dir: Path, map_location: Any = "cpu") -> Optional[dict[str, Any]]:
    """The run's last readable checkpoint, or None if it has none. A damaged checkpoint.pt falls back
    to checkpoint.prev.pt with a warning; when neither can be read, one `CheckpointError` line."""
    run_dir = Path(run_dir)
    problems = []
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as err:  # a truncated or corrupt file: zip, pickle and EOF errors alike
            problems.append(f"{name} is damaged ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
            continue
        if problems:
            log.warning("%s: %s; resuming from %s instead", run_dir, problems[0], name)
        return state
    if not problems:
        return None
    raise CheckpointError(f"{run_dir}: {'; '.join(problems)}, and no earlier checkpoint is readable: move the "
                          f"damaged file away and re-run with resume=never to start the run over")


# -- one writer per run directory ------------------------------------------------------------------
class RunDirLock:
    """An exclusive lock on a run directory for as long as a process writes it (a context manager)."""

    def __init__(self, run_dir: Path, purpose: str = "training") -> None:
        self.run_dir, self.purpose = Path(run_dir), purpose
        self._fd: Optional[int] = None

    def acquire(self, wait: bool = False) -> "RunDirLock":
        """Take the lock; `wait` blocks until the holder releases it, else `RunDirBusy` at once."""
        if self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                holder = self._holder(fd)
                os.close(fd)
                raise RunDirBusy(f"{self.run_dir} is in use by {holder}: one process at a time writes a run "
                                 f"directory (wait_for_lock=true waits for it)") from None
            log.info("%s is in use by %s: waiting for it", self.run_dir, self._holder(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                  "since": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return f"pid {info['pid']} on {info['host']} ({info['purpose']} since {info['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self) -> None:
        """Let the next writer in (the lock file stays; it is meaningless without its flock)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
