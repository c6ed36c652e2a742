"""Read a trained run directory (config.yaml, metrics.json, checkpoint.pt) back into the run's own
model, with the run's own data and preprocessing, through the functions the engine uses
(load_data, create_model_from_config, fit_to_model). Nothing here trains or writes a checkpoint.

Every problem a user can cause (no checkpoint, a run still running, a checkpoint of another
architecture, data that moved or changed) is a `RunDirError` with a one-line message.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from sam_repro.config import TrainConfig
from sam_repro.data import DataBundle, DataError, ImageArrays, fit_to_model, load_data, normalize, normalize_coeffs
from sam_repro.data.augment import resize
from sam_repro.errors import UserError
from sam_repro.models import create_model_from_config, pretrained_input
from sam_repro.rundir import CHECKPOINT, has_checkpoint, load_checkpoint, read_summary

SHARPNESS_FILE = "sharpness.json"


class RunDirError(UserError):
    """A run directory that cannot be measured; the message is one line for the CLI (exit 2)."""


@dataclass
class Run:
    """A trained run, ready to measure: its model with the checkpoint's weights (CPU, fp32, eval)."""

    path: Path
    cfg: DictConfig
    summary: dict[str, Any]
    model: nn.Module
    bundle: DataBundle

    @property
    def label(self) -> str:
        c = self.summary.get("config", {})
        return f"{c.get('optimizer')} seed={c.get('seed')}"


def finished_summary(path: Path) -> dict[str, Any]:
    """metrics.json of a finished run (a running or interrupted one is refused: its weights are not final)."""
    summary = read_summary(path)
    if summary is None:
        raise RunDirError(f"{path} is not a run directory (no readable metrics.json)")
    if summary.get("status") == "running":
        raise RunDirError(f"{path} is still running (metrics.json status running, {summary.get('epochs_done')} "
                          f"epochs done): measure it when it has finished, or resume a killed run first")
    if summary.get("status") == "interrupted":
        raise RunDirError(f"{path} was interrupted after {summary.get('epochs_done')} epochs (metrics.json status "
                          f"interrupted): re-run its command to finish it, then measure it")
    return summary


def require_checkpoint(path: Path) -> None:
    """One line when the run directory keeps no checkpoint to measure."""
    if not has_checkpoint(path):
        raise RunDirError(f"{path} has no {CHECKPOINT} (committed runs keep only their logs: measure a run "
                          f"before its checkpoint is dropped)")


def read_config(path: Path, data_root: Optional[str] = None) -> DictConfig:
    """config.yaml merged into the typed schema (keys added since the run get their defaults)."""
    f = path / "config.yaml"
    if not f.is_file():
        raise RunDirError(f"{path} has no config.yaml")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(f))
    except Exception as e:  # a YAML or schema error: one line is enough to find it
        raise RunDirError(f"{f} does not fit the config schema ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if data_root is not None:
        cfg.dataset.root = str(data_root)
    # the checkpoint supplies every weight: never fetch or read pretrained ones
    cfg.model.pretrained, cfg.model.checkpoint = False, None
    return cfg


def load_run(path: str | Path, data_root: Optional[str] = None) -> Run:
    """The run at `path` with its trained weights and its data (training split, no augmentation)."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path} is not a directory")
    summary = finished_summary(path)
    require_checkpoint(path)
    cfg = read_config(path, data_root)
    state = load_checkpoint(path, map_location="cpu")  # a damaged one: the previous, or one CheckpointError line
    try:
        bundle = load_data(cfg.dataset)
    except DataError as e:
        raise RunDirError(f"{path}: {str(e).splitlines()[0]} (--data-root moves the data)") from None
    if not isinstance(bundle.train, ImageArrays):
        raise RunDirError(f"{path}: dataset {cfg.dataset.name} is file-backed; only array datasets "
                          f"(CIFAR-sized) are measured so far")
    fp = state.get("data_fingerprint")
    if fp is not None and fp != bundle.info["fingerprint"]:
        raise RunDirError(f"{path} was trained on other data (fingerprint {fp}, found {bundle.info['fingerprint']} "
                          f"at {cfg.dataset.root})")
    model = create_model_from_config(cfg.model, num_classes=bundle.num_classes, in_chans=bundle.in_chans)
    # a finetuned run saw its pretrained model's input (size, normalization, interpolation): read_config
    # cleared the flags that say it was one (no weights are read), the run's own config.yaml keeps them
    trained = OmegaConf.load(path / "config.yaml")
    as_trained = cfg.model.copy()
    as_trained.pretrained = bool(OmegaConf.select(trained, "model.pretrained", default=False))
    as_trained.checkpoint = OmegaConf.select(trained, "model.checkpoint", default=None)
    bundle = fit_to_model(bundle, pretrained_input(model, as_trained), cfg.dataset.input_size)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else (first[0] if first else "")
        raise RunDirError(f"{path / CHECKPOINT} holds another architecture than model={cfg.model.name} "
                          f"({detail[:160]})") from None
    return Run(path, cfg, summary, model.float().eval(), bundle)


def train_subset(bundle: DataBundle, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed random subset of the training split: `size` examples drawn without replacement by a
    generator seeded with `seed`, normalized as at evaluation (no augmentation). Labels are the
    ones the run trained on (label noise included)."""
    train = bundle.train
    if not 1 <= size <= len(train):
        raise RunDirError(f"--subset {size} must be between 1 and the training set size {len(train)}")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:size]
    scale, shift = normalize_coeffs(bundle.mean, bundle.std, "cpu")
    x = resize(normalize(train.images[idx], scale, shift), bundle.image_size, bundle.interpolation)
    return x, train.labels[idx].clone()
