"""Hessian-vector products of a loss that is a weighted sum of mini-batch losses, two ways.

- `reverse` (default): reverse-over-reverse, H v = d/dw (grad L(w) . v). The gradient graph of
  each batch (one forward and one backward with create_graph) is built once and kept across
  calls while the kept graphs fit in `graph_budget` bytes; a batch beyond the budget rebuilds its
  graph at every call. A kept batch then costs one backward through its gradient graph per HVP.
- `forward`: forward-over-reverse, `torch.func.jvp` of `torch.func.grad`, recomputed at every
  call (memory: one batch). On the CPU it costs 1.4x a kept reverse HVP on ResNet-20 and 3.5x on
  a small CNN, where functorch's per-operator dispatch dominates (scripts/bench_sharpness.py,
  results/bench/sharpness_vs_pyhessian.jsonl).

Both see the batch losses as functions of a tuple of parameters, so the same code serves a
network (`Objective`) and a quadratic with a known Hessian (the tests). No per-example loop: a
batch is one batched forward.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.func import grad, jvp

Params = Tuple[Tensor, ...]
BatchLoss = Callable[[Sequence[Tensor]], Tensor]  # parameters -> the scalar loss of one batch
HVP = Callable[[Sequence[Tensor]], Params]  # v -> H v, both in the parameters' shapes

DEFAULT_GRAPH_BUDGET = 4 * 2 ** 30  # bytes of kept gradient graphs (ResNet-20: ~0.45 GiB per 128 fp32 examples)


def _accumulate(out: Optional[list[Tensor]], hv: Sequence[Tensor], weight: float) -> list[Tensor]:
    if out is None:
        return [h * weight for h in hv]
    return [o.add_(h, alpha=weight) for o, h in zip(out, hv)]


class ForwardHVP:
    """H v by jvp of grad (forward-over-reverse), every batch recomputed at every call."""

    mode = "forward"

    def __init__(self, losses: Sequence[tuple[BatchLoss, float]], params: Sequence[Tensor],
                 graph_budget: int = 0) -> None:
        self.losses, self.params = list(losses), tuple(p.detach() for p in params)

    def __call__(self, v: Sequence[Tensor]) -> Params:
        v, out = tuple(v), None
        for loss, weight in self.losses:
            _, hv = jvp(grad(loss), (self.params,), (v,))
            out = _accumulate(out, hv, weight)
        return tuple(out)

    def stats(self) -> dict:
        return {"mode": self.mode, "batches": len(self.losses), "graphs_kept": 0, "graph_bytes": 0}


class _SavedBytes:
    """Counts the bytes of the tensors autograd saves inside the context (each storage once):
    the memory a kept graph holds."""

    def __init__(self) -> None:
        self.bytes, self._seen = 0, set()

    def _pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += storage.nbytes()
        return t

    def __enter__(self) -> "_SavedBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


class ReverseHVP:
    """H v = d/dw (grad L . v) (reverse-over-reverse), gradient graphs kept within a byte budget."""

    mode = "reverse"

    def __init__(self, losses: Sequence[tuple[BatchLoss, float]], params: Sequence[Tensor],
                 graph_budget: int = DEFAULT_GRAPH_BUDGET) -> None:
        self.losses, self.budget = list(losses), int(graph_budget)
        # leaves of our own that share the weights' storage: the caller's tensors are not touched
        self.params = tuple(p.detach().requires_grad_(True) for p in params)
        self.kept: list[Optional[tuple[Params, Params]]] = [None] * len(self.losses)
        self.measured = [False] * len(self.losses)  # a batch's graph is sized (and kept or not) once
        self.kept_bytes = 0

    def _gradient_graph(self, i: int) -> tuple[Params, Params]:
        """(gradients with their graph, the matching parameters): those gradients that depend on
        w (a constant gradient has a zero Hessian row and no graph to differentiate)."""
        if self.kept[i] is not None:
            return self.kept[i]
        size = _SavedBytes()
        with torch.enable_grad(), size if not self.measured[i] else contextlib.nullcontext():
            loss = self.losses[i][0](self.params)
            g = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        pairs = [(gi, p) for gi, p in zip(g, self.params) if gi is not None and gi.requires_grad]
        graph = (tuple(gi for gi, _ in pairs), tuple(p for _, p in pairs))
        if not self.measured[i]:
            self.measured[i] = True
            if self.kept_bytes + size.bytes <= self.budget:
                self.kept[i], self.kept_bytes = graph, self.kept_bytes + size.bytes
        return graph

    def __call__(self, v: Sequence[Tensor]) -> Params:
        v, out = tuple(v), None
        index = {id(p): j for j, p in enumerate(self.params)}
        for i, (_, weight) in enumerate(self.losses):
            g, ps = self._gradient_graph(i)
            if g:
                hv = torch.autograd.grad(g, self.params, grad_outputs=[v[index[id(p)]] for p in ps],
                                         retain_graph=self.kept[i] is not None, materialize_grads=True)
            else:
                hv = [torch.zeros_like(p) for p in self.params]
            out = _accumulate(out, hv, weight)
        return tuple(t.detach() for t in out)

    def stats(self) -> dict:
        return {"mode": self.mode, "batches": len(self.losses), "graphs_kept": sum(k is not None for k in self.kept),
                "graph_bytes": self.kept_bytes}


# mode -> class(losses, params, graph_budget): the CLI's --hvp choices
HVP_MODES: Dict[str, type] = {"reverse": ReverseHVP, "forward": ForwardHVP}
DEFAULT_HVP = "reverse"


def make_hvp(mode: str, losses: Sequence[tuple[BatchLoss, float]], params: Sequence[Tensor],
             graph_budget: int = DEFAULT_GRAPH_BUDGET) -> ForwardHVP | ReverseHVP:
    """v -> sum_b weight_b * H_b v for the batch losses, by `mode` (a key of HVP_MODES)."""
    if mode not in HVP_MODES:
        raise ValueError(f"hvp mode {mode!r} must be one of {tuple(HVP_MODES)}")
    return HVP_MODES[mode](losses, params, graph_budget)
