"""Random draws shared by SAM's two passes, and the Shake-Shake / ShakeDrop layers.

SAM evaluates the loss twice per step, at w and at w + e. The official code (google-research/sam)
feeds both passes the same PRNG key, so dropout masks, Shake-Shake gates and the ShakeDrop alpha /
beta coefficients are identical in both. The ShakeDrop keep/drop MASK is the exception: the
official train.py swaps `jax.random.bernoulli` for a hardware generator that ignores its key, so
the mask is drawn afresh in the perturbed pass (docs/paper.md#random-layers-in-the-two-passes). In
the first pass the shake layers also use the "true gradient" (the forward coefficient in the
backward pass too), while normal training and SAM's second pass use an independent backward
coefficient. Here that is one small mechanism:

- Every stochastic layer draws all its random numbers inside `forward`, from torch's global
  generator on the input's device, and draws the same number of values whatever its mode. The
  generator therefore advances identically in both passes.
- `RandomDraws.capture()` snapshots the generator state(s) before the first pass and
  `RandomDraws.replay()` restores them before the second: every stochastic layer (these, nn.Dropout,
  timm's DropPath) repeats its draws. Snapshots are host-side copies of the generator's seed and
  offset (torch.get_rng_state / torch.cuda.get_rng_state): no device synchronization.
- ShakeDrop draws two mask uniforms per sample and reads the second one in the perturbed pass
  (`StochasticLayer.perturbed_pass`, set by the step), so its mask is fresh there while everything
  else is replayed; `ShakeDrop.replay_mask = True` (`optim.shakedrop_mask=replay`) reads the first
  one in both passes instead.
- `set_true_gradient(model, enabled)` flips `StochasticLayer.true_gradient` on every layer.

The layers keep Python control flow on module attributes only (training, true_gradient,
perturbed_pass), never on tensor values, so torch.compile traces them without graph breaks, and
they work under torch.func transforms (vmap over device groups, grad).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn


class RandomDraws:
    """Snapshot and restore the random generators a training step draws from."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._cpu_state: Optional[torch.Tensor] = None
        self._cuda_state: Optional[torch.Tensor] = None

    def capture(self) -> None:
        """Snapshot the CPU generator and, for a CUDA device, that device's generator."""
        self._cpu_state = torch.get_rng_state()
        if self.device.type == "cuda":
            self._cuda_state = torch.cuda.get_rng_state(self.device)

    def replay(self) -> None:
        """Restore the last snapshot: the next forward pass repeats the captured draws."""
        if self._cpu_state is None:
            raise RuntimeError("RandomDraws.replay() called before capture()")
        torch.set_rng_state(self._cpu_state)
        if self._cuda_state is not None:
            torch.cuda.set_rng_state(self._cuda_state, self.device)


class StochasticLayer(nn.Module):
    """Base class of layers whose backward may use a coefficient other than the forward one.

    `true_gradient = True` (SAM's first pass, as in the official code): backward uses the forward
    coefficient, i.e. the exact gradient of the function computed. False: an independent one.
    """

    true_gradient: bool = False
    perturbed_pass: bool = False  # SAM's second pass (at w + e): ShakeDrop redraws its mask there


def set_true_gradient(model: nn.Module, enabled: bool) -> None:
    """Set `true_gradient` on every StochasticLayer inside `model`."""
    for module in model.modules():
        if isinstance(module, StochasticLayer):
            module.true_gradient = enabled


