"""Each SAM-family method through the engine's step, on both backends with one device (the eager one a
solo run takes, and the grid one of packs and DDP), against its authors' released code: tests/fixtures/variants' trajectories, to 1e-10, in the fixtures' setting
(weight decay inside SGD: optim.wd_mode=decoupled; no clipping; BatchNorm as the fixture's policy
says: buffer_firstpass is optim.bn_stats=first_pass, whose count is one forward per step). And every
method trains in a run, alone, over emulated devices and packed, and resumes exactly. RWP's fixture,
which needs its two batches concatenated, is reproduced in tests/optim/methods/test_rwp_engine.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sam_repro.config import OptimConfig
from sam_repro.engine.loop import Run, fit, fit_pack
from sam_repro.engine.grid import GridStep
from sam_repro.engine.passes import Member
from sam_repro.engine.step import StepConfig, TrainStep
from sam_repro.optim.factory import build_optimizer
from sam_repro.optim.methods.gsam import GSAMRule
from tests.conftest import compose_config
from tests.helpers import train
from tests.optim.methods.methods_helpers import BUFFERS, PARAMS, STEPS, TOL, batch, expected_buffers, fixture, tiny_net
from tests.helpers import FAST, assert_same_rows, rows

BASE = dict(lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4, wd_mode="decoupled", grad_clip=None)
# fixture -> (the OptimConfig that asks the engine for what the released code ran, BatchNorm policy)
SETTINGS = {
    "sam_baseline": (dict(name="sam", rho=0.05), "frozen"),
    "gsam": (dict(name="gsam", rho=0.05, gsam_rho_min=0.01, gsam_alpha=0.3, gsam_adaptive="none"), "frozen"),
    "gsam_adaptive": (dict(name="gsam", rho=2.0, gsam_rho_min=2.0, gsam_alpha=0.4, gsam_adaptive="pytorch"), "frozen"),
    "esam": (dict(name="esam", rho=0.05, esam_beta=1.0, esam_gamma=0.5, eps=1e-7, bn_stats="both"), "all"),
    "esam_swp": (dict(name="esam", rho=0.05, esam_beta=0.6, esam_gamma=0.5, eps=1e-7, bn_stats="both"), "all"),
    "fsam": (dict(name="fsam", rho=0.05, fsam_sigma=1.0, fsam_lambda=0.6), "frozen"),
    "vasso": (dict(name="vasso", rho=0.05, vasso_theta=0.9, eps=1e-7, bn_stats="both"), "all"),
    "samon": (dict(name="samon", rho=0.05, samon_select="name", eps=1e-16, bn_stats="both"), "all"),
    "asam_on": (dict(name="asam_on", rho=1.0, eta=0.0, samon_select="name", samon_normalize_bias=True, eps=1e-16,
                     bn_stats="both"), "all"),
    "composer_interval": (dict(name="interval_sam", rho=0.05, sam_interval=3, bn_stats="both"), "all"),
    "wsam": (dict(name="wsam", rho=0.05, wsam_gamma=0.88, wsam_max_norm=1.0), "frozen"),
    "wsam_clip": (dict(name="wsam", rho=0.05, wsam_gamma=0.88, wsam_max_norm=0.4), "frozen"),
}


def run_engine(name: str, monkeypatch: pytest.MonkeyPatch, backend: str = "eager") -> dict[str, np.ndarray]:
    """The fixture's 8 steps through the step's `backend`; per step: parameters, BN buffers, the applied
    gradient."""
    overrides, _ = SETTINGS[name]
    fx = fixture(name)
    net = tiny_net()
    base, method = build_optimizer(net, OptimConfig(**{**BASE, **overrides}))
    applied: list[list[torch.Tensor]] = []
    base.register_step_pre_hook(lambda opt, args, kw: applied.append([p.grad.detach().clone() for p in net.parameters()]))
    cfg = StepConfig.of(OptimConfig(**{**BASE, **overrides}))
    if backend == "eager":
        step = TrainStep(net, base, method, cfg)
        assert step.eager is not None and step.grid is None, "a method on one device takes the eager backend"
    else:
        grid = GridStep([Member(net, base, method)], cfg)
        step = lambda x, y: grid(x.unsqueeze(0), y.unsqueeze(0))  # noqa: E731
    out: dict[str, list] = {}
    for t in range(STEPS):
        for group in base.param_groups:  # the lr the released code used at step t (GSAM's scheduler)
            group["lr"] = float(fx["lr"][t])
        if "rho_t" in fx:  # and GSAM's rho, which its scheduler pairs with the lr one step late at step 0
            monkeypatch.setattr(GSAMRule, "rho", lambda self, lr, rho=float(fx["rho_t"][t]): rho)
        if "keep/conv1.weight" in fx:  # ESAM's keep decisions, injected rather than matched draw by draw
            method.method_state["keep"] = torch.tensor([bool(fx[f"keep/{p}"][t]) for p in PARAMS])
            method.method_state.setdefault("generator", torch.Generator().manual_seed(0))
        step(*batch(t))
        state = net.state_dict()
        for key in PARAMS + BUFFERS:
            out.setdefault(key, []).append(state[key].numpy().copy())
        for p_name, g in zip(PARAMS, applied[-1]):
            out.setdefault(f"grad/{p_name}", []).append(g.numpy().copy())
    return {k: np.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("backend", ["eager", "grid"])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_the_engines_step_follows_the_released_code(name: str, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    got = run_engine(name, monkeypatch, backend)
    fx = fixture(name)
    _, policy = SETTINGS[name]
    buffers = expected_buffers(name, policy)
    worst = {
        "params": max(float(np.abs(got[p] - fx[f"param/{p}"]).max()) for p in PARAMS),
        "grad": max(float(np.abs(got[f"grad/{p}"] - fx[f"grad/{p}"]).max()) for p in PARAMS),
        "buffers": max(float(np.abs(got[b] - buffers[b]).max()) for b in BUFFERS),
    }
    assert all(v < TOL for v in worst.values()), worst


def fast(method: str, *extra: str) -> list[str]:
    return [*FAST, f"optim={method}", "engine.precision=fp64", *extra]


METHODS = ["gsam", "esam", "fsam", "vasso", "samon", "asam_on", "interval_sam", "looksam", "rwp", "wsam"]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_a_run_over_emulated_devices_and_a_pack_equals_its_solo_runs(tmp_path: Path,
                                                                                      method: str) -> None:
    extra = ("epochs=2", "device_batch=16", "optim.sam_interval=2", "optim.looksam_k=2",
             "optim.esam_selection=topk", "optim.esam_beta=0.6")
    cfgs = [compose_config([*fast(method, *extra), f"seed={s}"]) for s in (0, 1)]
    for i, cfg in enumerate(cfgs):
        assert fit(cfg, tmp_path / f"solo{i}") == 0
    assert fit_pack([(cfg, tmp_path / f"pack{i}") for i, cfg in enumerate(cfgs)]) == [0, 0]
    for i in range(2):
        solo = rows(tmp_path / f"solo{i}")
        assert len(solo) == 2 and all(np.isfinite(r["train_loss"]) for r in solo)
        assert_same_rows(solo, rows(tmp_path / f"pack{i}"))
    assert rows(tmp_path / "solo0") != rows(tmp_path / "solo1")


# RWP over 4 devices of 8: two clean and two noisy, the noisy devices' generator in the checkpoint
@pytest.mark.parametrize("method, layout", [("fsam", ()), ("looksam", ()), ("esam", ()), ("gsam", ()), ("wsam", ()),
                                            ("rwp", ("device_batch=8",))])
def test_a_resumed_method_run_equals_an_uninterrupted_one(tmp_path: Path, method: str, layout: tuple[str, ...]) -> None:
    """Every method's own state (F-SAM's running mean, LookSAM's stored component and counter, ESAM's
    generator and keep mask, RWP's noise generator) goes into the checkpoint, and a method that reads the lr (GSAM's rho, WSAM's
    own step) reads the resumed schedule's."""
    cfg = compose_config(fast(method, "epochs=3", "optim.looksam_k=3", "optim.gsam_rho_min=0.5", *layout))  # GSAM: rho follows the lr
    assert fit(cfg, tmp_path / "whole") == 0
    first = Run(cfg, tmp_path / "cut")
    first.epochs = 1
    assert train(first) == 0
    assert train(Run(cfg, tmp_path / "cut")) == 0
    assert rows(tmp_path / "whole") == rows(tmp_path / "cut")
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert state["method"] or method in ("gsam", "wsam")  # the stateless ones keep nothing of their own
    assert method != "rwp" or set(state["method"]) == {"generator"}
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["config"]["optimizer"] == method


