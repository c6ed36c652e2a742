"""Packed runs (sam_repro/engine/grid.py, trained by engine/loop.py) against the same runs trained alone.

The reference is the solo engine (engine/loop.py), itself tested against literal k-device
references (test_step.py, test_distributed.py). A pack must give each member exactly that run:
its own seed, noise, rho, lr, clipping, BatchNorm statistics and metrics.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from hydra_plugins.sam_repro_pack_launcher.plan import pack_key, plan_packs
from sam_repro.engine import loop as loop_module
from sam_repro.engine.grid import GridStep
from sam_repro.engine.loop import Run, Trainer, fit, fit_pack, open_runs
from sam_repro.rundir import load_checkpoint
from tests.conftest import TIMING_KEYS as TIMING, compose_config, sam_train  # wall-clock: the only fields allowed to differ


def tiny(optim: str, precision: str = "fp64", extra: tuple[str, ...] = ()) -> list[str]:
    """A WRN-10-1 on 192 synthetic 16 px images, batch 32 split into 2 emulated devices of 16."""
    return ["experiment=smoke", "model.name=wrn10_1", f"engine.precision={precision}", "dataset.train_size=192",
            "dataset.test_size=64", "batch_size=32", "device_batch=16", "epochs=2", "engine.progress=false",
            "engine.pack_execution=pack", f"optim={optim}", *extra]


# three members that differ in everything a member may: seed, label noise (rate and seed), rho, lr, clipping
MEMBERS = [
    ["seed=0", "dataset.label_noise=0.2", "optim.rho=0.05"],
    ["seed=1", "dataset.label_noise=0.4", "dataset.noise_seed=3", "optim.rho=0.1", "optim.lr=0.02"],
    ["seed=2", "optim.rho=0.2", "optim.grad_clip=0.5", "optim.weight_decay=1e-3"],
]


def configs(optim: str, precision: str = "fp64", extra: tuple[str, ...] = ()) -> list[DictConfig]:
    return [compose_config(tiny(optim, precision, extra) + m) for m in MEMBERS]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Error rates are percentages of a count of examples: discrete. They are compared as counts, never by a
# relative tolerance (one example more of 64 is 1.6 % whatever the tolerance was meant for).
ERRORS = {"train_err": "train", "test_err": "test", "val_err": "val"}


def worst_relative_gap(a: Path, b: Path, discrete: bool = True) -> float:
    """The largest relative difference over the continuous metrics.jsonl values (rows and keys must
    match); with `discrete`, the error counts must be equal (float64 runs: a flip needs an example
    whose top-2 logit margin is below ~1e-13)."""
    ra, rb = rows(a), rows(b)
    assert len(ra) == len(rb)
    worst = 0.0
    for x, y in zip(ra, rb):
        assert set(x) == set(y)
        for key in set(x) - TIMING:
            if key in ERRORS:
                assert not discrete or x[key] == y[key], key
            elif isinstance(x[key], float):
                worst = max(worst, abs(x[key] - y[key]) / max(abs(x[key]), 1e-12))
            else:
                assert x[key] == y[key], key
    return worst


@pytest.mark.parametrize("optim", ["sam", "sgd"])
def test_pack_of_three_equals_three_solo_runs_in_float64(tmp_path: Path, optim: str) -> None:
    cfgs = configs(optim)
    assert len({pack_key(c)[0] for c in cfgs}) == 1
    for i, cfg in enumerate(cfgs):
        assert fit(cfg, tmp_path / f"solo{i}") == 0
    assert fit_pack([(cfg, tmp_path / f"pack{i}") for i, cfg in enumerate(cfgs)]) == [0, 0, 0]
    for i in range(3):
        solo, packed = tmp_path / f"solo{i}", tmp_path / f"pack{i}"
        assert worst_relative_gap(solo, packed) < 1e-5
        # the run directory is a solo run's: same files, same config block, a checkpoint of that member alone
        assert sorted(p.name for p in solo.iterdir()) == sorted(p.name for p in packed.iterdir())
        summary_a, summary_b = (json.loads((d / "metrics.json").read_text()) for d in (solo, packed))
        assert summary_a["config"] == summary_b["config"] and summary_b["status"] == "completed"
        state_a, state_b = load_checkpoint(solo), load_checkpoint(packed)
        for name, tensor in state_a["model"].items():
            assert state_b["model"][name].shape == tensor.shape  # one member, not the stack
            torch.testing.assert_close(state_b["model"][name], tensor, rtol=1e-7, atol=1e-9)
    # the members really differ (a pack that trained one run three times would fail above, but say so)
    assert rows(tmp_path / "pack0")[-1]["train_loss"] != rows(tmp_path / "pack1")[-1]["train_loss"]


def test_pack_in_float32_is_close_to_solo_runs(tmp_path: Path) -> None:
    """float32: the packed kernels sum in another order (vmap turns a member's convolutions into one
    grouped convolution), a ~1e-7 relative difference per operation that training amplifies step by
    step, by an amount that depends on the CPU's kernels and thread count. Continuous values: 2e-3 at
    most measured after these 12 steps (SAM, clipping) on Intel and AMD machines; tolerance 2e-2.
    The final test error is a count of examples, and only an example whose top-2 logit margin is
    smaller than twice the largest logit difference between the two models can be classified
    differently: the counts may differ by at most the number of such examples, a bound computed
    here from the two models rather than assumed. The training error (accumulated over steps at
    weights not kept) is not compared."""
    cfgs = configs("sam", "fp32", ("epochs=2",))
    for i, cfg in enumerate(cfgs):
        fit(cfg, tmp_path / f"solo{i}")
    fit_pack([(cfg, tmp_path / f"pack{i}") for i, cfg in enumerate(cfgs)])
    for i, cfg in enumerate(cfgs):
        solo, packed = tmp_path / f"solo{i}", tmp_path / f"pack{i}"
        assert worst_relative_gap(solo, packed, discrete=False) < 2e-2
        logits = []
        for run_dir in (solo, packed):
            run = Run(cfg, tmp_path / "eval")
            run.model.load_state_dict(load_checkpoint(run_dir)["model"])
            run.model.eval()
            with torch.no_grad():
                batches = [(run.model(x), y) for x, y in run.eval_loaders["test"]]
            logits.append(torch.cat([out for out, _ in batches]))
            labels = torch.cat([y for _, y in batches])
            run.close()
        a, b = logits
        top2 = a.topk(2, dim=1).values
        near_boundary = int(((top2[:, 0] - top2[:, 1]) <= 2 * (a - b).abs().max()).sum())
        wrong = [round(rows(d)[-1]["test_err"] * labels.numel() / 100) for d in (solo, packed)]
        assert wrong[0] == int((a.argmax(1) != labels).sum()) and wrong[1] == int((b.argmax(1) != labels).sum())
        assert abs(wrong[0] - wrong[1]) <= near_boundary, (wrong, near_boundary)


def test_first_packed_step_matches_each_solo_step_in_float32(tmp_path: Path) -> None:
    cfgs = configs("sam", "fp32")
    solo = [Run(cfg, tmp_path / f"s{i}") for i, cfg in enumerate(cfgs)]
    packed = [Run(cfg, tmp_path / f"p{i}") for i, cfg in enumerate(cfgs)]
    step = GridStep([run.member for run in packed], packed[0].step_config)
    batches = []
    for trainer in solo:
        trainer.train_loader.set_epoch(1)
        batches.append(next(iter(trainer.train_loader)))
    torch.manual_seed(0)
    stats = step(torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches]))
    for trainer, (x, y), member in zip(solo, batches, stats):
        trainer.lr(0)
        alone = trainer.solo_step()(x, y)
        torch.testing.assert_close(member.loss_sum, alone.loss_sum, rtol=1e-5, atol=0)
        torch.testing.assert_close(member.grad_norm, alone.grad_norm, rtol=1e-5, atol=0)
    for a, b in zip(solo, packed):
        for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


def test_each_member_is_perturbed_with_its_own_norm(tmp_path: Path) -> None:
    """Members whose gradients differ by orders of magnitude (the classifier of one scaled by 1e3, of
    another by 1e-3): each member's ||e|| per device is its own rho, and its logged gradient norm is
    its own, computed here by plain autograd per device group."""
    cfgs = configs("sam")
    trainers = [Run(cfg, tmp_path / f"m{i}") for i, cfg in enumerate(cfgs)]
    with torch.no_grad():
        for trainer, scale in zip(trainers, (1.0, 1e3, 1e-3)):
            trainer.model.fc.weight.mul_(scale)
    x = torch.randn(3, 32, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (3, 32))
    expected = []
    for trainer, xi, yi in zip(trainers, x, y):  # the independent reference: each device group alone
        norms = []
        for g in range(2):
            model = trainer.model
            model.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xi[16 * g:16 * g + 16]), yi[16 * g:16 * g + 16])
            grads = torch.autograd.grad(loss, list(model.parameters()))
            l2_of = {id(p): group.get("l2", 0.0) for group in trainer.optimizer.param_groups for p in group["params"]}
            total = [gr + l2_of[id(p)] * p for gr, p in zip(grads, model.parameters())]  # L2 in the loss
            norms.append(torch.sqrt(sum((t.double() ** 2).sum() for t in total)))
        expected.append(torch.stack(norms).mean())
        _reset_bn(model)
    assert max(expected) > 100 * min(expected)
    step = GridStep([run.member for run in trainers], trainers[0].step_config)
    stats = step(x, y)
    for member, reference, cfg in zip(stats, expected, cfgs):
        assert float(member.perturbation_norm) == pytest.approx(cfg.optim.rho, rel=1e-9)
        assert float(member.grad_norm) == pytest.approx(float(reference.detach()), rel=1e-6)


def _reset_bn(model: torch.nn.Module) -> None:
    """The reference's forward passes moved the running statistics; the pack must start from fresh ones."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()


