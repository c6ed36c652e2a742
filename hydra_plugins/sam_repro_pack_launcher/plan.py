"""Which jobs of a sweep can be trained as one pack (sam_repro/engine/grid.py), and why the others not.

Runs may differ in the keys the schema declares MEMBER (sam_repro/config.py: seed, label noise, lr,
weight decay, momentum, rho, clipping, the schedule, where the run lives); every other key fixes
tensor shapes, the data pipeline or the step, and must agree. SGD and SAM runs are packed apart: an
SGD member in a SAM pack would pay SAM's second pass.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from sam_repro.config import MEMBER, flatten, has_role
from sam_repro.data import DATASETS
from sam_repro.optim.factory import METHODS


def _file_backed(dataset: str) -> bool:
    return dataset in DATASETS and DATASETS[dataset].files


def why_solo(cfg: DictConfig) -> Optional[str]:
    """Why this run cannot be packed at all (None: it can)."""
    engine = cfg.engine
    reasons = {
        "engine.ddp=true: a multi-GPU run is a pack of its own": engine.ddp,
        "precision=fp16: its loss scaling is per run": engine.precision == "fp16",
        "optim.sync_perturbation=true: one perturbation over all devices is not a per-member step":
            cfg.optim.sync_perturbation,
        "file-backed data (ImageNet, the finetuning sets): each member would decode its own JPEGs":
            engine.loader == "files" or (cfg.dataset.source != "synthetic" and _file_backed(cfg.dataset.name)),
    }
    return next((why for why, applies in reasons.items() if applies), None)


def _shape(cfg: DictConfig) -> dict:
    values = flatten(OmegaConf.to_container(cfg, resolve=True))
    return {k: v for k, v in values.items() if not has_role(k, MEMBER) and not k.startswith("hydra")}


def pack_key(cfg: DictConfig) -> tuple[Optional[str], Optional[str]]:
    """(key, None): runs with equal keys can be trained as one pack; (None, why) for a run that must
    run alone. The key is every config value that is not a MEMBER key (plus SGD vs SAM)."""
    why = why_solo(cfg)
    if why:
        return None, why
    shape = _shape(cfg)
    shape["perturbs"] = METHODS[cfg.optim.name].uses_sam
    return repr(sorted(shape.items())), None


def differing_keys(a: DictConfig, b: DictConfig) -> list[str]:
    """The keys (MEMBER keys aside) in which two runs differ: why they are not one pack."""
    fa, fb = _shape(a), _shape(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def plan_packs(configs: list[Optional[DictConfig]], size: int) -> list[tuple[list[int], Optional[str]]]:
    """Group a sweep's jobs (their task configs; None for one that is not to be packed) into packs of at
    most `size` whose members agree on `pack_key`, in sweep order. Returns (job indices, why) pairs:
    why is None for a pack, else the one line saying why that job runs alone."""
    keys: dict[str, list[int]] = defaultdict(list)
    alone: dict[int, str] = {}
    for i, cfg in enumerate(configs):
        if cfg is None:
            alone[i] = "not packable (see its error)"
            continue
        key, why = pack_key(cfg)
        if key is None:
            alone[i] = why
        else:
            keys[key].append(i)
    plan: list[tuple[list[int], Optional[str]]] = []
    largest = max(keys.values(), key=len, default=[])
    for members in keys.values():
        n_chunks = -(-len(members) // max(size, 1))  # balanced: 9 jobs at size 8 are packs of 5 and 4
        bounds = [round(j * len(members) / n_chunks) for j in range(n_chunks + 1)]
        chunks = [members[a:b] for a, b in zip(bounds, bounds[1:])]
        for chunk in chunks:
            if len(chunk) > 1:
                plan.append((chunk, None))
            elif len(members) == 1 and largest and largest is not members:
                diff = differing_keys(configs[chunk[0]], configs[largest[0]])
                alone[chunk[0]] = f"no other job agrees with it on {', '.join(diff[:4])}"
            else:
                alone[chunk[0]] = ("left over after packs of hydra.launcher.size" if len(members) > 1
                                   else "the only job of the sweep")
    plan += [([i], why) for i, why in alone.items()]
    return sorted(plan, key=lambda entry: entry[0][0])
