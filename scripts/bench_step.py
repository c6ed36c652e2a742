#!/usr/bin/env python3
"""Benchmark one training step: SGD vs our fused SAM vs a per-parameter-loop SAM, side by side.

All variants run in ONE process on the same model, batch, precision and device, interleaved in
rounds so that clock drift or a noisy neighbour hits them alike. Per configuration it prints one
JSON line: median ms per step of each variant, SAM/SGD ratio, speed-up over the reference loop,
and (on CUDA) peak memory of each and SAM's extra memory in units of the parameter bytes.

The reference is written here the way the popular PyTorch port does it: per-tensor norms stacked
into a global norm, a `clone()` of every weight per step, the weights restored by swapping
`p.data`. `sam_engine` is our whole training step (RNG replay, BatchNorm freeze, L2 gradient,
clipping), i.e. what `sam-train` actually runs.

    python scripts/bench_step.py --device cpu                       # < 1 min, ResNet-20, fp32
    python scripts/bench_step.py --device cuda --suite gpu --out results/bench
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sam_repro.config import OptimConfig  # noqa: E402
from sam_repro.engine.step import StepConfig, TrainStep  # noqa: E402
from sam_repro.models import create_model  # noqa: E402
from sam_repro.optim import SAM  # noqa: E402
from sam_repro.runlog import cpu_name  # noqa: E402
from sam_repro.optim.factory import METHODS, build_optimizer  # noqa: E402

# The GPU suite of issue 2: the configurations whose targets it names.
GPU_SUITE = [
    dict(model="wrn28_10", batch=128, precision="bf16", channels_last=True, compile=False),
    dict(model="resnet32", batch=128, precision="bf16", channels_last=True, compile=False),
    dict(model="resnet32", batch=128, precision="bf16", channels_last=True, compile=True),
    dict(model="wrn28_10", batch=128, precision="fp32", channels_last=True, compile=False),
    # Table 2's network: images/s of SGD vs SAM at 224 px (issue 5)
    dict(model="resnet50", batch=128, precision="bf16", channels_last=True, compile=False, image_size=224, classes=1000),
]
CPU_SUITE = [dict(model="resnet20", batch=32, precision="fp32", channels_last=False, compile=False)]
# The per-device step (issue 8): the engine's step with device_batch 32 against one device per batch,
# SGD and SAM, at the paper's batch 256. Targets (GPU, bf16): WRN-28-10 per-device SAM <= 1.15x the
# one-device SAM step, ResNet-32 <= 1.5x.
GPU_PER_DEVICE_SUITE = [
    dict(model="wrn28_10", batch=256, device_batch=32, precision="bf16", channels_last=True),
    dict(model="resnet32", batch=256, device_batch=32, precision="bf16", channels_last=True),
]
CPU_PER_DEVICE_SUITE = [dict(model="resnet20", batch=64, device_batch=16, precision="fp32", channels_last=False)]


class LoopSAM(torch.optim.Optimizer):
    """The popular port's SAM: a Python loop over parameters, a clone per step."""

    def __init__(self, params, base_optimizer_cls, rho: float = 0.05, **kwargs) -> None:
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer_cls(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for g in self.param_groups for p in g["params"]
                                            if p.grad is not None]), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_(p.grad * scale.to(p))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


def make_variants(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype) -> dict[str, Callable[[], None]]:
    """Each variant is a closure that runs one full training step."""
    loss_fn = nn.CrossEntropyLoss()
    device_type = x.device.type

    def fwd_bwd() -> None:
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(x).float(), y)
        loss.backward()

    kwargs = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sgd = torch.optim.SGD(model.parameters(), **kwargs)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.05, **kwargs)
    ref = LoopSAM(model.parameters(), torch.optim.SGD, rho=0.05, **kwargs)
    base, engine_sam = build_optimizer(model, OptimConfig(name="sam", lr=0.1, weight_decay=5e-4))
    engine = TrainStep(model, base, engine_sam, StepConfig(grad_clip=5.0, autocast_dtype=dtype))

    def run_sgd() -> None:
        fwd_bwd()
        sgd.step()
        sgd.zero_grad(set_to_none=False)

    def run_sam() -> None:
        fwd_bwd()
        sam.first_step(zero_grad=True)
        fwd_bwd()
        sam.second_step(zero_grad=True)

    def run_ref() -> None:
        fwd_bwd()
        ref.first_step(zero_grad=True)
        fwd_bwd()
        ref.second_step(zero_grad=True)

    return {"sgd": run_sgd, "sam": run_sam, "sam_reference_loop": run_ref, "sam_engine": lambda: engine(x, y)}


