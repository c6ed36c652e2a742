"""TensorBoard: event files in <run dir>/<logger.tensorboard.dir>; `tensorboard --logdir runs/`
shows every run of a sweep side by side (each run directory is one TensorBoard run)."""
from __future__ import annotations

from typing import Any

from sam_repro.trackers import Tracker

# The metrics the HParams dashboard shows beside each run's hyperparameters.
HPARAM_METRICS = ("test_err", "test_loss", "train_err", "train_loss")


def _scalar(value: Any) -> Any:
    """HParams take bool, int, float and str only."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class TensorBoardTracker(Tracker):
    def start(self, state: dict[str, Any], first_epoch: int) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = self.run_dir / self.settings.dir
        # purge_step: TensorBoard itself discards any event at or after first_epoch left by a run
        # killed between writing the event and recording it, so a resumed run shows each epoch once
        # (from epoch 1 on: a run killed after its first event, before trackers.json, resumes at 1).
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=first_epoch)
        self.last_epoch = first_epoch - 1
        return {"log_dir": str(self.log_dir)}

    def log_hparams(self, hparams: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        # The three summaries of SummaryWriter.add_hparams, written into this run's own event file
        # (add_hparams would make a new sub-run per call).
        for summary in hparams_summary({k: _scalar(v) for k, v in hparams.items()}, {k: 0.0 for k in HPARAM_METRICS}):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def log_row(self, epoch: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=epoch)
        self.writer.flush()
        self.last_epoch = epoch

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        if status not in ("interrupted", "running"):  # the resumed run writes the status
            error = summary.get("error")
            self.writer.add_text("status", status + (f": {error}" if error else ""), global_step=self.last_epoch)
        self.writer.close()
