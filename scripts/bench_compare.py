#!/usr/bin/env python3
"""Benchmark this checkout's training step against another git revision's, side by side in ONE process.

The other revision's `sam_repro` and `configs/` are extracted (git archive) into a temporary folder
as the package `sam_repro_baseline`, so that both versions' steps are built on the same model, data
and process, and timed in alternation (round by round), so that a noisy neighbour or clock drift
hits both alike. Rows (one JSON line each, `after_over_before` = after's throughput / before's):
- `one_device`: SAM's step with the batch as one device (ResNet-32, batch 128; the eager path);
- `per_device`: SAM's step with `device_batch` emulated devices (ResNet-32, batch 256 in devices of 32);
- `pack<N>`: N SAM runs trained as one pack (ResNet-32, batch 64 in devices of 32), and SGD.

    python scripts/bench_compare.py --before 3904a77 --out results/bench        # CPU, ~10 min on 2 cores
"""
from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_step import emit, git_sha  # noqa: E402


def extract(revision: str, into: Path) -> str:
    """`revision`'s sam_repro as the package sam_repro_baseline below `into` (its configs beside it)."""
    archive = into / "rev.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), revision, "sam_repro", "configs"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    (into / "sam_repro").rename(into / "sam_repro_baseline")
    for path in (into / "sam_repro_baseline").rglob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\bsam_repro\b(?!_)", "sam_repro_baseline", text))
    sys.path.insert(0, str(into))
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", revision], capture_output=True, text=True).stdout.strip()


def compose(package: str, overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    config = importlib.import_module(f"{package}.config")
    config.register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config.config_dir()), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def solo_step(package: str, model_name: str, batch: int, device_batch: int | None) -> Callable[[], Any]:
    """A SAM step of one run (the engine's TrainStep) on a fixed batch."""
    step_mod = importlib.import_module(f"{package}.engine.step")
    factory = importlib.import_module(f"{package}.optim.factory")
    models = importlib.import_module(f"{package}.models")
    config = importlib.import_module(f"{package}.config")
    torch.manual_seed(0)
    model = models.create_model(model_name, num_classes=10)
    model.train()
    opt, sam = factory.build_optimizer(model, config.OptimConfig(name="sam", lr=0.1, weight_decay=5e-4))
    step = step_mod.TrainStep(model, opt, sam, step_mod.StepConfig(grad_clip=5.0, device_batch=device_batch))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    return lambda: step(x, y)


def pack_step(package: str, optim: str, n: int, root: Path) -> Callable[[], Any]:
    """n runs of Table 4's shape as one pack (each version's own pack API)."""
    base = ["dataset=synthetic", "dataset.image_size=32", "dataset.train_size=128", "dataset.test_size=64",
            "model.name=resnet32", "batch_size=64", "device_batch=32", f"optim={optim}", "engine.device=cpu",
            "engine.precision=fp32", "engine.progress=false", "epochs=1"]
    cfgs = [compose(package, base + [f"seed={i}", f"optim.rho={0.05 * (1 + i % 2)}"]) for i in range(n)]
    loop = importlib.import_module(f"{package}.engine.loop")
    dirs = [root / f"{package}-{optim}{n}-{i}" for i in range(n)]
    if package == "sam_repro_baseline":  # before the one core: Trainer + engine/pack.py's PackedStep
        pack = importlib.import_module(f"{package}.engine.pack")
        runs = [loop.Trainer(cfg, d) for cfg, d in zip(cfgs, dirs)]
        step = pack.PackedStep(runs, runs[0].step.cfg)
    else:
        grid = importlib.import_module(f"{package}.engine.grid")
        runs = [loop.Run(cfg, d) for cfg, d in zip(cfgs, dirs)]
        step = grid.GridStep([run.member for run in runs], runs[0].step_config)
    batches = []
    for run in runs:
        run.train_loader.set_epoch(1)
        batches.append(next(iter(run.train_loader)))
    x, y = torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])
    return lambda: step(x, y)


def alternate(before: Callable[[], Any], after: Callable[[], Any], warmup: int, steps: int, rounds: int) -> dict:
    """Median seconds per step of each, timed round by round in alternation after warm-up steps."""
    for _ in range(warmup):
        before(), after()
    times: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(rounds):
        for name, fn in (("before", before), ("after", after)):
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - start) / steps)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"before_s": round(median["before"], 4), "after_s": round(median["after"], 4),
            "after_over_before": round(median["before"] / median["after"], 3),
            "timing": f"median of {rounds} rounds x {steps} steps after {warmup} warm-up steps, alternating"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the git revision to compare with (e.g. 3904a77)")
    parser.add_argument("--rows", default="one_device,per_device,pack4,pack8",
                        help="which rows: one_device, per_device, pack<N> (SAM and SGD)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also append the JSON lines to OUT/bench_compare.jsonl")
    args = parser.parse_args()
    from sam_repro.runlog import cpu_name

    with tempfile.TemporaryDirectory() as tmp:
        before_sha = extract(args.before, Path(tmp))
        env = {"after_sha": git_sha(), "before_sha": before_sha, "torch": torch.__version__, "device": cpu_name(),
               "threads": torch.get_num_threads()}
        for row in args.rows.split(","):
            if row == "one_device":
                pairs = {"sam": [solo_step(p, "resnet32", 128, None) for p in ("sam_repro_baseline", "sam_repro")]}
            elif row == "per_device":
                pairs = {"sam": [solo_step(p, "resnet32", 256, 32) for p in ("sam_repro_baseline", "sam_repro")]}
            else:
                n = int(row.removeprefix("pack"))
                pairs = {optim: [pack_step(p, optim, n, Path(tmp)) for p in ("sam_repro_baseline", "sam_repro")]
                         for optim in ("sam", "sgd")}
            for optim, (before, after) in pairs.items():
                emit({"bench": "compare", "row": row, "optim": optim,
                      **alternate(before, after, args.warmup, args.steps, args.rounds), **env}, args.out, "bench_compare.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
