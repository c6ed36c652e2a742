"""AutoAugment (Cubuk et al. 2019), batched on the device, per sample, with torchvision's semantics.

Each image draws one of the policy's 25 sub-policies; each of the sub-policy's two ops fires with
its probability, signed ops take a random sign, and the ops run in order on uint8 pixels. The ops,
magnitudes and policies are torchvision's (`AutoAugmentPolicy.CIFAR10` / `SVHN`, 10 magnitude bins,
nearest interpolation, fill 0), so every op matches `torchvision.transforms.autoaugment._apply_op`
pixel for pixel (tests/data/test_augment.py checks each op at each magnitude and sign).

How it is batched: all draws of an epoch are made at once (one device generator), copied to the host
once, and sorted there into groups (step, slot, kernel). Per batch each non-empty group is one
`index_select`, one batched op with per-sample parameters, one `index_copy_`; the five geometric ops
(shear, translate, rotate) share one kernel: a `grid_sample` over per-sample grids precomputed for
every (op, magnitude, sign). No host synchronization happens inside an epoch.

Differences from the official SAM code (google-research/sam `autoaugment/`, forked from the TPU
EfficientNet code). We follow torchvision, the reference named for this project; each difference
below changes the augmentation distribution, so an `autoaugment` result is "AutoAugment as in
torchvision", not bit-for-bit the paper's pipeline:
- policy (CIFAR): the official code draws uniformly from 95 sub-policies (the concatenated search
  results `exp0_*`, `exp1_*`, `exp2_*`; 20 of the paper's 25 are among them, and three of the other
  75 use a `Cutout` op); torchvision uses the 25 of the AutoAugment paper. SVHN: the same 25 in both.
- magnitude levels: official level L in 0..10 maps to L/10 of the maximum, torchvision bin b in
  0..9 to b/9. Same maxima for shear (coefficient 0.3, about the top-left corner) and rotate (30 deg).
- enhance ops (Brightness, Color, Contrast, Sharpness): official factor 0.1 + 1.8 L/10 (no sign),
  torchvision 1 +/- 0.9 b/9 with a random sign.
- Posterize: official keeps int(4 L/10) bits (0..4), torchvision 8 - round(4 b/9) bits (8..4).
- Solarize: official threshold int(256 L/10) rises with the level, torchvision's 255 (1 - b/9) falls.
- Translate: official up to 250 px at level 10 (an ImageNet constant: on 32 px images most
  translations leave nothing of the image), torchvision up to 150/331 of the image size (14.5 px).
- fill of vacated pixels: official 128 (gray), torchvision 0.
- Contrast's degenerate mean: official averages the 256-bin histogram counts (a quirk: it is
  H*W/256, not the mean intensity), torchvision the mean grayscale intensity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

NUM_BINS = 10

# op name -> (kernel name, signed). The order fixes the op codes used in plans.
OPS: Dict[str, Tuple[str, bool]] = {
    "ShearX": ("affine", True), "ShearY": ("affine", True), "TranslateX": ("affine", True),
    "TranslateY": ("affine", True), "Rotate": ("affine", True),
    "Brightness": ("brightness", True), "Color": ("color", True), "Contrast": ("contrast", True),
    "Sharpness": ("sharpness", True), "Posterize": ("posterize", False), "Solarize": ("solarize", False),
    "AutoContrast": ("autocontrast", False), "Equalize": ("equalize", False), "Invert": ("invert", False),
}
OP_NAMES = list(OPS)

SubPolicy = Tuple[Tuple[str, float, int], Tuple[str, float, int]]  # ((op, probability, magnitude bin) x 2)
POLICIES: Dict[str, List[SubPolicy]] = {
    # AutoAugment paper, Table 7 (as torchvision's AutoAugmentPolicy.CIFAR10); magnitude-free ops take bin 0
    "cifar10": [
        (("Invert", 0.1, 0), ("Contrast", 0.2, 6)), (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)), (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, 0), ("Equalize", 0.9, 0)), (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)), (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, 0), ("Equalize", 0.5, 0)), (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)), (("Equalize", 0.3, 0), ("AutoContrast", 0.4, 0)),
        (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)), (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), ("Invert", 0.0, 0)), (("Equalize", 0.2, 0), ("AutoContrast", 0.6, 0)),
        (("Equalize", 0.2, 0), ("Equalize", 0.6, 0)), (("Color", 0.9, 9), ("Equalize", 0.6, 0)),
        (("AutoContrast", 0.8, 0), ("Solarize", 0.2, 8)), (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, 0)), (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, 0), ("Solarize", 0.8, 3)), (("Equalize", 0.8, 0), ("Invert", 0.1, 0)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, 0)),
    ],
    # AutoAugment paper, SVHN policy (as torchvision's AutoAugmentPolicy.SVHN)
    "svhn": [
        (("ShearX", 0.9, 4), ("Invert", 0.2, 0)), (("ShearY", 0.9, 8), ("Invert", 0.7, 0)),
        (("Equalize", 0.6, 0), ("Solarize", 0.6, 6)), (("Invert", 0.9, 0), ("Equalize", 0.6, 0)),
        (("Equalize", 0.6, 0), ("Rotate", 0.9, 3)), (("ShearX", 0.9, 4), ("AutoContrast", 0.8, 0)),
        (("ShearY", 0.9, 8), ("Invert", 0.4, 0)), (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
        (("Invert", 0.9, 0), ("AutoContrast", 0.8, 0)), (("Equalize", 0.6, 0), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)), (("ShearY", 0.8, 8), ("Invert", 0.7, 0)),
        (("Equalize", 0.9, 0), ("TranslateY", 0.6, 6)), (("Invert", 0.9, 0), ("Equalize", 0.6, 0)),
        (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)), (("Invert", 0.8, 0), ("TranslateY", 0.0, 2)),
        (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)), (("Invert", 0.6, 0), ("Rotate", 0.8, 4)),
        (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)), (("ShearX", 0.1, 6), ("Invert", 0.6, 0)),
        (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)), (("ShearY", 0.8, 4), ("Invert", 0.8, 0)),
        (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)), (("ShearY", 0.8, 5), ("AutoContrast", 0.7, 0)),
        (("ShearX", 0.7, 2), ("Invert", 0.1, 0)),
    ],
}


def magnitude(op: str, bin: int, negative: bool, height: int, width: int) -> float:
    """The argument torchvision's AutoAugment passes to `_apply_op` for (op, bin, sign).

    Bins are float32 linspace values (as torchvision builds them) read back as Python floats.
    """
    lin = lambda hi: float(torch.linspace(0.0, hi, NUM_BINS)[bin])
    table: Dict[str, Callable[[], float]] = {
        "ShearX": lambda: lin(0.3), "ShearY": lambda: lin(0.3),
        "TranslateX": lambda: lin(150.0 / 331.0 * width), "TranslateY": lambda: lin(150.0 / 331.0 * height),
        "Rotate": lambda: lin(30.0), "Brightness": lambda: lin(0.9), "Color": lambda: lin(0.9),
        "Contrast": lambda: lin(0.9), "Sharpness": lambda: lin(0.9),
        "Posterize": lambda: float(8 - (torch.arange(NUM_BINS) / ((NUM_BINS - 1) / 4)).round().int()[bin]),
        "Solarize": lambda: float(torch.linspace(255.0, 0.0, NUM_BINS)[bin]),
    }
    m = table.get(op, lambda: 0.0)()
    return -m if (negative and OPS[op][1]) else m


def table_id(op_code: int, bin: int, negative: bool) -> int:
    return (op_code * NUM_BINS + bin) * 2 + int(negative)


NUM_TABLE = len(OPS) * NUM_BINS * 2


# ---------------------------------------------------------------- geometry (torchvision's conventions)
def _inverse_affine(center: Tuple[float, float], angle: float, translate: Tuple[float, float],
                    shear: Tuple[float, float]) -> List[float]:
    """The output->input pixel map torchvision's tensor `affine`/`rotate` sample with (scale 1, degrees)."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    (cx, cy), (tx, ty) = center, translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]  # inverse of [[a, b], [c, d]] (determinant 1)
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
    return m


