"""Shake-Shake ResNet (Gastaldi 2017), as in the official SAM code.

Follows google-research/sam `sam_jax/models/wide_resnet_shakeshake.py` (itself the AutoAugment
`shake_shake.py`): a 16-channel conv + BN stem, 3 groups of residual blocks whose two branches are
ReLU-Conv3x3-BN-ReLU-Conv3x3-BN mixed by `ShakeShake`, and a shortcut that, where the channel count
changes, concatenates two 1x1 convs of the strided input, the second offset by one pixel, then BN.
Shake-Shake-26 2x96d = 4 blocks per group, widths 96/192/384 (26.2M parameters).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model
from .stochastic import ShakeShake
from .wrn import official_init_


def _branch(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
    )


class TwoPathShortcut(nn.Module):
    """Gastaldi's downsampling shortcut: [conv1x1(x[::s]), conv1x1(shift(x)[::s])] -> BN.

    The official code uses a 1x1 average pool with stride s (a plain subsample) and shifts the
    second path by one pixel right and down (zero-padded), so the two paths see disjoint pixels."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(cin, cout // 2, 1, bias=False)
        self.conv2 = nn.Conv2d(cin, cout - cout // 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        h1 = x[:, :, ::s, ::s]
        h2 = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:][:, :, ::s, ::s]
        return self.bn(torch.cat([self.conv1(h1), self.conv2(h2)], dim=1))


class ShakeShakeBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.branch_a = _branch(cin, cout, stride)
        self.branch_b = _branch(cin, cout, stride)
        self.shake = ShakeShake()
        # Official: the shortcut is the identity whenever the channel count is unchanged (every
        # downsampling block also changes the channel count).
        self.shortcut = TwoPathShortcut(cin, cout, stride) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.shake(self.branch_a(x), self.branch_b(x))


class ShakeShakeResNet(nn.Module):
    """Shake-Shake-(6n+2) 2x<base_width>d; any input size (the head pools adaptively)."""

    def __init__(self, blocks_per_group: int = 4, base_width: int = 96, num_classes: int = 10,
                 in_chans: int = 3) -> None:
        super().__init__()
        if blocks_per_group < 1 or base_width < 1:
            raise ValueError("ShakeShakeResNet needs blocks_per_group >= 1 and base_width >= 1; "
                             f"got {blocks_per_group}, {base_width}")
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16))
        blocks, cin = [], 16
        for multiplier, stride in ((1, 1), (2, 2), (4, 2)):
            for i in range(blocks_per_group):
                cout = base_width * multiplier
                blocks.append(ShakeShakeBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        official_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model("shakeshake26_2x96d")
def shakeshake26_2x96d(num_classes: int, in_chans: int = 3, **kw: Any) -> ShakeShakeResNet:
    """Shake-Shake-26 2x96d (Table 1 of the SAM paper)."""
    return ShakeShakeResNet(4, 96, num_classes=num_classes, in_chans=in_chans, **kw)
