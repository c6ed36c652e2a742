#!/usr/bin/env python3
"""End-to-end training throughput: our engine vs the popular port's way of training, in one run.

ours:       the training set resident on the device as uint8, augmented there (crop + flip), bf16
            autocast and channels_last on a GPU, our TrainStep with the fused SAM step.
reference:  a torch DataLoader with worker processes applying torchvision transforms per image,
            fp32, a SAM that loops over parameters and clones weights each step (the popular
            port's example training loop).
Same model, same batch, same data, same number of steps, in one process. Prints one JSON line per
model: images/s and seconds per epoch of each (an epoch = the training set / batch steps,
extrapolated from the timed steps), and our speed-up.

    python scripts/bench_engine.py --device cpu                  # a quick check that it runs
    python scripts/bench_engine.py --device cuda --out results/bench
    python scripts/bench_engine.py --device cuda --data /data/cifar10-jpeg   # the real JPEG CIFAR-10
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import LoopSAM, emit, git_sha  # noqa: E402

from sam_repro.config import AugmentConfig, DatasetConfig, OptimConfig  # noqa: E402
from sam_repro.data import load_data, make_train_loader  # noqa: E402
from sam_repro.engine.step import StepConfig, TrainStep  # noqa: E402
from sam_repro.models import create_model  # noqa: E402
from sam_repro.optim.factory import build_optimizer  # noqa: E402
from sam_repro.runlog import cpu_name  # noqa: E402

GPU_SUITE = [dict(model="wrn28_10", batch=128), dict(model="resnet32", batch=128),
             dict(model="resnet32", batch=128, cuda_graphs=True)]
CPU_SUITE = [dict(model="resnet20", batch=64)]


def timed(loader, step: Callable, steps: int, warmup: int, device: torch.device) -> float:
    """Images per second over `steps` training steps (data loading included) after `warmup`."""
    loader.set_epoch(1)
    it = iter(loader)
    for _ in range(warmup):
        step(*next(it))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, seen = time.perf_counter(), 0
    for _ in range(steps):
        x, y = next(it)
        step(x, y)
        seen += y.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - t0)


def ours(bundle, spec: dict, device: torch.device, augment: AugmentConfig) -> tuple:
    torch.manual_seed(0)
    on_gpu = device.type == "cuda"
    model = create_model(spec["model"], num_classes=bundle.num_classes).to(device)
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    forward = torch.compile(model, mode="reduce-overhead") if spec.get("cuda_graphs") else model
    base, sam = build_optimizer(model, OptimConfig(name="sam", lr=0.1, weight_decay=5e-4))
    step = TrainStep(forward, base, sam, StepConfig(grad_clip=5.0, autocast_dtype=torch.bfloat16 if on_gpu else None,
                                                    channels_last=on_gpu))
    loader = make_train_loader(bundle.train, bundle, augment, spec["batch"], device, seed=0, kind="device")
    return loader, step


def reference(bundle, spec: dict, device: torch.device, augment: AugmentConfig, workers: int) -> tuple:
    torch.manual_seed(0)
    model = create_model(spec["model"], num_classes=bundle.num_classes).to(device)
    model.train()
    opt = LoopSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

    loader = make_train_loader(bundle.train, bundle, augment, spec["batch"], device, seed=0, kind="workers",
                               num_workers=workers)
    return loader, step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", help="an image folder (train/<class>/*, test/<class>/*) instead of synthetic data")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="reference DataLoader workers (default: CPU count - 1)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.data:
        data_cfg = DatasetConfig(name="cifar10", source="folder", root=args.data)
    else:  # CIFAR-10-shaped generated data: throughput does not depend on the pixels
        data_cfg = DatasetConfig(name="synthetic", source="synthetic", train_size=50000, test_size=10, num_classes=10)
    bundle = load_data(SimpleNamespace(**{**DatasetConfig().__dict__, **data_cfg.__dict__}))
    augment = AugmentConfig(name="basic")
    steps = args.steps or (100 if cuda else 20)
    warmup = args.warmup or (20 if cuda else 5)
    workers = args.workers or max(1, (os.cpu_count() or 2) - 1)
    sha = git_sha()
    for spec in (GPU_SUITE if cuda else CPU_SUITE):
        result = {**spec, "device": torch.cuda.get_device_name(device) if cuda else cpu_name(), "torch": torch.__version__,
                  "data": bundle.info["source"], "train_size": bundle.info["train_size"], "reference_workers": workers}
        for name, build in (("ours", lambda: ours(bundle, spec, device, augment)),
                            ("reference", lambda: reference(bundle, spec, device, augment, workers))):
            loader, step = build()
            ips = timed(loader, step, steps, warmup, device)
            result[f"{name}_images_per_s"] = round(ips, 1)
            result[f"{name}_s_per_epoch"] = round(len(loader) * spec["batch"] / ips, 2)
            del loader, step
            if cuda:
                torch.cuda.empty_cache()
        result["speedup"] = round(result["ours_images_per_s"] / result["reference_images_per_s"], 2)
        result["timing"] = f"{steps} steps after {warmup} warm-up; s/epoch extrapolated"
        result["git_sha"] = sha
        emit(result, args.out, "bench_engine.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
