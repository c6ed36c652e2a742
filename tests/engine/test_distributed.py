"""Multi-GPU SAM on the CPU: DistributedDataParallel over 2 gloo processes against single-process runs.

- 2 replicas of 16 equal ONE process emulating 2 devices of 16 (device_batch=16), for SGD and SAM:
  weights, every metrics row (train and test) and the BatchNorm running statistics; for SAM also
  one process with optim.m=16 (the per-device perturbation and BatchNorm of the same devices);
- optim.sync_perturbation=true equals one process over the full batch, m=null (with a model without
  BatchNorm: per-replica BatchNorm normalizes over half the batch, so it cannot equal full-batch BN);
- a resumed DDP run ends where an uninterrupted one does, and the ranks hold the same BN statistics;
- every SAM-family method, trained in one 2-process launch, equals one process emulating 2 devices;
- `sam-train engine.ddp=true` writes one run directory.
Augmentation is off (its draws are per rank) and the data is synthetic.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sam_repro.engine.loop import Run
from tests.helpers import train
from tests.conftest import compose_config, sam_train

WORLD = 2
PER_REPLICA = 16
BASE = ["experiment=smoke", "augment=none", "dataset.image_size=8", "dataset.train_size=128",
        "dataset.test_size=64", f"batch_size={WORLD * PER_REPLICA}", "epochs=2", "engine.progress=false",
        "engine.eval_batch_size=64", "optim.lr=0.05"]
NO_BN = ["model.name=timm/test_efficientnet_gn", "dataset.image_size=16"]  # GroupNorm: no BatchNorm layer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, overrides: list[str], out: str, resume: bool) -> None:
    """One rank: an uninterrupted run into out/straight, and (resume=True) a run stopped after epoch 1
    and continued by a fresh Run into out/resumed; each rank saves its final model."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from sam_repro.engine import distributed

    cfg = compose_config(overrides)
    try:
        run = Run(cfg, Path(out) / "straight")
        assert train(run) == 0
        torch.save(run.model.state_dict(), Path(out) / f"rank{rank}.pt")
        if resume:
            stopped = Run(cfg, Path(out) / "resumed")
            stopped.epochs = 1  # as if killed after the first epoch's checkpoint
            assert train(stopped) == 0
            assert train(Run(cfg, Path(out) / "resumed")) == 0
    finally:
        distributed.shutdown()


def run_ddp(tmp: Path, overrides: list[str], resume: bool = False) -> Path:
    mp.spawn(_rank_main, args=(free_port(), overrides, str(tmp), resume), nprocs=WORLD, join=True)
    return tmp


def run_single(run_dir: Path, overrides: list[str]) -> dict:
    assert train(Run(compose_config(overrides), run_dir)) == 0
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)


