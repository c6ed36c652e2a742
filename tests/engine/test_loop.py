"""engine/loop.py in process, on runs of a second or less: what each metrics.jsonl row sums, the
evaluation against a naive count, resume, cadence, divergence, interruptions and failures, packs
whose members stand at different points. (The end-to-end versions, through `sam-train`, are in
tests/test_cli.py and tests/engine/test_run_faults.py.)"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sam_repro.engine import loop as loop_module
from sam_repro.engine.loop import Period, Progress, Run, Trainer, evaluate, fit, fit_pack, open_runs
from sam_repro.engine.passes import StepStats
from sam_repro.engine.runtime import Runtime
from sam_repro.rundir import DiskFull, RunDirBusy, RunDirLock, load_checkpoint
from tests.conftest import compose_config
from tests.helpers import FAST, assert_same_rows, rows, train


def cfg_of(*extra: str):
    return compose_config([*FAST, *extra])


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def recording(calls: list):
    """A step wrapper that records each step's StepStats."""
    def wrap(real):
        def step(x, y):
            stats = real(x, y)
            calls.append(stats)
            return stats
        return step
    return wrap


def test_evaluate_counts_each_members_loss_error_and_top5_error_as_a_naive_loop_does() -> None:
    torch.manual_seed(0)
    batches = [(torch.randn(5, 3), torch.randint(0, 12, (5,))) for _ in range(3)]
    weights = torch.randn(2, 3, 12, dtype=torch.float64)  # two members, a linear model each

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nd,pdc->pnc", x.double(), weights)

    runtime = Runtime(torch.device("cpu"), "fp64", channels_last=False)
    got = evaluate(forward, batches, runtime, members=2, top5=True)
    for p in range(2):
        loss = wrong = wrong5 = 0.0
        for x, y in batches:
            for xi, yi in zip(x.double(), y):
                logits = xi @ weights[p]
                loss += float(torch.logsumexp(logits, 0) - logits[yi])
                ranked = sorted(range(12), key=lambda c: -float(logits[c]))
                wrong += ranked[0] != int(yi)
                wrong5 += int(yi) not in ranked[:5]
        assert got[p]["loss"] == pytest.approx(loss / 15, rel=1e-12)
        assert got[p]["err"] == 100.0 * wrong / 15 and got[p]["top5_err"] == 100.0 * wrong5 / 15
    assert "top5_err" not in evaluate(forward, batches, runtime, members=2, top5=False)[0]


def test_a_row_sums_every_step_since_the_last_row_and_the_evaluation_of_the_model_it_checkpoints(tmp_path: Path) -> None:
    steps: list[StepStats] = []
    run = Run(cfg_of("epochs=3", "engine.eval_every=2", "optim=sam"), tmp_path)
    assert train(run, recording(steps)) == 0
    got = rows(tmp_path)
    assert [r["epoch"] for r in got] == [2, 3] and len(steps) == 6
    for row, interval in ((got[0], steps[:4]), (got[1], steps[4:])):
        seen = sum(s.count for s in interval)
        assert row["train_loss"] == pytest.approx(sum(float(s.loss_sum) for s in interval) / seen, rel=1e-12)
        assert row["train_err"] == pytest.approx(100 - 100 * sum(int(s.correct) for s in interval) / seen, rel=1e-12)
        assert row["grad_norm"] == pytest.approx(sum(float(s.grad_norm) for s in interval) / len(interval), rel=1e-12)
        assert row["perturbation_norm"] == pytest.approx(0.05, rel=1e-9)
    assert got[1]["lr"] == run.lr(5)  # the lr of the interval's last step
    state = load_checkpoint(tmp_path)
    assert state["progress"]["epoch"] == 3 and state["progress"]["step"] == 6 and len(state["progress"]["history"]) == 2
    run.model.load_state_dict(state["model"])
    run.model.eval()
    test = evaluate(run.forward, run.eval_loaders["test"], run.runtime, 1, top5=False)[0]
    assert (test["loss"], test["err"]) == (got[1]["test_loss"], got[1]["test_err"])
    done = summary(tmp_path)
    assert done["status"] == "completed" and done["epochs_done"] == 3 and done["final"]["test_err"] == got[1]["test_err"]
    assert done["wall_s"] == pytest.approx(state["progress"]["wall_s"], abs=1e-3)


