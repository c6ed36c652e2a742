"""CIFAR ResNets of He et al. 2016 (Sec. 4.2): ResNet-20/32/44/56/110, option A shortcuts.

3 groups of n basic blocks (Conv3x3-BN-ReLU-Conv3x3-BN, add, ReLU) at 16/32/64 channels,
depth = 6n + 2. Option A: downsampling shortcuts subsample and zero-pad the new channels (no
parameters), so ResNet-32 has 464,154 parameters on 10 classes. Used for the label-noise table.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x
        if self.stride > 1 or self.pad:
            # option A: subsample, then zero channels split evenly on both sides
            shortcut = F.pad(x[:, :, ::self.stride, ::self.stride],
                             (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(y + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32-like inputs (any size: the head pools adaptively)."""

    def __init__(self, depth: int = 32, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...); got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():  # He et al. 2015 init for convs; PyTorch defaults elsewhere
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _register(depth: int) -> None:
    def factory(num_classes: int, in_chans: int = 3, **kw: Any) -> CifarResNet:
        return CifarResNet(depth, num_classes=num_classes, in_chans=in_chans, **kw)

    factory.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016, option A shortcuts)."
    register_model(f"resnet{depth}")(factory)


for _depth in (20, 32, 44, 56, 110):
    _register(_depth)
