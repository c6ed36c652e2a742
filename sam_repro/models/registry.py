"""Model registry (timm style): names -> factories `fn(num_classes, in_chans=3, **kw) -> nn.Module`.

Four kinds of names resolve, in this order:
1. exact names registered with `@register_model("name")`;
2. `timm/<name>`: handed to `timm.create_model(<name>, num_classes=..., in_chans=..., **kw)`;
3. name families registered with `@register_model_pattern(regex, description, parse)`, e.g.
   `wrn<depth>_<k>`: `parse(match)` turns the name into constructor keywords (raising ValueError
   for invalid values), which the factory receives with the user's keywords;
4. any other name timm knows (`tf_efficientnet_b7.ra_in1k`, with or without its weight tag): timm,
   as `timm/<name>` (so `model=timm model.name=<timm name>` works; names above win).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from torch import nn

ModelFactory = Callable[..., nn.Module]
TIMM_PREFIX = "timm/"

_MODELS: Dict[str, ModelFactory] = {}


class _Pattern(NamedTuple):
    regex: "re.Pattern[str]"
    description: str  # shown in the unknown-name message, e.g. "any wrn<depth>_<k> with depth = 6n+4"
    parse: Callable[["re.Match[str]"], Dict[str, Any]]  # name -> constructor keywords
    factory: ModelFactory  # fn(num_classes, in_chans=3, **parsed, **kw)


_PATTERNS: List[_Pattern] = []


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register `fn(num_classes, in_chans=3, **kw)` under `name` (unique)."""

    def decorator(fn: ModelFactory) -> ModelFactory:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        if name.startswith(TIMM_PREFIX):
            raise ValueError(f"model names starting with {TIMM_PREFIX!r} are reserved for timm")
        _MODELS[name] = fn
        return fn

    return decorator


def register_model_pattern(pattern: str, description: str,
                           parse: Callable[["re.Match[str]"], Dict[str, Any]]
                           ) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register `fn(num_classes, in_chans=3, **kw)` for every name fully matching
    `pattern`; `parse(match)` gives the keywords the name stands for, or raises ValueError."""

    def decorator(fn: ModelFactory) -> ModelFactory:
        _PATTERNS.append(_Pattern(re.compile(pattern), description, parse, fn))
        return fn

    return decorator


def _natural_key(name: str) -> List[Any]:
    """resnet20 < resnet32 < resnet110: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_models() -> List[str]:
    """The registered names in natural order (a pattern family lists its common members)."""
    return sorted(_MODELS, key=_natural_key)


def _unknown_message(name: str) -> str:
    choices = ", ".join(list_models())
    families = "".join(f" ({p.description})" for p in _PATTERNS)
    return (f"model.name={name!r} is not a registered model; choose one of: "
            f"{choices}{families}, or {TIMM_PREFIX}<name>")


def _timm_arch(name: str) -> str:
    """`timm/resnet50.a1_in1k` -> `resnet50` (the architecture timm's registry knows)."""
    import timm

    return timm.models.split_model_name_tag(name[len(TIMM_PREFIX):])[0]


def _is_timm_model(name: str) -> bool:
    import timm

    rest = name[len(TIMM_PREFIX):]
    # hf-hub:/local-dir: sources are resolved by timm itself at creation time
    return ":" in rest or timm.is_model(_timm_arch(name))


def timm_name(name: str) -> Optional[str]:
    """The timm model name `name` resolves to (`timm/x` or a bare timm name), or None if it is ours."""
    if name in _MODELS:
        return None
    if name.startswith(TIMM_PREFIX):
        return name[len(TIMM_PREFIX):]
    if _parse_pattern(name) is None and _is_timm_model(TIMM_PREFIX + name):
        return name
    return None


def _parse_pattern(name: str) -> Optional[Tuple[_Pattern, Dict[str, Any]]]:
    """The pattern `name` belongs to and the keywords it stands for; None if no pattern matches."""
    for pattern in _PATTERNS:
        match = pattern.regex.fullmatch(name)
        if match is not None:
            try:
                return pattern, pattern.parse(match)
            except ValueError as err:
                raise ValueError(f"model.name={name!r}: {err}") from None
    return None


def validate_model_name(name: str) -> None:
    """Raise ValueError (one line naming the value and the valid names) unless `name` resolves.

    Checks the name only; nothing is built (the config validator calls this before any work)."""
    if name in _MODELS:
        return
    if name.startswith(TIMM_PREFIX):
        if not _is_timm_model(name):
            raise ValueError(f"model.name={name!r}: {_timm_arch(name)!r} is not a timm model "
                             f"(see timm.list_models())")
        return
    if _parse_pattern(name) is None and not _is_timm_model(TIMM_PREFIX + name):
        raise ValueError(_unknown_message(name))


def is_model(name: str) -> bool:
    """True if `create_model(name, ...)` would find a model of that name."""
    try:
        validate_model_name(name)
    except ValueError:
        return False
    return True


def create_model(name: str, num_classes: int, in_chans: int = 3, **kw) -> nn.Module:
    """Build the model registered as `name` (or `timm/<name>`, or a pattern such as wrn22_4)."""
    validate_model_name(name)
    if name in _MODELS:
        return _MODELS[name](num_classes=num_classes, in_chans=in_chans, **kw)
    timm_model = timm_name(name)
    if timm_model is not None:
        import timm

        return timm.create_model(timm_model, num_classes=num_classes, in_chans=in_chans, **kw)
    pattern, parsed = _parse_pattern(name)
    return pattern.factory(num_classes=num_classes, in_chans=in_chans, **parsed, **kw)
