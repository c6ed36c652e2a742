"""The tensor arithmetic every method's rule is written in: lists of tensors with a leading device axis.

A method's rule sees each parameter's gradient as one tensor of shape (k, *param_shape): row d is
device d's gradient (k = 1 for the hand-driven classes, k devices for the engine's per-device step).
These helpers reduce and scale such lists per device, with multi-tensor `torch._foreach_*` kernels
where one kernel can serve every tensor, and never synchronize with the host: per-device quantities
stay (k,) tensors on the device. Norms and dot products accumulate in float32 at least (bf16
gradients would lose the sum otherwise), in float64 when the tensors are float64.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def accumulation_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype sums over `tensors` accumulate in: theirs, at least float32."""
    return torch.promote_types(tensors[0].dtype, torch.float32)


def rows_view(coef: Tensor, like: Tensor) -> Tensor:
    """A (k,) per-device coefficient shaped to broadcast over the rows of a (k, *shape) tensor."""
    return coef.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def device_norms(tensors: Sequence[Tensor]) -> Tensor:
    """(k,): each device's 2-norm over every tensor of the list (one foreach kernel over all rows)."""
    k = tensors[0].shape[0]
    rows = [row for t in tensors for row in t.unbind(0)]
    norms = torch._foreach_norm(rows, 2, dtype=accumulation_dtype(tensors))
    # the norm of the parts' norms, as SAM.first_step takes it (so that the reductions to SAM are exact)
    return torch.linalg.vector_norm(torch.stack(norms).view(len(tensors), k), 2, dim=0)


def tensor_norms(tensors: Sequence[Tensor]) -> Tensor:
    """(n, k): the 2-norm of each tensor's row for each device (the per-tensor reading of a method)."""
    k = tensors[0].shape[0]
    rows = [row for t in tensors for row in t.unbind(0)]
    return torch.stack(torch._foreach_norm(rows, 2, dtype=accumulation_dtype(tensors))).view(len(tensors), k)


def tensor_dots(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """(n, k): the dot product of a[i] and b[i] for each device, one batched kernel per tensor (no
    temporary of the parameters' size)."""
    acc = accumulation_dtype(a)
    k = a[0].shape[0]
    return torch.stack([torch.linalg.vecdot(x.reshape(k, -1).to(acc), y.reshape(k, -1).to(acc)) for x, y in zip(a, b)])


def device_dots(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """(k,): each device's dot product of the two lists over every tensor."""
    return tensor_dots(a, b).sum(dim=0)


def mul_rows_(tensors: Sequence[Tensor], coef: Tensor) -> None:
    """tensors[i][d] *= coef[d]: one foreach kernel for one device, one kernel per tensor for k."""
    if not tensors:
        return
    if tensors[0].shape[0] == 1:
        torch._foreach_mul_(list(tensors), coef.reshape(()).to(tensors[0].dtype))
    else:
        for t in tensors:
            t.mul_(rows_view(coef, t))


def mul_tensor_rows_(tensors: Sequence[Tensor], coef: Tensor) -> None:
    """tensors[i][d] *= coef[i, d]: a coefficient per tensor and device ((n, k), the per-tensor reading)."""
    for t, c in zip(tensors, coef):
        t.mul_(rows_view(c, t))


def add_rows_(ys: Sequence[Tensor], xs: Sequence[Tensor], coef: Tensor) -> None:
    """ys[i][d] += coef[d] * xs[i][d], in place and without temporaries (coef: (k,), or (n, k) per tensor)."""
    per_tensor = coef.dim() == 2
    for i, (y, x) in enumerate(zip(ys, xs)):
        y.addcmul_(x, rows_view(coef[i] if per_tensor else coef, y))


def clip_rows_(tensors: Sequence[Tensor], max_norm: float) -> Tensor:
    """Each device's gradient clipped at its global norm, by torch.nn.utils.clip_grad_norm_'s formula:
    g * min(1, max_norm / (||g|| + 1e-6)). Returns the (k,) norms before clipping."""
    norm = device_norms(tensors)
    mul_rows_(tensors, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm

