"""The grid backend of the step: P members (runs) x k devices each, one functional core.

A solo run that emulates the paper's devices is one member; a packed sweep (hydra/launcher=pack)
is several members of one shape, each with its own seed, data, noise, optimizer, lr, weight decay,
schedule, rho and clipping. The official code writes its step once for one device and lets pmap make
it per-device; here torch.func does the mapping over the (member, device) grid:

- the members' parameters live in one stacked tensor per parameter name, (P, *shape), and their
  gradients in another; each member's nn.Parameter and its .grad are views of their row, so the
  member's own optimizer steps its own row in place and its checkpoint is an ordinary state_dict
  (one member alone: the views are of its own tensors, nothing is copied);
- each (member, device) cell gets its own copy of the BatchNorm running statistics (P, k, ...),
  averaged over the devices after the step: what k real devices end with once the official code
  averages their statistics (r <- 0.9 r + 0.1 * mean_d s_d, linear in r);
- SGD: one forward of every cell with the member's weights shared by its devices, one backward: the
  mean of the devices' gradients, per member;
- SAM: every cell's gradient at w (vmap of grad), L2 term included; each member's own SAM object
  turns its rows into e (SAM.device_perturbations: its rho, one norm per device); then one forward
  of the P x k perturbed weight sets w + e_d and one backward. The loss summed over members has, in
  each member's rows, exactly that member's gradient: members never mix.
- a method on two batches (RWP): the devices halved into clean ones at w and noisy ones at w + their
  own noise (`two_halves`: under DDP the even ranks clean, the odd ones noisy), one pass over all of
  them side by side, each device's gradient weighted by the method before the mean; the BatchNorm
  statistics kept are the clean devices' (`bn_stats=first_pass`).

Under autocast, a convolution whose weights are batched by vmap is not cast: the weights and the
input are cast by hand (`_low_precision`), BatchNorm kept in fp32 (`_batchnorm_in_float`). What
differs from running the members alone: dropout/ShakeDrop draws are made by the pack (vmap's
"different" randomness), so a stochastic member is statistically, not bitwise, its solo run; float32
sums may be ordered differently. One member draws exactly what its solo run draws.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from sam_repro.engine.passes import (Member, Passes, StepConfig, StepStats, apply_gradients, batchnorm_buffers,
                                     clip_norms, device_size, loss_scale, member_stats, per_example_losses,
                                     running_stats_frozen, to_layout)
from sam_repro.optim.methods import MethodOptimizer
from sam_repro.optim.methods.base import COMBINE_ON_MEAN, COMBINE_PER_DEVICE, Needs


def _stack(tensors: Sequence[Tensor]) -> Tensor:
    """(P, *shape), each row in the layout of its tensor (a channels_last weight stays channels_last)."""
    first = tensors[0]
    if first.dim() == 4 and not first.is_contiguous() and first.is_contiguous(memory_format=torch.channels_last):
        return torch.stack([t.movedim(1, -1) for t in tensors]).movedim(-1, 2)
    return torch.stack(list(tensors))


def _owned(t: Tensor) -> Tensor:
    """`t`, or a copy when it shares memory across its elements (vmap's gradient of a parameter the loss
    never reaches: zeros expanded with stride 0), so that it can be changed in place."""
    shared = any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape))
    return t.clone() if shared else t


def _set_buffer(model: nn.Module, name: str, value: Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    model.get_submodule(owner)._buffers[leaf] = value


@dataclass(frozen=True)
class Halves:
    """Which of a process's k devices run the clean pass and which the noisy one, for a method whose step
    runs on two batches (RWP, `needs.two_batches`)."""

    clean: int  # devices [0, clean) are clean (gradient at w), [clean, k) noisy (gradient at w + noise)
    noise_rows: slice  # this process's noisy devices among the rows of the noise every process draws
    noise_total: int  # the noisy devices of all processes: the rows drawn


def two_halves(k: int, rank: int = 0, world_size: int = 1) -> Halves:
    """One process: the batch's first half of devices is clean, the second noisy (the released 2-GPU run
    with the same total batch: rank 0 clean on batch A, rank 1 noisy on batch B). Under DDP, as the
    released code: the even ranks clean, the odd ranks noisy, each with all its k devices."""
    if world_size == 1:
        if k % 2:
            raise ValueError(f"a step on two batches splits its devices into a clean and a noisy half: {k} devices "
                             "do not split (choose device_batch so that the batch makes an even number of them)")
        return Halves(k // 2, slice(0, k // 2), k // 2)
    if world_size % 2:
        raise ValueError(f"a step on two batches runs the clean pass on the even ranks and the noisy one on the odd "
                         f"ranks: {world_size} processes do not pair up")
    total = world_size // 2 * k
    if rank % 2 == 0:
        return Halves(k, slice(0, 0), total)
    first = rank // 2 * k
    return Halves(0, slice(first, first + k), total)


class GridStep:
    """Callable (x, y) of shape (P, B, ...) and (P, B) -> one StepStats per member; steps every active
    member's optimizer (`active[i] = False` freezes member i: a diverged run)."""

    def __init__(self, members: Sequence[Member], cfg: StepConfig, scaler: Optional[torch.amp.GradScaler] = None,
                 grad_reduce: Optional[Callable[[list[Tensor]], None]] = None, rank: int = 0,
                 world_size: int = 1) -> None:
        """`rank`, `world_size`: this process among those `grad_reduce` averages over (a method on two
        batches gives the even ranks the clean pass, the odd ranks the noisy one)."""
        self.members, self.cfg, self.scaler, self.grad_reduce = list(members), cfg, scaler, grad_reduce
        self.rank, self.world_size = rank, world_size
        self.size = len(self.members)
        alone = self.size == 1
        # The module torch.func calls: a member's own when it is alone, else a private copy (members' own
        # parameters become views of the stack; none of them must be the template)
        module = self.members[0].module if alone else copy.deepcopy(self.members[0].module)
        device = next(module.parameters()).device
        self.passes = Passes(module, cfg, device)
        self.uses_sam = self.members[0].sam is not None
        # what a SAM-family method asks of the step beyond SAM's two passes (optim/methods/base.py)
        self.needs = self.members[0].sam.rule.needs if isinstance(self.members[0].sam, MethodOptimizer) else Needs()
        self.active = [True] * self.size
        params = [dict(m.module.named_parameters()) for m in self.members]
        self.names = [n for n, p in params[0].items() if p.requires_grad]
        self.member_params = [[p[n] for n in self.names] for p in params]
        for row in self.member_params:
            for p in row:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        stats = [batchnorm_buffers(m.module) for m in self.members]
        if alone:  # views of the member's own tensors
            self.weights = {n: p.detach().unsqueeze(0) for n, p in zip(self.names, self.member_params[0])}
            self.grads = {n: p.grad.unsqueeze(0) for n, p in zip(self.names, self.member_params[0])}
            self.buffers = {n: b.unsqueeze(0) for n, b in stats[0].items()}
        else:  # one stack per tensor; the members' own become views of their rows
            self.weights = {n: _stack([row[j].detach() for row in self.member_params]) for j, n in enumerate(self.names)}
            self.grads = {n: torch.zeros_like(w) for n, w in self.weights.items()}
            for i, row in enumerate(self.member_params):
                for n, p in zip(self.names, row):
                    p.data, p.grad = self.weights[n][i], self.grads[n][i]
            self.buffers = {n: _stack([s[n] for s in stats]) for n in stats[0]}
            for i, member in enumerate(self.members):
                for n, stacked in self.buffers.items():
                    _set_buffer(member.module, n, stacked[i])
        self.l2 = {n: self._per_member_l2(n, j) for j, n in enumerate(self.names)}
        self.max_norm = clip_norms(self.members, device)
        self._norm_params = {f"{prefix}.{n}" if prefix else n for prefix, m in module.named_modules()
                             if isinstance(m, nn.modules.batchnorm._NormBase) for n, _ in m.named_parameters(recurse=False)}
        self._bn_in_float = False
        if cfg.autocast_dtype is not None:
            self._install_batchnorm_hooks()

    @property
    def counts_statistics(self) -> bool:
        """Whether this process's BatchNorm statistics enter the mean over processes: not a process that
        runs only the noisy pass of a method on two batches with `bn_stats=first_pass` (RWP: the
        statistics are the clean pass's; the released code's buffers are its clean rank 0's)."""
        if not (self.needs.two_batches and self.cfg.bn_stats == "first_pass") or self.world_size == 1:
            return True
        return two_halves(1, self.rank, self.world_size).clean > 0

    def _per_member_l2(self, name: str, index: int) -> Optional[Tensor]:
        """Each member's L2 coefficient of one parameter (from its param group), as a (P, 1, ...) tensor."""
        values = []
        for member, row in zip(self.members, self.member_params):
            p = row[index]
            values.append(next(g.get("l2", 0.0) for g in member.optimizer.param_groups if any(q is p for q in g["params"])))
        if not any(values):
            return None
        w = self.weights[name]
        return torch.tensor(values, dtype=w.dtype, device=w.device).view(-1, *[1] * (w.dim() - 1))

    # -- mapping a one-cell function over the grid ------------------------------------------------
    def _over_grid(self, fn: Callable, member_dims: tuple, device_dims: tuple) -> Callable:
        """`fn` of one (member, device) cell, mapped over devices inside members. One member: its axis is
        squeezed rather than mapped, so a solo run draws and computes exactly as over its devices."""
        over_devices = vmap(fn, in_dims=device_dims, randomness="different")
        if self.size > 1:
            return vmap(over_devices, in_dims=member_dims, randomness="different")

        def squeezed(*args: Any) -> Any:
            args = [tree_map(lambda t: t.squeeze(0), a) if d is not None else a for a, d in zip(args, member_dims)]
            return tree_map(lambda t: t.unsqueeze(0), over_devices(*args))
        return squeezed

    def _logits(self, weights: dict[str, Tensor], stats: dict[str, Tensor], x: Tensor) -> Tensor:
        """One cell's logits, with `weights` and BatchNorm `stats` in place of the module's own."""
        with self.passes.autocast(), self._batchnorm_in_float():
            return functional_call(self.passes.module, {**weights, **stats}, (x,))

    @contextlib.contextmanager
    def _batchnorm_in_float(self) -> Iterator[None]:
        """Under autocast, BatchNorm reads its input in its statistics' dtype (fp32) and hands back the
        autocast dtype: vmap's batch-norm rule, unlike the plain kernel, refuses a bf16 input with fp32
        running statistics. The hooks are installed once and act only in here."""
        self._bn_in_float = self.cfg.autocast_dtype is not None
        try:
            yield
        finally:
            self._bn_in_float = False

    def _install_batchnorm_hooks(self) -> None:
        def to_float(module: nn.Module, args: tuple) -> Optional[tuple]:
            if not self._bn_in_float:
                return None
            return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

        def back(module: nn.Module, args: tuple, out: Tensor) -> Optional[Tensor]:
            return out.to(self.cfg.autocast_dtype) if self._bn_in_float else None

        for layer in self.passes.batchnorms:
            layer.register_forward_pre_hook(to_float)
            layer.register_forward_hook(back)

    def _low_precision(self, weights: dict[str, Tensor], x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """What autocast does to a convolution's input and weights on the eager path, done by hand:
        under vmap with batched weights autocast casts neither (BatchNorm's stay fp32, see above)."""
        low = self.cfg.autocast_dtype
        if low is None:
            return weights, x
        return {n: (w.to(low) if n not in self._norm_params else w) for n, w in weights.items()}, x.to(low)

    def _member_losses(self, logits: Tensor, y: Tensor) -> Tensor:
        """Each member's mean cross-entropy over its batch, (P,) (in fp32 under autocast)."""
        return per_example_losses(logits, y, self.cfg.label_smoothing).view(logits.shape[0], -1).mean(dim=1)

    def _backward(self, losses: Tensor, leaves: dict[str, Tensor], scale: Optional[Tensor]) -> None:
        """The members' gradients into the stacked .grad rows (the sum's gradient, row i, is member i's)."""
        total = losses.sum() if scale is None else losses.sum() * scale
        grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
        for n, g in zip(leaves, grads):
            if g is None:
                self.grads[n].zero_()
            else:
                self.grads[n].copy_(g)

    def _add_l2(self, grads: dict[str, Tensor], at: Callable[[str], Tensor], scale: Optional[Tensor],
                per_device: bool = False) -> None:
        """grads += l2 * at(name), each member its own l2; `per_device`: grads are (P, k, ...)."""
        for n, l2 in self.l2.items():
            if l2 is not None:
                coef = l2.unsqueeze(1) if per_device else l2
                grads[n].add_(at(n) * (coef if scale is None else coef * scale))

    # -- the step -----------------------------------------------------------------------------------
    def __call__(self, x: Tensor, y: Tensor) -> list[StepStats]:
        members, batch = y.shape
        size = device_size(batch, self.cfg, self.uses_sam)
        if self.needs.two_batches and self.world_size == 1 and size == batch:
            # one process, one device: the batch still splits into its clean and its noisy half (RWP)
            if batch % 2:
                raise ValueError(f"a step on two batches splits its batch into a clean and a noisy half: a batch "
                                 f"of {batch} examples does not")
            size = batch // 2
        if batch % size:
            raise ValueError(f"a batch of {batch} examples cannot be split into devices of {size}")
        k = batch // size
        xg = to_layout(x.view(members, k, size, *x.shape[2:]), self.cfg.channels_last)
        yg = y.view(members, k, size)
        # one copy of the running statistics per (member, device), averaged after the step
        stats = {n: b.unsqueeze(1).expand(members, k, *b.shape[1:]).clone() for n, b in self.buffers.items()}
        scale = loss_scale(self.scaler, self.passes.device)
        self.passes.draws.capture()
        reduced = False  # the gradients already averaged over processes (a method that combines on the mean)
        labels = yg  # of the examples the applied pass saw (ESAM: a subset)
        counted = k  # the leading devices whose BatchNorm statistics the buffers keep
        perturbed = self.uses_sam and not (self.needs.skips_perturbation and not self.members[0].sam.perturbs_now())
        if not self.uses_sam:
            losses, logits = self._sgd(xg, yg, stats, scale)
        elif self.needs.two_batches:
            losses, logits, counted = self._two_batches(xg, yg, stats, scale)
        elif not perturbed:
            losses, logits = self._plain(xg, yg, stats, scale)
        else:
            losses, logits, labels, reduced = self._sam(xg, yg, stats, scale)
        with torch.no_grad():
            for n, buffer in self.buffers.items():
                if not counted:  # a process of noisy devices only: its statistics stay as they were
                    break
                value = stats[n][:, :counted]
                if buffer.is_floating_point():  # the mean in at least fp32 (bf16 statistics would lose it)
                    buffer.copy_(value.mean(1, dtype=torch.promote_types(value.dtype, torch.float32)))
                else:  # num_batches_tracked: every device counted the same steps
                    buffer.copy_(value[:, 0])
            apply_gradients(self.members, list(self.grads.values()), self.max_norm, self.active, self.scaler,
                            None if reduced else self.grad_reduce)
            for member, active in zip(self.members, self.active):
                if active and isinstance(member.sam, MethodOptimizer):
                    member.sam.finish_step()  # after the base step: WSAM's own move, counters, next draws
        count = labels[0].numel()
        loss_sums = losses.detach() * count
        correct = (logits.argmax(dim=-1) == labels).view(members, -1).sum(dim=1)
        # the logged gradient and perturbation norms: of the steps that perturbed
        return [member_stats(loss_sums[i], correct[i], count, m.sam if perturbed else None, scale, batch)
                for i, m in enumerate(self.members)]

    def _sgd(self, xg: Tensor, yg: Tensor, stats: dict[str, Tensor], scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        leaves = {n: w.detach().requires_grad_() for n, w in self.weights.items()}
        weights, x = self._low_precision(leaves, xg)  # the gradient flows back to the fp32 leaves
        logits = self._over_grid(self._logits, (0, 0, 0), (None, 0, 0))(weights, stats, x)
        losses = self._member_losses(logits, yg)
        self._backward(losses, leaves, scale)
        with torch.no_grad():  # L2 in the loss (wd_mode=loss): + l2 * w, each member its own l2
            self._add_l2(self.grads, lambda n: self.weights[n], scale)
        return losses.detach(), logits.detach()

    def _cell_gradients(self, weights: dict[str, Tensor], per_device: bool, stats: dict[str, Tensor], xg: Tensor,
                        yg: Tensor, scale: Optional[Tensor]) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        """Every (member, device) cell's own gradient of its mean loss (P, k, ...), with `weights` (P, ...)
        shared by a member's devices or (P, k, ...) one set per device (`per_device`); and each cell's
        loss, logits and per-example losses (detached). One vmap of grad: every convolution runs once."""
        def loss_of(w: dict[str, Tensor], st: dict[str, Tensor], x: Tensor, y: Tensor):
            w, x = self._low_precision(w, x)  # inside: the gradient is the fp32 weights'
            logits = self._logits(w, st, x)
            per_example = per_example_losses(logits, y, self.cfg.label_smoothing)
            loss = per_example.mean()
            return (loss if scale is None else loss * scale), (loss.detach(), logits.detach(), per_example.detach())

        grads, (loss, logits, per_example) = self._over_grid(
            grad(loss_of, has_aux=True), (0, 0, 0, 0), (0 if per_device else None, 0, 0, 0))(dict(weights), stats, xg, yg)
        return {n: _owned(grads[n]) for n in self.names}, loss, logits, per_example

    def _into_grads(self, per_cell: dict[str, Tensor]) -> None:
        """The members' applied gradients: each member's mean over its devices (equal-sized: the mean of
        the devices' mean losses' gradients)."""
        for n, g in per_cell.items():
            self.grads[n].copy_(g.mean(1))

    def _plain(self, xg: Tensor, yg: Tensor, stats: dict[str, Tensor], scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """A method's step without a perturbed pass (interval SAM, LookSAM between its SAM steps)."""
        if not self.needs.plain_per_device:
            losses, logits = self._sgd(xg, yg, stats, scale)
            with torch.no_grad():
                for i, member in enumerate(self.members):
                    member.sam.device_plain(self.member_params[i], [self.grads[n][i:i + 1] for n in self.names])
            return losses, logits
        grad_w, loss, logits, _ = self._cell_gradients(self.weights, False, stats, xg, yg, scale)
        with torch.no_grad():
            self._add_l2(grad_w, lambda n: self.weights[n].unsqueeze(1), scale, per_device=True)
            for i, member in enumerate(self.members):  # each device's own gradient, the stored component added
                member.sam.device_plain(self.member_params[i], [grad_w[n][i] for n in self.names])
            self._into_grads(grad_w)
        return loss.mean(1), logits

    def _sam(self, xg: Tensor, yg: Tensor, stats: dict[str, Tensor],
             scale: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, bool]:
        """SAM, or a SAM-family method (`self.needs`): (losses, logits, the labels of the examples the
        applied pass saw, whether the gradients were already averaged over processes)."""
        needs = self.needs
        # 1. every cell's gradient at w (P, k, ...), L2 term included
        with self.passes.first_pass(uses_sam=True):
            grad_w, _, _, per_example_w = self._cell_gradients(self.weights, False, stats, xg, yg, scale)
        with torch.no_grad():
            self._add_l2(grad_w, lambda n: self.weights[n].unsqueeze(1), scale, per_device=True)
            if needs.first_pass_synchronized and self.grad_reduce is not None:
                self.grad_reduce(list(grad_w.values()))  # one e from every device of every process (VaSSO)
            # 2. each member's own SAM (or method) turns its rows of the gradient into e (its rho, one norm
            # per device), in the gradient's memory: from here on that memory holds e
            e = grad_w
            for i, member in enumerate(self.members):
                member.sam.device_perturbations(self.member_params[i], [e[n][i] for n in self.names])
        if needs.selects_examples:  # ESAM: the perturbed pass on the examples whose loss rose most
            xg, yg = self._selected_examples(e, stats, xg, yg, per_example_w)
        # 3. at the P x k perturbed weight sets
        if needs.combine == COMBINE_PER_DEVICE:  # each device's own gradient at w + e, combined, then averaged
            leaves = {n: w.detach() for n, w in self.weights.items()}
            with self.passes.perturbed_pass():
                grad_e, loss, logits, _ = self._cell_gradients(
                    {n: leaves[n].unsqueeze(1) + e[n] for n in self.names}, True, stats, xg, yg, scale)
            with torch.no_grad():
                self._add_l2(grad_e, lambda n: self.weights[n].unsqueeze(1) + e[n], scale, per_device=True)
                for i, member in enumerate(self.members):
                    member.sam.device_combine(self.member_params[i], [grad_e[n][i] for n in self.names])
                self._into_grads(grad_e)
            return loss.mean(1), logits, yg, False
        leaves = {n: w.detach().requires_grad_() for n, w in self.weights.items()}
        perturbed, x = self._low_precision({n: leaves[n].unsqueeze(1) + e[n] for n in self.names}, xg)
        with self.passes.perturbed_pass():
            # the devices' statistics go in either way (BatchNorm in eval mode, when finetuning, reads them)
            logits = self._over_grid(self._logits, (0, 0, 0), (0, 0, 0))(perturbed, stats, x)
        losses = self._member_losses(logits, yg)
        self._backward(losses, leaves, scale)
        with torch.no_grad():  # the L2 gradient at w + e_d, averaged over the devices: l2 * (w + mean_d e_d)
            self._add_l2(self.grads, lambda n: self.weights[n] + e[n].mean(1), scale)
            if needs.combine != COMBINE_ON_MEAN:
                return losses.detach(), logits.detach(), yg, False
            for i, member in enumerate(self.members):  # WSAM: on gradients averaged over every device
                own = [self.grads[n][i:i + 1] for n in self.names]
                if self.grad_reduce is not None:
                    self.grad_reduce(own + list(member.sam.rule.kept_first_gradient(member.sam.method_state)))
                member.sam.device_combine(self.member_params[i], own)
        return losses.detach(), logits.detach(), yg, self.grad_reduce is not None

    def _two_batches(self, xg: Tensor, yg: Tensor, stats: dict[str, Tensor],
                     scale: Optional[Tensor]) -> tuple[Tensor, Tensor, int]:
        """RWP (`needs.two_batches`): the clean devices' gradients at w and the noisy devices' at w + their
        own noise, in one pass side by side (the two do not depend on each other), L2 term included, mixed
        by the method's weights and averaged. Returns (losses, logits, the devices whose BatchNorm
        statistics count: the clean ones with `bn_stats=first_pass`, else all)."""
        members, k = yg.shape[:2]
        halves = two_halves(k, self.rank, self.world_size)
        noise = {n: w.new_zeros((members, k, *w.shape[1:])) for n, w in self.weights.items()}  # zero: clean devices
        with torch.no_grad():
            for i, member in enumerate(self.members):  # each member draws from its own generator
                member.sam.device_noise(self.member_params[i], [noise[n][i, halves.clean:] for n in self.names],
                                         halves.noise_rows, halves.noise_total)
        weights = {n: self.weights[n].detach().unsqueeze(1) + noise[n] for n in self.names}
        grads, loss, logits, _ = self._cell_gradients(weights, True, stats, xg, yg, scale)
        with torch.no_grad():
            self._add_l2(grads, lambda n: weights[n], scale, per_device=True)
            for i, member in enumerate(self.members):
                member.sam.device_mix(self.member_params[i], [grads[n][i] for n in self.names],
                                       [noise[n][i] for n in self.names], halves.clean)
            self._into_grads(grads)
        return loss.mean(1), logits, halves.clean if self.cfg.bn_stats == "first_pass" else k

    def _selected_examples(self, e: dict[str, Tensor], stats: dict[str, Tensor], xg: Tensor, yg: Tensor,
                           per_example_w: Tensor) -> tuple[Tensor, Tensor]:
        """ESAM's sharpness-sensitive selection: a no-grad forward at w + e (BatchNorm statistics moved as
        the method says), each example's loss rise, and each device's selected examples (P, k, c, ...)."""
        method = self.members[0].sam.rule
        if method.selects_all():
            return xg, yg
        weights, x = self._low_precision({n: self.weights[n].unsqueeze(1) + e[n] for n in self.names}, xg)
        frozen = running_stats_frozen(self.passes.batchnorms) if method.sharpness_bn == "frozen" else contextlib.nullcontext()
        with torch.no_grad(), frozen:
            logits = self._over_grid(self._logits, (0, 0, 0), (0, 0, 0))(weights, stats, x)
            per_example_e = per_example_losses(logits, yg, self.cfg.label_smoothing)
        mask = torch.stack([m.sam.rule.select(per_example_w[i], per_example_e[i]) for i, m in enumerate(self.members)])
        counts = mask.sum(-1).unique().tolist()  # a host sync, as the released code's subset indexing
        if len(counts) != 1:
            raise RuntimeError(f"ESAM selected {counts} examples on different devices of one step (ties in the loss "
                               f"rise); optim.esam_selection=topk selects a fixed number")
        order = mask.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :counts[0]].sort(dim=-1).values
        pick = order.view(*order.shape, *[1] * (xg.dim() - 3)).expand(*order.shape, *xg.shape[3:])
        return xg.gather(2, pick), yg.gather(2, order)

    # -- evaluation -----------------------------------------------------------------------------------
    def forward_members(self, x: Tensor) -> Tensor:
        """Every member's logits for one batch (n, ...) of examples, (P, n, C), BatchNorm in eval mode."""
        weights, x = self._low_precision(dict(self.weights), to_layout(x, self.cfg.channels_last))
        return vmap(self._logits, in_dims=(0, 0, None))(weights, self.buffers, x)
