"""Batched augmentation of uint8 image batches on the device (the official SAM pipeline, vectorized).

Order (official code): AutoAugment (if set) -> horizontal flip -> pad + random crop -> float,
normalize -> Cutout (zeros in normalized space).

Flip, pad and crop are one gather: for crop offsets (dy, dx) and flip f, output pixel p of an image
reads source pixel `lin[dy, f, dx, p]` from an index table built once (int64 [2P+1, 2, 2P+1, H*W]),
so a batch costs a handful of kernels whatever its size: index_select of the batch, one lookup in
the table, one gather, the cast, one fused multiply-add for the normalization (reflect padding needs
no padded copy; constant padding multiplies by a validity mask from a second table). All random
draws of an epoch are made up front from one generator (`EpochDraws`); a batch only slices them,
so nothing here synchronizes with the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .autoaugment import POLICIES, BatchedAutoAugment, Plan
from .datasets import DataError

if TYPE_CHECKING:
    from ..config import AugmentConfig

PAD_MODES = ("reflect", "constant")
CUTOUT_PER = ("batch", "sample")


def check_augment(augment: "AugmentConfig", image_size: int) -> None:
    """Reject AugmentConfig values this module cannot honour, with one line each."""
    if augment.pad_mode not in PAD_MODES:
        raise DataError(f"augment.pad_mode={augment.pad_mode!r} must be one of {list(PAD_MODES)}")
    if augment.cutout_per not in CUTOUT_PER:
        raise DataError(f"augment.cutout_per={augment.cutout_per!r} must be one of {list(CUTOUT_PER)}")
    if augment.autoaugment is not None and augment.autoaugment not in POLICIES:
        raise DataError(f"augment.autoaugment={augment.autoaugment!r} must be null or one of {sorted(POLICIES)}")
    if augment.padding < 0 or (augment.crop and augment.pad_mode == "reflect" and augment.padding >= image_size):
        raise DataError(f"augment.padding={augment.padding} must be in [0, {image_size}) for reflect padding")
    if augment.cutout < 0:
        raise DataError(f"augment.cutout={augment.cutout} must be >= 0 (0 = off)")


def pad_tables(size: int, padding: int, pad_mode: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each crop offset o in [0, 2p]: the source coordinate of output coordinate i (int64 [2p+1, size])
    and whether it lies inside the image (bool; always true for reflect)."""
    k = torch.arange(size)[None, :] + torch.arange(2 * padding + 1)[:, None] - padding  # padded -> source
    if pad_mode == "reflect":  # mirror without repeating the edge pixel (numpy/torch/TF 'reflect')
        k = torch.where(k < 0, -k, k)
        k = torch.where(k >= size, 2 * (size - 1) - k, k)
        valid = torch.ones_like(k, dtype=torch.bool)
    else:
        valid = (k >= 0) & (k < size)
        k = k.clamp(0, size - 1)
    return k, valid


