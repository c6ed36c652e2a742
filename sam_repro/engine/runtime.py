"""Where and how a run computes: device, precision, memory format, distributed rank.

Defaults: bf16 autocast and channels_last on a GPU, fp32 on the CPU. fp16 adds a GradScaler.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Optional

import torch

from sam_repro.config import EngineConfig

# precision name -> autocast dtype (None: no autocast)
PRECISIONS: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return PRECISIONS[self.precision]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun sets them; (0, 0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def resolve_runtime(cfg: EngineConfig) -> Runtime:
    """Turn `engine.device/precision/channels_last` (with their `auto` values) into decisions."""
    rank, local_rank, world_size = world_from_env()
    if cfg.device == "auto":
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    on_gpu = device.type == "cuda"
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if on_gpu else "fp32")
    channels_last = cfg.channels_last if cfg.channels_last is not None else on_gpu
    if on_gpu:
        torch.cuda.set_device(device)
    return Runtime(device, precision, channels_last, rank, local_rank, world_size)


def seed_everything(seed: int) -> None:
    """Seed Python, and torch on every device (dropout, ShakeDrop, weight init)."""
    random.seed(seed)
    torch.manual_seed(seed)


def set_determinism(deterministic: bool, on_gpu: bool) -> None:
    """Deterministic kernels for tests and bit-exact resume; autotuned cuDNN otherwise."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif on_gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
