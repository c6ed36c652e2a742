"""Check a composed config before any data is read or any GPU is touched.

Types and unknown keys are already refused at composition (the structured schema in
sam_repro.config). Here: ranges, names that must exist in a registry, and combinations. Every
problem is one line naming the key, the value and what is allowed; the CLI prints them all and
exits with status 2.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable

from omegaconf import DictConfig

from sam_repro.data import CUTOUT_PER, DATASETS, LOADERS, NOISE_KINDS, PAD_MODES, POLICIES, SOURCES, ImageArrays, ImageFiles
from sam_repro.engine.distributed import planned_world_size
from sam_repro.engine.runtime import PRECISIONS
from sam_repro.engine.schedule import SCHEDULES
from sam_repro.engine.packing import PACK_EXECUTIONS
from sam_repro.engine.passes import BN_STATS, SHAKEDROP_MASKS
from sam_repro.errors import UserError
from sam_repro.models import is_model, list_models
from sam_repro.models.finetune import BOTH_WAYS
from sam_repro.models.registry import timm_name
from sam_repro.optim.factory import ASAM_SCALES, BASE_OPTIMIZERS, METHODS, WD_MODES
from sam_repro.optim.methods.esam import ESAM_SELECTIONS, ESAM_SHARPNESS_BN, ESAM_SWP_DRAWS
from sam_repro.optim.methods.gsam import GSAM_ADAPTIVE
from sam_repro.optim.methods.looksam import LOOKSAM_PROJECTIONS
from sam_repro.optim.methods.samon import SAMON_SELECT
from sam_repro.trackers import not_installed

RESUME_MODES = ("auto", "never", "must")
WANDB_MODES = (None, "online", "offline", "disabled")


class ConfigError(UserError, ValueError):
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
    need(d.input_size is None or d.input_size >= 1, "dataset.input_size", d.input_size,
         "must be >= 1 (pixels), or null for the dataset's (or a pretrained model's) size")
    # resident arrays (device/workers loaders) or image files decoded per batch (files loader)
    spec = DATASETS.get(d.name) if d.source != "synthetic" else None
    storage = ImageFiles if spec is not None and spec.files else ImageArrays

    m = cfg.model
    need(is_model(m.name), "model.name", m.name,
         f"choose one of: {_choices(list_models())} (any wrn<depth>_<k> with depth = 6n+4), or timm/<name>")
    if m.pretrained and not m.checkpoint and is_model(m.name):
        need(timm_name(m.name) is not None, "model.pretrained", m.pretrained,
             f"pretrained weights come from timm: use a timm model (timm/<name>), or model.checkpoint=<file> for {m.name}")
    if m.checkpoint:
        need(Path(str(m.checkpoint)).expanduser().is_file(), "model.checkpoint", m.checkpoint, f"no such file; {BOTH_WAYS}")

    need(a.padding >= 0, "augment.padding", a.padding, "must be >= 0")
    one_of("augment.pad_mode", a.pad_mode, PAD_MODES)
    need(a.cutout >= 0, "augment.cutout", a.cutout, "must be >= 0 (pixels; 0 = off)")
    one_of("augment.cutout_per", a.cutout_per, CUTOUT_PER)
    one_of("augment.autoaugment", a.autoaugment, [None, *sorted(POLICIES)])
    need(not a.random_resized_crop or storage is ImageFiles, "augment.random_resized_crop", a.random_resized_crop,
         "only file-backed datasets (imagenet, the finetuning sets) take the Inception crop; use augment=basic here")

    one_of("optim.name", o.name, METHODS)
    one_of("optim.base", o.base, BASE_OPTIMIZERS)
    need(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    need(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    need(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    one_of("optim.wd_mode", o.wd_mode, WD_MODES)
    need(o.rho >= 0, "optim.rho", o.rho, "must be >= 0")
    need(o.p == 2 or o.p == math.inf, "optim.p", o.p, "must be 2 or inf")
    need(not (o.name == "asam" and o.p != 2), "optim.p", o.p, "ASAM (optim=asam) is defined for p=2 only")
    if o.name in METHODS and METHODS[o.name].spec is not None:
        need(o.p == 2, "optim.p", o.p, f"optim={o.name} is defined for p=2 only")
        need(o.eps > 0, "optim.eps", o.eps, "must be > 0")
    _method_ranges(o, need, one_of)
    need(o.eta >= 0, "optim.eta", o.eta, "must be >= 0")
    one_of("optim.bn_stats", o.bn_stats, BN_STATS)
    one_of("optim.shakedrop_mask", o.shakedrop_mask, SHAKEDROP_MASKS)
    one_of("optim.asam_scale", o.asam_scale, ASAM_SCALES)
    for method, rho in cfg.method_rho.items():
        need(rho >= 0, f"method_rho.{method}", rho, "must be >= 0")
    need(o.grad_clip is None or o.grad_clip > 0, "optim.grad_clip", o.grad_clip, "must be > 0, or null for no clipping")
    need(0 <= o.label_smoothing < 1, "optim.label_smoothing", o.label_smoothing, "must be in [0, 1)")

    world = planned_world_size(e.nproc, e.ddp)
    need(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be >= 1")
    if cfg.batch_size >= 1:
        need(cfg.batch_size % world == 0, "batch_size", cfg.batch_size, f"must be divisible by the {world} processes")
        per_process = cfg.batch_size // world
        db = cfg.device_batch
        need(db is None or (db >= 1 and per_process % db == 0), "device_batch", db,
             f"must divide the batch of each of the {world} processes ({per_process}), "
             f"or be null (one device per process)")
        per_device = db if db is not None and db >= 1 and per_process % db == 0 else per_process
        if o.m is not None:
            need(o.m >= 1 and per_device % o.m == 0, "optim.m", o.m,
                 f"must divide the per-device batch ({per_device}), or be null (m = the per-device batch)")
        need(not (o.sync_perturbation and (per_device < per_process or (o.m or per_device) < per_device)),
             "optim.sync_perturbation", o.sync_perturbation,
             "one shared e(w) for the whole batch excludes per-device perturbations: set device_batch=null "
             "and optim.m=null, or optim.sync_perturbation=false")
        _two_batch_layout(cfg, world, per_process, per_device, need)
    need(cfg.epochs >= 1, "epochs", cfg.epochs, "must be >= 1")
    need(cfg.train_steps is None or cfg.train_steps >= 1, "train_steps", cfg.train_steps, "must be >= 1, or null")
    one_of("resume", cfg.resume, RESUME_MODES)

    one_of("sched.name", cfg.sched.name, sorted(SCHEDULES))
    need(cfg.sched.warmup_epochs >= 0, "sched.warmup_epochs", cfg.sched.warmup_epochs, "must be >= 0")
    need(0 < cfg.sched.gamma <= 1, "sched.gamma", cfg.sched.gamma, "must be in (0, 1]")

    one_of("engine.precision", e.precision, ["auto", *PRECISIONS])
    one_of("engine.loader", e.loader, ["auto", *sorted(LOADERS)])
    one_of("engine.pack_execution", e.pack_execution, PACK_EXECUTIONS)
    if e.loader in LOADERS:
        fits = sorted(k for k, loader in LOADERS.items() if loader.storage is storage)
        need(LOADERS[e.loader].storage is storage, "engine.loader", e.loader,
             f"dataset {d.name!r} is {'read from image files' if storage is ImageFiles else 'held in memory'}: "
             f"choose auto or one of: {_choices(fits)}")
    need(e.nproc is None or e.nproc >= 1, "engine.nproc", e.nproc, "must be >= 1, or null for every visible GPU")
    need(not (e.ddp and e.nproc is None and e.device == "cpu"), "engine.nproc", e.nproc,
         "engine.ddp=true on the CPU needs engine.nproc=N (N gloo processes)")
    need(_valid_device(e.device), "engine.device", e.device, "use auto, cpu, cuda or cuda:N")
    need(e.eval_batch_size >= 1, "engine.eval_batch_size", e.eval_batch_size, "must be >= 1")
    need(e.eval_every >= 1, "engine.eval_every", e.eval_every, "must be >= 1 (epochs)")
    need(e.eval_every_steps is None or e.eval_every_steps >= 1, "engine.eval_every_steps", e.eval_every_steps,
         "must be >= 1, or null (use engine.eval_every epochs)")
    need(e.num_workers >= 0, "engine.num_workers", e.num_workers, "must be >= 0")

    for name, spec in not_installed(cfg):  # before any data is read: a missing extra is bad input
        need(False, "logger", name, f"the {spec.package} package is not installed: pip install 'sam-repro[{spec.extra}]'")
    if cfg.logger.wandb is not None:
        one_of("logger.wandb.mode", cfg.logger.wandb.mode, WANDB_MODES)
    if problems:
        raise ConfigError(problems)


def _method_ranges(o: DictConfig, need: Callable[[bool, str, Any, str], None],
                   one_of: Callable[[str, Any, Iterable[Any]], None]) -> None:
    """The SAM family's own hyperparameters (docs/methods.md), whichever optim.name is chosen."""
    need(o.gsam_alpha >= 0, "optim.gsam_alpha", o.gsam_alpha, "must be >= 0")
    # the upper bounds only against a valid rho / lr (a bad one has its own line)
    need(o.gsam_rho_min is None or (o.gsam_rho_min >= 0 and (o.rho < 0 or o.gsam_rho_min <= o.rho)),
         "optim.gsam_rho_min", o.gsam_rho_min, f"must be in [0, optim.rho={o.rho}], or null for a constant rho")
    need(o.gsam_lr_min >= 0 and (o.lr <= 0 or o.gsam_lr_min <= o.lr), "optim.gsam_lr_min", o.gsam_lr_min,
         f"must be in [0, optim.lr={o.lr}]")
    one_of("optim.gsam_adaptive", o.gsam_adaptive, GSAM_ADAPTIVE)
    need(0 < o.esam_beta <= 1, "optim.esam_beta", o.esam_beta, "must be in (0, 1]")
    need(0 < o.esam_gamma <= 1, "optim.esam_gamma", o.esam_gamma, "must be in (0, 1]")
    one_of("optim.esam_selection", o.esam_selection, ESAM_SELECTIONS)
    one_of("optim.esam_swp_draw", o.esam_swp_draw, ESAM_SWP_DRAWS)
    one_of("optim.esam_sharpness_bn", o.esam_sharpness_bn, ESAM_SHARPNESS_BN)
    need(o.fsam_sigma >= 0, "optim.fsam_sigma", o.fsam_sigma, "must be >= 0")
    need(0 <= o.fsam_lambda < 1, "optim.fsam_lambda", o.fsam_lambda, "must be in [0, 1)")
    need(0 <= o.vasso_theta <= 1, "optim.vasso_theta", o.vasso_theta, "must be in [0, 1]")
    one_of("optim.samon_select", o.samon_select, SAMON_SELECT)
    need(o.sam_interval >= 1, "optim.sam_interval", o.sam_interval, "must be >= 1 (steps)")
    need(o.looksam_k >= 1, "optim.looksam_k", o.looksam_k, "must be >= 1 (steps)")
    need(o.looksam_alpha >= 0, "optim.looksam_alpha", o.looksam_alpha, "must be >= 0")
    one_of("optim.looksam_projection", o.looksam_projection, LOOKSAM_PROJECTIONS)
    need(0 <= o.rwp_alpha <= 1, "optim.rwp_alpha", o.rwp_alpha, "must be in [0, 1]")
    need(o.rwp_gamma >= 0, "optim.rwp_gamma", o.rwp_gamma, "must be >= 0")
    need(0 <= o.wsam_gamma < 1, "optim.wsam_gamma", o.wsam_gamma, "must be in [0, 1)")
    need(o.wsam_max_norm is None or o.wsam_max_norm > 0, "optim.wsam_max_norm", o.wsam_max_norm,
         "must be > 0, or null for no clipping")


