"""SAM: Sharpness-Aware Minimization (Foret et al., ICLR 2021), as one fused optimizer step.

    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, nesterov=True)
    loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)   # w -> w + e(w)
    loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)  # restore w, base step

e(w) = rho * g / (||g||_2 + eps) with ONE norm over every parameter that has a gradient (all
groups, all devices), or rho * sign(g) for p = inf, or, with adaptive=True (ASAM, Kwon et al.
2021), rho * T^2 g / (||T g||_2 + eps) with T = |w| + eta. Per-group `rho` overrides the default;
a group with `adaptive_scale=False` takes T = 1 (the official ASAM code scales only parameters
whose name contains `weight`: the optimizer factory puts biases in such a group).

`device_perturbations` computes the same e(w) for k devices at once (the per-device
step: each device perturbs with its own gradient); tests hold it equal to `first_step`.

Why it is fast: every operation is a multi-tensor `torch._foreach_*` kernel over all parameters of
one (device, dtype) at once; the norm stays on the device (no `.item()`, no host sync); the copy of
w that `second_step` restores is one buffer per parameter, allocated on the first step and reused
(SAM's extra memory is 1x the parameter bytes); the perturbation is built in the gradient buffers
themselves, which the second backward overwrites anyway. Parameter storage is never replaced, so
the step works with torch.compile'd models and CUDA graphs.

Mixed precision:
- bf16 autocast needs nothing special.
- fp16 with a GradScaler: e(w) is invariant to the loss scale (g and ||g|| scale together), so the
  first pass needs no unscale. Restore w before the scaler's step, and let the scaler unscale,
  check for inf/NaN and skip the BASE optimizer's step:

        scaler.scale(loss_fn(model(x), y)).backward()
        opt.first_step(zero_grad=True)
        scaler.scale(loss_fn(model(x), y)).backward()
        opt.unperturb()                  # w restored exactly, whatever the gradients hold
        scaler.step(opt.base_optimizer)  # unscales; skipped if any gradient is inf/NaN
        scaler.update()
        opt.zero_grad()

  An inf in the first pass makes e(w) NaN, so the second pass's gradients are non-finite too and
  the scaler skips the step; w is restored by copy, so nothing leaks into the weights.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor


def _norms(tensors: list[Tensor]) -> list[Tensor]:
    """Per-tensor 2-norms of one bucket (one dtype, one device), accumulated in float32 or wider."""
    return list(torch._foreach_norm(tensors, 2, dtype=torch.promote_types(tensors[0].dtype, torch.float32)))


def _combine(norms: list[Tensor]) -> Tensor:
    """The 2-norm of the concatenation, from the parts' norms (on the first part's device)."""
    anchor = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(anchor, torch.float32) for n in norms]), 2)


def _device_norms(grads: list[Tensor], k: int) -> Tensor:
    """(k,): the 2-norm of each device's slice over every tensor (each tensor is (k, *shape))."""
    rows = [row for grad in grads for row in grad.unbind(0)]
    acc = torch.promote_types(grads[0].dtype, torch.float32)
    return torch.stack(torch._foreach_norm(rows, 2, dtype=acc)).view(len(grads), k).square().sum(dim=0).sqrt()


