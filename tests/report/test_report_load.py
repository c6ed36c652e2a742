"""sam_repro.report.load: run directories -> one row per completed run; what is skipped and why."""
from __future__ import annotations

import json
from pathlib import Path

from tests.report.conftest_report import FIX, SKIPPED_REASONS, runs_root, write_run  # noqa: F401  (fixture)

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


# ---- the row, exactly -----------------------------------------------------------------------------
def _flat(block: dict, prefix: str) -> dict:
    """A naive flattening written here, independent of load._flatten."""
    out = {}
    for key, value in block.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}.{key}"))
        else:
            out[f"{prefix}.{key}"] = value
    return out


def test_a_row_is_the_document_flattened_and_nothing_else(tmp_path: Path) -> None:
    d = write_run(tmp_path, "only", test_err=4.0)
    doc = json.loads((d / "metrics.json").read_text())
    del doc["final"]["test_acc"]  # absent: derived as 100 - error
    del doc["schema"]  # absent: schema 1
    doc["best"] = None  # a block that is not an object adds no columns
    doc["data"]["nested"] = {"deeper": {"x": 1}}
    (d / "metrics.json").write_text(json.dumps(doc))
    runs = load_runs(tmp_path).runs
    config = doc["config"]
    identity = {**{k: v for k, v in config.items() if k != "seed"}, "data.source": "torchvision"}
    expected = {
        "run_dir": "only", "abs_dir": str(d), "status": "completed", "experiment": "fixture",
        "updated_at": doc["updated_at"], "epochs_done": 200, "wall_s": 10.0, "images_per_s": 1000.0,
        "setting_key": json.dumps(dict(sorted(identity.items()))),
        "run_key": json.dumps(dict(sorted({**identity, "seed": 0, "data.fingerprint": "sha256:cifar10-torchvision"}.items()))),
        **config, **_flat({**doc["final"], "test_acc": 96.0}, "final"), **_flat(doc["env"], "env"), **_flat(doc["data"], "data"),
        # the training done, counted here: 200 epochs of 50,000 // 256 = 195 steps of 256 images
        "trained.epochs": 200.0, "trained.steps": 200 * 195, "trained.images": 200 * 195 * 256,
        "trained.steps_per_epoch": 195, "trained.images_per_step": 256, "trained.on_schedule": True,
        "trained.label": "200 epochs",
    }
    assert list(runs.index) == [0] and runs.iloc[0].to_dict() == expected
    assert set(runs.columns) == set(expected)


def test_setting_and_run_keys_ignore_key_order_and_split_on_source_seed_and_data(tmp_path: Path) -> None:
    a = write_run(tmp_path, "a", test_err=1.0, seed=0)
    doc = json.loads((a / "metrics.json").read_text())
    doc["config"] = dict(reversed(list(doc["config"].items())))  # the same config, keys in another order
    (a / "metrics.json").write_text(json.dumps(doc))
    write_run(tmp_path, "b", test_err=2.0, seed=1)
    write_run(tmp_path, "c", test_err=3.0, seed=0, source="folder")
    d = write_run(tmp_path, "d", test_err=4.0, seed=0)  # seed 0 again, other data (another fingerprint)
    doc = json.loads((d / "metrics.json").read_text())
    doc["data"]["fingerprint"] = "sha256:other"
    (d / "metrics.json").write_text(json.dumps(doc))
    loaded = load_runs(tmp_path)
    runs = loaded.runs.set_index("run_dir")
    assert loaded.skipped.empty and list(runs.index) == ["a", "b", "c", "d"]
    assert runs.loc["a", "setting_key"] == runs.loc["b", "setting_key"] == runs.loc["d", "setting_key"]
    assert runs.loc["c", "setting_key"] != runs.loc["a", "setting_key"]  # other data source, other setting
    assert len(set(runs["run_key"])) == 4


def test_a_duplicate_is_skipped_as_completed_and_naive_times_are_utc(tmp_path: Path) -> None:
    write_run(tmp_path, "aware", test_err=1.0, updated_at="2026-03-01T00:30:00+01:00")  # 2026-02-28T23:30Z
    write_run(tmp_path, "naive", test_err=2.0, updated_at="2026-03-01T00:00:00")  # read as UTC: newer
    write_run(tmp_path, "garbled", test_err=3.0, updated_at="yesterday")  # unparsable: oldest
    loaded = load_runs(tmp_path)
    assert list(loaded.runs["run_dir"]) == ["naive"]
    assert loaded.skipped.to_dict("records") == [
        {"run_dir": "aware", "status": "completed", "reason": "duplicate of naive (same config and seed; that one is newer)"},
        {"run_dir": "garbled", "status": "completed", "reason": "duplicate of naive (same config and seed; that one is newer)"}]


def test_a_dir_with_only_a_log_is_listed_and_hydras_own_folder_is_not(tmp_path: Path) -> None:
    write_run(tmp_path, "done", test_err=1.0)
    (tmp_path / "done" / ".hydra").mkdir()
    (tmp_path / "done" / ".hydra" / "config.yaml").write_text("a: 1\n")
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "metrics.jsonl").write_text('{"epoch": 1, "test_err": 50.0}\n')
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "config.yaml").write_text("a: 1\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("[]")  # no status to report
    assert load_runs(tmp_path).skipped.to_dict("records") == [
        {"run_dir": "broken", "status": "", "reason": "not a JSON object (list)"},
        *({"run_dir": d, "status": "", "reason": "no metrics.json (the run never got past its start)"}
          for d in ("killed", "started"))]


def test_curve_keeps_reading_past_a_bad_line_and_drops_records_without_an_epoch_and_an_error(tmp_path: Path) -> None:
    lines = ['{"epoch": 1, "test_err": 50.0, "lr": 0.1}', "not json", "[1, 2]", '{"epoch": 2, "test_err": null}',
             '{"epoch": null, "test_err": 9.0}', '{"test_err": 8.0}', '{"epoch": 3, "test_err": 30.0}']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    curve = load_curve(tmp_path)
    assert list(curve.index) == [0, 1] and list(curve.columns) == ["epoch", "test_err", "lr"]  # every logged field
    assert curve[["epoch", "test_err"]].to_dict("list") == {"epoch": [1, 3], "test_err": [50.0, 30.0]}
    empty = load_curve(tmp_path / "missing")
    assert empty.empty and list(empty.columns) == ["epoch", "test_err"]