def _two_batch_layout(cfg: DictConfig, world: int, per_process: int, per_device: int,
                      need: Callable[[bool, str, Any, str], None]) -> None:
    """A method on two batches (RWP) halves its devices into clean and noisy ones (engine/grid.py's
    two_halves): one process needs an even number of devices (one device: an even batch, split in two),
    DDP an even number of processes (the even ranks clean, the odd ones noisy)."""
    o, method = cfg.optim, cfg.optim.name
    spec = METHODS[method].spec if method in METHODS else None
    if spec is None or not spec.needs.two_batches:
        return
    if world > 1:
        need(world % 2 == 0, "engine.nproc", cfg.engine.nproc,
             f"optim={method} runs its clean pass on the even ranks and its noisy pass on the odd ones: "
             f"it needs an even number of processes, not {world}")
        return
    m_sets = o.m is not None and o.m >= 1 and per_device % o.m == 0 and o.m < per_device
    size = o.m if m_sets else per_device
    devices = per_process // size
    if devices == 1:
        need(per_process % 2 == 0, "batch_size", cfg.batch_size,
             f"optim={method} splits each step's batch into a clean and a noisy half: it must be even")
    else:
        need(devices % 2 == 0, "optim.m" if m_sets else "device_batch", o.m if m_sets else cfg.device_batch,
             f"optim={method} splits each step's devices into a clean and a noisy half: the batch of {per_process} "
             f"makes {devices} devices of {size}; choose one that makes an even number")


def _valid_device(name: str) -> bool:
    if name in ("auto", "cpu", "cuda"):
        return True
    head, _, index = name.partition(":")
    return head == "cuda" and index.isdigit()