def _affine_matrix(op: str, mag: float, height: int, width: int) -> List[float]:
    """Coordinates relative to the image centre, as torchvision's tensor path uses them."""
    corner = (-width * 0.5, -height * 0.5)  # shears pivot on the top-left corner (center=[0, 0] in _apply_op)
    if op == "ShearX":
        return _inverse_affine(corner, 0.0, (0.0, 0.0), (math.degrees(math.atan(mag)), 0.0))
    if op == "ShearY":
        return _inverse_affine(corner, 0.0, (0.0, 0.0), (0.0, math.degrees(math.atan(mag))))
    if op == "TranslateX":
        return _inverse_affine((0.0, 0.0), 0.0, (float(int(mag)), 0.0), (0.0, 0.0))
    if op == "TranslateY":
        return _inverse_affine((0.0, 0.0), 0.0, (0.0, float(int(mag))), (0.0, 0.0))
    if op == "Rotate":
        return _inverse_affine((0.0, 0.0), -mag, (0.0, 0.0), (0.0, 0.0))  # rotate() passes -angle to affine
    raise ValueError(op)


def _affine_grid(matrix: List[float], height: int, width: int) -> torch.Tensor:
    """grid_sample grid [H, W, 2] for `matrix`, computed in float32 exactly as torchvision does."""
    theta = torch.tensor(matrix, dtype=torch.float32).reshape(1, 2, 3)
    base = torch.empty(1, height, width, 3, dtype=torch.float32)
    base[..., 0].copy_(torch.linspace(-width * 0.5 + 0.5, width * 0.5 - 0.5, steps=width))
    base[..., 1].copy_(torch.linspace(-height * 0.5 + 0.5, height * 0.5 - 0.5, steps=height).unsqueeze_(-1))
    base[..., 2].fill_(1)
    rescaled = theta.transpose(1, 2) / torch.tensor([0.5 * width, 0.5 * height], dtype=torch.float32)
    return base.view(1, height * width, 3).bmm(rescaled).view(height, width, 2)


