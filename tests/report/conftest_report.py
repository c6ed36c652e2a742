"""Fixture run directories for the report tests, written by the tests themselves.

`write_run` writes one run directory by the contract of docs/run_directory.md. `build_runs` lays
out the shared fixture tree (paper-setting runs, budget runs, a duplicate, corrupt and unfinished
directories); `FIX` holds the numbers the tests expect back. Imported by tests/test_report_*.py
as `tests.report.conftest_report` (a helper module, not a conftest: tests/conftest.py is shared).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from tests.mutation_scope import module_scope

PAPER_RHO = {"cifar10": 0.05, "cifar100": 0.1}


def write_run(root: Path, name: str, *, test_err: float | None = None, status: str = "completed",
              updated_at: str = "2026-01-01T00:00:00+00:00", source: str = "torchvision",
              curve: list[float] | None = None, final: dict[str, Any] | None = None,
              device: str = "NVIDIA H100 80GB HBM3", images_per_s: float = 1000.0, **config: Any) -> Path:
    """One run directory `root/name` with metrics.json (and metrics.jsonl when `curve` is given).
    `config` overrides the defaults below (a paper-setting CIFAR-10 WRN-28-10 SAM run)."""
    cfg: dict[str, Any] = {
        "dataset": "cifar10", "model": "wrn28_10", "augment": "basic", "optimizer": "sam",
        "rho": 0.05, "p": 2, "adaptive": False, "m": 32, "device_batch": 32, "label_noise": 0.0,
        "noise_kind": "symmetric",
        "epochs": 200, "batch_size": 256, "seed": 0, "precision": "bf16", "lr": 0.1,
        "weight_decay": 0.0005, "wd_mode": "loss", "bn_stats": "first_pass", "label_smoothing": 0.0,
        "grad_clip": 5.0, "val_fraction": 0.0, "train_steps": None,
    }
    cfg.update(config)
    if cfg["optimizer"] == "sgd":
        cfg.update(rho=None, p=None, adaptive=None, m=None, bn_stats=None)  # as runlog.summary_config logs SGD
    if final is None and test_err is not None:
        final = {"test_err": test_err, "test_acc": round(100 - test_err, 6), "test_loss": 0.1,
                 "train_loss": 0.01, "train_err": 0.1}
    doc = {
        "schema": 1, "status": status, "experiment": "fixture",
        "started_at": "2026-01-01T00:00:00+00:00", "updated_at": updated_at, "config": cfg,
        "final": final, "best": final and {**final, "epoch": cfg["epochs"]},
        "epochs_done": cfg["epochs"] if status == "completed" else 3, "wall_s": 10.0,
        "images_per_s": images_per_s,
        "env": {"torch": "2.11.0", "cuda": "13.0", "device": device, "git_sha": "abc", "git_dirty": False},
        "data": {"source": source, "root": "/data", "fingerprint": f"sha256:{cfg['dataset']}-{source}",
                 "train_size": 50000, "test_size": 10000, "val_size": 0,
                 "label_noise": {"kind": "symmetric", "rate": cfg["label_noise"], "seed": 0}},
        "error": "RuntimeError: CUDA out of memory" if status == "failed" else None,
    }
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps(doc, indent=1))
    if curve is not None:
        lines = [json.dumps({"epoch": i + 1, "lr": 0.1, "train_loss": 1.0, "train_err": 30.0,
                             "test_loss": 1.0, "test_err": e, "epoch_s": 1.0, "images_per_s": 1000.0})
                 for i, e in enumerate(curve)]
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return d


def row(table: pd.DataFrame, **where: object) -> pd.Series:
    """The one row of `table` matching `where` (column=value)."""
    sel = table
    for k, v in where.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, where
    return sel.iloc[0]


def ours_cell(values: list[float]) -> str:
    """A cell as the tables print it, computed here: mean ± t_{0.975,n-1} s / sqrt(n) (n)."""
    n, mean = len(values), float(np.mean(values))
    half = f" ± {stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n):.2f}" if n > 1 else ""
    return f"{mean:.2f}{half} (n={n})"


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path) -> None:
    """A 640 x 420 PNG of a drawn figure, without the version-bearing Software tag."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000  # a drawn figure, not an empty canvas
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size == (640, 420)
        assert "Software" not in im.info  # no version string: the bytes do not change with matplotlib


def curve_for(final_err: float) -> list[float]:
    """A 4-epoch learning curve ending at `final_err`."""
    return [final_err + 30.0, final_err + 10.0, final_err + 2.0, final_err]


