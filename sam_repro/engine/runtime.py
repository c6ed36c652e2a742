"""Where and how a run computes: device, precision, memory format, distributed rank.

Defaults: bf16 autocast and channels_last on a GPU, fp32 on the CPU. fp16 adds a GradScaler.
`fp32` is strict float32 (TF32 off on a GPU) and `tf32` lets matmuls and convolutions use TF32: the
controls against bf16 autocast, which rounds most of SAM's e(w) away (docs/semantics.md). `fp64`
(float64 weights and data) is for exact comparisons.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Optional

import torch

from sam_repro.config import EngineConfig



@dataclass(frozen=True)
class Precision:
    """How a precision name computes: autocast dtype (None: no autocast), weight/data dtype, TF32."""

    autocast: Optional[torch.dtype]
    dtype: torch.dtype = torch.float32
    tf32: bool = True  # GPU only: TF32 for the float32 matmuls/convolutions that remain


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision(None, tf32=False),
    "tf32": Precision(None),
    "bf16": Precision(torch.bfloat16),
    "fp16": Precision(torch.float16),
    "fp64": Precision(None, dtype=torch.float64, tf32=False),
}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # a key of PRECISIONS
    channels_last: bool
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return PRECISIONS[self.precision].autocast

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights and of the data fed to the model."""
        return PRECISIONS[self.precision].dtype

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
        torch.backends.cuda.matmul.allow_tf32 = PRECISIONS[precision].tf32
        torch.backends.cudnn.allow_tf32 = PRECISIONS[precision].tf32
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