# ---------------------------------------------------------------- batched ops on uint8 [n, C, H, W]
# Per-sample parameters arrive as float32 [n, 4] rows: (ratio, 1 - ratio, solarize threshold, posterize mask),
# each computed in float64 and rounded once, as torchvision's Python-float arithmetic does.
def _col(params: torch.Tensor, i: int) -> torch.Tensor:
    return params[:, i].view(-1, 1, 1, 1)


def _blend(img: torch.Tensor, other: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    # ratio * img + (1 - ratio) * other, clamped, truncated to uint8 (torchvision's _blend)
    return (_col(params, 0) * img + _col(params, 1) * other).clamp_(0, 255).to(torch.uint8)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x.clone()
    r, g, b = x.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(x.dtype).unsqueeze(1)


def _brightness(x, params, grids):
    return (_col(params, 0) * x).clamp_(0, 255).to(torch.uint8)  # the blend with black: (1 - r) * 0 adds nothing


def _color(x, params, grids):
    return x if x.shape[1] == 1 else _blend(x, _grayscale(x), params)


def _contrast(x, params, grids):
    mean = _grayscale(x).to(torch.float32).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, params)


def _sharpness(x, params, grids):
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x
    kernel = torch.ones(3, 3, dtype=torch.float32, device=x.device)
    kernel[1, 1] = 5.0
    kernel /= kernel.sum()
    c = x.shape[1]
    blurred = F.conv2d(x.to(torch.float32), kernel.expand(c, 1, 3, 3), groups=c).round_().to(torch.uint8)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = blurred  # borders keep the original pixels
    return _blend(x, degenerate, params)


def _posterize(x, params, grids):
    return x & _col(params, 3).to(torch.uint8)