def test_killed_pack_resumes_every_member_to_the_uninterrupted_result(tmp_path: Path, monkeypatch) -> None:
    cfgs = configs("sam", extra=("epochs=3",))
    fit_pack([(cfg, tmp_path / f"whole{i}") for i, cfg in enumerate(cfgs)])
    # killed before the third member's epoch-2 checkpoint: members 0 and 1 at epoch 2, member 2 at epoch 1
    real_save = loop_module.save_checkpoint
    saves = []

    def save_then_maybe_die(run_dir: Path, state: dict) -> None:
        saves.append(run_dir)
        if len(saves) == 3 + 3:  # member 2's epoch-2 checkpoint: the kill comes first
            raise SystemExit("killed")  # what a preemption signal handler raises
        real_save(run_dir, state)

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_maybe_die)
    with pytest.raises(SystemExit):
        fit_pack([(cfg, tmp_path / f"cut{i}") for i, cfg in enumerate(cfgs)])
    monkeypatch.setattr(loop_module, "save_checkpoint", real_save)
    assert [len(rows(tmp_path / f"cut{i}")) for i in range(3)] == [2, 2, 1]
    assert json.loads((tmp_path / "cut2" / "metrics.json").read_text())["status"] == "interrupted"
    # member 0 resumes ALONE (a member's checkpoint is a solo run's); 1 and 2 resume as a pack (two packs inside)
    assert fit(cfgs[0], tmp_path / "cut0") == 0
    assert fit_pack([(cfgs[i], tmp_path / f"cut{i}") for i in (1, 2)]) == [0, 0]
    for i in range(3):
        assert worst_relative_gap(tmp_path / f"whole{i}", tmp_path / f"cut{i}") < 1e-9


