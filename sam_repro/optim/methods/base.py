"""What every SAM-family method shares: its rule (written once, over per-device tensor lists) and the
hand-driven optimizer class that runs the rule for one device.

A method is a `Rule`: how it turns the gradients at w into a perturbation e (and updates its state),
whether a step perturbs at all, how it combines the gradient at w + e (and the one at w) into the
gradient the base optimizer applies, and what it does after the base optimizer's step. Every tensor a
rule sees has a leading device axis, (k, *param_shape), except the weights, which the devices share.
Its `Needs` tell whoever drives it (the engine's step, or `MethodOptimizer` below with k = 1) which
passes and extra forwards to run; a driver dispatches on them, never on the method's name.

The rule's state is a dict: tensors (running means, stored components), counters as 0-dim CPU int64
tensors (a host decision such as "does this step perturb" reads them without a device sync), random
generators. `Rule.persistent` names what a checkpoint carries; everything else is scratch reused
from step to step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from sam_repro.optim.methods.kernels import device_norms, mul_rows_

State = dict[str, Any]
HOST, DEVICE = "host", "device"  # where a persistent state entry lives (a counter on the host, a mean with the weights)
# How the gradient at w + e becomes the applied one: as it is (SAM); by combine() on each device's own
# gradients, then averaged over the devices (GSAM, LookSAM, RWP); by combine() on gradients already
# averaged over every device and process, its kept copy of the gradient at w included (WSAM).
COMBINE_NONE, COMBINE_PER_DEVICE, COMBINE_ON_MEAN = "none", "per_device", "on_mean"


@dataclass(frozen=True)
class Needs:
    """What a method asks of the step that drives it, beyond SAM's two passes on one batch."""

    combine: str = COMBINE_NONE  # see COMBINE_* above
    plain_per_device: bool = False  # a step without a perturbed pass needs each device's gradient at w (LookSAM)
    first_pass_synchronized: bool = False  # the gradient at w is averaged over all devices before e (VaSSO)
    skips_perturbation: bool = False  # on some steps no perturbed pass: rule.perturbs(state) says which
    partial_first_pass: bool = False  # only rule.first_pass_mask(state)'s tensors need a gradient at w (ESAM)
    selects_examples: bool = False  # ESAM: per-example losses at w and at w + e, the perturbed pass on a subset
    # RWP: the batch splits into a clean half (gradient at w) and a noisy half (gradient at w + noise drawn
    # by rule.draw_noise, independent of any gradient), run side by side; rule.mix_weights mixes them
    two_batches: bool = False
    after_step: bool = False  # rule.after_step() moves the weights after the base optimizer's step (WSAM)


class Rule:
    """One method's update. Subclasses set `needs`, `persistent` and override what differs from SAM."""

    needs: ClassVar[Needs] = Needs()
    persistent: ClassVar[dict[str, str]] = {}  # state key -> HOST | DEVICE, what a checkpoint carries

    def perturbs(self, state: State) -> bool:
        """Whether this step runs the perturbed pass (a host decision: no device sync)."""
        return True

    def passes_per_step(self) -> tuple[float, float]:
        """(forwards, backwards) per step on average, the extra no-grad forwards counted."""
        return 2.0, 2.0

    def perturbation(self, params: Sequence[Tensor], grads: list[Tensor], state: State, lr: float) -> Tensor:
        """Turn `grads` (k, *shape), the gradients at w, into the perturbations e, in place. `params` are
        the weights w (*shape). Returns the (k,) norms of the gradients the perturbation was formed from."""
        raise NotImplementedError

    def kept_first_gradient(self, state: State) -> Optional[list[Tensor]]:
        """The copy of the gradients at w that combine() reads, for a driver to average over processes
        first when `needs.combine` is COMBINE_ON_MEAN (None: the rule keeps none)."""
        return None

    def combine(self, grads: list[Tensor], state: State) -> None:
        """Turn `grads` (k, *shape), the gradients at w + e, into the applied gradients, in place."""

    def plain(self, grads: list[Tensor], state: State) -> None:
        """The applied gradients of a step without a perturbed pass, from the gradients at w, in place."""

    def draw_noise(self, params: Sequence[Tensor], k: int, state: State) -> list[Tensor]:
        """`needs.two_batches`: the noise of k noisy devices, (k, *shape) per tensor of `params` (w)."""
        raise NotImplementedError(f"{type(self).__name__} does not run on two batches")

    def mix_weights(self) -> tuple[float, float]:
        """`needs.two_batches`: the weights of a clean and of a noisy device's gradient, such that the mean
        over the devices of every process of weight x gradient is the applied gradient."""
        raise NotImplementedError(f"{type(self).__name__} does not run on two batches")

    def after_step(self, params: Sequence[Tensor], state: State, lrs: Sequence[float]) -> None:
        """After the base optimizer's step (`lrs`: each parameter's learning rate)."""

    def end_step(self, state: State) -> None:
        """The step's last act: counters, draws for the next step."""

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self, state: State) -> dict[str, Any]:
        """The persistent part of `state` (references: the caller saves or copies them)."""
        return {key: state[key] for key in self.persistent if key in state}

    def load_state_dict(self, state: State, saved: dict[str, Any], device: torch.device) -> None:
        """Restore `saved` into `state`: counters on the host, tensors with the weights on `device`."""
        for key, value in saved.items():
            where = self.persistent[key]
            target = torch.device("cpu") if where == HOST else device
            state[key] = [t.to(target).clone() for t in value] if isinstance(value, (list, tuple)) else value.to(target).clone()