def params(state: dict) -> dict[str, torch.Tensor]:
    """The trainable weights of a checkpoint (BatchNorm running statistics left out)."""
    return {k: v for k, v in state["model"].items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def train_rows(state: dict) -> list[float]:
    """train_loss, train_err of every epoch (both summed over the ranks)."""
    return [v for r in state["progress"]["history"] for v in (r["train_loss"], r["train_err"])]


def rows(state: dict) -> list[float]:
    """Every logged number of every epoch but the timings: train and test loss and error, lr."""
    keys = ("lr", "train_loss", "train_err", "test_loss", "test_err")
    return [r[k] for r in state["progress"]["history"] for k in keys]


def bn_stats(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state["model"].items() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["sam", "sgd"])
def test_ddp_replicas_equal_one_process_emulating_the_devices(tmp_path: Path, optim: str) -> None:
    # float64: the two runs add the same numbers in different orders (one 32-example convolution vs
    # two 16-example ones); in float32 that rounding, amplified by 8 SGD steps, reaches 1e-4, which
    # would hide a real difference. In float64 they agree to ~1e-15.
    base = [*BASE, f"optim={optim}", "engine.precision=fp64"]
    out = run_ddp(tmp_path / "ddp", base, resume=optim == "sam")
    ddp = torch.load(out / "straight" / "checkpoint.pt", weights_only=False)
    emulated = run_single(tmp_path / "emulated", [*base, f"device_batch={PER_REPLICA}"])
    full_batch = run_single(tmp_path / "full", base)

    # The same step: BatchNorm over each 16 examples, e(w) from each half (SAM), gradients averaged;
    # the devices' running statistics averaged (the emulation every step, DDP before each evaluation).
    assert max_diff(params(ddp), params(emulated)) < 1e-6
    assert max_diff(bn_stats(ddp), bn_stats(emulated)) < 1e-6
    assert rows(ddp) == pytest.approx(rows(emulated), rel=1e-6, abs=1e-6)
    # ... and not the one-device step over the whole batch: the comparison can fail.
    assert max_diff(params(ddp), params(full_batch)) > 1e-3
    assert max_diff(bn_stats(ddp), bn_stats(full_batch)) > 1e-3

    # BatchNorm statistics averaged over the ranks before evaluation/checkpointing: both ranks end equal.
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in range(WORLD))
    stats = [k for k in r0 if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(r0[k], r1[k]) for k in stats)
    if optim == "sgd":
        return
    # optim.m=16 in one process perturbs and normalizes the same two devices.
    per_m = run_single(tmp_path / "m", [*base, f"optim.m={PER_REPLICA}"])
    assert max_diff(params(ddp), params(per_m)) < 1e-6 and max_diff(bn_stats(ddp), bn_stats(per_m)) < 1e-6
    assert rows(ddp) == pytest.approx(rows(per_m), rel=1e-6, abs=1e-6)

    # Every rank resumed from rank 0's checkpoint and ended where the uninterrupted run did.
    resumed = torch.load(out / "resumed" / "checkpoint.pt", weights_only=False)
    assert resumed["progress"]["epoch"] == 2
    assert all(torch.equal(resumed["model"][k], ddp["model"][k]) for k in ddp["model"])
    assert train_rows(resumed) == train_rows(ddp)
    assert "module." not in " ".join(ddp["model"])  # the plain model is saved, not the DDP wrapper


@pytest.mark.slow
def test_synchronized_perturbation_equals_one_process_over_the_full_batch(tmp_path: Path) -> None:
    # float64: a mean over 32 examples and the mean of two means over 16 differ in the last bits, and
    # training amplifies that; in float32 it reached 1e-6 after these 4 steps (3e-5 after 8), a tenth
    # of a 1e-5 bound tuned to one machine, and a train_err compared within it could flip. In float64
    # it stays ~1e-15, so the weights agree to 1e-10 and the error counts exactly.
    base = [*BASE, *NO_BN, "epochs=1", "engine.precision=fp64"]
    ddp = torch.load(run_ddp(tmp_path / "ddp", [*base, "optim.sync_perturbation=true"]) / "straight" / "checkpoint.pt",
                     weights_only=False)
    full_batch = run_single(tmp_path / "full", base)
    per_replica = run_single(tmp_path / "m", [*base, f"optim.m={PER_REPLICA}"])

    assert max_diff(params(ddp), params(full_batch)) < 1e-10
    assert train_rows(ddp)[1::2] == train_rows(full_batch)[1::2]  # train_err: the same examples misclassified
    assert train_rows(ddp)[::2] == pytest.approx(train_rows(full_batch)[::2], rel=1e-10)  # train_loss
    assert max_diff(params(ddp), params(per_replica)) > 1e-3  # one e for the batch, not one per replica


