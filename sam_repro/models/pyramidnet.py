"""PyramidNet (Han et al. 2017) with bottleneck blocks and ShakeDrop, as in the official SAM code.

Follows google-research/sam `sam_jax/models/pyramidnet.py` (itself the AutoAugment
`shake_drop.py`):
- depth = 9n + 2 (n bottleneck blocks per group); block k of N = 3n widens to
  round(16 + k * alpha / N) bottleneck channels (x4 at its output). The official code rounds where
  the PyramidNet paper truncates (about 0.2M more parameters); we round, with Python's round.
- block: BN-Conv1x1-BN-ReLU-Conv3x3(stride)-BN-ReLU-Conv1x1(x4)-BN, then ShakeDrop; shortcut:
  average-pool on downsampling, zero-pad the new channels (no parameters).
- ShakeDrop: block k keeps its branch unchanged with probability 1 - (k / N) * 0.5 (linear
  depth rule down to 0.5 at the last block), alpha ~ U[-1, 1], beta ~ U[0, 1].
`pyramidnet272` is the same network with ShakeDrop off (the paper's plain PyramidNet row; the
official code has no config for it).
"""
from __future__ import annotations

from typing import Any, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model
from .stochastic import ShakeDrop
from .wrn import official_init_, pool_and_pad


class PyramidBottleneck(nn.Module):
    def __init__(self, cin: int, channels: int, stride: int, shakedrop: nn.Module) -> None:
        super().__init__()
        cout = 4 * channels
        self.branch = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shakedrop = shakedrop
        self.cout, self.stride = cout, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_and_pad(x, self.cout, self.stride) + self.shakedrop(self.branch(x))


class PyramidNet(nn.Module):
    """Bottleneck PyramidNet-<depth> (alpha = widening), optionally with ShakeDrop."""

    def __init__(self, depth: int = 272, alpha: float = 200, num_classes: int = 10,
                 in_chans: int = 3, shakedrop: bool = True, max_drop: float = 0.5,
                 shake_alpha: Tuple[float, float] = (-1.0, 1.0),
                 shake_beta: Tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__()
        if depth < 11 or (depth - 2) % 9 != 0:
            raise ValueError(f"bottleneck PyramidNet depth must be 9n+2 (11, 110, 272, ...); got {depth}")
        if not 0.0 <= max_drop <= 1.0:
            raise ValueError(f"PyramidNet max_drop must be in [0, 1]; got {max_drop}")
        n = (depth - 2) // 9
        total = 3 * n
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16))
        blocks, cin, width = [], 16, 16.0
        for k in range(1, total + 1):
            width += alpha / total
            channels = int(round(width))
            stride = 2 if k in (n + 1, 2 * n + 1) else 1
            # official _calc_shakedrop_mask_prob: keep probability 1 - (k / N) * max_drop
            regularizer = (ShakeDrop(1.0 - k / total * max_drop, tuple(shake_alpha), tuple(shake_beta))
                           if shakedrop else nn.Identity())
            blocks.append(PyramidBottleneck(cin, channels, stride, regularizer))
            cin = 4 * channels
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        official_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model("pyramidnet272_shakedrop")
def pyramidnet272_shakedrop(num_classes: int, in_chans: int = 3, **kw: Any) -> PyramidNet:
    """PyramidNet-272 (alpha 200) + ShakeDrop: the official code's model (Table 1)."""
    return PyramidNet(272, 200, num_classes=num_classes, in_chans=in_chans, shakedrop=True, **kw)


@register_model("pyramidnet272")
def pyramidnet272(num_classes: int, in_chans: int = 3, **kw: Any) -> PyramidNet:
    """PyramidNet-272 (alpha 200) without ShakeDrop (Table 1's plain PyramidNet row)."""
    return PyramidNet(272, 200, num_classes=num_classes, in_chans=in_chans, shakedrop=False, **kw)