# -- helpers the rules share ------------------------------------------------------------------------
def counter(state: State, key: str = "step") -> Tensor:
    """A 0-dim int64 CPU counter in `state`, created at 0."""
    if key not in state:
        state[key] = torch.zeros((), dtype=torch.int64)
    return state[key]


def scratch(state: State, key: str, like: Sequence[Tensor]) -> list[Tensor]:
    """Buffers shaped like `like`, allocated once and reused (reallocated if the shapes change)."""
    bufs = state.get(key)
    if bufs is None or [b.shape for b in bufs] != [t.shape for t in like]:
        bufs = [torch.empty_like(t, memory_format=torch.preserve_format) for t in like]
        state[key] = bufs
    return bufs


def check_rows(state: State, key: str, like: Sequence[Tensor]) -> None:
    """A persistent per-device entry must keep its device count: a run resumed on another layout fails."""
    have = state[key][0].shape[0]
    want = like[0].shape[0]
    if have != want:
        raise ValueError(f"the method's state {key!r} holds {have} devices, the step has {want}: "
                         "resume with the same devices (device_batch, m, processes) as the run was started with")


def sam_direction_(grads: list[Tensor], rho: float, eps: float) -> Tensor:
    """grads <- rho * g / (||g|| + eps), one norm per device over every tensor. Returns the (k,) norms."""
    norm = device_norms(grads)
    mul_rows_(grads, rho / (norm + eps))
    return norm


