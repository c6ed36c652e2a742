#!/usr/bin/env python3
"""Benchmark packed runs: a pack of n runs trained as one vectorized model against the same n runs
trained alone one after another, SAM and SGD, side by side in ONE process.

Each run is what `sam-train` builds for the configuration (the engine's Run: ResNet-32, Table 4's
batch 256 in devices of 32, its optimizer, L2, clipping), on synthetic 32 px data so that no data
is needed. Per (optimizer, n) it prints one JSON line: aggregate images/s of the pack and of the
solo runs, and their ratio (pack / solo; > 1: packing is faster). Solo and pack steps alternate
(after warm-up steps), with a device synchronization around each timed block.

    python scripts/bench_pack.py                                   # CPU: packs of 1, 4, 8
    python scripts/bench_pack.py --device cuda --sizes 1,4,8,16 --out results/bench
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import emit, git_sha  # noqa: E402
from sam_repro.config import config_dir, register_configs  # noqa: E402
from sam_repro.engine.grid import GridStep  # noqa: E402
from sam_repro.engine.loop import Run  # noqa: E402
from sam_repro.runlog import cpu_name  # noqa: E402


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def run_configs(args: argparse.Namespace, optim: str, n: int) -> list:
    """n runs of Table 4's shape that differ as a sweep's do (seed, noise rate, rho)."""
    base = ["dataset=synthetic", "dataset.image_size=32", f"dataset.train_size={args.batch * (args.warmup + args.steps)}",
            "dataset.test_size=256", f"model.name={args.model}", f"batch_size={args.batch}",
            f"device_batch={args.device_batch}", f"optim={optim}", f"engine.device={args.device}",
            f"engine.precision={args.precision}", "engine.progress=false", "epochs=1"]
    return [compose(base + [f"seed={i}", f"dataset.label_noise={0.2 * (i % 4)}", f"optim.rho={0.05 * (1 + i % 2)}"])
            for i in range(n)]


def timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def batches_of(run: Run, count: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    run.train_loader.set_epoch(1)
    out = []
    for x, y in run.train_loader:
        out.append((x.to(run.runtime.dtype), y))
        if len(out) == count:
            return out
    raise ValueError("the synthetic training set is too small for the steps asked")


def bench(args: argparse.Namespace, optim: str, n: int, device: torch.device, root: Path) -> dict:
    """n runs alone (each its own engine step, what `sam-train` runs per job, one after another) and
    the same n runs as one pack, timed in alternation step by step, so that a noisy neighbour or
    clock drift hits both alike."""
    steps, warmup = args.steps, args.warmup
    solo = [Run(cfg, root / f"{optim}{n}solo{i}") for i, cfg in enumerate(run_configs(args, optim, n))]
    solo_steps = [run.solo_step() for run in solo]
    solo_data = [batches_of(run, warmup + steps, device) for run in solo]
    packed = [Run(cfg, root / f"{optim}{n}pack{i}") for i, cfg in enumerate(run_configs(args, optim, n))]
    step = GridStep([run.member for run in packed], packed[0].step_config)
    per_run = [batches_of(run, warmup + steps, device) for run in packed]
    stacked = [(torch.stack([b[j][0] for b in per_run]), torch.stack([b[j][1] for b in per_run]))
               for j in range(warmup + steps)]
    solo_s = pack_s = 0.0
    for j in range(warmup + steps):
        t_solo = timed(lambda: [s(*data[j]) for s, data in zip(solo_steps, solo_data)], device)
        t_pack = timed(lambda: step(*stacked[j]), device)
        if j >= warmup:
            solo_s, pack_s = solo_s + t_solo, pack_s + t_pack
    images = n * args.batch * steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if args.profile and n == max(args.sizes_list):
        profile(step, stacked[-1], device, args.profile / f"profile_pack_{optim}{n}.txt")
    return {"bench": "pack", "optim": optim, "runs": n, "model": args.model, "batch": args.batch,
            "device_batch": args.device_batch, "precision": args.precision, "steps": steps,
            "solo_images_per_s": round(images / solo_s, 1), "pack_images_per_s": round(images / pack_s, 1),
            "pack_over_solo": round(solo_s / pack_s, 3), "peak_memory_gib": peak and round(peak, 2)}


def profile(step: GridStep, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device, path: Path) -> None:
    """Where a packed step's time goes: the torch profiler's top operators, to `path`."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step(*batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=30))
    print(f"# profile of a packed step -> {path}", file=sys.stderr)


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
           "cpu": cpu_name(), "cores": os.cpu_count()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default=None, help="pack sizes, comma-separated (CPU: 1,4,8; GPU: 1,4,8,16)")
    parser.add_argument("--optims", default="sam,sgd")
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device-batch", type=int, default=32)
    parser.add_argument("--precision", default=None, help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--out", type=Path, help="also append the JSON lines to OUT/bench_pack.jsonl")
    parser.add_argument("--profile", type=Path, help="write a profile of the largest pack's step into this folder")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.steps = args.steps or (20 if cuda else 2)
    args.warmup = args.warmup or (5 if cuda else 1)
    sizes = args.sizes_list = [int(s) for s in (args.sizes or ("1,4,8,16" if cuda else "1,4,8")).split(",")]
    env, sha = environment(device), git_sha()
    with tempfile.TemporaryDirectory() as tmp:
        for optim in args.optims.split(","):
            for n in sizes:
                result = {**bench(args, optim, n, device, Path(tmp)), **env, "git_sha": sha}
                emit(result, args.out, "bench_pack.jsonl")
                print(f"# {optim} x{n}: pack {result['pack_images_per_s']} img/s, solo {result['solo_images_per_s']} "
                      f"img/s, ratio {result['pack_over_solo']}x", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
