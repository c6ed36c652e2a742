"""Wide ResNet (Zagoruyko & Komodakis 2016), pre-activation, as in the official SAM code.

Follows google-research/sam `sam_jax/models/wide_resnet.py` (itself the AutoAugment `wrn.py`):
- BN-ReLU before each conv; the first block of the first group activates before branching, so its
  shortcut carries the activated input; the other blocks' shortcuts carry the raw input.
- shortcuts are parameter-free by default (`shortcut="pad"`): average-pool to the new resolution,
  zero-pad the new channels. `shortcut="conv"` gives the original paper's 1x1 projection on the
  activated input instead (36,479,194 parameters for WRN-28-10 on 10 classes, vs 36,220,634).
- BatchNorm momentum 0.9 in flax = 0.1 in PyTorch, eps 1e-5 (PyTorch defaults); convs Kaiming
  normal fan_out; the classifier weight U[-1/sqrt(num_classes), +] and bias 0; no dropout (the
  `dropout` keyword puts it between the two convs of each block, as in the WRN paper).
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model, register_model_pattern


def official_init_(model: nn.Module) -> None:
    """The official code's initializers (sam_jax/models/utils.py): Kaiming normal fan_out (gain 2)
    convs, BN scale 1 / bias 0, and the AutoAugment classifier init U[-s, s], s = 1/sqrt(classes)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            scale = 1.0 / math.sqrt(m.out_features)
            nn.init.uniform_(m.weight, -scale, scale)
            nn.init.zeros_(m.bias)


def pool_and_pad(x: torch.Tensor, out_channels: int, stride: int) -> torch.Tensor:
    """Parameter-free shortcut: average-pool by `stride`, zero-pad channels up to `out_channels`.

    ceil_mode keeps the pooled size equal to a stride-2 conv's on odd inputs (the official VALID
    pooling assumes even sizes, which every paper dataset has)."""
    if stride > 1:
        x = F.avg_pool2d(x, stride, stride, ceil_mode=True)
    return F.pad(x, (0, 0, 0, 0, 0, out_channels - x.shape[1]))


def wrn_blocks_per_group(depth: int) -> int:
    """Blocks per group of a WRN of this depth (depth = 6n + 4); ValueError otherwise."""
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...); got {depth}")
    return (depth - 4) // 6


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class WideResNetBlock(nn.Module):
    """BN-ReLU-Conv3x3-BN-ReLU-(Dropout)-Conv3x3, plus the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, activate_before_residual: bool,
                 dropout: float, shortcut: str) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv3x3(cout, cout)
        self.cout, self.stride = cout, stride
        changes_shape = cin != cout or stride != 1
        self.projection = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
                           if shortcut == "conv" and changes_shape else None)
        # Official: only the model's first block feeds the activated input to its shortcut; the
        # WRN paper's projection shortcut also takes the activated input.
        self.shortcut_sees_activation = activate_before_residual or self.projection is not None
        self.changes_shape = changes_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        residual = activated if self.shortcut_sees_activation else x
        y = self.conv1(activated)
        y = self.conv2(self.dropout(F.relu(self.bn2(y))))
        if self.projection is not None:
            residual = self.projection(residual)
        elif self.changes_shape:
            residual = pool_and_pad(residual, self.cout, self.stride)
        return y + residual


class WideResNet(nn.Module):
    """WRN-depth-width for 32x32-like inputs (any size: the head pools adaptively)."""

    def __init__(self, depth: int = 28, width: int = 10, num_classes: int = 10, in_chans: int = 3,
                 dropout: float = 0.0, shortcut: str = "pad") -> None:
        super().__init__()
        if shortcut not in ("pad", "conv"):
            raise ValueError(f"WideResNet shortcut must be 'pad' (official) or 'conv'; got {shortcut!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"WideResNet dropout must be in [0, 1); got {dropout}")
        n = wrn_blocks_per_group(depth)
        self.conv = _conv3x3(in_chans, 16)
        blocks, cin = [], 16
        for group, (channels, stride) in enumerate(zip((16, 32, 64), (1, 2, 2))):
            for i in range(n):
                cout = channels * width
                blocks.append(WideResNetBlock(cin, cout, stride if i == 0 else 1,
                                              activate_before_residual=(group == 0 and i == 0),
                                              dropout=dropout, shortcut=shortcut))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        official_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv(x))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _parse_wrn_name(match: "re.Match[str]") -> Dict[str, Any]:
    depth, width = int(match[1]), int(match[2])
    wrn_blocks_per_group(depth)
    if width < 1:
        raise ValueError(f"WRN width must be a positive integer; got {width}")
    return {"depth": depth, "width": width}


@register_model_pattern(r"wrn(\d+)_(\d+)", "any wrn<depth>_<k> with depth = 6n+4", _parse_wrn_name)
def wide_resnet(num_classes: int, in_chans: int = 3, **kw: Any) -> WideResNet:
    """WRN-<depth>-<k> from its name, e.g. wrn22_4."""
    return WideResNet(num_classes=num_classes, in_chans=in_chans, **kw)


def _register_common(depth: int, width: int) -> None:
    def factory(num_classes: int, in_chans: int = 3, **kw: Any) -> WideResNet:
        return WideResNet(depth, width, num_classes=num_classes, in_chans=in_chans, **kw)

    factory.__doc__ = f"WRN-{depth}-{width}."
    register_model(f"wrn{depth}_{width}")(factory)


# The common members of the family are listed by name (and so get the registry-driven tests);
# every other wrn<depth>_<k> resolves through the pattern above.
for _depth, _width in ((16, 4), (16, 8), (28, 2), (28, 10), (40, 2)):
    _register_common(_depth, _width)