def time_variants(variants: dict[str, Callable[[], None]], device: torch.device, warmup: int, steps: int,
                  rounds: int) -> tuple[dict[str, float], dict[str, int | None]]:
    """Median ms per step of each variant, interleaved in rounds; and peak memory (CUDA)."""
    cuda = device.type == "cuda"
    samples: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, int | None] = {name: None for name in variants}
    for name, fn in variants.items():  # warm-up and peak memory, one variant at a time
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            fn()
        if cuda:
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated()
    for _ in range(rounds):
        for name, fn in variants.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(steps):
                    fn()
                end.record()
                torch.cuda.synchronize()
                samples[name].append(start.elapsed_time(end) / steps)
            else:
                t0 = time.perf_counter()
                for _ in range(steps):
                    fn()
                samples[name].append((time.perf_counter() - t0) * 1000 / steps)
    return {name: statistics.median(v) for name, v in samples.items()}, peaks


def bench(spec: dict, device: torch.device, warmup: int, steps: int, rounds: int) -> dict:
    torch.manual_seed(0)
    size, classes = spec.get("image_size", 32), spec.get("classes", 10)
    model = create_model(spec["model"], num_classes=classes).to(device)
    if spec["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    forward = torch.compile(model) if spec["compile"] else model
    x = torch.randn(spec["batch"], 3, size, size, device=device)
    if spec["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (spec["batch"],), device=device)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[spec["precision"]]

    class Forward(nn.Module):  # the variants call the (maybe compiled) forward, step the real params
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            return forward(inp)

    ms, peaks = time_variants(make_variants(Forward(), x, y, dtype), device, warmup, steps, rounds)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {
        **spec, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "ms": {k: round(v, 3) for k, v in ms.items()},
        "images_per_s": {k: round(spec["batch"] * 1000 / v, 1) for k, v in ms.items()},
        "sam_over_sgd": round(ms["sam"] / ms["sgd"], 3),
        "engine_over_sgd": round(ms["sam_engine"] / ms["sgd"], 3),
        "speedup_over_reference": round(ms["sam_reference_loop"] / ms["sam"], 3),
        "peak_mem_MB": {k: (round(v / 2**20, 1) if v is not None else None) for k, v in peaks.items()},
        "sam_extra_mem_over_param_bytes": (round((peaks["sam"] - peaks["sgd"]) / param_bytes, 3)
                                           if peaks["sam"] is not None else None),
        "timing": f"median of {rounds} rounds x {steps} steps after {warmup} warm-up steps",
    }
    return out


def bench_per_device(spec: dict, device: torch.device, warmup: int, steps: int, rounds: int) -> dict:
    """The engine's TrainStep with `device_batch` devices against one device per batch, SGD and SAM,
    timed side by side (interleaved rounds) on one model."""
    torch.manual_seed(0)
    model = create_model(spec["model"], num_classes=10).to(device)
    if spec["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    x = torch.randn(spec["batch"], 3, 32, 32, device=device)
    y = torch.randint(0, 10, (spec["batch"],), device=device)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[spec["precision"]]
    variants: dict[str, Callable[[], None]] = {}
    for name in ("sgd", "sam"):
        for label, device_batch in (("one_device", None), ("per_device", spec["device_batch"])):
            base, sam = build_optimizer(model, OptimConfig(name=name, lr=0.1, weight_decay=5e-4))
            step = TrainStep(model, base, sam, StepConfig(grad_clip=5.0, autocast_dtype=dtype, device_batch=device_batch,
                                                          channels_last=spec["channels_last"]))
            variants[f"{name}_{label}"] = (lambda s: lambda: s(x, y))(step)
    ms, peaks = time_variants(variants, device, warmup, steps, rounds)
    return {
        **spec, "kind": "per_device_step", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__, "ms": {k: round(v, 3) for k, v in ms.items()},
        "images_per_s": {k: round(spec["batch"] * 1000 / v, 1) for k, v in ms.items()},
        "per_device_over_one_device_sam": round(ms["sam_per_device"] / ms["sam_one_device"], 3),
        "per_device_over_one_device_sgd": round(ms["sgd_per_device"] / ms["sgd_one_device"], 3),
        "per_device_sam_over_per_device_sgd": round(ms["sam_per_device"] / ms["sgd_per_device"], 3),
        "peak_mem_MB": {k: (round(v / 2**20, 1) if v is not None else None) for k, v in peaks.items()},
        "timing": f"median of {rounds} rounds x {steps} steps after {warmup} warm-up steps",
    }


# SAM's follow-ups against SGD and SAM, each the engine's whole step on one model and batch (issue 20's
# targets: two-pass methods <= 1.05x SAM; ESAM beta 0.5 gamma 0.5 <= 1.55x SGD; interval 3 <= 1.40x SGD;
# LookSAM k 5 <= 1.30x SGD). Rows name the method's own forward/backward count per step.
METHOD_ROWS = [("gsam", {}), ("esam", {"esam_beta": 0.5, "esam_gamma": 0.5}), ("fsam", {}), ("vasso", {}),
               ("samon", {}), ("asam_on", {}), ("interval_sam", {"sam_interval": 3}), ("looksam", {"looksam_k": 5}),
               ("rwp", {}), ("wsam", {})]


def bench_methods(spec: dict, device: torch.device, warmup: int, steps: int, rounds: int) -> dict:
    """Every method's engine step (TrainStep) beside SGD's and SAM's, interleaved in rounds. Steps that
    alternate (interval SAM, LookSAM) are timed over whole cycles: steps is rounded up to a multiple of
    the cycle, so each variant's mean step is what a run pays."""
    torch.manual_seed(0)
    model = create_model(spec["model"], num_classes=10).to(device)
    model.train()
    x = torch.randn(spec["batch"], 3, 32, 32, device=device)
    y = torch.randint(0, 10, (spec["batch"],), device=device)
    variants: dict[str, Callable[[], None]] = {}
    passes = {}
    for name, extra in [("sgd", {}), ("sam", {}), *METHOD_ROWS]:
        ocfg = OptimConfig(name=name, lr=0.1, weight_decay=5e-4, **extra)
        base, method = build_optimizer(model, ocfg)
        step = TrainStep(model, base, method, StepConfig.of(ocfg, device_batch=spec.get("device_batch")))
        variants[name] = (lambda s: lambda: s(x, y))(step)
        passes[name] = METHODS[name].passes_per_step(ocfg)  # the one statement of a step's passes
    cycle = 15  # a multiple of interval 3 and LookSAM's 5
    steps = -(-steps // cycle) * cycle
    ms, _ = time_variants(variants, device, warmup, steps, rounds)
    return {
        **spec, "kind": "methods", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__, "ms": {k: round(v, 3) for k, v in ms.items()},
        "over_sgd": {k: round(v / ms["sgd"], 3) for k, v in ms.items()},
        "over_sam": {k: round(v / ms["sam"], 3) for k, v in ms.items()},
        "passes_per_step": {k: list(v) for k, v in passes.items()},
        "timing": f"median of {rounds} rounds x {steps} steps after {warmup} warm-up steps",
    }


def emit(result: dict, out: Path | None, filename: str) -> None:
    """Print one JSON line; with --out, also append it to OUT/filename."""
    line = json.dumps(result)
    print(line, flush=True)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / filename, "a") as f:
            f.write(line + "\n")


def git_sha() -> str | None:
    import subprocess

    r = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--suite", choices=["cpu", "gpu"], default=None, help="default: the device's suite")
    parser.add_argument("--model", help="one configuration instead of a suite")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, help="also append the JSON lines to OUT/bench_step.jsonl")
    parser.add_argument("--per-device", action="store_true", help="only the per-device step rows (issue 8)")
    parser.add_argument("--methods", action="store_true", help="only the SAM-family rows: each method against SGD and SAM")
    parser.add_argument("--no-per-device", action="store_true", help="skip the per-device step rows")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.model:
        suite = [dict(model=args.model, batch=args.batch, precision=args.precision,
                      channels_last=args.channels_last, compile=args.compile)]
    else:
        suite = GPU_SUITE if (args.suite or ("gpu" if cuda else "cpu")) == "gpu" else CPU_SUITE
    warmup = args.warmup or (20 if cuda else 3)
    steps = args.steps or (20 if cuda else 3)
    rounds = args.rounds or (7 if cuda else 3)
    sha = git_sha()
    if args.methods:
        spec = dict(model=args.model or "resnet20", batch=args.batch, precision="fp32", channels_last=False)
        emit({**bench_methods(spec, device, warmup, steps, rounds), "git_sha": sha}, args.out, "bench_step.jsonl")
        return 0
    if not args.per_device:
        for spec in suite:
            emit({**bench(spec, device, warmup, steps, rounds), "git_sha": sha}, args.out, "bench_step.jsonl")
    if not args.no_per_device and not args.model:
        per_device = GPU_PER_DEVICE_SUITE if suite is GPU_SUITE else CPU_PER_DEVICE_SUITE
        for spec in per_device:
            emit({**bench_per_device(spec, device, warmup, steps, rounds), "git_sha": sha}, args.out, "bench_step.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
