"""ImageNet ResNet-50/101/152 (Table 2): thin registrations of torchvision's models.

torchvision's architectures are the standard ones (25.6M / 44.5M / 60.2M parameters on 1000
classes); they are built untrained (weights=None). Only the stem changes when in_chans != 3.
As in the official code, the last BatchNorm scale of every residual block starts at zero (each
block starts as the identity); `zero_init_residual=False` keeps torchvision's default of one.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn
from torchvision import models as tv

from .registry import register_model


def _torchvision(builder: Callable[..., tv.ResNet], num_classes: int, in_chans: int,
                 zero_init_residual: bool = True, **kw: Any) -> tv.ResNet:
    model = builder(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual, **kw)
    if in_chans != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride,
                                old.padding, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_model("resnet50")
def resnet50(num_classes: int, in_chans: int = 3, **kw: Any) -> tv.ResNet:
    """torchvision ResNet-50, untrained."""
    return _torchvision(tv.resnet50, num_classes, in_chans, **kw)


@register_model("resnet101")
def resnet101(num_classes: int, in_chans: int = 3, **kw: Any) -> tv.ResNet:
    """torchvision ResNet-101, untrained."""
    return _torchvision(tv.resnet101, num_classes, in_chans, **kw)


@register_model("resnet152")
def resnet152(num_classes: int, in_chans: int = 3, **kw: Any) -> tv.ResNet:
    """torchvision ResNet-152, untrained."""
    return _torchvision(tv.resnet152, num_classes, in_chans, **kw)