# The fixture's numbers, in one place: tests compare what the report computes against these.
FIX = {
    "t1_c10_sam": [2.60, 2.75, 2.90],  # cifar10 wrn28_10 200 basic, SAM rho 0.05, seeds 0-2
    "t1_c10_sgd": [3.40, 3.50, 3.60, 3.45, 3.55],  # the same row, SGD 200 epochs, seeds 0-4
    "t1_c10_sgd_400": [3.80, 3.90],  # SGD with 2x epochs: worse, so not shown
    "t1_c100_sgd": [19.0, 19.2],  # cifar100 wrn28_10 200 basic, SGD 200 epochs
    "t1_c100_sgd_400": [18.6, 18.8],  # SGD 400 epochs: better, so shown ("400 ep")
    "t4_sam_acc": [94.0, 95.0, 96.0],  # label noise 20 %, SAM rho 0.1
    "t4_sgd_acc": [80.0, 82.0, 84.0],  # label noise 20 %, SGD
    "t5_fmnist_cutout_sam": [3.70],  # Fashion-MNIST WRN cutout: fills Table 5's autoaugment column
    "t2_r50_top1": [22.4, 22.6],  # ImageNet ResNet-50 100 epochs, SAM
    "t2_r50_top5": [6.2, 6.3],
    "budget_folder": [3.10],  # the JPEG folder copy of CIFAR-10
    "budget_15ep": {0.05: [20.0, 22.0], 0.1: [19.0, 21.0], 0.2: [25.0]},  # 15 epochs, rho sweep
    "budget_15ep_sgd": [24.0],
    "synthetic": [50.0],
}


def build_runs(root: Path) -> Path:
    """Lay out every fixture run below `root` (directory names are deliberately meaningless)."""
    for seed, err in enumerate(FIX["t1_c10_sam"]):
        write_run(root, f"sweep/a/{seed}", test_err=err, seed=seed, curve=curve_for(err))
    # A duplicate of seed 0: older and worse, in a directory that sorts after the newer one.
    write_run(root, "zz_rerun/old", test_err=9.99, seed=0, updated_at="2025-06-01T00:00:00+00:00")
    for seed, err in enumerate(FIX["t1_c10_sgd"]):
        write_run(root, f"sweep/b/{seed}", test_err=err, seed=seed, optimizer="sgd", curve=curve_for(err))
    for seed, err in enumerate(FIX["t1_c10_sgd_400"]):
        write_run(root, f"sweep/c/{seed}", test_err=err, seed=seed, optimizer="sgd", epochs=400)
    for seed, err in enumerate(FIX["t1_c100_sgd"]):
        write_run(root, f"sweep/d/{seed}", test_err=err, seed=seed, optimizer="sgd", dataset="cifar100")
    for seed, err in enumerate(FIX["t1_c100_sgd_400"]):
        write_run(root, f"sweep/e/{seed}", test_err=err, seed=seed, optimizer="sgd", dataset="cifar100",
                  epochs=400)
    for seed, (sam, sgd) in enumerate(zip(FIX["t4_sam_acc"], FIX["t4_sgd_acc"])):
        common = {"model": "resnet32", "label_noise": 0.2}
        write_run(root, f"noise/{seed}/x", test_err=100 - sam, seed=seed, rho=0.1, **common)
        write_run(root, f"noise/{seed}/y", test_err=100 - sgd, seed=seed, optimizer="sgd", **common)
    # 80 % noise with rho 0.1: the paper used 0.05 there, so this is a budget run.
    write_run(root, "noise/80", test_err=30.0, model="resnet32", label_noise=0.8, rho=0.1)
    write_run(root, "t5/fm", test_err=FIX["t5_fmnist_cutout_sam"][0], dataset="fashion_mnist",
              augment="cutout", rho=0.05)
    for seed, (t1, t5) in enumerate(zip(FIX["t2_r50_top1"], FIX["t2_r50_top5"])):
        write_run(root, f"imnet/{seed}", seed=seed, dataset="imagenet", model="resnet50", epochs=100,
                  batch_size=4096, augment="basic", label_smoothing=0.1,
                  final={"test_err": t1, "test_acc": 100 - t1, "test_top5_err": t5, "test_loss": 1.0,
                         "train_loss": 1.0})
    write_run(root, "jpeg/0", test_err=FIX["budget_folder"][0], source="folder")
    for rho, errs in FIX["budget_15ep"].items():
        for seed, err in enumerate(errs):
            write_run(root, f"quick/{rho}/{seed}", test_err=err, seed=seed, rho=rho, epochs=15,
                      curve=curve_for(err), device="NVIDIA GeForce RTX 4090")
    write_run(root, "quick/sgd/0", test_err=FIX["budget_15ep_sgd"][0], optimizer="sgd", epochs=15,
              curve=curve_for(FIX["budget_15ep_sgd"][0]), device="NVIDIA GeForce RTX 4090")
    write_run(root, "smoke/0", test_err=FIX["synthetic"][0], source="synthetic", epochs=2,
              curve=curve_for(FIX["synthetic"][0]), device="cpu")
    # Not final: each must be listed as skipped with its reason, and crash nothing.
    write_run(root, "bad/running", test_err=5.0, status="running")
    write_run(root, "bad/diverged", test_err=None, status="diverged")
    write_run(root, "bad/failed", test_err=None, status="failed")
    (root / "bad/corrupt").mkdir(parents=True)
    (root / "bad/corrupt/metrics.json").write_text('{"schema": 1, "status": "compl')
    (root / "bad/list").mkdir(parents=True)
    (root / "bad/list/metrics.json").write_text("[1, 2]")
    nofinal = write_run(root, "bad/nofinal", test_err=1.0)
    doc = json.loads((nofinal / "metrics.json").read_text())
    del doc["final"]
    (nofinal / "metrics.json").write_text(json.dumps(doc))
    (root / "bad/killed_early").mkdir(parents=True)
    (root / "bad/killed_early/config.yaml").write_text("seed: 0\n")
    return root