def _solarize(x, params, grids):
    return torch.where(x >= _col(params, 2), 255 - x, x)


def _autocontrast(x, params, grids):
    lo = x.amin(dim=(-2, -1), keepdim=True).to(torch.float32)
    hi = x.amax(dim=(-2, -1), keepdim=True).to(torch.float32)
    scale = 255.0 / (hi - lo)
    flat = ~torch.isfinite(scale)  # a constant channel is left as it is
    lo = lo.masked_fill(flat, 0.0)
    scale = scale.masked_fill(flat, 1.0)
    return ((x - lo) * scale).clamp_(0, 255).to(torch.uint8)


def _equalize(x, params, grids):
    # PIL's equalize per channel: a histogram, a step = (pixels not at the max value) // 255, a LUT
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).to(torch.int64)
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    top = flat.amax(dim=1, keepdim=True)
    step = (h * w - hist.gather(1, top)) // 255
    lut = (hist.cumsum(1) + step // 2) // step.clamp(min=1)
    lut = F.pad(lut, (1, 0))[:, :-1].clamp_(0, 255)
    out = torch.where(step == 0, flat, lut.gather(1, flat))
    return out.to(torch.uint8).view(n, c, h, w)


def _invert(x, params, grids):
    return 255 - x


def _affine(x, params, grids):
    # nearest sampling with zero fill (torchvision's AutoAugment default: fill=None)
    return F.grid_sample(x.to(torch.float32), grids, mode="nearest", padding_mode="zeros",
                         align_corners=False).round_().to(torch.uint8)


KERNELS: Dict[str, Callable] = {
    "affine": _affine, "brightness": _brightness, "color": _color, "contrast": _contrast,
    "sharpness": _sharpness, "posterize": _posterize, "solarize": _solarize,
    "autocontrast": _autocontrast, "equalize": _equalize, "invert": _invert,
}
KERNEL_NAMES = list(KERNELS)
KERNEL_OF_OP = torch.tensor([KERNEL_NAMES.index(OPS[op][0]) for op in OP_NAMES])


# ---------------------------------------------------------------- plans
@dataclass
class Plan:
    """One epoch of AutoAugment draws, grouped: entries sorted by (step, slot, kernel)."""

    index: torch.Tensor  # int64 [E] on the device: position of the sample in its batch
    table: torch.Tensor  # int64 [E] on the device: table id (op, bin, sign)
    params: torch.Tensor  # float32 [E, 4] on the device
    counts: List[List[List[int]]]  # host: [step][slot][kernel] -> number of entries
    starts: List[int]  # host: offset of each step's first entry


class BatchedAutoAugment:
    """A policy compiled for one image size and device: parameter tables, grids, a planner."""

    def __init__(self, policy: str, image_size: int, device: torch.device):
        if policy not in POLICIES:
            raise ValueError(f"unknown AutoAugment policy {policy!r}; choose one of {sorted(POLICIES)}")
        self.policy, self.size, self.device = policy, image_size, torch.device(device)
        params = torch.zeros(NUM_TABLE, 4, dtype=torch.float64)
        grids = torch.zeros(NUM_TABLE, image_size, image_size, 2, dtype=torch.float32)
        for code, op in enumerate(OP_NAMES):
            for bin in range(NUM_BINS):
                for neg in (False, True):
                    t, m = table_id(code, bin, neg), magnitude(op, bin, neg, image_size, image_size)
                    mask = 256 - 2 ** (8 - int(m)) if op == "Posterize" else 0  # keeps the top int(m) bits
                    params[t] = torch.tensor([1.0 + m, 1.0 - (1.0 + m), m, mask])
                    if OPS[op][0] == "affine":
                        grids[t] = _affine_grid(_affine_matrix(op, m, image_size, image_size), image_size, image_size)
        self.params_cpu = params.to(torch.float32)
        self.grids = grids.to(self.device)
        rows = POLICIES[policy]
        self.pol_op = torch.tensor([[OP_NAMES.index(o) for o, _, _ in r] for r in rows])  # [P, 2]
        self.pol_bin = torch.tensor([[b for _, _, b in r] for r in rows])
        self.pol_prob = torch.tensor([[p for _, p, _ in r] for r in rows], dtype=torch.float32)
        self.signed = torch.tensor([OPS[o][1] for o in OP_NAMES])

    def plan(self, g: torch.Generator, steps: int, batch: int) -> Plan:
        """Draw one epoch's choices on g's device (sub-policy, fire, sign per sample and slot) and group them."""
        dev = self.device
        pid = torch.randint(len(self.pol_op), (steps, batch), generator=g, device=dev)
        u = torch.rand(steps, batch, 2, generator=g, device=dev)
        sign = torch.randint(2, (steps, batch, 2), generator=g, device=dev)
        # the epoch's one host transfer: grouping needs the group sizes on the host
        drawn = torch.cat([pid.unsqueeze(-1).float(), u, sign.float()], dim=-1).cpu()
        return self.group(drawn[..., 0].long(), drawn[..., 1:3], drawn[..., 3:5].long())

    def group(self, pid: torch.Tensor, u: torch.Tensor, sign: torch.Tensor) -> Plan:
        """Plan from host draws: pid [S, B], u [S, B, 2] uniform, sign [S, B, 2] in {0, 1} (0 = negative)."""
        steps, batch = pid.shape
        op, bin = self.pol_op[pid], self.pol_bin[pid]  # [S, B, 2]
        fire = u <= self.pol_prob[pid]  # torchvision: probs[i] <= p
        neg = (sign == 0) & self.signed[op]
        tid = (op * NUM_BINS + bin) * 2 + neg.long()
        s, b, slot = fire.nonzero(as_tuple=True)  # row-major: sorted by (step, position, slot)
        nk = len(KERNEL_NAMES)
        key = (s * 2 + slot) * nk + KERNEL_OF_OP[op[s, b, slot]]
        order = torch.argsort(key, stable=True)  # groups by (step, slot, kernel); positions stay ascending
        counts = torch.bincount(key, minlength=steps * 2 * nk).view(steps, 2, nk)
        starts = torch.cumsum(counts.sum(dim=(1, 2)), 0) - counts.sum(dim=(1, 2))
        table = tid[s, b, slot][order]
        return Plan(index=b[order].to(self.device), table=table.to(self.device),
                    params=self.params_cpu[table].to(self.device), counts=counts.tolist(), starts=starts.tolist())

    def apply_(self, x: torch.Tensor, plan: Plan, step: int) -> torch.Tensor:
        """Run step `step` of `plan` on the uint8 batch x [B, C, H, W], in place."""
        at = plan.starts[step]
        for slot in range(2):  # slot 0 before slot 1, as each sub-policy orders its ops
            for k, n in enumerate(plan.counts[step][slot]):
                if n:
                    self.run_kernel(x, KERNEL_NAMES[k], plan.index[at:at + n], plan.table[at:at + n],
                                    plan.params[at:at + n])
                    at += n
        return x

    def run_kernel(self, x: torch.Tensor, kernel: str, index: torch.Tensor, table: torch.Tensor,
                   params: torch.Tensor) -> None:
        """Apply one kernel to the samples x[index] with their table ids / parameters, in place."""
        grids = self.grids[table] if kernel == "affine" else None
        x.index_copy_(0, index, KERNELS[kernel](x.index_select(0, index), params, grids))

    def apply_op(self, x: torch.Tensor, op: str, bins: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """Apply `op` to every sample of x at per-sample (bin, sign): a test and debugging entry point."""
        tid = (OP_NAMES.index(op) * NUM_BINS + bins.cpu().long()) * 2 + negative.cpu().long()
        out = x.clone()
        self.run_kernel(out, OPS[op][0], torch.arange(len(x), device=x.device), tid.to(x.device),
                        self.params_cpu[tid].to(x.device))
        return out
