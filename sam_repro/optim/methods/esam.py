"""ESAM: Efficient Sharpness-Aware Minimization (Du et al., ICLR 2022), as its released code runs it.

    opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.05, beta=0.6, gamma=0.5, lr=0.05, momentum=0.9)
    def losses(mask=None):                       # per-example losses on the batch, or on its subset `mask`
        xb, yb = (x, y) if mask is None else (x[mask], y[mask])
        return F.cross_entropy(model(xb), yb, reduction="none")
    for x, y in batches:
        opt.step(losses)                         # 3 forwards, 2 backwards

One step (dydjw9/Efficient_SAM, utils/Esam.py, ESAM.step):
1. SWP: only the tensors kept for this step get a gradient at w (the others have requires_grad off in
   the first pass). e = rho g / (||g|| + 1e-7) / beta over the kept tensors; the others are not moved.
2. SDS: a no-grad forward of the whole batch at w + e gives each example's loss rise s = l(w+e) - l(w);
   the examples with s STRICTLY above the k-th largest, k = int(n * gamma), are selected (k - 1 of
   them when there are no ties; all examples when gamma >= 0.99).
3. The gradient at w + e of the mean loss over the selected examples is applied to every tensor.
4. The keep decisions are drawn at the END of the step, one uniform per tensor (kept iff u <= beta),
   and take effect in the NEXT step's first pass; step 0 keeps every tensor.
Switches for the paper's reading: `selection="topk"` (exactly int(n * gamma) examples, static
shapes) and `swp_draw="start_of_step"` (step 0 draws its mask too). The released code's no-grad
forward runs in train mode, so it moves BatchNorm's running statistics (`sharpness_bn="update"`,
read by the engine; here BatchNorm is your loss function's business).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Optional, Sequence

import torch
from torch import Tensor

from sam_repro.optim.methods.base import HOST, MethodOptimizer, Needs, Rule, State
from sam_repro.optim.methods.kernels import device_norms, mul_rows_

ESAM_SELECTIONS = ("strict", "topk")
ESAM_SWP_DRAWS = ("end_of_step", "start_of_step")
ESAM_SHARPNESS_BN = ("update", "frozen")


@dataclass
class ESAMRule(Rule):
    rho: float
    beta: float
    gamma: float
    selection: str = "strict"
    swp_draw: str = "end_of_step"
    sharpness_bn: str = "update"
    eps: float = 1e-7
    seed: int = 0

    needs: ClassVar[Needs] = Needs(partial_first_pass=True, selects_examples=True)
    persistent: ClassVar[dict[str, str]] = {"keep": HOST, "generator": HOST}

    def __post_init__(self) -> None:
        for key, value, allowed in (("selection", self.selection, ESAM_SELECTIONS),
                                    ("swp_draw", self.swp_draw, ESAM_SWP_DRAWS),
                                    ("sharpness_bn", self.sharpness_bn, ESAM_SHARPNESS_BN)):
            if value not in allowed:
                raise ValueError(f"{key}={value!r} is invalid: choose one of {', '.join(allowed)}")

    def passes_per_step(self) -> tuple[float, float]:
        """The released code's three forwards (at w, the no-grad one at w + e, the subset's) and two
        backwards (the first over the kept tensors only, the second over the subset)."""
        return 3.0, 2.0

    # -- SWP: which tensors take part in the first pass ---------------------------------------------
    def first_pass_mask(self, state: State, n: int) -> list[bool]:
        """Whether each of the n tensors gets a gradient at w in this step (one mask for every device:
        the released code seeds Python's random alike on every process)."""
        if "generator" not in state:
            state["generator"] = torch.Generator().manual_seed(self.seed)
        if "keep" not in state:
            state["keep"] = self._draw(state, n) if self.swp_draw == "start_of_step" else torch.ones(n, dtype=torch.bool)
        return state["keep"].tolist()

    def _draw(self, state: State, n: int) -> Tensor:
        return torch.rand(n, generator=state["generator"], dtype=torch.float64) <= self.beta

    def perturbation(self, params: Sequence[Tensor], grads: list[Tensor], state: State, lr: float) -> Tensor:
        keep = self.first_pass_mask(state, len(grads))
        kept = [g for g, k in zip(grads, keep) if k]
        left = [g for g, k in zip(grads, keep) if not k]
        if left:
            torch._foreach_zero_(left)  # not perturbed
        if not kept:
            return torch.zeros(grads[0].shape[0], dtype=grads[0].dtype, device=grads[0].device)
        norm = device_norms(kept)
        mul_rows_(kept, self.rho / (norm + self.eps) / self.beta)
        return norm

    # -- SDS: which examples the perturbed pass uses ------------------------------------------------
    def selects_all(self) -> bool:
        """Whether every example is selected whatever the losses (then s is not needed)."""
        return self.gamma >= 0.99 if self.selection == "strict" else self.gamma >= 1.0

    def select(self, loss_before: Tensor, loss_after: Tensor) -> Tensor:
        """(k, n) bool: the examples of each device's n that the perturbed pass uses, from the per-example
        losses at w and at w + e."""
        n = loss_before.shape[-1]
        if self.selects_all():
            return torch.ones_like(loss_before, dtype=torch.bool)
        rise = loss_after - loss_before
        count = max(1, int(n * self.gamma))
        top = torch.topk(rise, count, dim=-1)
        if self.selection == "strict":
            return rise > top.values[..., -1:]
        return torch.zeros_like(rise, dtype=torch.bool).scatter_(-1, top.indices, True)

    def end_step(self, state: State) -> None:
        state["keep"] = self._draw(state, len(state["keep"]))

    # -- checkpoints: the generator as its state ---------------------------------------------------
    def state_dict(self, state: State) -> dict[str, Any]:
        if "keep" not in state:
            return {}
        return {"keep": state["keep"], "generator": state["generator"].get_state()}

    def load_state_dict(self, state: State, saved: dict[str, Any], device: torch.device) -> None:
        if saved:
            state["keep"] = saved["keep"].cpu().clone()
            state["generator"] = torch.Generator()
            state["generator"].set_state(saved["generator"].cpu())


class ESAM(MethodOptimizer):
    """ESAM around a base optimizer; `step(losses)` runs the released code's three forwards."""

    rule: ESAMRule

    def __init__(self, params: Iterable[Any], base_optimizer_cls: type[torch.optim.Optimizer], rho: float = 0.05,
                 beta: float = 0.6, gamma: float = 0.5, selection: str = "strict", swp_draw: str = "end_of_step",
                 sharpness_bn: str = "update", eps: float = 1e-7, seed: Optional[int] = None, **base_kwargs: Any) -> None:
        """`seed` seeds the SWP draws (None: torch's current seed); `sharpness_bn` is for the engine."""
        seed = torch.initial_seed() if seed is None else seed
        super().__init__(params, base_optimizer_cls,
                         ESAMRule(rho, beta, gamma, selection, swp_draw, sharpness_bn, eps=eps, seed=seed), **base_kwargs)

    def keep_mask(self) -> list[bool]:
        """This step's SWP decisions, one per parameter (True: perturbed, with a gradient at w)."""
        return self.rule.first_pass_mask(self.method_state, len(self.params))

    def select(self, loss_before: Tensor, loss_after: Tensor) -> Tensor:
        """(n,) bool: the examples the perturbed pass uses."""
        return self.rule.select(loss_before.unsqueeze(0), loss_after.unsqueeze(0))[0]

    def step(self, closure: Optional[Callable[..., Tensor]] = None) -> Tensor:  # type: ignore[override]
        """One ESAM step. `closure(mask=None)` returns the per-example losses of the batch (mask None) or
        of the examples where the (n,) bool `mask` is True. Returns the losses at w (detached)."""
        if closure is None:
            raise RuntimeError("ESAM.step needs closure(mask=None) returning per-example losses (reduction='none')")
        with torch.enable_grad():
            with self.first_pass():
                losses = closure(None)
                losses.mean().backward()
        before = losses.detach()
        self.first_step(zero_grad=True)
        with torch.no_grad():
            after = closure(None)
        mask = self.select(before, after)
        with torch.enable_grad():
            closure(mask).mean().backward()
        self.second_step(zero_grad=True)
        return before
