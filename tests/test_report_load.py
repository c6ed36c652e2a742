"""sam_repro.report.load: run directories -> one row per completed run; what is skipped and why."""
from __future__ import annotations

import json
from pathlib import Path

from tests.conftest_report import FIX, SKIPPED_REASONS, runs_root, write_run  # noqa: F401  (fixture)

from sam_repro.report.load import load_curve, load_runs


def test_one_flat_row_per_completed_run(runs_root: Path) -> None:
    runs = load_runs(runs_root).runs
    # 3 + 5 + 2 + 2 + 2 (Table 1) + 6 + 1 (noise) + 1 (T5) + 2 (T2) + 1 (folder) + 5 + 1 (15 ep) + 1 (synthetic)
    assert len(runs) == 32
    row = runs.set_index("run_dir").loc["sweep/b/3"]
    assert (row["dataset"], row["model"], row["optimizer"], row["seed"]) == ("cifar10", "wrn28_10", "sgd", 3)
    assert row["final.test_err"] == FIX["t1_c10_sgd"][3]
    assert row["data.source"] == "torchvision"
    assert row["env.device"] == "NVIDIA H100 80GB HBM3"
    assert row["data.label_noise.rate"] == 0.0  # nested blocks are flattened with dots
    assert row["best.epoch"] == 200


def test_duplicate_counts_once_and_the_latest_wins(runs_root: Path) -> None:
    loaded = load_runs(runs_root)
    seed0 = loaded.runs[(loaded.runs["optimizer"] == "sam") & (loaded.runs["epochs"] == 200)
                        & (loaded.runs["data.source"] == "torchvision") & (loaded.runs["model"] == "wrn28_10")
                        & (loaded.runs["dataset"] == "cifar10") & (loaded.runs["seed"] == 0)]
    assert list(seed0["run_dir"]) == ["sweep/a/0"]  # the newer one, though its dir sorts first
    assert list(seed0["final.test_err"]) == [FIX["t1_c10_sam"][0]]
    assert "zz_rerun/old" not in set(loaded.runs["run_dir"])


def test_duplicate_resolution_follows_updated_at_not_path(tmp_path: Path) -> None:
    write_run(tmp_path, "a", test_err=5.0, updated_at="2026-03-01T00:00:00+00:00")
    write_run(tmp_path, "b", test_err=7.0, updated_at="2026-02-01T00:00:00+00:00")
    loaded = load_runs(tmp_path)
    assert list(loaded.runs["final.test_err"]) == [5.0]
    assert list(loaded.skipped["run_dir"]) == ["b"]


def test_every_unfinished_or_broken_dir_is_skipped_with_its_reason(runs_root: Path) -> None:
    skipped = load_runs(runs_root).skipped.set_index("run_dir")["reason"].to_dict()
    for run_dir, reason in SKIPPED_REASONS.items():
        assert skipped[run_dir] == reason
    assert skipped["bad/corrupt"].startswith("unreadable metrics.json: JSONDecodeError")
    assert len(skipped) == len(SKIPPED_REASONS) + 1


def test_directory_names_are_never_parsed(tmp_path: Path) -> None:
    # The name says cifar100/sgd/seed9; the contents say cifar10/sam/seed 2: the contents win.
    write_run(tmp_path, "cifar100_sgd_seed9", test_err=3.0, seed=2)
    row = load_runs(tmp_path).runs.iloc[0]
    assert (row["dataset"], row["optimizer"], row["seed"]) == ("cifar10", "sam", 2)


def test_missing_runs_dir_gives_empty_frames_with_columns(tmp_path: Path) -> None:
    loaded = load_runs(tmp_path / "nope")
    assert loaded.runs.empty and loaded.skipped.empty
    assert {"setting_key", "dataset", "final.test_err", "data.source"} <= set(loaded.runs.columns)


def test_unknown_schema_and_non_finite_error_are_skipped(tmp_path: Path) -> None:
    d = write_run(tmp_path, "x", test_err=1.0)
    doc = json.loads((d / "metrics.json").read_text())
    (d / "metrics.json").write_text(json.dumps({**doc, "schema": 2}))
    write_run(tmp_path, "y", final={"test_err": None})
    reasons = load_runs(tmp_path).skipped.set_index("run_dir")["reason"]
    assert reasons["x"] == "unknown schema 2 (this report reads schema 1)"
    assert reasons["y"] == "final.test_err is None"


def test_curve_drops_broken_lines_and_keeps_the_last_of_a_repeated_epoch(tmp_path: Path) -> None:
    lines = [{"epoch": 1, "test_err": 50.0}, {"epoch": 2, "test_err": 40.0},
             {"epoch": 2, "test_err": 39.0}, {"epoch": 3, "test_err": 30.0}]
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"epoch": 4, "test_e'
    (tmp_path / "metrics.jsonl").write_text(text)
    curve = load_curve(tmp_path)
    assert list(curve["epoch"]) == [1, 2, 3]
    assert list(curve["test_err"]) == [50.0, 39.0, 30.0]
    assert load_curve(tmp_path / "missing").empty