class SAM(torch.optim.Optimizer):
    """Wraps a base optimizer (SGD, AdamW, ...) with the two-pass SAM update."""

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer_cls: type[torch.optim.Optimizer],
        rho: float = 0.05,
        p: float = 2,
        adaptive: bool = False,
        eta: float = 0.0,
        eps: float = 1e-12,
        **base_kwargs: Any,
    ) -> None:
        if rho < 0:
            raise ValueError(f"rho={rho!r} is invalid: rho must be >= 0")
        if p not in (2, math.inf):
            raise ValueError(f"p={p!r} is invalid: p must be 2 or float('inf')")
        if adaptive and p != 2:
            raise ValueError("adaptive=True (ASAM) is defined for p=2 only")
        # SAM's epsilon is stored as "sam_eps": Adam-family base optimizers read group["eps"].
        defaults = dict(rho=rho, p=p, adaptive=adaptive, eta=eta, sam_eps=eps, adaptive_scale=True, **base_kwargs)
        super().__init__(params, defaults)
        # The base optimizer shares the very same group dicts, so a scheduler that sets
        # group["lr"] on either object is seen by both, and per-group rho lives beside lr.
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._perturbed: list[tuple[list[Tensor], list[Tensor]]] = []  # (params, saved w) per bucket
        # Set by each first_step, on the device (reading them is the caller's host sync, not ours):
        # the 2-norm of the gradient at w (all parameters with a gradient) and of the perturbation e.
        self.last_grad_norm: Optional[Tensor] = None
        self.last_perturbation_norm: Optional[Tensor] = None

    # -- the two halves of the step -------------------------------------------------------------
    # The public steps are thin no_grad wrappers around undecorated bodies: mutmut (make mutate,
    # docs/testing.md) skips decorated functions, and these bodies are the ones that must be tested.
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter that has a gradient from w to w + e(w), saving w."""
        self._perturb(zero_grad)

    @torch.no_grad()
    def unperturb(self) -> None:
        """Restore w exactly (a copy, bit-identical) without stepping. Idempotent."""
        self._restore()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w, then take the base optimizer's step with the gradient computed at w + e(w)."""
        self._restore_and_step(zero_grad)

    def _perturb(self, zero_grad: bool) -> None:
        if self._perturbed:
            raise RuntimeError("first_step() called twice: call second_step() or unperturb() in between")
        self._check_group_settings()
        buckets = self._buckets()
        if not buckets:
            self._perturbed = []
            return
        adaptive = self.param_groups[0]["adaptive"]
        p_norm = self.param_groups[0]["p"]
        plain = p_norm == 2 and not adaptive  # then ||g|| is the global norm below, and ||e|| follows from it
        if not plain:  # read before the gradient buffers turn into e
            self.last_grad_norm = _combine([n for b in buckets.values() for n in _norms(b["grads"])])
        # Scratch holds the perturbation while it is built: the gradient buffers themselves when
        # the caller discards them anyway (zero_grad=True), else a copy.
        scratch = {key: (b["grads"] if zero_grad else torch._foreach_mul(b["grads"], 1.0)) for key, b in buckets.items()}

        for key, b in buckets.items():
            self._save_weights(b)
            if adaptive and b["scale"]:
                # T = |w| + eta, built in the parameter storage (w is safe in the saved copy and
                # is copied back below): no extra buffer. scratch <- T g.
                torch._foreach_abs_(b["params"])
                torch._foreach_add_(b["params"], b["eta"])
                torch._foreach_mul_(scratch[key], b["params"])

        if p_norm == 2:
            # Norms accumulate in at least float32 (bf16 gradients would lose the sum otherwise).
            acc = {key: torch.promote_types(key[2], torch.float32) for key in buckets}
            norms = [torch._foreach_norm(scratch[key], 2, dtype=acc[key]) for key in buckets]
            anchor, acc_dtype = next(iter(buckets))[1], max(acc.values(), key=lambda d: d.itemsize)
            flat = [n.to(anchor, acc_dtype, non_blocking=True) for group in norms for n in group]
            global_norm = torch.linalg.vector_norm(torch.stack(flat), 2)
            if plain:  # e_b = rho_b * g_b / (||g|| + eps): its norm from the bucket norms, no extra pass
                self.last_grad_norm = global_norm
                squares = [(b["rho"] / (global_norm + b["eps"])) ** 2
                           * torch.stack([n.to(anchor, acc_dtype) for n in group]).square().sum()
                           for b, group in zip(buckets.values(), norms)]
                self.last_perturbation_norm = torch.stack(squares).sum().sqrt()
        e_norms: list[Tensor] = []

        for key, b in buckets.items():
            s = scratch[key]
            if adaptive and b["scale"]:
                torch._foreach_mul_(s, b["params"])  # T^2 g
                torch._foreach_copy_(b["params"], b["saved"])  # back to w
            if p_norm == 2:
                scale = b["rho"] / (global_norm.to(b["params"][0].device) + b["eps"])
                torch._foreach_mul_(s, scale)
            else:  # p = inf: e = rho * sign(g)
                torch._foreach_sign_(s)
                torch._foreach_mul_(s, b["rho"])
            torch._foreach_add_(b["params"], s)
            if not plain:  # ||e|| before s (the gradient storage) is zeroed: one foreach norm
                e_norms += _norms(s)
            if zero_grad:
                torch._foreach_zero_(s)  # s is the gradient storage: ready for the second backward
        if not plain:
            self.last_perturbation_norm = _combine(e_norms)
        self._perturbed = [(b["params"], b["saved"]) for b in buckets.values()]

    def _restore(self) -> None:
        for params, saved in self._perturbed:
            torch._foreach_copy_(params, saved)
        self._perturbed = []

    def _restore_and_step(self, zero_grad: bool) -> None:
        self._restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """The whole SAM step, for users of the popular port's interface.

        Call backward on the loss at w first; `closure` must re-evaluate the loss (at w + e) and
        call backward. Returns what the closure returned.
        """
        if closure is None:
            raise RuntimeError(
                "SAM.step needs a closure that re-evaluates the loss and calls backward; "
                "or call first_step() and second_step() yourself"
            )
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    @torch.no_grad()
    def device_perturbations(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """e(w) for k devices at once, each from its own gradient: `grads[i]` is (k, *params[i].shape),
        the k devices' gradients of `params[i]` at w (L2 term included). Returns the k perturbations
        per parameter, built in place in `grads`. The same formula as `first_step` (p = 2 with one norm
        per device over all parameters, p = inf, ASAM), batched over the leading dimension: a handful
        of kernels whatever k is, and no host synchronization."""
        self._check_group_settings()
        k = grads[0].shape[0]
        settings = self._settings_of(params)
        adaptive, p_norm = self.param_groups[0]["adaptive"], self.param_groups[0]["p"]
        # the logged norms (last_grad_norm, last_perturbation_norm): means over the k devices
        self.last_grad_norm = _device_norms(grads, k).mean()
        if p_norm != 2:  # p = inf: e = rho * sign(g), per element
            for grad, g in zip(grads, settings):
                grad.sign_().mul_(g["rho"])
            self.last_perturbation_norm = _device_norms(grads, k).mean()
            return grads
        # T = |w| + eta for scaled ASAM parameters (None: T = 1); broadcast over the k devices
        t = [(w.abs() + g["eta"]) if adaptive and g.get("adaptive_scale", True) else None for w, g in zip(params, settings)]
        for grad, ti in zip(grads, t):
            if ti is not None:
                grad.mul_(ti)  # T g
        # one norm per device over every parameter: the squared norms of the k rows of each tensor
        rows = [row for grad in grads for row in grad.unbind(0)]
        acc = torch.promote_types(grads[0].dtype, torch.float32)
        squares = torch.stack(torch._foreach_norm(rows, 2, dtype=acc)).view(len(grads), k).square()
        norm = squares.sum(dim=0).sqrt()  # (k,)
        eps = self.param_groups[0]["sam_eps"]
        for grad, ti, g in zip(grads, t, settings):
            scale = (g["rho"] / (norm + eps)).to(grad.dtype).view(k, *([1] * (grad.dim() - 1)))
            grad.mul_(scale)
            if ti is not None:
                grad.mul_(ti)  # rho * T^2 g / ||T g||
        self.last_perturbation_norm = _device_norms(grads, k).mean()
        return grads

    def _settings_of(self, params: list[Tensor]) -> list[dict[str, Any]]:
        """The param group of each parameter (rho, eta, adaptive_scale live there)."""
        group_of = {id(q): group for group in self.param_groups for q in group["params"]}
        return [group_of[id(q)] for q in params]

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (momentum buffers ...) and the groups, SAM settings included."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups

    # -- internals ------------------------------------------------------------------------------
    def _check_group_settings(self) -> None:
        # One global norm needs one geometry: p and adaptive must agree across groups.
        first = self.param_groups[0]
        for group in self.param_groups[1:]:
            if group["p"] != first["p"] or group["adaptive"] != first["adaptive"]:
                raise ValueError("all parameter groups of SAM must share p and adaptive (one global norm)")

    def _buckets(self) -> dict[tuple, dict[str, Any]]:
        """Parameters with a gradient, bucketed by (group, device, dtype) for the foreach kernels."""
        buckets: dict[tuple, dict[str, Any]] = defaultdict(lambda: {"params": [], "grads": []})
        for index, group in enumerate(self.param_groups):
            for param in group["params"]:
                if param.grad is None:
                    continue  # frozen or unused in this pass: not perturbed, not restored
                b = buckets[(index, param.device, param.dtype)]
                b["params"].append(param)
                b["grads"].append(param.grad)
                b["rho"], b["eta"], b["eps"] = group["rho"], group["eta"], group["sam_eps"]
                b["scale"] = group.get("adaptive_scale", True)
        return dict(buckets)

    def _save_weights(self, bucket: dict[str, Any]) -> None:
        saved = []
        for param in bucket["params"]:
            state = self.state[param]
            if "sam_w" not in state:  # allocated once, reused every step
                state["sam_w"] = torch.empty_like(param, memory_format=torch.preserve_format)
            saved.append(state["sam_w"])
        torch._foreach_copy_(saved, bucket["params"])
        bucket["saved"] = saved
