"""Finetuning (Table 3): a pretrained backbone, a new head, and the model's own input pipeline.

    model = create_model_from_config(cfg.model, num_classes=102)
    bundle = fit_to_model(bundle, pretrained_input(model, cfg.model), cfg.dataset.input_size)

- Weights: `model.checkpoint=PATH` (a local file, for offline machines) wins over
  `model.pretrained=true` (timm's weights for the name's tag, from the Hugging Face hub or its
  cache). Either way the classifier head of the weights is dropped: the model keeps its own, freshly
  initialized head with the dataset's number of classes, as the paper does.
- A weights file may be a plain state_dict (.pth/.pt/.bin, or .safetensors), or a dict holding it
  under "model" or "state_dict" (a sam-train checkpoint.pt, a timm or torchvision training
  checkpoint); "module." (DistributedDataParallel) and "_orig_mod." (torch.compile) prefixes go.
- Input: the pretrained config's image size, mean/std, crop_pct and interpolation (timm's
  resolve_model_data_config) replace the dataset's (sam_repro.data.fit_to_model).
- BatchNorm statistics stay frozen with `model.freeze_bn=true`: the loop keeps BN layers in eval mode.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sam_repro.errors import UserError

from .registry import create_model, timm_name

if TYPE_CHECKING:
    from ..config import ModelConfig

STATE_KEYS = ("model", "state_dict", "model_state_dict")  # where training checkpoints keep the weights
PREFIXES = ("module.", "_orig_mod.")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


class WeightsError(UserError):
    """Pretrained weights that cannot be had or do not fit; the message is one actionable line."""


BOTH_WAYS = ("supply the weights with model.pretrained=true (timm fetches them from the Hugging Face hub: needs "
             "network, or a filled cache with HF_HUB_OFFLINE=1) or model.checkpoint=<path to a state_dict file>")


def is_finetuning(cfg: "ModelConfig") -> bool:
    """True when the backbone starts from pretrained weights."""
    return bool(cfg.pretrained or cfg.checkpoint)


def create_model_from_config(cfg: "ModelConfig", num_classes: int, in_chans: int = 3) -> nn.Module:
    """The model `cfg` describes: built from scratch, or a pretrained backbone with a new head."""
    kwargs = OmegaConf.to_container(cfg.kwargs, resolve=True) if isinstance(cfg.kwargs, DictConfig) else dict(cfg.kwargs or {})
    if cfg.checkpoint:
        model = create_model(cfg.name, num_classes=num_classes, in_chans=in_chans, **kwargs)
        load_backbone(model, cfg.checkpoint)
        return model
    if cfg.pretrained:
        return timm_pretrained(cfg.name, num_classes, in_chans, **kwargs)
    return create_model(cfg.name, num_classes=num_classes, in_chans=in_chans, **kwargs)


def timm_pretrained(name: str, num_classes: int, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """timm's pretrained weights for `name` with a new `num_classes` head (timm drops the old one)."""
    import timm

    arch = timm_name(name)
    if arch is None:
        raise WeightsError(f"model.pretrained=true needs a timm model (timm/<name>); {name!r} is one of ours: "
                           f"use model.checkpoint=<path to a state_dict file>")
    try:
        return timm.create_model(arch, pretrained=True, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except Exception as e:  # no network, no cache entry, no weights for this tag: one line with both ways out
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise WeightsError(f"model.pretrained=true: no weights for {arch!r} ({type(e).__name__}: {first[:200]}); "
                           f"{BOTH_WAYS}") from None


def read_state_dict(path: str | Path) -> Dict[str, torch.Tensor]:
    """The tensors of a weights file (see the module docstring for the accepted layouts), on the CPU."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"model.checkpoint={str(path)!r}: no such file; {BOTH_WAYS}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p))
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)  # tensors and plain containers only
    except Exception as e:
        raise WeightsError(f"model.checkpoint={str(path)!r} is not a readable weights file "
                           f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from None
    for key in STATE_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise WeightsError(f"model.checkpoint={str(path)!r} holds a {type(obj).__name__}, not a state_dict")
    out = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            for prefix in PREFIXES:
                key = key.removeprefix(prefix)
            out[key] = value
    return out


def classifier_prefixes(model: nn.Module) -> List[str]:
    """State-dict prefixes of the classifier head: timm's pretrained config names it; otherwise the
    last Linear layer (torchvision's `fc`, our CIFAR models' `fc`)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    if names:
        return [f"{n}." for n in ([names] if isinstance(names, str) else names)]
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return [f"{linear[-1]}."] if linear else []


def load_backbone(model: nn.Module, path: str | Path) -> None:
    """Load every weight of `path` except the classifier head into `model`; the head stays new."""
    state = read_state_dict(path)
    head = tuple(classifier_prefixes(model))
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if not k.startswith(head)}
    missing = [k for k in own if k not in kept and not k.startswith(head) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in kept if k not in own]
    reshaped = [f"{k} {tuple(kept[k].shape)} vs {tuple(own[k].shape)}" for k in kept
                if k in own and kept[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        detail = "; ".join(f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("of another shape", reshaped)) if keys)
        raise WeightsError(f"model.checkpoint={str(path)!r} does not fit model {type(model).__name__}: {detail}; "
                           f"is it the same architecture as model.name?")
    model.load_state_dict(kept, strict=False)


def pretrained_input(model: nn.Module, cfg: "ModelConfig") -> Dict[str, Any]:
    """What a finetuned model expects to see (image_size, mean, std, crop_pct, interpolation), from
    timm's pretrained config; {} when not finetuning or for a model timm did not build."""
    if not is_finetuning(cfg) or not getattr(model, "pretrained_cfg", None):
        return {}
    from timm.data import resolve_model_data_config

    d = resolve_model_data_config(model)
    interpolation = d.get("interpolation", "bilinear")
    return {
        "image_size": int(d["input_size"][-2]),
        "mean": tuple(float(v) for v in d["mean"]),
        "std": tuple(float(v) for v in d["std"]),
        "crop_pct": float(d.get("crop_pct", 0.875)),
        "interpolation": interpolation if interpolation in INTERPOLATIONS else "bilinear",
    }