# Every one-batch method on the two backends a one-device step can take, in the presets' semantics (L2
# in the loss, clipping, BatchNorm statistics of the first pass): the eager one of a solo run and the
# grid one of its packs and DDP runs. LookSAM's steps between its SAM steps and interval SAM's plain
# ones are among the 6 steps; ESAM selects (and keeps a subset of tensors).
ONE_BATCH = dict(gsam=dict(gsam_rho_min=0.01), esam=dict(esam_beta=0.6, esam_gamma=0.5), fsam={}, vasso={}, samon={},
                 asam_on={}, interval_sam=dict(sam_interval=2), looksam=dict(looksam_k=3), wsam={})


@pytest.mark.parametrize("method", sorted(ONE_BATCH))
def test_a_method_steps_alike_on_the_eager_and_the_grid_backend(method: str) -> None:
    cfg = OptimConfig(name=method, lr=0.1, momentum=0.9, weight_decay=5e-4, wd_mode="loss", grad_clip=0.5,
                      **ONE_BATCH[method])
    nets, steps = [], []
    for backend in ("eager", "grid"):
        torch.manual_seed(0)  # ESAM's generator too
        net = tiny_net()
        base, opt = build_optimizer(net, cfg)
        step_cfg = StepConfig.of(cfg)
        if backend == "eager":
            steps.append(TrainStep(net, base, opt, step_cfg))
        else:
            grid = GridStep([Member(net, base, opt, cfg.grad_clip)], step_cfg)
            steps.append(lambda x, y, grid=grid: grid(x.unsqueeze(0), y.unsqueeze(0))[0])
        nets.append(net)
    generator = torch.Generator().manual_seed(1)
    for t in range(6):
        x = torch.randn(16, 3, 8, 8, dtype=torch.float64, generator=generator)
        y = torch.randint(0, 5, (16,), generator=generator)
        eager, grid = (step(x, y) for step in steps)
        assert eager.count == grid.count and int(eager.correct) == int(grid.correct), t
        assert eager.images == grid.images == 16 and (method == "esam") == (eager.count < 16), t  # ESAM: a subset
        assert abs(float(eager.loss_sum - grid.loss_sum)) < 1e-12, t
        assert (eager.grad_norm is None) == (grid.grad_norm is None), t  # the same steps perturbed
        for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
            assert float((a.double() - b.double()).abs().max()) < 1e-12, (t, name)
    assert any(float((a - b).abs().max()) > 1e-3 for a, b in zip(tiny_net().state_dict().values(), nets[0].state_dict().values()))
