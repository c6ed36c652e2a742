"""engine/packing.py: engine.pack_execution=auto packs only where a packed step is faster than its
runs' solo steps, and timing a pack leaves its runs untouched."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sam_repro.engine import packing
from sam_repro.engine.loop import fit, fit_pack, open_runs
from tests.conftest import compose_config
from tests.helpers import FAST, assert_same_rows, rows


def cfgs(*extra: str) -> list:
    return [compose_config([*FAST, "epochs=2", f"seed={s}", f"optim.rho={0.05 * (s + 1)}", *extra]) for s in (0, 1)]


@pytest.mark.parametrize("seconds, packed", [((1.0, 2.0), True), ((2.0, 1.0), False)])
def test_auto_packs_only_where_a_packed_step_is_faster_than_the_solo_steps(tmp_path: Path, monkeypatch, caplog,
                                                                             seconds, packed: bool) -> None:
    """The timing is the machine's (stubbed here); slower, the runs train one after another, each
    exactly its solo run."""
    monkeypatch.setattr(packing, "step_seconds", lambda runs, epoch: seconds)
    jobs = cfgs("optim=sam", "engine.pack_execution=auto")
    with caplog.at_level("INFO", logger="sam_repro"):
        assert fit_pack([(cfg, tmp_path / f"pack{i}") for i, cfg in enumerate(jobs)]) == [0, 0]
    ratio = seconds[1] / seconds[0]
    assert (f"pack of 2 runs from epoch 1: a packed step of the 2 runs took {seconds[0]:.3g} s, their solo steps "
            f"{seconds[1]:.3g} s ({ratio:.2f}x the solo throughput): ") in caplog.text
    assert ("packed: " in caplog.text) == packed
    assert ("packing does not pay on this machine" in caplog.text) == (not packed)
    for i, cfg in enumerate(jobs):
        fit(cfg, tmp_path / f"solo{i}")
        assert_same_rows(rows(tmp_path / f"solo{i}"), rows(tmp_path / f"pack{i}"))


@pytest.mark.parametrize("execution, packed", [("pack", True), ("alone", False)])
def test_pack_and_alone_are_obeyed_without_timing(tmp_path: Path, monkeypatch, caplog, execution: str, packed: bool) -> None:
    monkeypatch.setattr(packing, "step_seconds", lambda runs, epoch: pytest.fail("timed"))
    with caplog.at_level("INFO", logger="sam_repro"):
        fit_pack([(cfg, tmp_path / f"p{i}") for i, cfg in enumerate(cfgs(f"engine.pack_execution={execution}"))])
    assert f"engine.pack_execution={execution}" in caplog.text and ("packed: " in caplog.text) == packed


def test_timing_a_pack_leaves_its_runs_untouched(tmp_path: Path) -> None:
    runs = open_runs([(cfg, tmp_path / f"r{i}") for i, cfg in enumerate(cfgs("optim=sam"))])
    before = [{k: v.clone() for k, v in run.model.state_dict().items()} for run in runs]
    pack_s, solo_s = packing.step_seconds(runs, epoch=1)
    assert pack_s > 0 and solo_s > 0
    for run, state in zip(runs, before):
        assert all(torch.equal(state[k], v) for k, v in run.model.state_dict().items())
        assert all(p.grad is None or not p.grad.any() for p in run.model.parameters())
        assert not run.optimizer.state  # no step was taken with the run's own optimizer
    for run in runs:
        run.close()


def test_a_model_with_a_frozen_parameter_trains_alone(tmp_path: Path, monkeypatch, caplog) -> None:
    """Each member's frozen parameter is its own (its seed drew it); the pack's one module copy would
    give every member the first member's."""
    from sam_repro.engine import loop as loop_module

    real = loop_module.create_model_from_config

    def with_frozen(cfg, num_classes: int, in_chans: int) -> torch.nn.Module:
        model = real(cfg, num_classes=num_classes, in_chans=in_chans)
        model.register_parameter("frozen", torch.nn.Parameter(torch.randn(3), requires_grad=False))
        return model

    monkeypatch.setattr(loop_module, "create_model_from_config", with_frozen)
    monkeypatch.setattr(packing, "step_seconds", lambda runs, epoch: pytest.fail("timed"))
    with caplog.at_level("INFO", logger="sam_repro"):
        fit_pack([(cfg, tmp_path / f"p{i}") for i, cfg in enumerate(cfgs("engine.pack_execution=pack"))])
    assert "the model has frozen parameters" in caplog.text and "packed: " not in caplog.text
