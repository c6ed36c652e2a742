"""How much of SAM's perturbation e(w) survives the rounding of the weights a convolution sees.

Under bf16 autocast (our GPU default) a convolution or linear layer reads bf16(w + e) instead of
w + e: with ||e|| = rho spread over millions of weights, most e_i are far below the bf16 spacing of
w_i, and the layer sees no change at all. This script measures it on a real network and real data:
the gradient of a batch at w (fp32), e = rho * g / ||g||, and for each rounding of the layer inputs
(fp32: none; TF32: 10 mantissa bits, what Ampere+ GPUs use with allow_tf32; bf16: 7 bits, our
autocast and the TPU's default matmul precision) the share of weights whose rounded value moves and
the cosine between the applied perturbation round(w + e) - round(w) and the intended e.

    python scripts/bf16_perturbation.py --model wrn28_10 --data /path/to/cifar10-jpeg --batch 32
    python scripts/bf16_perturbation.py --model resnet32                 # synthetic data if no --data

Prints one JSON line per rounding and writes them to --out (results/bench/bf16_perturbation.jsonl).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from sam_repro.models import create_model
from sam_repro.runlog import environment

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x rounded to `bits` explicit mantissa bits, round-to-nearest-even (bf16: 7, TF32: 10)."""
    if bits >= 23:
        return x.clone()
    if bits == 7:
        return x.to(torch.bfloat16).to(torch.float32)
    as_int = x.contiguous().view(torch.int32)
    drop = 23 - bits
    half = (1 << (drop - 1)) - 1
    lsb = (as_int >> drop) & 1
    rounded = ((as_int + half + lsb) >> drop) << drop
    return rounded.view(torch.float32)


ROUNDINGS = {"fp32": 23, "tf32": 10, "bf16": 7}  # mantissa bits a layer's weight input keeps


def real_batch(root: Path, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n training images of an image-folder copy (ROOT/train/<class>/*.jpg), normalized, with labels."""
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / "train" / name).iterdir())]
    pick = np.random.default_rng(seed).choice(len(files), n, replace=False)
    images = [np.asarray(Image.open(files[i][0]).convert("RGB"), dtype=np.float32) / 255 for i in pick]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    x = (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return x, torch.tensor([files[i][1] for i in pick])


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float) -> list[dict]:
    """One row per rounding: share of weights whose rounded value moves, cosine(applied, intended)."""
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
    # weights that autocast casts (conv and linear); BatchNorm's scale and bias stay fp32 under autocast
    cast = [p for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in [m.weight] if p.grad is not None]
    cast_ids = {id(p) for p in cast}
    rows = []
    for name, bits in ROUNDINGS.items():
        moved = total = 0
        dot = applied_sq = intended_sq = 0.0
        for p in params:
            e = (rho * p.grad.double() / norm).float()
            w = p.detach()
            rounded = id(p) in cast_ids
            applied = (round_mantissa(w + e, bits) - round_mantissa(w, bits)) if rounded else e
            if rounded:
                moved += int((applied != 0).sum())
                total += w.numel()
            dot += float((applied.double() * e.double()).sum())
            applied_sq += float((applied.double() ** 2).sum())
            intended_sq += float((e.double() ** 2).sum())
        rows.append({
            "rounding": name, "mantissa_bits": bits, "rho": rho,
            "share_of_conv_linear_weights_moved": moved / total,
            "cosine_applied_vs_intended": dot / (applied_sq ** 0.5 * intended_sq ** 0.5) if applied_sq else 0.0,
            "norm_applied_over_rho": applied_sq ** 0.5 / rho,
            "rms_e_per_weight": (intended_sq / sum(p.numel() for p in params)) ** 0.5,
            "median_abs_w": float(torch.cat([p.detach().abs().flatten() for p in cast]).median()),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wrn28_10")
    parser.add_argument("--data", type=Path, default=None, help="image-folder CIFAR-10 (ROOT/train/<class>/*.jpg)")
    parser.add_argument("--batch", type=int, default=32, help="examples per perturbation (the paper's m = 32)")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/bench/bf16_perturbation.jsonl"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = create_model(args.model, num_classes=10)
    if args.data is not None:
        x, y = real_batch(args.data, args.batch, args.seed)
        source = f"folder:{args.data.name}"
    else:
        x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
        source = "synthetic"
    start = time.perf_counter()
    rows = measure(model, x, y, args.rho)
    env = environment(torch.device("cpu"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for row in rows:
            row.update(model=args.model, weights="initialization (official He init)", data=source, batch=args.batch,
                       seconds=round(time.perf_counter() - start, 1), git_sha=env["git_sha"], device=env["device"])
            print(json.dumps(row))
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
