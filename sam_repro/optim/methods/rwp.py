"""RWP: random weight perturbation (Li et al., "Efficient Generalization Improvement Guided by Random
Weight Perturbation", 2022): a clean and a noisy gradient from two different batches, mixed.

    opt = RWP(model.parameters(), torch.optim.SGD, alpha=0.5, gamma=0.01, lr=0.1, momentum=0.9)
    for (xa, ya), (xb, yb) in pairs_of_batches:
        loss_fn(model(xa), ya).backward()          # clean gradient at w, batch A
        opt.first_step(zero_grad=True)             # w -> w + noise (filter-wise Gaussian)
        loss_fn(model(xb), yb).backward()          # noisy gradient at w + noise, batch B
        opt.second_step(zero_grad=True)            # (1 - alpha) g_clean + alpha g_noisy

nblt/RWP, train_rwp_parallel.py, train(): two DDP ranks, rank 0 clean on its batch, rank 1 noisy on
its own, the losses weighted (1 - alpha) * 2 and alpha * 2 and the gradients averaged by DDP. The
noise, drawn per tensor from the weights at w: for a tensor of >= 2 dims, N(0, sigma_i^2) elementwise
with sigma_i = gamma ||W[i]|| per slice i along dim 0 (per output filter, per fc row); for a 1-d tensor
one sigma = gamma (||w|| + 1e-16). The two passes do not depend on each other (the noise ignores the
clean gradient), so a driver may run them side by side; this class runs them one after the other, the
engine side by side, on the two halves of its batch (engine/grid.py, docs/methods.md#rwp).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Optional, Sequence

import torch
from torch import Tensor

from sam_repro.optim.methods.base import COMBINE_PER_DEVICE, HOST, MethodOptimizer, Needs, Rule, State, scratch
from sam_repro.optim.methods.kernels import device_norms


def filter_sigmas(params: Sequence[Tensor], gamma: float) -> list[Tensor]:
    """Each tensor's noise scale, shaped to broadcast over it: per slice along dim 0, or one for 1-d."""
    sigmas = []
    for w in params:
        if w.dim() > 1:
            sigmas.append(gamma * torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1).view(-1, *[1] * (w.dim() - 1)))
        else:
            sigmas.append(gamma * (torch.linalg.vector_norm(w) + 1e-16))
    return sigmas


@dataclass
class RWPRule(Rule):
    alpha: float
    gamma: float
    seed: int = 0

    needs: ClassVar[Needs] = Needs(combine=COMBINE_PER_DEVICE, two_batches=True)
    persistent: ClassVar[dict[str, str]] = {"generator": HOST}

    def generator(self, state: State, device: torch.device) -> torch.Generator:
        """The noise's generator, on the weights' device (created from `seed` on first use)."""
        if "generator" not in state:
            state["generator"] = torch.Generator(device=device).manual_seed(self.seed)
        return state["generator"]

    def draw_noise(self, params: Sequence[Tensor], k: int, state: State) -> list[Tensor]:
        """Independent noise for each of k devices, (k, *shape) per tensor."""
        gen = self.generator(state, params[0].device)
        noise = [torch.randn((k, *w.shape), generator=gen, dtype=w.dtype, device=w.device) for w in params]
        torch._foreach_mul_(noise, filter_sigmas(params, self.gamma))
        return noise

    def mix_weights(self) -> tuple[float, float]:
        """The engine's weights: the clean devices are half of all (of every process), so 2 (1 - alpha) on
        each clean one and 2 alpha on each noisy one make the mean over all of them (1 - alpha) x the
        clean mean + alpha x the noisy mean: the released code's loss weights (1 - alpha) x 2 and
        alpha x 2 before DDP's average."""
        return 2 * (1 - self.alpha), 2 * self.alpha

    def perturbation(self, params: Sequence[Tensor], grads: list[Tensor], state: State, lr: float) -> Tensor:
        return self.perturb_with(grads, self.draw_noise(params, grads[0].shape[0], state), state)

    def perturb_with(self, grads: list[Tensor], noise: Sequence[Tensor], state: State) -> Tensor:
        """Keep the clean gradients, and put `noise` (k, *shape) in their place as the perturbation."""
        clean = scratch(state, "grad_clean", grads)
        torch._foreach_copy_(clean, grads)
        torch._foreach_copy_(grads, list(noise))
        return device_norms(clean)

    def combine(self, grads: list[Tensor], state: State) -> None:
        torch._foreach_mul_(grads, self.alpha)
        torch._foreach_add_(grads, state["grad_clean"], alpha=1 - self.alpha)

    # -- checkpoints: the generator as its state ---------------------------------------------------
    def state_dict(self, state: State) -> dict[str, Any]:
        return {"generator": state["generator"].get_state()} if "generator" in state else {}

    def load_state_dict(self, state: State, saved: dict[str, Any], device: torch.device) -> None:
        if saved:
            self.generator(state, device).set_state(saved["generator"].cpu())


class RWP(MethodOptimizer):
    """RWP around a base optimizer: first_step after the clean backward, second_step after the noisy one."""

    rule: RWPRule

    def __init__(self, params: Iterable[Any], base_optimizer_cls: type[torch.optim.Optimizer], alpha: float = 0.5,
                 gamma: float = 0.01, seed: Optional[int] = None, **base_kwargs: Any) -> None:
        seed = torch.initial_seed() if seed is None else seed
        super().__init__(params, base_optimizer_cls, RWPRule(alpha, gamma, seed), **base_kwargs)
        self._noise: Optional[Sequence[Tensor]] = None

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, noise: Optional[Sequence[Tensor]] = None) -> bool:
        """Keep the clean gradient, move w to w + noise (`noise`, one tensor per parameter, replaces the
        draw: to replay a recorded run)."""
        self._noise = noise
        try:
            return super().first_step(zero_grad)
        finally:
            self._noise = None

    @torch.no_grad()
    def device_perturbations(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        if self._noise is None:
            return super().device_perturbations(params, grads)
        _, work = self.ordered(params, grads)  # the noise is given in the method's order
        norm = self.rule.perturb_with(work, [n.unsqueeze(0) for n in self._noise], self.method_state)
        self.last_grad_norm, self.last_perturbation_norm = norm.mean(), device_norms(work).mean()
        return grads
