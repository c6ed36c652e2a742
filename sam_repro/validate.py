"""Check a composed config before any data is read or any GPU is touched.

Types and unknown keys are already refused at composition (the structured schema in
sam_repro.config). Here: ranges, names that must exist in a registry, and combinations. Every
problem is one line naming the key, the value and what is allowed; the CLI prints them all and
exits with status 2.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

from omegaconf import DictConfig

from sam_repro.data import CUTOUT_PER, DATASETS, LOADERS, NOISE_KINDS, PAD_MODES, POLICIES, SOURCES
from sam_repro.engine.runtime import PRECISIONS, world_from_env
from sam_repro.engine.schedule import SCHEDULES
from sam_repro.engine.step import BN_STATS
from sam_repro.models import is_model, list_models
from sam_repro.optim.factory import BASE_OPTIMIZERS, METHODS, WD_MODES

RESUME_MODES = ("auto", "never", "must")


class ConfigError(ValueError):
    """One or more invalid config values; str() is one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _choices(values: Iterable[Any]) -> str:
    return ", ".join("null" if v is None else str(v) for v in values)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every invalid value of `cfg`."""
    problems: list[str] = []

    def need(ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            problems.append(f"{key}={value!r} is invalid: {allowed}")

    def one_of(key: str, value: Any, allowed: Iterable[Any]) -> None:
        allowed = list(allowed)
        need(value in allowed, key, value, f"choose one of: {_choices(allowed)}")

    d, a, o, e = cfg.dataset, cfg.augment, cfg.optim, cfg.engine
    one_of("dataset.source", d.source, sorted(SOURCES))
    if d.source != "synthetic":  # generated data takes its shape from the synthetic fields, not a name
        one_of("dataset.name", d.name, sorted(DATASETS))
    need(0 <= d.label_noise < 1, "dataset.label_noise", d.label_noise, "must be in [0, 1)")
    one_of("dataset.noise_kind", d.noise_kind, sorted(NOISE_KINDS))
    need(0 <= d.val_fraction < 1, "dataset.val_fraction", d.val_fraction, "must be in [0, 1)")
    if d.source == "synthetic":
        for key in ("num_classes", "image_size", "channels", "train_size", "test_size"):
            need(d[key] >= 1, f"dataset.{key}", d[key], "must be >= 1")

    need(is_model(cfg.model.name), "model.name", cfg.model.name,
         f"choose one of: {_choices(list_models())} (any wrn<depth>_<k> with depth = 6n+4), or timm/<name>")

    need(a.padding >= 0, "augment.padding", a.padding, "must be >= 0")
    one_of("augment.pad_mode", a.pad_mode, PAD_MODES)
    need(a.cutout >= 0, "augment.cutout", a.cutout, "must be >= 0 (pixels; 0 = off)")
    one_of("augment.cutout_per", a.cutout_per, CUTOUT_PER)
    one_of("augment.autoaugment", a.autoaugment, [None, *sorted(POLICIES)])

    one_of("optim.name", o.name, METHODS)
    one_of("optim.base", o.base, BASE_OPTIMIZERS)
    need(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    need(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    need(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    one_of("optim.wd_mode", o.wd_mode, WD_MODES)
    need(o.rho >= 0, "optim.rho", o.rho, "must be >= 0")
    need(o.p == 2 or o.p == math.inf, "optim.p", o.p, "must be 2 or inf")
    need(not (o.name == "asam" and o.p != 2), "optim.p", o.p, "ASAM (optim=asam) is defined for p=2 only")
    need(o.eta >= 0, "optim.eta", o.eta, "must be >= 0")
    one_of("optim.bn_stats", o.bn_stats, BN_STATS)
    need(o.grad_clip is None or o.grad_clip > 0, "optim.grad_clip", o.grad_clip, "must be > 0, or null for no clipping")
    need(0 <= o.label_smoothing < 1, "optim.label_smoothing", o.label_smoothing, "must be in [0, 1)")

    _, _, world = world_from_env()
    need(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be >= 1")
    if cfg.batch_size >= 1:
        need(cfg.batch_size % world == 0, "batch_size", cfg.batch_size, f"must be divisible by the {world} processes")
        per_device = cfg.batch_size // world
        if o.m is not None:
            need(o.m >= 1 and per_device % o.m == 0, "optim.m", o.m,
                 f"must divide the per-device batch ({per_device}), or be null (one perturbation per device batch)")
    need(cfg.epochs >= 1, "epochs", cfg.epochs, "must be >= 1")
    need(cfg.train_steps is None or cfg.train_steps >= 1, "train_steps", cfg.train_steps, "must be >= 1, or null")
    one_of("resume", cfg.resume, RESUME_MODES)

    one_of("sched.name", cfg.sched.name, sorted(SCHEDULES))
    need(cfg.sched.warmup_epochs >= 0, "sched.warmup_epochs", cfg.sched.warmup_epochs, "must be >= 0")
    need(0 < cfg.sched.gamma <= 1, "sched.gamma", cfg.sched.gamma, "must be in (0, 1]")

    one_of("engine.precision", e.precision, ["auto", *PRECISIONS])
    one_of("engine.loader", e.loader, ["auto", *sorted(LOADERS)])
    need(_valid_device(e.device), "engine.device", e.device, "use auto, cpu, cuda or cuda:N")
    need(e.eval_batch_size >= 1, "engine.eval_batch_size", e.eval_batch_size, "must be >= 1")
    need(e.num_workers >= 0, "engine.num_workers", e.num_workers, "must be >= 0")
    if problems:
        raise ConfigError(problems)


def _valid_device(name: str) -> bool:
    if name in ("auto", "cpu", "cuda"):
        return True
    head, _, index = name.partition(":")
    return head == "cuda" and index.isdigit()

