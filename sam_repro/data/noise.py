"""Label noise for the paper's Table 4 (and the asymmetric variant common in the literature).

- symmetric (Jiang et al. 2019, which the paper follows): a fraction `rate` of the training images,
  chosen uniformly, gets a label drawn uniformly from ALL classes, so about 1/K of them keep their
  label by chance; the realized fraction of changed labels is about rate * (K - 1) / K.
- asymmetric: within each class that has a target, a fraction `rate` of its images moves to the
  target class. CIFAR-10 uses the usual pairs (truck -> automobile, bird -> airplane, deer -> horse,
  cat <-> dog); every other dataset maps class c -> c + 1 (mod K).

Noise depends on `seed` only (never on the training seed) and is drawn on the CPU, so the same
(labels, rate, seed) gives the same noisy labels on every machine.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

NoiseFn = Callable[[torch.Tensor, int, float, torch.Generator, str], torch.Tensor]
NOISE_KINDS: Dict[str, NoiseFn] = {}

# CIFAR-10 label indices: 0 airplane, 1 automobile, 2 bird, 3 cat, 4 deer, 5 dog, 7 horse, 9 truck
ASYMMETRIC_PAIRS: Dict[str, Dict[int, int]] = {"cifar10": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}}


def register_noise(name: str) -> Callable[[NoiseFn], NoiseFn]:
    def wrap(fn: NoiseFn) -> NoiseFn:
        NOISE_KINDS[name] = fn
        return fn

    return wrap


def symmetric(labels: torch.Tensor, num_classes: int, rate: float, g: torch.Generator, dataset: str) -> torch.Tensor:
    n = len(labels)
    chosen = torch.randperm(n, generator=g)[: round(rate * n)]
    out = labels.clone()
    out[chosen] = torch.randint(num_classes, (len(chosen),), generator=g)
    return out


def asymmetric(labels: torch.Tensor, num_classes: int, rate: float, g: torch.Generator, dataset: str) -> torch.Tensor:
    pairs = ASYMMETRIC_PAIRS.get(dataset, {c: (c + 1) % num_classes for c in range(num_classes)})
    out = labels.clone()
    for src, dst in sorted(pairs.items()):  # a loop over classes; the source labels are read from `labels`
        members = (labels == src).nonzero().flatten()
        chosen = members[torch.randperm(len(members), generator=g)[: round(rate * len(members))]]
        out[chosen] = dst
    return out


# Registered by call rather than by decorator: mutmut (make mutate) skips decorated functions.
NOISE_KINDS.update(symmetric=symmetric, asymmetric=asymmetric)


def apply_label_noise(labels: torch.Tensor, num_classes: int, rate: float, kind: str, seed: int,
                      dataset: str) -> Tuple[torch.Tensor, dict]:
    """(noisy labels, info) with info = {kind, rate, seed, realized_fraction} for the run directory."""
    info = {"kind": kind, "rate": float(rate), "seed": int(seed), "realized_fraction": 0.0}
    if rate <= 0:
        return labels, info
    g = torch.Generator().manual_seed(int(seed))
    noisy = NOISE_KINDS[kind](labels, num_classes, rate, g, dataset)
    info["realized_fraction"] = float((noisy != labels).double().mean()) if len(labels) else 0.0
    return noisy, info