def test_a_diverging_member_is_frozen_and_the_others_go_on(tmp_path: Path) -> None:
    cfgs = configs("sgd")
    pack = Trainer(open_runs([(cfgs[0], tmp_path / "a"), (cfgs[1], tmp_path / "bad"), (cfgs[2], tmp_path / "c")]))
    schedule = pack.runs[1].lr

    def nan_from_step_8(step: int) -> float:  # the middle member's weights become NaN in epoch 2 (6 steps each)
        lr = schedule(step)
        if step >= 8:
            for group in pack.runs[1].optimizer.param_groups:
                group["lr"] = float("nan")
        return lr

    pack.runs[1].lr = nan_from_step_8
    assert pack.fit() == [0, 1, 0]
    bad = json.loads((tmp_path / "bad" / "metrics.json").read_text())
    assert bad["status"] == "diverged" and "non-finite training loss in epoch 2" in bad["error"]
    assert len(rows(tmp_path / "bad")) == 1  # its last good epoch; its checkpoint is that epoch's
    assert load_checkpoint(tmp_path / "bad")["progress"]["epoch"] == 1
    fit_pack([(cfgs[0], tmp_path / "a2"), (cfgs[2], tmp_path / "c2")])  # the same two without it
    assert worst_relative_gap(tmp_path / "a", tmp_path / "a2") < 1e-9
    assert worst_relative_gap(tmp_path / "c", tmp_path / "c2") < 1e-9