def crop_flip_tables(height: int, width: int, padding: int,
                     pad_mode: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(lin, valid): lin[dy, f, dx] = int64 [H*W] source pixel of each output pixel after flip f (applied
    first, as in the official code), padding and a crop at (dy, dx); valid[dy, dx] = bool [H*W] inside
    the unpadded image (None for reflect padding, where every pixel is)."""
    rows, rvalid = pad_tables(height, padding, pad_mode)  # [O, H]
    cols, cvalid = pad_tables(width, padding, pad_mode)  # [O, W]
    cols = torch.stack([cols, width - 1 - cols], dim=0)  # flipping first mirrors the source column
    lin = rows[:, None, None, :, None] * width + cols[None, :, :, None, :]  # [O, 2, O, H, W]
    valid = (rvalid[:, None, :, None] & cvalid[None, :, None, :]).flatten(2) if pad_mode != "reflect" else None
    return lin.flatten(3).contiguous(), valid


def normalize_coeffs(mean: Sequence[float], std: Sequence[float], device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), float32 [1, C, 1, 1], such that x * scale + shift = (x / 255 - mean) / std."""
    m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    return (1.0 / (255.0 * s)).float().to(device), (-m / s).float().to(device)


def normalize(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] -> normalized float32 (two kernels: the cast and one fused multiply-add)."""
    return torch.addcmul(shift, x.to(torch.float32), scale)


def resize(x: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """A float batch [B, C, h, w] resized to [B, C, size, size]; the batch itself when it already is
    (finetuning upsamples 32 px CIFAR to a pretrained model's input size, after augmentation)."""
    if x.shape[-2:] == (size, size):
        return x
    smooth = mode in ("bilinear", "bicubic")
    return F.interpolate(x, size=(size, size), mode=mode, align_corners=False if smooth else None,
                         antialias=smooth and size < x.shape[-1])  # antialias only when shrinking


def cutout_(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, size: int) -> torch.Tensor:
    """Zero a size x size square centred at (cy, cx), clipped at the borders, in place (official code).

    cy, cx: int64 scalars (one square for the whole batch) or [B] (one per sample). The square covers
    rows [cy - size // 2, cy + size // 2) and the same for columns.
    """
    h, w = x.shape[-2:]
    half = size // 2
    r = torch.arange(h, device=x.device)
    c = torch.arange(w, device=x.device)
    cy, cx = cy.reshape(-1, 1), cx.reshape(-1, 1)  # [1 or B, 1]
    in_r = (r >= cy - half) & (r < cy + half)  # [1 or B, H]
    in_c = (c >= cx - half) & (c < cx + half)
    mask = in_r[:, None, :, None] & in_c[:, None, None, :]  # [1 or B, 1, H, W]
    return x.masked_fill_(mask, 0.0)


@dataclass
class EpochDraws:
    """Every random choice of one epoch for one rank, made up front (device tensors, [steps, ...])."""

    dy: Optional[torch.Tensor]  # int64 [S, B] crop offsets, None without crop
    dx: Optional[torch.Tensor]
    flip: Optional[torch.Tensor]  # int64 [S, B] in {0, 1}, None without flip
    cut_y: Optional[torch.Tensor]  # int64 [S] (per batch) or [S, B] (per sample), None without cutout
    cut_x: Optional[torch.Tensor]
    autoaugment: Optional[Plan]


class BatchAugment:
    """An AugmentConfig compiled for one dataset and device; `draw` an epoch, then `__call__` per batch."""

    def __init__(self, augment: "AugmentConfig", image_size: int, mean: Sequence[float], std: Sequence[float], device):
        check_augment(augment, image_size)
        self.device = torch.device(device)
        self.size = image_size
        self.padding = augment.padding if augment.crop else 0
        self.flip = bool(augment.flip)
        self.cutout, self.cutout_per = int(augment.cutout), augment.cutout_per
        self.lin, self.valid = crop_flip_tables(image_size, image_size, self.padding, augment.pad_mode)
        self.lin = self.lin.to(self.device)
        self.valid = self.valid.to(self.device) if self.valid is not None and self.padding else None
        self.scale, self.shift = normalize_coeffs(mean, std, self.device)
        self.aa = BatchedAutoAugment(augment.autoaugment, image_size, self.device) if augment.autoaugment else None

    def draw(self, g: torch.Generator, steps: int, batch: int) -> EpochDraws:
        """All random draws for `steps` batches of `batch` samples, in a fixed order, from g."""
        dev, p = self.device, self.padding
        randint = lambda hi, shape: torch.randint(hi, shape, generator=g, device=dev)
        dy = randint(2 * p + 1, (steps, batch)) if p else None
        dx = randint(2 * p + 1, (steps, batch)) if p else None
        flip = randint(2, (steps, batch)) if self.flip else None
        shape = (steps,) if self.cutout_per == "batch" else (steps, batch)
        cut_y = randint(self.size, shape) if self.cutout else None  # centre uniform over the image
        cut_x = randint(self.size, shape) if self.cutout else None
        plan = self.aa.plan(g, steps, batch) if self.aa else None
        return EpochDraws(dy, dx, flip, cut_y, cut_x, plan)

    def __call__(self, src: torch.Tensor, index: torch.Tensor, d: EpochDraws, step: int) -> torch.Tensor:
        """Augmented, normalized float32 batch [B, C, H, W] of src[index] for batch `step` of the epoch."""
        x = src.index_select(0, index)
        if self.aa is not None:  # AutoAugment first, in place on the gathered batch
            self.aa.apply_(x, d.autoaugment, step)
        if self.padding or self.flip:
            b, c, h, w = x.shape
            dy, dx = (d.dy[step], d.dx[step]) if self.padding else (0, 0)
            lin = self.lin[dy, d.flip[step] if self.flip else 0, dx]  # [B, H*W]
            x = x.view(b, c, h * w).gather(2, lin[:, None, :].expand(b, c, h * w)).view(b, c, h, w)
            if self.valid is not None:  # constant padding: zeros outside the image
                x = x * self.valid[dy, dx].view(b, 1, h, w)
        x = normalize(x, self.scale, self.shift)
        if self.cutout:
            cutout_(x, d.cut_y[step], d.cut_x[step], self.cutout)
        return x