def test_train_steps_cut_the_last_epoch_and_eval_every_steps_sets_the_rows(tmp_path: Path) -> None:
    steps: list[StepStats] = []
    run = Run(cfg_of("epochs=9", "train_steps=5", "engine.eval_every_steps=3"), tmp_path)
    assert run.epochs == 3 and run.total_steps == 5
    assert train(run, recording(steps)) == 0
    assert len(steps) == 5 and [r["epoch"] for r in rows(tmp_path)] == [2, 3]
    assert load_checkpoint(tmp_path)["progress"]["step"] == 5


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    cfg = cfg_of("epochs=3", "optim=sam", "dataset.label_noise=0.25")
    assert fit(cfg, tmp_path / "whole") == 0
    first = Run(cfg, tmp_path / "cut")
    first.epochs = 1  # stopped after its first epoch's checkpoint
    assert train(first) == 0
    resumed = Run(cfg, tmp_path / "cut")
    assert train(resumed) == 0
    assert rows(tmp_path / "whole") == rows(tmp_path / "cut")
    a, b = (load_checkpoint(tmp_path / d) for d in ("whole", "cut"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert all(torch.equal(a["optimizer"]["state"][k]["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
               for k in a["optimizer"]["state"])
    assert summary(tmp_path / "cut")["started_at"] == b["progress"]["started_at"]  # the first session's start


@pytest.mark.parametrize("pack", [False, True])
def test_a_diverging_run_stops_with_its_last_good_checkpoint_and_a_pack_goes_on(tmp_path: Path, pack: bool) -> None:
    cfgs = [cfg_of("epochs=3", f"seed={s}") for s in (0, 1)]
    runs = open_runs([(cfg, tmp_path / f"r{i}") for i, cfg in enumerate(cfgs)] if pack else [(cfgs[1], tmp_path / "r1")])
    bad = runs[-1]
    schedule = bad.lr

    def nan_in_epoch_2(step: int) -> float:
        lr = schedule(step)
        if step >= 2:
            for group in bad.optimizer.param_groups:
                group["lr"] = float("nan")
        return lr

    bad.lr = nan_in_epoch_2
    codes = Trainer(runs).fit()
    assert codes == ([0, 1] if pack else [1])
    stopped = summary(tmp_path / "r1")
    # lr NaN from step 2 on: the weights are NaN after it, the loss of step 3 is, and epoch 2's end sees it
    assert (stopped["status"], stopped["error"]) == ("diverged", "non-finite training loss in epoch 2 (by step 4)")
    assert len(rows(tmp_path / "r1")) == load_checkpoint(tmp_path / "r1")["progress"]["epoch"] == stopped["epochs_done"]
    assert all(math.isfinite(t) for r in rows(tmp_path / "r1") for t in (r["train_loss"], r["test_loss"]))
    if pack:
        assert summary(tmp_path / "r0")["status"] == "completed" and len(rows(tmp_path / "r0")) == 3


@pytest.mark.parametrize("error, status, text", [
    (KeyboardInterrupt(), "interrupted", "interrupted (KeyboardInterrupt) after epoch 1; re-run the same command to resume"),
    (SystemExit(143), "interrupted", "interrupted (SystemExit) after epoch 1; re-run the same command to resume"),
    (RuntimeError("boom"), "failed", "RuntimeError: boom"),
])
def test_an_exception_mid_run_is_recorded_and_raised(tmp_path: Path, error: BaseException, status: str, text: str) -> None:
    calls: list = []

    def raising(real):
        def step(x, y):
            calls.append(1)
            if len(calls) == 3:  # the first step of epoch 2
                raise error
            return real(x, y)
        return step

    run = Run(cfg_of("epochs=3"), tmp_path)
    with pytest.raises(type(error)):
        train(run, raising)
    stopped = summary(tmp_path)
    assert (stopped["status"], stopped["error"], stopped["epochs_done"]) == (status, text, 1)
    RunDirLock(tmp_path).acquire().release()  # the lock went with the run


def test_a_full_disk_while_recording_the_exit_is_logged_not_raised(tmp_path: Path, monkeypatch, caplog) -> None:
    run = Run(cfg_of("epochs=1"), tmp_path)
    progress = run.begin()

    def full(status: str, error: str) -> None:
        raise DiskFull("no space")

    monkeypatch.setattr(run.runlog, "finish", full)
    with caplog.at_level("ERROR", logger="sam_repro"):
        run.record_exit(KeyboardInterrupt(), progress)
    assert "metrics.json could not record interrupted: the disk is full" in caplog.text
    run.close()


def test_a_completed_run_trains_nothing_when_run_again(tmp_path: Path) -> None:
    cfg = cfg_of("epochs=2")
    assert fit(cfg, tmp_path) == 0
    before = rows(tmp_path, timing=True)
    calls: list = []
    assert train(Run(cfg, tmp_path), recording(calls)) == 0
    assert calls == [] and rows(tmp_path, timing=True) == before and summary(tmp_path)["status"] == "completed"


def test_runs_of_a_pack_at_different_points_train_in_groups_that_each_end_where_they_would(tmp_path: Path,
                                                                                            monkeypatch) -> None:
    cfgs = [cfg_of("epochs=3", f"seed={s}") for s in range(3)]
    for i, cfg in enumerate(cfgs):
        assert fit(cfg, tmp_path / f"solo{i}") == 0
    early = Run(cfgs[2], tmp_path / "p2")
    early.epochs = 1
    assert train(early) == 0  # the third member stands one epoch ahead
    groups: list[list[int]] = []
    real = Trainer._fit_together

    def recorded(self, runs, progresses):
        groups.append([p.epoch for p in progresses])
        return real(self, runs, progresses)

    monkeypatch.setattr(Trainer, "_fit_together", recorded)
    assert fit_pack([(cfg, tmp_path / f"p{i}") for i, cfg in enumerate(cfgs)]) == [0, 0, 0]
    assert groups == [[0, 0], [1]]
    for i in range(3):
        assert_same_rows(rows(tmp_path / f"solo{i}"), rows(tmp_path / f"p{i}"))


def test_a_packed_members_checkpoint_holds_that_member_alone(tmp_path: Path) -> None:
    runs = open_runs([(cfg_of("epochs=1", f"seed={s}"), tmp_path / f"p{s}") for s in (0, 1)])
    Trainer(runs).fit()
    for run in runs:
        state = run.state(Progress(history=[]))
        for name, tensor in state["model"].items():
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name
        torch.testing.assert_close(state["model"], load_checkpoint(run.run_dir)["model"], rtol=0, atol=0)


def test_opening_a_pack_with_a_busy_member_leaves_no_member_locked(tmp_path: Path) -> None:
    jobs = [(cfg_of("epochs=1", f"seed={s}"), tmp_path / f"p{s}") for s in range(3)]
    with RunDirLock(tmp_path / "p2"):
        with pytest.raises(RunDirBusy):
            open_runs(jobs)
    for _, run_dir in jobs:
        RunDirLock(run_dir).acquire().release()


def test_period_sums_on_the_device_and_counts_the_steps_with_sam_norms() -> None:
    period = Period(torch.device("cpu"))
    period.add(StepStats(torch.tensor(2.0), torch.tensor(3), 4, torch.tensor(1.5), torch.tensor(0.25)))
    period.add(StepStats(torch.tensor(1.0), torch.tensor(1), 4))
    period.add(StepStats(torch.tensor(0.5), torch.tensor(1), 3, images=8))  # ESAM: sums over 3 of the batch's 8
    assert (float(period.loss_sum), int(period.correct), period.seen, period.steps) == (3.5, 5, 11, 3)
    assert period.images == 16  # the throughput counts every example of every batch
    assert (float(period.grad_norm_sum), float(period.e_norm_sum), period.norm_steps) == (1.5, 0.25, 1)
    assert period.loss_sum.dtype == torch.float64


def test_each_epoch_draws_from_a_seed_of_its_own() -> None:
    seeds = {loop_module.epoch_seed(seed, epoch) for seed in range(4) for epoch in range(1, 200)}
    assert len(seeds) == 4 * 199 and loop_module.epoch_seed(0, 1) == 1 and loop_module.epoch_seed(1, 0) == 1_000_003


def tiny_model(cfg, num_classes: int, in_chans: int) -> torch.nn.Module:
    """The model of tests/fixtures/old_run_3904a77 (make.py)."""
    return torch.nn.Sequential(torch.nn.Conv2d(in_chans, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, num_classes))


def test_a_run_directory_written_before_the_one_core_resumes_to_what_todays_code_trains(tmp_path: Path,
                                                                                         monkeypatch) -> None:
    import shutil

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "old_run_3904a77"
    shutil.copytree(fixture, tmp_path / "old")
    old_rows = rows(tmp_path / "old", timing=True)
    monkeypatch.setattr(loop_module, "create_model_from_config", tiny_model)
    cfg = compose_config(["experiment=smoke", "dataset.image_size=8", "dataset.train_size=64", "dataset.test_size=32",
                          "batch_size=32", "epochs=2", "engine.progress=false", "engine.precision=fp64",
                          "augment=none", "optim=sam"])
    assert fit(cfg, tmp_path / "old") == 0
    assert fit(cfg, tmp_path / "new") == 0
    resumed = rows(tmp_path / "old", timing=True)
    assert resumed[0] == old_rows[0]  # the old row kept byte for byte, the second one added
    assert_same_rows(rows(tmp_path / "new"), rows(tmp_path / "old"))
    assert summary(tmp_path / "old")["status"] == "completed" and summary(tmp_path / "old")["epochs_done"] == 2