# bad/running checkpointed 3 epochs of 50,000 // 256 = 195 steps each (the loader drops the partial batch)
_RUNNING_STEPS = 3 * (50000 // 256)
SKIPPED_REASONS = {
    "bad/running": f"status running (3 of 200 epochs: {_RUNNING_STEPS:,} steps, {_RUNNING_STEPS * 256:,} images)",
    "bad/diverged": "status diverged",
    "bad/failed": "status failed: RuntimeError: CUDA out of memory",
    "bad/list": "not a JSON object (list)",
    "bad/nofinal": "missing key 'final'",
    "bad/killed_early": "no metrics.json (the run never got past its start)",
    "zz_rerun/old": "duplicate of sweep/a/0 (same config and seed; that one is newer)",
}


@pytest.fixture(scope=module_scope)
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture run tree (module scope: written once per test module)."""
    return build_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope=module_scope)
def cells():
    """The paper's SAM and SGD cells with their expected settings (report.tables.paper_cells)."""
    from sam_repro.report.tables import paper_cells

    return paper_cells()


@pytest.fixture(scope=module_scope)
def report(runs_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """One generation of the whole report from the fixture runs."""
    from sam_repro.report import generate

    return generate(runs_root, tmp_path_factory.mktemp("tables"))


@dataclass
class Tabled:
    """The tables of one generation, without its plots and README: what a tables test needs."""

    tables: list  # Tables 1-5 (report.tables.Table)
    budget: Any

    def markdown(self, name: str) -> str:
        """What generate writes to <name>.md ("table1" ... "table5", "budget")."""
        from sam_repro.report.tables import to_markdown

        return to_markdown(next(t for t in [*self.tables, self.budget] if t.name == name))


@pytest.fixture(scope=module_scope)
def tabled(runs_root: Path, cells) -> Tabled:
    """Tables 1-5 and the budget table of the fixture runs, built as generate builds them (no plots:
    a tables mutant then costs a fraction of a second, not a whole report)."""
    from sam_repro.report import PAPER_TABLES
    from sam_repro.report.load import load_runs
    from sam_repro.report.tables import budget_table, match_runs, paper_table

    runs = load_runs(runs_root).runs
    matches = match_runs(runs, cells)
    return Tabled([paper_table(n, runs, cells, matches) for n in PAPER_TABLES], budget_table(runs, cells, matches))


@dataclass
class Plotted:
    """The three plot functions on the fixture runs: what each returned, and each figure it drew."""

    plots: dict[str, Any]  # "learning curves", "label noise", "rho sweep" -> report.plots.Plot
    figures: dict[str, Any]  # file stem -> the matplotlib Figure it would have been saved from


@pytest.fixture(scope=module_scope)
def plotted(runs_root: Path, cells, tmp_path_factory: pytest.TempPathFactory) -> Plotted:
    """The plot functions called as generate calls them, with each figure captured instead of
    rendered: a PNG costs ~0.2 s to render, and test_report_generate.py checks the files generate writes."""
    from sam_repro.report import plots
    from sam_repro.report.load import load_runs
    from sam_repro.report.tables import match_runs, paper_table

    figures: dict[str, Any] = {}

    def capture(fig: Any, path: Path) -> Path:
        figures[Path(path).stem] = fig
        return Path(path)

    runs = load_runs(runs_root).runs
    table4 = paper_table(4, runs, cells, match_runs(runs, cells))  # the label-noise plot's input
    out = tmp_path_factory.mktemp("plots")
    mp = pytest.MonkeyPatch()
    mp.setattr(plots, "save_figure", capture)
    try:
        drawn = {"learning curves": plots.learning_curves(runs, out),
                 "label noise": plots.label_noise(table4, out),
                 "rho sweep": plots.rho_sweep(runs, out)}
    finally:
        mp.undo()
    return Plotted(drawn, figures)
