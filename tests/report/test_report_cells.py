"""Which runs may fill a paper cell, key by key; and which final errors count as a completed run.

A run fills a paper cell only when it ran the paper's setting. Every key of the logged setting
(runlog.summary_config, minus the seed, plus data.source) is listed below as either one that must
match the cell, or one that is deliberately free (how the run was executed, or a hyperparameter
the paper's recipe sets but the report does not police). A key added to the run directory
without a decision here fails `test_every_logged_key_is_either_checked_or_deliberately_free`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from tests.report.conftest_report import cells, write_run  # noqa: F401  (fixture)

from sam_repro.report import paper
from sam_repro.report.load import load_runs
from sam_repro.report.tables import diff_fields, match_setting

# key -> a departing value; a run differing from the paper's setting only here fills no cell.
MUST_MATCH: dict[str, Any] = {
    "dataset": "cifar100",
    "model": "resnet20",
    "augment": "autoaugment",
    "label_noise": 0.2,
    "noise_kind": "asymmetric",  # Table 4 is symmetric noise (paper Table 4); only checked when noise > 0
    "optimizer": "sgd",
    "rho": 0.07,
    "p": "inf",
    "epochs": 37,
    "batch_size": 128,
    "data.source": "folder",
    "val_fraction": 0.1,  # trained on 90 % of the data: a model selection run, not the paper's number
    "train_steps": 1234,
    # the official 8 devices x 32 (Tables 1, 4, 5): BatchNorm per 32 examples, SAM's e per 32
    "device_batch": 256,
    "m": 16,
}
# key -> a value that differs from the fixture's and still fills the cell.
FREE: dict[str, Any] = {
    "adaptive": True,  # the method is `optimizer` (asam is its own name)
    "devices": 8, "precision": "fp32",  # how the run was executed
    "lr": 0.2, "weight_decay": 1e-3, "wd_mode": "decoupled", "bn_stats": "both",
    "label_smoothing": 0.1, "grad_clip": None,
}

# The Table 1 CIFAR-10 WRN-28-10 200-epoch SAM cell, as the fixture runs log it.
BASE: dict[str, Any] = {
    "dataset": "cifar10", "model": "wrn28_10", "augment": "basic", "optimizer": "sam", "rho": 0.05, "p": 2,
    "adaptive": False, "m": 32, "device_batch": 32, "devices": 1, "label_noise": 0.0, "noise_kind": "symmetric", "epochs": 200,
    "batch_size": 256, "precision": "bf16", "lr": 0.1, "weight_decay": 0.0005, "wd_mode": "loss",
    "bn_stats": "first_pass", "label_smoothing": 0.0, "grad_clip": 5.0, "val_fraction": 0.0, "train_steps": None,
    "data.source": "torchvision",
}
NOISY: dict[str, Any] = {**BASE, "model": "resnet32", "label_noise": 0.4, "rho": 0.1}  # Table 4, 40 % noise


def filled(setting: dict[str, Any], cells) -> list[tuple[int, str]]:
    got = match_setting(setting, cells).cells
    return [(int(cells.loc[cells["order"] == o, "table"].iloc[0]), cells.loc[cells["order"] == o, "method"].iloc[0])
            for o in got]


def test_every_logged_key_is_either_checked_or_deliberately_free() -> None:
    from sam_repro.runlog import summary_config  # noqa: F401  (the source of the keys)
    logged = set(BASE) | {"seed"}
    assert set(MUST_MATCH) | set(FREE) == logged - {"seed"}
    assert not set(MUST_MATCH) & set(FREE)
    # and BASE is what runlog.summary_config writes (a SAM run), plus data.source from the data block
    import inspect
    import sam_repro.runlog as runlog
    source = inspect.getsource(runlog.summary_config)
    for key in logged - {"data.source"}:
        assert f'"{key}":' in source, key


def test_the_base_settings_fill_their_paper_cells(cells) -> None:
    assert filled(BASE, cells) == [(1, "sam")]
    assert filled(NOISY, cells) == [(4, "sam")]
    # a noisy run that logs no noise_kind (runs before the key existed) used symmetric noise
    assert filled({k: v for k, v in NOISY.items() if k != "noise_kind"}, cells) == [(4, "sam")]


@pytest.mark.parametrize("key", sorted(MUST_MATCH))
def test_a_run_departing_in_one_checked_key_does_not_fill_the_cell(key: str, cells) -> None:
    base = NOISY if key == "noise_kind" else BASE
    own = match_setting(base, cells).cells
    setting = {**base, key: MUST_MATCH[key]}
    if key == "optimizer":  # an SGD run logs no SAM fields (runlog.summary_config)
        setting.update(rho=None, p=None, adaptive=None, m=None, bn_stats=None)
    match = match_setting(setting, cells)
    assert len(own) == 1 and own[0] not in match.cells, key
    if key in ("dataset", "model", "augment", "label_noise", "optimizer"):
        return  # these name another cell of the paper, which the run may fill (e.g. Table 1 AutoAugment)
    assert match.cells == [] and match.nearest == own[0], key
    assert len(match.diffs) == 1, match.diffs  # and the report names exactly this difference


@pytest.mark.parametrize("key", sorted(FREE))
def test_a_run_departing_in_one_free_key_still_fills_its_cell(key: str, cells) -> None:
    assert filled({**BASE, key: FREE[key]}, cells) == [(1, "sam")]


def test_val_fraction_departs_at_any_size_and_absent_means_zero(cells) -> None:
    for val in (1e-6, 0.01, 0.5):
        assert filled({**BASE, "val_fraction": val}, cells) == []
    old = {k: v for k, v in BASE.items() if k != "val_fraction"}  # runs logged before the key existed
    assert filled(old, cells) == [(1, "sam")]


def test_the_expected_setting_of_every_cell_fills_that_cell_and_a_val_hold_out_never_does(cells) -> None:
    # For every SAM/SGD cell of the paper: the run that does exactly what the cell says fills it;
    # the same run with a validation hold-out fills nothing.
    for _, cell in cells.iterrows():
        exp: paper.Expected = cell["expected"]
        setting = {
            "dataset": exp.dataset, "model": exp.model, "augment": exp.augment or "basic",
            "label_noise": exp.label_noise, "noise_kind": "symmetric", "optimizer": exp.optimizer,
            "rho": exp.rho, "p": exp.p, "epochs": exp.epochs[0] if exp.epochs else 10,
            "train_steps": (exp.train_steps or 1000) if exp.counts_steps else None,
            "batch_size": exp.batch_size, "data.source": exp.source, "val_fraction": 0.0,
            "device_batch": exp.device_batch, "m": exp.m,
        }
        assert int(cell["order"]) in match_setting(setting, cells).cells, (cell["table"], cell["dataset"], cell["model"])
        assert match_setting({**setting, "val_fraction": 0.1}, cells).cells == []


# ---- report/load.py: a non-finite final error is never a completed result ----------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_final_error_is_skipped_and_never_wins_deduplication(tmp_path: Path, bad: float) -> None:
    # Same config and seed: the broken run is newer, so it would win de-duplication if it counted.
    write_run(tmp_path, "good", test_err=3.5, updated_at="2026-01-01T00:00:00+00:00")
    d = write_run(tmp_path, "broken", test_err=1.0, updated_at="2026-06-01T00:00:00+00:00")
    doc = json.loads((d / "metrics.json").read_text())
    doc["final"]["test_err"] = bad
    (d / "metrics.json").write_text(json.dumps(doc))  # json writes NaN / Infinity, as Python reads them
    loaded = load_runs(tmp_path)
    assert list(loaded.runs["run_dir"]) == ["good"] and list(loaded.runs["final.test_err"]) == [3.5]
    skipped = loaded.skipped.set_index("run_dir")
    assert skipped.loc["broken", "reason"] == f"final.test_err is {bad!r}"
    assert skipped.loc["broken", "status"] == "completed"


@pytest.mark.parametrize("bad", ["3.5", True, [1.0], {"v": 1}])
def test_a_final_error_that_is_not_a_number_is_skipped(tmp_path: Path, bad: Any) -> None:
    d = write_run(tmp_path, "x", test_err=1.0)
    doc = json.loads((d / "metrics.json").read_text())
    doc["final"]["test_err"] = bad
    (d / "metrics.json").write_text(json.dumps(doc))
    loaded = load_runs(tmp_path)
    assert loaded.runs.empty
    assert loaded.skipped.set_index("run_dir").loc["x", "reason"] == f"final.test_err is {bad!r}"


# the exact phrase the report prints for each departure (budget.md's "differences from the paper")
PHRASES: dict[str, list[tuple[str, str]]] = {
    "augment": [("augment", "augment autoaugment (paper basic)")],
    "batch_size": [("batch_size", "batch_size 128 (paper 256)")],
    "data.source": [("data.source", "data folder (paper torchvision)")],
    "dataset": [("dataset", "dataset cifar100 (paper cifar10)")],
    "device_batch": [("device_batch", "device_batch 256 (paper 32: BatchNorm per device)")],
    "epochs": [("epochs", "epochs 37 (paper 200)")],
    "label_noise": [("label_noise", "label_noise 0.2 (paper 0)")],
    "m": [("m", "m 16 (paper 32)")],
    "model": [("model", "model resnet20 (paper wrn28_10)")],
    "noise_kind": [("noise_kind", "noise_kind asymmetric (paper symmetric)")],
    "optimizer": [("optimizer", "optimizer sgd (paper sam)"), ("rho", "rho null (paper 0.05)"), ("p", "p null (paper 2)"),
                  ("m", "m null (paper 32)")],
    "p": [("p", "p inf (paper 2)")],
    "rho": [("rho", "rho 0.07 (paper 0.05)")],
    "train_steps": [("train_steps", "train_steps 1234 (paper counts epochs)")],
    "val_fraction": [("val_fraction", "val_fraction 0.1 (paper 0, the whole training set)")],
}


@pytest.mark.parametrize("key", sorted(MUST_MATCH))
def test_each_departure_is_named_in_its_own_words(key: str, cells) -> None:
    base = NOISY if key == "noise_kind" else BASE
    exp = cells.set_index("order").loc[match_setting(base, cells).cells[0], "expected"]
    setting = {**base, key: MUST_MATCH[key]}
    if key == "optimizer":
        setting.update(rho=None, p=None, adaptive=None, m=None, bn_stats=None)
    assert diff_fields(setting, exp) == PHRASES[key]


def test_departures_in_step_counted_cells_and_absent_values(cells) -> None:
    by = cells.set_index("order")["expected"]
    b7 = next(e for e in by if e.counts_steps and e.train_steps == 5000 and e.optimizer == "sam")
    base = {"dataset": b7.dataset, "model": b7.model, "augment": b7.augment, "label_noise": 0.0, "optimizer": "sam",
            "rho": b7.rho, "p": 2, "batch_size": b7.batch_size, "data.source": b7.source, "train_steps": 5000, "epochs": 3}
    assert diff_fields(base, b7) == []
    assert diff_fields({**base, "train_steps": None}, b7) == [("train_steps", "epochs 3 (paper counts steps)")]
    assert diff_fields({**base, "train_steps": 4999}, b7) == [("train_steps", "train_steps 4999 (paper 5000)")]
    sgd = next(e for e in by if e.optimizer == "sgd" and e.epochs and len(e.epochs) == 2 and e.device_batch == 32)
    run = {"dataset": sgd.dataset, "model": sgd.model, "augment": sgd.augment, "optimizer": "sgd", "batch_size": 256,
           "data.source": "torchvision", "epochs": sgd.epochs[1], "device_batch": None}
    assert diff_fields(run, sgd) == [("device_batch", "device_batch null (paper 32: BatchNorm per device)")]
    assert diff_fields({**run, "device_batch": 32, "epochs": 7}, sgd) == [
        ("epochs", f"epochs 7 (paper {sgd.epochs[0]} or {sgd.epochs[1]})")]
    # label noise and val_fraction logged as null read as 0; noise_kind is only checked when there is noise
    assert diff_fields({**run, "device_batch": 32, "label_noise": None, "val_fraction": None,
                        "noise_kind": "asymmetric"}, sgd) == []
