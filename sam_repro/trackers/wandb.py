"""Weights & Biases: project/entity/group/tags from `logger.wandb.*`; files under <run dir>/wandb.

`logger.wandb.mode=offline` (or WANDB_MODE=offline) needs no network: `wandb sync <run dir>/wandb/offline-run-*`
uploads later. A resumed run continues the same W&B run id (kept in trackers.json); an offline resume
adds a second offline-run-* folder with that id, and `wandb sync` puts both into the one run.

W&B buffers what it writes: a run killed hard (SIGKILL, out of memory) loses what its last session
had not flushed. So on resume the W&B run says itself what it holds (the server's step online; the
offline files' history records offline), and every row after that is logged again, once.
"""
from __future__ import annotations

import struct
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

from sam_repro.trackers import Tracker

EXIT_CODES = {"completed": 0, "interrupted": 0, "running": 0}  # anything else (diverged, failed) exits the W&B run with 1
BLOCK = 32768


def read_records(path: Path) -> Iterator[Any]:
    """The records of a W&B run file (run-<id>.wandb), as wandb_internal_pb2.Record.

    W&B's Go core writes it as a LevelDB-style log: a 7-byte header (':W&B', magic 0xBEE1, version),
    then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last); a block's tail shorter than a header is padding. wandb ships no Python reader
    for it any more. A file cut short (a killed run) yields the records it holds."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if len(data) < 7:
        return
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B run file (header {ident!r}, magic {magic:#x})")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if pos + length > len(data):
            return  # a chunk cut short by a kill
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def offline_steps(run_dir: Path, run_id: str) -> list[int]:
    """The history steps the offline files of W&B run `run_id` below `run_dir` hold, in order."""
    steps = []
    for run_file in sorted((Path(run_dir) / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        steps += [r.history.step.num for r in read_records(run_file) if r.WhichOneof("record_type") == "history"]
    return steps


class WandbTracker(Tracker):
    hparams_every_start = True  # a killed offline session may have lost its config record
    def start(self, state: dict[str, Any], first_epoch: int) -> dict[str, Any]:
        import wandb

        s = self.settings
        run_id = state.get("run_id") or uuid.uuid4().hex[:12]
        # what earlier offline sessions hold, read before this session adds its own folder
        self.held = max(offline_steps(self.run_dir, run_id), default=0) if state.get("run_id") else 0
        self.run = wandb.init(
            project=s.project, entity=s.entity, group=s.group or self.cfg.name, tags=list(s.tags) or None,
            name=f"{self.run_dir.parent.name}/{self.run_dir.name}", id=run_id, resume="allow",
            dir=str(self.run_dir), mode=s.mode, reinit="create_new",  # one W&B run per run directory
            settings=wandb.Settings(console="off"),  # train.log already keeps the console
        )
        return {"run_id": self.run.id}

    def last_logged(self) -> Optional[int]:
        if self.run.settings.mode in ("offline", "dryrun"):
            return self.held
        if self.run.settings.mode == "disabled":
            return None
        return max(self.run.starting_step - 1, 0)  # online: the server's record of the resumed run

    def log_hparams(self, hparams: dict[str, Any]) -> None:
        self.run.config.update(hparams, allow_val_change=True)

    def log_row(self, epoch: int, metrics: dict[str, float]) -> None:
        self.run.log({**metrics, "epoch": epoch}, step=epoch, commit=True)

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        self.run.summary["status"] = status
        if summary.get("error"):
            self.run.summary["error"] = summary["error"]
        self.run.finish(exit_code=EXIT_CODES.get(status, 1))