class _ScaleGrad(torch.autograd.Function):
    """y = x * forward_coef; dL/dx = dL/dy * backward_coef (coefficients carry no gradient).

    Written with `setup_context` and an automatic vmap rule so that torch.func (the per-device
    step's vmap over device groups and per-group gradients) can transform it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, forward_coef: torch.Tensor, backward_coef: torch.Tensor) -> torch.Tensor:
        return x * forward_coef

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (backward_coef,) = ctx.saved_tensors
        return grad_out * backward_coef, None, None


def scale_grad(x: torch.Tensor, forward_coef: torch.Tensor,
               backward_coef: Optional[torch.Tensor]) -> torch.Tensor:
    """Multiply by `forward_coef` in the forward pass and by `backward_coef` in the backward pass;
    `backward_coef=None` is the true gradient (a plain product: backward uses `forward_coef`).

    Equivalent to the official stop-gradient trick `x*bwd + stop_gradient(x*fwd - x*bwd)` with one
    multiply instead of four. Coefficients are cast to x's dtype so bf16 activations stay bf16.
    """
    forward_coef = forward_coef.to(x.dtype)
    if backward_coef is None:
        # A plain product rather than _ScaleGrad(x, c, c): Dynamo cannot trace an
        # autograd.Function that gets the same tensor twice.
        return x * forward_coef
    return _ScaleGrad.apply(x, forward_coef, backward_coef.to(x.dtype))


def _per_sample_uniform(count: int, x: torch.Tensor) -> torch.Tensor:
    """`count` uniform [0, 1) values per sample, shape (count, N, 1, 1, 1), fp32 on x's device.

    One call per layer and forward, independent of dtype and mode: the generator advances by the
    same amount in every pass (what makes RandomDraws.replay exact).
    """
    shape = (count, x.shape[0]) + (1,) * (x.dim() - 1)
    return torch.rand(shape, device=x.device)


class ShakeShake(StochasticLayer):
    """Shake-Shake mix of two branches (Gastaldi 2017), per-sample coefficients.

    Train: forward a*alpha + b*(1-alpha), backward with beta (alpha and beta ~ U[0, 1]
    independent; official `shake_shake_train`). Both are always drawn, even when true_gradient
    reuses alpha. Eval: 0.5 * (a + b) (official `shake_shake_eval`).
    """

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return 0.5 * (a + b)
        alpha, beta = _per_sample_uniform(2, a)  # beta is drawn even when unused (see module doc)
        if self.true_gradient:
            return scale_grad(a, alpha, None) + scale_grad(b, 1.0 - alpha, None)
        return scale_grad(a, alpha, beta) + scale_grad(b, 1.0 - alpha, 1.0 - beta)


class ShakeDrop(StochasticLayer):
    """ShakeDrop (Yamada et al. 2018, Eqn 6) on a residual branch, per-sample coefficients.

    Train: b ~ Bernoulli(keep_prob), alpha ~ U[alpha_range], beta ~ U[beta_range]; forward
    multiplies by b + alpha - b*alpha, backward by b + beta - b*beta (official `shake_drop_train`;
    `keep_prob` is the official `mask_prob`, the probability that the branch passes unchanged).
    Eval: E[b + alpha - b*alpha] * x (official `shake_drop_eval`).
    In SAM's perturbed pass b is drawn afresh (as the official code's keyless mask generator did)
    unless `replay_mask` is set; alpha and beta are always replayed.
    """

    replay_mask: bool = False  # optim.shakedrop_mask=replay: the perturbed pass reuses the first pass's mask

    def __init__(self, keep_prob: float, alpha_range: Tuple[float, float] = (-1.0, 1.0),
                 beta_range: Tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__()
        if not 0.0 <= keep_prob <= 1.0:
            raise ValueError(f"ShakeDrop keep_prob must be in [0, 1]; got {keep_prob}")
        self.keep_prob = float(keep_prob)
        self.alpha_range = (float(alpha_range[0]), float(alpha_range[1]))
        self.beta_range = (float(beta_range[0]), float(beta_range[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (alpha_lo, alpha_hi), (beta_lo, beta_hi) = self.alpha_range, self.beta_range
        if not self.training:
            mean_alpha = 0.5 * (alpha_lo + alpha_hi)
            return (self.keep_prob + mean_alpha - self.keep_prob * mean_alpha) * x
        u = _per_sample_uniform(4, x)  # mask, alpha, beta, and the perturbed pass's fresh mask
        mask_u = u[3] if self.perturbed_pass and not self.replay_mask else u[0]
        keep = (mask_u < self.keep_prob).float()
        alpha = alpha_lo + (alpha_hi - alpha_lo) * u[1]
        beta = beta_lo + (beta_hi - beta_lo) * u[2]
        forward_coef = keep + alpha - keep * alpha
        backward_coef = None if self.true_gradient else keep + beta - keep * beta
        return scale_grad(x, forward_coef, backward_coef)

    def extra_repr(self) -> str:
        return f"keep_prob={self.keep_prob:.4f}, alpha={self.alpha_range}, beta={self.beta_range}"
