"""Run directories made by hand for the sharpness tests: a composed config, a metrics.json and a
checkpoint holding a freshly initialized model (no training: the instruments only read them)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import OmegaConf

from sam_repro.data import load_data
from sam_repro.models import create_model_from_config
from tests.conftest import compose_config

TINY_RUN = ["experiment=smoke", "dataset.train_size=64", "dataset.test_size=16", "dataset.image_size=8",
            "batch_size=32"]


def make_run_dir(path: Path, overrides: Sequence[str] = (), status: str = "completed", seed: int = 0,
                 checkpoint: bool = True, model_overrides: Sequence[str] | None = None) -> Path:
    """A run directory as sam-train leaves it; `model_overrides` builds the checkpoint's model from
    another config (a checkpoint of another architecture)."""
    cfg = compose_config([*TINY_RUN, *overrides])
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    bundle = load_data(cfg.dataset)
    torch.manual_seed(seed)
    model_cfg = compose_config([*TINY_RUN, *model_overrides]).model if model_overrides else cfg.model
    model = create_model_from_config(model_cfg, num_classes=bundle.num_classes, in_chans=bundle.in_chans)
    summary = {"schema": 1, "status": status, "epochs_done": 1,
               "config": {"dataset": cfg.dataset.name, "model": cfg.model.name, "optimizer": cfg.optim.name,
                          "rho": cfg.optim.rho if cfg.optim.name != "sgd" else None, "epochs": cfg.epochs,
                          "seed": cfg.seed},
               "final": {"test_err": 50.0}}
    (path / "metrics.json").write_text(json.dumps(summary))
    if checkpoint:
        torch.save({"model": model.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True),
                    "data_fingerprint": bundle.info["fingerprint"]}, path / "checkpoint.pt")
    return path
