"""What the method tests share: the reference trajectories (tests/fixtures/variants), the tiny float64
BatchNorm network they were made on, and a recorder of what each step did.

The fixtures come from running each method's released code (tests/fixtures/variants/README.md); the
recorder watches our classes through the same kind of hooks: the weights at every forward (the
perturbation is the difference between a step's later forwards and its first), the gradient the base
optimizer receives, and the BatchNorm policy of each forward of a step.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "variants"
STEPS = 8
PARAMS = ["conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "conv2.bias", "bn2.weight", "bn2.bias",
          "fc.weight", "fc.bias"]
BUFFERS = [f"{bn}.{b}" for bn in ("bn1", "bn2") for b in ("running_mean", "running_var", "num_batches_tracked")]
TOL = 1e-10
# The fixtures' base optimizer: weight decay inside SGD (optim.wd_mode=decoupled in the engine's words)
SGD_KWARGS = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=5e-4)

# BatchNorm policies of a step's forwards: "all" (every train-mode forward updates the running
# statistics: the fixtures' buffer/), "first_pass" (later forwards with BN momentum 0: buffer_firstpass/,
# num_batches_tracked still counts them), "frozen" (later forwards leave the statistics and the count
# alone: the engine's optim.bn_stats=first_pass)
POLICIES = ("all", "first_pass", "frozen")


class TinyBNNet(nn.Module):
    """The fixtures' network: conv-BN-ReLU, strided conv-BN-ReLU, global average pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, stride=2, bias=True)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


@lru_cache(maxsize=None)
def fixture(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


def meta(name: str) -> dict[str, Any]:
    return json.loads(str(fixture(name)["meta_json"]))


def hyper(name: str) -> dict[str, Any]:
    return meta(name)["hyperparameters"]


def batch(t: int, second: bool = False) -> tuple[Tensor, Tensor]:
    """Step t's batch (the second one: RWP's noisy rank)."""
    data = fixture("data")
    suffix = "2" if second else ""
    return torch.from_numpy(data[f"batch{t}/x{suffix}"]), torch.from_numpy(data[f"batch{t}/y{suffix}"])


def tiny_net() -> TinyBNNet:
    """TinyBNNet in float64 with the fixtures' initial state."""
    net = TinyBNNet().double()
    init = fixture("data")
    net.load_state_dict({k.removeprefix("init/"): torch.from_numpy(v) for k, v in init.items() if k.startswith("init/")})
    net.train()
    return net


def ce(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(net(x), y)


def tensors(net: nn.Module) -> list[Tensor]:
    return [p for _, p in net.named_parameters()]


class Recorder:
    """Watches a network and its base optimizer through hooks, one step at a time."""

    def __init__(self, net: nn.Module, base: torch.optim.Optimizer, policy: str) -> None:
        assert policy in POLICIES
        self.net, self.policy = net, policy
        self.bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        self.rows: dict[str, list[np.ndarray]] = {}
        self.weights_at_forward: list[list[Tensor]] = []
        self.applied: list[Tensor] = []
        net.register_forward_pre_hook(self._before_forward)
        base.register_step_pre_hook(self._before_base_step)

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        later = len(self.weights_at_forward) > 0
        self.weights_at_forward.append([p.detach().clone() for p in tensors(self.net)])
        for bn in self.bns:
            bn.momentum = 0.0 if (later and self.policy == "first_pass") else 0.1
            bn.track_running_stats = not (later and self.policy == "frozen")

    def _before_base_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.applied = [p.grad.detach().clone() for p in tensors(self.net)]

    @contextmanager
    def step(self) -> Iterator[None]:
        """One step: what happens inside is recorded as one row of every key."""
        self.weights_at_forward, self.applied = [], []
        yield
        for bn in self.bns:
            bn.momentum, bn.track_running_stats = 0.1, True
        state = self.net.state_dict()
        first = self.weights_at_forward[0]
        later = self.weights_at_forward[-1] if len(self.weights_at_forward) > 1 else None
        for i, name in enumerate(PARAMS):
            self._add(f"param/{name}", state[name])
            self._add(f"grad/{name}", self.applied[i])
            e = later[i] - first[i] if later is not None else torch.full_like(first[i], float("nan"))
            self._add(f"perturb/{name}", e)
        for name in BUFFERS:
            self._add(f"buffer/{name}", state[name])
        self._add("n_forwards", torch.tensor(len(self.weights_at_forward)))

    def _add(self, key: str, value: Tensor) -> None:
        self.rows.setdefault(key, []).append(value.detach().cpu().numpy().copy())

    def result(self) -> dict[str, np.ndarray]:
        return {k: np.stack(v) for k, v in self.rows.items()}


def expected_buffers(name: str, policy: str) -> dict[str, np.ndarray]:
    """The fixture's BatchNorm buffers under `policy`; "frozen": buffer_firstpass's statistics with a
    count of one forward per step."""
    fx = fixture(name)
    key = "buffer" if policy == "all" else "buffer_firstpass"
    out = {name_: fx[f"{key}/{name_}"] for name_ in BUFFERS}
    if policy == "frozen":
        for bn in ("bn1", "bn2"):
            out[f"{bn}.num_batches_tracked"] = np.arange(1, STEPS + 1)
    return out


def differences(name: str, got: dict[str, np.ndarray], policy: str) -> dict[str, float]:
    """Max |ours - fixture| over the 8 steps: parameters, buffers, the applied gradient, the perturbation
    (NaN where neither side has a perturbed pass; a NaN on one side only is an infinite difference)."""
    fx = fixture(name)

    def gap(keys: list[str], want: Callable[[str], np.ndarray]) -> float:
        worst = 0.0
        for k in keys:
            a, b = got[k], want(k)
            assert a.shape == b.shape, (k, a.shape, b.shape)
            both_nan = np.isnan(a) & np.isnan(b)
            if (np.isnan(a) ^ np.isnan(b)).any():
                return float("inf")
            worst = max(worst, float(np.abs(np.where(both_nan, 0.0, a - b)).max()))
        return worst

    buffers = expected_buffers(name, policy)
    out = {
        "params": gap([f"param/{p}" for p in PARAMS], lambda k: fx[k]),
        "buffers": gap([f"buffer/{b}" for b in BUFFERS], lambda k: buffers[k.removeprefix("buffer/")]),
        "grad": gap([f"grad/{p}" for p in PARAMS], lambda k: fx[k]),
    }
    if f"perturb/{PARAMS[0]}" in fx:
        out["perturb"] = gap([f"perturb/{p}" for p in PARAMS], lambda k: fx[k])
    return out
