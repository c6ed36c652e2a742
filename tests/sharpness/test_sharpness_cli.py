"""`sam-sharpness` on run directories: bad input gets one line and exit 2 before anything is
measured; a measurement writes sharpness.json atomically and the report turns it into a table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sam_repro.report import generate
from sam_repro.sharpness.cli import main
from tests.sharpness.sharpness_helpers import make_run_dir

FAST = ["--subset", "16", "--batch-size", "16", "--m", "4,16", "--points", "3", "--grid", "2",
        "--lanczos-iters", "6", "--trace-probes", "3", "--top-k", "5"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sam-sharpness: error: "), err
    return err[0]


def test_run_without_checkpoint_exits_2(tmp_path: Path, capsys) -> None:
    run = make_run_dir(tmp_path / "run", checkpoint=False)
    assert main([str(run), *FAST]) == 2
    assert "no checkpoint.pt" in one_error_line(capsys)


def test_run_still_running_exits_2(tmp_path: Path, capsys) -> None:
    run = make_run_dir(tmp_path / "run", status="running")
    assert main([str(run), *FAST]) == 2
    assert "still running" in one_error_line(capsys)


def test_checkpoint_of_another_architecture_exits_2(tmp_path: Path, capsys) -> None:
    run = make_run_dir(tmp_path / "run", model_overrides=["model=wrn16_4"])
    assert main([str(run), *FAST]) == 2
    assert "another architecture" in one_error_line(capsys)
    assert not (run / "sharpness.json").exists()


def test_m_that_does_not_divide_the_subset_exits_2(tmp_path: Path, capsys) -> None:
    run = make_run_dir(tmp_path / "run")
    assert main([str(run), "--subset", "16", "--m", "5"]) == 2
    assert "--m 5 does not divide --subset 16" in one_error_line(capsys)


@pytest.mark.slow
def test_measure_two_runs_interpolate_and_report(tmp_path: Path, capsys) -> None:
    root = tmp_path / "runs"
    sgd = make_run_dir(root / "sgd", ["optim=sgd"], seed=0)
    sam = make_run_dir(root / "sam", ["optim=sam"], seed=1)
    assert main([str(sgd), str(sam), *FAST, "--interpolate", "--interp-points", "3"]) == 0
    for run in (sgd, sam):
        doc = json.loads((run / "sharpness.json").read_text())
        assert doc["setup"]["subset"] == 16 and doc["setup"]["bn_mode"] == "eval"
        assert doc["setup"]["weight_decay"]["in_loss"] is False and doc["setup"]["dtype"] == "fp32"
        assert doc["setup"]["hvp"] == "reverse" and doc["hessian"]["hvp"]["mode"] == "reverse"
        assert doc["hessian"]["hvp"]["graphs_kept"] == doc["hessian"]["hvp"]["batches"] == 1
        top = doc["hessian"]["top_eigenvalues"]
        assert len(top["values"]) == 5 and top["values"] == sorted(top["values"], reverse=True)
        assert doc["hessian"]["lambda_max"] == top["values"][0] and len(top["residuals"]) == 5
        assert doc["hessian"]["trace"]["probes"] == 3 and doc["hessian"]["trace"]["stderr"] >= 0
        assert [c["m"] for c in doc["msharpness"]["cells"]] == [4, 16]
        assert len(doc["landscape"]["d1"]["loss"]) == 3 and len(doc["landscape"]["d2"]["loss"]) == 2
        assert doc["interpolation"]["t"][0] == -0.5 and len(doc["interpolation"]["loss"]) == 3
        assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    # The report reads the files: synthetic runs are pipeline checks and never enter the table.
    report = generate(root, tmp_path / "tables")
    assert report.sharpness is not None and report.sharpness.display.empty
    assert (tmp_path / "tables" / "sharpness.md").is_file()


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_hvp_mode_and_kept_graphs_are_recorded(tmp_path: Path, mode: str) -> None:
    run = make_run_dir(tmp_path / "run")
    assert main([str(run), *FAST, "--parts", "hessian", "--hvp", mode, "--graph-memory", "0"]) == 0
    doc = json.loads((run / "sharpness.json").read_text())
    assert doc["setup"]["hvp"] == mode and doc["hessian"]["hvp"]["mode"] == mode
    assert doc["hessian"]["hvp"]["graphs_kept"] == 0  # a budget of 0 keeps nothing: recomputed per product


def test_negative_graph_memory_exits_2(tmp_path: Path, capsys) -> None:
    run = make_run_dir(tmp_path / "run")
    assert main([str(run), *FAST, "--graph-memory", "-1"]) == 2
    assert "--graph-memory -1 must be >= 0" in one_error_line(capsys)
