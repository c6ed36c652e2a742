"""Model zoo: a timm-style registry of the SAM paper's networks, plus `timm/<name>` for the rest.

    from sam_repro.models import create_model
    model = create_model("wrn28_10", num_classes=100)
    model = create_model_from_config(cfg.model, num_classes=102)   # finetuning: pretrained backbone, new head

`stochastic` holds the mechanism that gives SAM's two passes the same random draws.
"""
from .registry import (create_model, is_model, list_models, register_model,
                       register_model_pattern, validate_model_name)
from .finetune import WeightsError, create_model_from_config, is_finetuning, pretrained_input
from .stochastic import (RandomDraws, ShakeDrop, ShakeShake, StochasticLayer, scale_grad,
                         set_true_gradient)

# Importing the model modules registers their models.
from .imagenet import resnet50, resnet101, resnet152
from .pyramidnet import PyramidNet
from .resnet_cifar import CifarResNet
from .shakeshake import ShakeShakeResNet
from .wrn import WideResNet

__all__ = [
    "create_model", "is_model", "list_models", "register_model", "register_model_pattern",
    "validate_model_name", "create_model_from_config", "pretrained_input", "is_finetuning", "WeightsError",
    "RandomDraws", "StochasticLayer", "set_true_gradient", "ShakeShake", "ShakeDrop", "scale_grad",
    "WideResNet", "ShakeShakeResNet", "PyramidNet", "CifarResNet",
    "resnet50", "resnet101", "resnet152",
]