# -- the hand-driven optimizer ----------------------------------------------------------------------
class MethodOptimizer(torch.optim.Optimizer):
    """A method's rule driven by hand for one device, with the two-step usage of `SAM`:

        loss_fn(model(x), y).backward()
        if opt.first_step(zero_grad=True):     # w -> w + e; False on a step without a perturbed pass
            loss_fn(model(x), y).backward()    # the gradient at w + e
        opt.second_step(zero_grad=True)        # restore w, combine, base step

    or `opt.step(closure)` after the first backward, the closure re-evaluating the loss and calling
    backward. The base optimizer shares the param groups (a scheduler may talk to either); the rule's
    hyperparameters live in the rule. `state_dict()` holds the base optimizer's state and the rule's
    (`"method"`): a class loaded from it continues exactly.
    """

    def __init__(self, params: Iterable[Any], base_optimizer_cls: type[torch.optim.Optimizer], rule: Rule,
                 **base_kwargs: Any) -> None:
        super().__init__(params, dict(base_kwargs))
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.rule = rule
        self.method_state: State = {}
        self._params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        self._saved: Optional[list[Tensor]] = None  # w while the weights are perturbed (one buffer, reused)
        self._weights_buffer: Optional[list[Tensor]] = None
        self._perturbed = False
        # Set by each perturbation, on the device (means over devices): the norm of the gradient the
        # perturbation was formed from, and of the perturbation e.
        self.last_grad_norm: Optional[Tensor] = None
        self.last_perturbation_norm: Optional[Tensor] = None

    # -- the parts a driver calls ----------------------------------------------------------------
    @property
    def params(self) -> list[Tensor]:
        """The parameters the method updates, in param-group order (the order of every tensor list)."""
        return self._params

    def perturbs_now(self) -> bool:
        """Whether this step runs the perturbed pass."""
        return self.rule.perturbs(self.method_state)

    @contextlib.contextmanager
    def first_pass(self) -> Iterator[None]:
        """Around the forward/backward at w: with `needs.partial_first_pass` (ESAM) the tensors the rule
        does not keep for this step get no gradient (requires_grad off), as in the released code."""
        dropped = []
        if self.rule.needs.partial_first_pass:
            keep = self.rule.first_pass_mask(self.method_state, len(self._params))
            dropped = [p for p, k in zip(self._params, keep) if not k]
        for p in dropped:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in dropped:
                p.requires_grad_(True)

    @torch.no_grad()
    def device_perturbations(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """e for k devices at once, in place in `grads` (each (k, *shape): the devices' gradients at w of
        `params`, in any order): the engine's per-device call, with the signature of
        `SAM.device_perturbations`."""
        ours, work = self.ordered(params, grads)
        norm = self.rule.perturbation(ours, work, self.method_state, self.lr)
        self.last_grad_norm = norm.mean()
        self.last_perturbation_norm = device_norms(work).mean()
        return grads

    @torch.no_grad()
    def device_combine(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """The applied gradients (k, *shape) from the gradients at w + e of `params`, in place."""
        self.rule.combine(self.ordered(params, grads)[1], self.method_state)
        return grads

    @torch.no_grad()
    def device_plain(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """The applied gradients of a step without a perturbed pass, from the gradients at w, in place."""
        self.rule.plain(self.ordered(params, grads)[1], self.method_state)
        return grads

    @torch.no_grad()
    def device_noise(self, params: list[Tensor], out: list[Tensor], rows: slice, total: int) -> list[Tensor]:
        """`needs.two_batches`: the noise of `total` noisy devices drawn (every process draws all of them, so
        that one generator state, the one a checkpoint saves, serves every process), rows `rows` of it
        written into `out` ((rows, *shape) beside each of `params`, in any order)."""
        ours, work = self.ordered(params, out)
        noise = self.rule.draw_noise(ours, total, self.method_state)
        torch._foreach_copy_(work, [n[rows] for n in noise])
        return out

    @torch.no_grad()
    def device_mix(self, params: list[Tensor], grads: list[Tensor], noise: list[Tensor], clean: int) -> list[Tensor]:
        """`needs.two_batches`: `grads` (k, *shape), devices [0, clean) at w and the others at w + `noise`,
        weighted in place so that their mean over the devices (and processes) is the applied gradient.
        The logged norms: the clean gradients' mean norm and the noise's, over every process's devices (the
        clean devices are half of them, so twice the mean of each role's share of this process's)."""
        _, work = self.ordered(params, grads)
        _, drawn = self.ordered(params, noise)
        k = work[0].shape[0]
        is_clean = torch.arange(k, device=work[0].device) < clean
        self.last_grad_norm = (device_norms(work) * is_clean).mean() * 2
        self.last_perturbation_norm = (device_norms(drawn) * ~is_clean).mean() * 2
        clean_weight, noisy_weight = self.rule.mix_weights()
        coef = torch.full((k,), noisy_weight, dtype=work[0].dtype, device=work[0].device)
        coef[:clean] = clean_weight  # fills on the device: no host-to-device copy, which would wait for it
        mul_rows_(work, coef)
        return grads

    def ordered(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """`params` and `grads` in the method's own order (`self.params`: its state and masks follow it);
        the lists are reordered, the tensors are the caller's."""
        if len(params) == len(self._params) and all(p is q for p, q in zip(params, self._params)):
            return list(params), list(grads)
        where = {id(p): i for i, p in enumerate(params)}
        missing = [i for i, p in enumerate(self._params) if id(p) not in where]
        if missing or len(params) != len(self._params):
            raise ValueError(f"the method needs the gradients of exactly its {len(self._params)} parameters, "
                             f"got {len(params)} ({len(missing)} of its own missing)")
        order = [where[id(p)] for p in self._params]
        return [params[i] for i in order], [grads[i] for i in order]

    @torch.no_grad()
    def finish_step(self) -> None:
        """After the base optimizer's step: the rule's own update (WSAM) and its end-of-step bookkeeping."""
        if self.rule.needs.after_step:
            self.rule.after_step(self._params, self.method_state, self._lrs())
        self.rule.end_step(self.method_state)

    @property
    def lr(self) -> float:
        """The learning rate of the first param group (GSAM ties rho to it)."""
        return float(self.param_groups[0]["lr"])

    def _lrs(self) -> list[float]:
        lr_of = {id(p): float(g["lr"]) for g in self.param_groups for p in g["params"]}
        return [lr_of[id(p)] for p in self._params]

    # -- the hand-driven step --------------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> bool:
        """w -> w + e(w) from the gradients in .grad, saving w. Returns False (and leaves everything as it
        is) on a step without a perturbed pass: then call second_step() without a second backward."""
        if self._perturbed:
            raise RuntimeError("first_step() called twice: call second_step() or unperturb() in between")
        if not self.perturbs_now():
            return False
        grads = self._grads()
        work = grads if zero_grad else [g.clone() for g in grads]
        self._perturb(work)
        if zero_grad:
            torch._foreach_zero_(work)
        return True

    def _perturb(self, work: list[Tensor]) -> None:
        self.device_perturbations(self._params, work)
        self._save_weights()
        torch._foreach_add_(self._params, [e[0] for e in work])
        self._perturbed = True

    @torch.no_grad()
    def unperturb(self) -> None:
        """Restore w exactly (a copy) without stepping. Idempotent."""
        if self._perturbed:
            torch._foreach_copy_(self._params, self._saved)
            self._perturbed = False

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w, form the applied gradient in .grad, take the base optimizer's step, then the rule's."""
        grads = self._grads()
        if self._perturbed:
            self.unperturb()
            self.device_combine(self._params, grads)
        else:
            self.device_plain(self._params, grads)
        self.base_optimizer.step()
        self.finish_step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """The whole step after the backward at w: `closure` re-evaluates the loss (at w + e) and calls
        backward; it is not called on a step without a perturbed pass. Returns what it returned."""
        if closure is None:
            raise RuntimeError(f"{type(self).__name__}.step needs a closure that re-evaluates the loss and calls "
                               "backward; or call first_step() and second_step() yourself")
        loss = None
        if self.first_step(zero_grad=True):
            with torch.enable_grad():
                loss = closure()
        self.second_step()
        return loss

    # -- state -------------------------------------------------------------------------------------
    def method_state_dict(self) -> dict[str, Any]:
        """The rule's persistent state (running means, stored components, counters, generators)."""
        return self.rule.state_dict(self.method_state)

    def load_method_state_dict(self, saved: dict[str, Any]) -> None:
        self.method_state = {}
        self.rule.load_state_dict(self.method_state, saved, self._params[0].device)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and groups, and the rule's under "method"."""
        return {**self.base_optimizer.state_dict(), "method": self.method_state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        method = state_dict.pop("method", {})
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.load_method_state_dict(method)

    # -- internals ---------------------------------------------------------------------------------
    def _grads(self) -> list[Tensor]:
        """Each parameter's .grad as a (1, *shape) view (a zero gradient where there is none)."""
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad.unsqueeze(0) for p in self._params]

    def _save_weights(self) -> None:
        if self._weights_buffer is None:
            self._weights_buffer = [torch.empty_like(p, memory_format=torch.preserve_format) for p in self._params]
        torch._foreach_copy_(self._weights_buffer, self._params)
        self._saved = self._weights_buffer