def test_plan_packs_groups_by_shape_and_says_why_a_job_runs_alone() -> None:
    base = tiny("sam")
    jobs = [compose_config(base + ["seed=0"]), compose_config(base + ["seed=1", "optim.rho=0.3"]),
            compose_config(base + ["seed=0", "model.name=wrn16_1"]), compose_config(tiny("sgd") + ["seed=0"]),
            compose_config(tiny("sgd") + ["seed=1", "sched=step"]), compose_config(base + ["engine.ddp=true"]),
            None, compose_config(base + ["seed=2", "dataset.label_noise=0.6"]),
            compose_config(["experiment=t3_flowers102_efficientnet_b7", "seed=0"]),
            compose_config(["experiment=t3_flowers102_efficientnet_b7", "seed=1"])]
    plan = dict((tuple(members), why) for members, why in plan_packs(jobs, size=8))
    assert plan[(0, 1, 7)] is None and plan[(3, 4)] is None  # rho, noise, schedule: per member
    assert "model.name" in plan[(2,)]
    assert "ddp" in plan[(5,)]
    assert plan[(6,)] is not None
    assert "file-backed" in plan[(8,)] and "file-backed" in plan[(9,)]  # finetuning on JPEG files: alone
    seeds = [compose_config(base + [f"seed={s}"]) for s in range(9)]
    assert sorted(len(m) for m, _ in plan_packs(seeds, size=8)) == [4, 5]  # balanced, not 8 + a lone job
    assert sorted(len(m) for m, _ in plan_packs(seeds[:5], size=2)) == [1, 2, 2]
    assert sorted(i for m, _ in plan_packs(seeds, size=8) for i in m) == list(range(9))