@pytest.mark.slow
def test_sam_train_engine_ddp_writes_one_run_directory(tmp_path: Path) -> None:
    result = sam_train([*BASE, "engine.ddp=true", "engine.device=cpu", f"engine.nproc={WORLD}",
                        f"runs_root={tmp_path}"], cwd=tmp_path, timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    runs = [p.parent for p in tmp_path.rglob("metrics.json")]
    assert len(runs) == 1 and len(list(tmp_path.rglob(".hydra"))) == 1
    summary = json.loads((runs[0] / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_done"] == 2
    assert summary["data"]["train_size"] == 128  # both ranks' examples counted once
    # each replica perturbs with its own half of the batch: the log says m = the per-replica batch
    assert summary["config"]["devices"] == WORLD
    assert summary["config"]["m"] == summary["config"]["batch_size"] // WORLD
    log = (runs[0] / "train.log").read_text()
    assert "re-launching under torchrun over 2 processes" in log
    assert log.count("epoch 2/2") == 1, "only rank 0 writes the run directory's log"
    rows = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_engine_ddp_on_the_cpu_needs_nproc(tmp_path: Path) -> None:
    from sam_repro.validate import ConfigError, validate

    with pytest.raises(ConfigError) as err:
        validate(compose_config([*BASE, "engine.ddp=true", "engine.device=cpu"]))
    assert err.value.problems == ["engine.nproc=None is invalid: engine.ddp=true on the CPU needs engine.nproc=N "
                                  "(N gloo processes)"]
    # the per-device batch the m check uses is the one the launched processes will have
    with pytest.raises(ConfigError, match="per-device batch \\(16\\)"):
        validate(compose_config([*BASE, "engine.ddp=true", "engine.device=cpu", "engine.nproc=2", "optim.m=32"]))


# Every SAM-family method (docs/methods.md), with the settings that make its step do all it can do in
# 2 steps: interval SAM and LookSAM alternate plain and SAM steps, ESAM keeps a subset of tensors (its
# keep mask, one for every process) and a fixed number of examples. Each distinct case of what is per
# device and what is synchronized under DDP is among them: a per-replica e (GSAM, SAM-ON, ASAM-ON,
# ESAM, the SAM steps of interval SAM and LookSAM), per-device state (F-SAM's running mean, LookSAM's
# g_v), a synchronized first pass (VaSSO), gradients averaged before the method combines them (WSAM),
# a decision shared by seeding alike (ESAM's keep mask), clean and noisy ranks (RWP: the even rank clean,
# its BatchNorm statistics the only ones kept).
METHOD_RUNS = {
    "gsam": ["optim.gsam_rho_min=0.01"], "esam": ["optim.esam_selection=topk", "optim.esam_beta=0.6"],
    "fsam": [], "vasso": [], "samon": [], "asam_on": [], "interval_sam": ["optim.sam_interval=2"],
    "looksam": ["optim.looksam_k=2"], "rwp": [], "wsam": [],
}
METHODS_BASE = [*BASE, "model.name=wrn10_1", "dataset.train_size=64", "dataset.test_size=32", "engine.eval_batch_size=32",
                "epochs=1", "engine.precision=fp64"]


def _methods_rank_main(rank: int, port: int, runs: dict[str, list[str]], out: str) -> None:
    """One rank of one launch that trains every method in turn (spawning processes costs more than a run)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from sam_repro.engine import distributed

    try:
        for method, overrides in runs.items():
            assert train(Run(compose_config(overrides), Path(out) / method)) == 0
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_every_method_under_ddp_equals_one_process_emulating_the_devices(tmp_path: Path) -> None:
    # float64, as the SAM test above: the two layouts add the same numbers in different orders
    runs = {m: [*METHODS_BASE, f"optim={m}", *extra] for m, extra in METHOD_RUNS.items()}
    mp.spawn(_methods_rank_main, args=(free_port(), runs, str(tmp_path / "ddp")), nprocs=WORLD, join=True)
    worst = {}
    for method, overrides in runs.items():
        ddp = torch.load(tmp_path / "ddp" / method / "checkpoint.pt", weights_only=False)
        emulated = run_single(tmp_path / "emulated" / method, [*overrides, f"device_batch={PER_REPLICA}"])
        assert ddp["progress"]["step"] == emulated["progress"]["step"] == 2
        worst[method] = (max_diff(params(ddp), params(emulated)), max_diff(bn_stats(ddp), bn_stats(emulated)))
    assert all(p < 1e-6 and b < 1e-6 for p, b in worst.values()), worst
    print("max |DDP - emulated| (parameters, BatchNorm buffers):", {m: f"{p:.1e}, {b:.1e}" for m, (p, b) in worst.items()})
