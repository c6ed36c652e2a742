"""report/methods.py: SGD, SAM and the SAM-family methods side by side, against figures computed here."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import scipy.stats as sps
import yaml

from sam_repro.report import generate
from sam_repro.report.load import load_runs
from sam_repro.report.methods import methods_table
from tests.report.conftest_report import write_run

JPEG = {"source": "folder", "model": "resnet20", "batch_size": 128, "epochs": 1, "precision": "fp32"}


def put(root: Path, name: str, optimizer: str, seed: int, err: float, speed: float, device: str = "CPU X",
        optim_yaml: dict | None = None) -> Path:
    """A completed run of `optimizer` with its images/s and, as a real run directory has, its config.yaml."""
    d = write_run(root, name, test_err=err, optimizer=optimizer, seed=seed, device=device,
                  rho=None if optimizer == "sgd" else 0.05, **JPEG)
    doc = json.loads((d / "metrics.json").read_text())
    doc["images_per_s"] = speed
    (d / "metrics.json").write_text(json.dumps(doc))
    (d / "config.yaml").write_text(yaml.safe_dump({"optim": {"name": optimizer, **(optim_yaml or {})}}))
    return d


def ci95(values: list[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return sps.t.ppf(0.975, n - 1) * s / math.sqrt(n)


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for seed, (e_sgd, e_sam, e_gsam) in enumerate([(30.0, 28.0, 27.0), (32.0, 29.0, 26.0), (31.0, 27.5, 28.5)]):
        put(root, f"sgd{seed}", "sgd", seed, e_sgd, 300.0)
        put(root, f"sam{seed}", "sam", seed, e_sam, 150.0)
        put(root, f"gsam{seed}", "gsam", seed, e_gsam, 120.0 if seed else 100.0)
    put(root, "interval", "interval_sam", 0, 29.0, 250.0, optim_yaml={"sam_interval": 4})
    put(root, "esam_elsewhere", "esam", 0, 30.0, 200.0, device="CPU Y")
    return root


def rows_by_optimizer(root: Path) -> dict[str, dict]:
    table = methods_table(load_runs(root).runs)
    assert len(table.data) == len(set(table.data["optimizer"])), "one setting: one row per optimizer"
    return {r["optimizer"]: r for r in table.data.to_dict("records")}


def test_error_interval_time_and_passes_per_optimizer(sweep: Path) -> None:
    rows = rows_by_optimizer(sweep)
    assert list(rows) == ["sgd", "sam", "esam", "gsam", "interval_sam"]  # the paper's first, then by name
    gsam = [27.0, 26.0, 28.5]
    assert rows["gsam"]["n"] == 3 and rows["gsam"]["mean"] == pytest.approx(sum(gsam) / 3, abs=1e-12)
    assert rows["gsam"]["ci95"] == pytest.approx(ci95(gsam), rel=1e-12)
    assert rows["gsam"]["time_over_sgd"] == pytest.approx(300.0 / ((100.0 + 120.0 + 120.0) / 3), rel=1e-12)
    assert rows["sam"]["time_over_sgd"] == pytest.approx(2.0, rel=1e-12)
    assert rows["sgd"]["time_over_sgd"] == pytest.approx(1.0)
    # passes from each run's own hyperparameters: a SAM step every 4th step is 1 + 1/4 passes
    assert (rows["interval_sam"]["forwards"], rows["interval_sam"]["backwards"]) == (1.25, 1.25)
    assert (rows["esam"]["forwards"], rows["esam"]["backwards"]) == (3.0, 2.0)
    assert (rows["sgd"]["forwards"], rows["sam"]["forwards"], rows["gsam"]["backwards"]) == (1.0, 2.0, 2.0)
    # one seed: its value alone, no interval
    assert rows["interval_sam"]["n"] == 1 and math.isnan(rows["interval_sam"]["ci95"])


def test_time_on_other_hardware_is_not_compared(sweep: Path) -> None:
    rows = rows_by_optimizer(sweep)
    assert math.isnan(rows["esam"]["time_over_sgd"])
    display = methods_table(load_runs(sweep).runs).display
    assert display[display["optimizer"] == "esam"]["time / SGD's"].item() == "n/a"


def test_settings_with_only_the_papers_optimizers_have_no_methods_rows(tmp_path: Path) -> None:
    put(tmp_path, "sgd", "sgd", 0, 30.0, 300.0)
    put(tmp_path, "sam", "sam", 0, 28.0, 150.0)
    assert methods_table(load_runs(tmp_path).runs).data.empty


def test_method_runs_never_fill_the_papers_cells(tmp_path: Path) -> None:
    # a paper-setting CIFAR-10 WRN-28-10 run (conftest_report's defaults) fills Table 1's SAM cell as sam,
    # and no cell at all as gsam: there it is a budget row and a methods row
    write_run(tmp_path / "runs", "sam", test_err=2.7)
    write_run(tmp_path / "runs", "gsam", test_err=2.5, optimizer="gsam")
    report = generate(tmp_path / "runs", tmp_path / "out")
    table1 = report.tables[0].data
    assert int(table1["sam_n"].sum()) == 1 and table1.loc[table1["sam_n"] > 0, "sam_mean"].item() == 2.7
    budget = report.budget.data
    assert list(budget["optimizer"]) == ["gsam"] and "optimizer gsam (paper sam)" in budget["differences"].item()
    assert list(report.methods.data["optimizer"]) == ["sam", "gsam"]
    assert (tmp_path / "out" / "methods.md").read_text().count("| gsam ") == 1