@pytest.mark.slow
def test_pack_launcher_end_to_end_packs_skips_completed_and_runs_a_leftover_alone(tmp_path: Path) -> None:
    """`sam-train -m hydra/launcher=pack`: three matching jobs at size 2 are a pack of 2 and one job
    alone (with its reason); every job gets a complete run directory; a second identical sweep
    skips the completed members instead of training them again."""
    args = ["-m", "hydra/launcher=pack", "hydra.launcher.size=2", *tiny("sam", "fp32", ("epochs=1",)),
            "seed=0,1,2", f"runs_root={tmp_path}"]
    first = sam_train(args, cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    log = first.stdout + first.stderr
    assert "pack of 2 runs" in log
    assert "runs alone: left over after packs of hydra.launcher.size" in log
    assert "3 of 3 jobs completed" in log
    run_dirs = sorted(p.parent for p in tmp_path.glob("smoke/*/metrics.json"))
    assert len(run_dirs) == 3
    for run_dir in run_dirs:
        summary = json.loads((run_dir / "metrics.json").read_text())
        assert summary["status"] == "completed" and len(rows(run_dir)) == 1
        assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "checkpoint.pt").is_file()
        assert "epoch 1/1" in (run_dir / "train.log").read_text()
    again = sam_train(args, cwd=tmp_path, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("already completed: skipped") == 2
    assert all(len(rows(d)) == 1 for d in run_dirs)


@pytest.mark.parametrize("family", ["pyramidnet_shakedrop", "shakeshake"])
def test_other_model_families_pack_like_their_solo_runs(tmp_path: Path, monkeypatch, family: str) -> None:
    """Not only ResNets: a PyramidNet with ShakeDrop (its drop probability at 0, so that both sides are
    deterministic) and a Shake-Shake net (its branch coefficients drawn per member by the pack) train
    in a pack; the PyramidNet members equal their solo runs in float64."""
    import sam_repro.engine.loop as loop
    from sam_repro.models.pyramidnet import PyramidNet
    from sam_repro.models.shakeshake import ShakeShakeResNet

    def small(cfg, num_classes: int, in_chans: int) -> torch.nn.Module:
        if family == "shakeshake":
            return ShakeShakeResNet(blocks_per_group=1, base_width=4, num_classes=num_classes, in_chans=in_chans)
        return PyramidNet(depth=11, alpha=12, num_classes=num_classes, in_chans=in_chans, max_drop=0.0)

    monkeypatch.setattr(loop, "create_model_from_config", small)
    cfgs = [compose_config(tiny("sam", extra=("dataset.image_size=8", "dataset.train_size=64", f"seed={s}",
                                              f"optim.rho={0.05 * (s + 1)}"))) for s in (0, 1)]
    assert fit_pack([(cfg, tmp_path / f"pack{i}") for i, cfg in enumerate(cfgs)]) == [0, 0]
    for i, cfg in enumerate(cfgs):
        history = rows(tmp_path / f"pack{i}")
        assert len(history) == 2 and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in history)
        if family == "pyramidnet_shakedrop":
            fit(cfg, tmp_path / f"solo{i}")
            assert worst_relative_gap(tmp_path / f"solo{i}", tmp_path / f"pack{i}") < 1e-5


@pytest.mark.parametrize("optim", ["sam", "sgd"])
def test_a_parameter_the_loss_never_reaches_packs_like_its_solo_runs(tmp_path: Path, monkeypatch, optim: str) -> None:
    """vmap's gradient of such a parameter is zeros expanded with stride 0; the L2 term (in the loss)
    is added to it in place, and decays it as the official code's L2 in the loss does."""
    real = loop_module.create_model_from_config

    def with_unused(cfg, num_classes: int, in_chans: int) -> torch.nn.Module:
        model = real(cfg, num_classes=num_classes, in_chans=in_chans)
        model.register_parameter("unused", torch.nn.Parameter(torch.ones(3)))
        return model

    monkeypatch.setattr(loop_module, "create_model_from_config", with_unused)
    cfgs = configs(optim)[:2]
    for i, cfg in enumerate(cfgs):
        assert fit(cfg, tmp_path / f"solo{i}") == 0
    assert fit_pack([(cfg, tmp_path / f"pack{i}") for i, cfg in enumerate(cfgs)]) == [0, 0]
    for i, cfg in enumerate(cfgs):
        assert worst_relative_gap(tmp_path / f"solo{i}", tmp_path / f"pack{i}") < 1e-9
        solo, packed = (load_checkpoint(tmp_path / f"{kind}{i}")["model"]["unused"] for kind in ("solo", "pack"))
        torch.testing.assert_close(packed, solo, rtol=1e-12, atol=0)
        assert float(solo.max()) < 1.0  # decayed: L2 in the loss reaches it


def test_a_pack_in_channels_last_equals_its_solo_runs_and_keeps_the_members_layout(tmp_path: Path) -> None:
    cfgs = configs("sam", extra=("engine.channels_last=true",))[:2]
    for i, cfg in enumerate(cfgs):
        assert fit(cfg, tmp_path / f"solo{i}") == 0
    runs = open_runs([(cfg, tmp_path / f"pack{i}") for i, cfg in enumerate(cfgs)])
    assert Trainer(runs).fit() == [0, 0]
    for i, run in enumerate(runs):
        assert worst_relative_gap(tmp_path / f"solo{i}", tmp_path / f"pack{i}") < 1e-9
        convs = [p for p in run.model.parameters() if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
