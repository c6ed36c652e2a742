"""sam_repro.report.methods: the SAM family side by side, per setting. Every figure is computed here
from the fixture's own numbers (mean, Student-t interval, time ratios) and compared with the table;
the passes per step are docs/methods.md's; method runs never fill the paper's SAM or SGD cells."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats
from tests.report.conftest_report import assert_valid_png, ours_cell, row, write_run
from tests.mutation_scope import module_scope

H100, A100, RTX = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 4090"
TRAIN_SIZE = 50000  # write_run's data.train_size

# Setting A: the paper's CIFAR-10 WRN-28-10 setting (200 epochs, batch 256), every run on one H100
# except where a row tests the hardware rule. (optimizer, seed, test error, images/s, device, optim block)
PAPER = [
    ("sgd", 0, 3.40, 2000.0, H100, {}), ("sgd", 1, 3.62, 2100.0, H100, {}), ("sgd", 2, 3.51, 1900.0, H100, None),
    ("sam", 0, 2.70, 1000.0, H100, {}), ("sam", 1, 2.81, 1050.0, H100, {}), ("sam", 2, 2.64, 980.0, H100, {}),
    ("gsam", 0, 2.50, 990.0, H100, {"gsam_alpha": 0.4}), ("gsam", 1, 2.66, 1000.0, H100, {"gsam_alpha": 0.4}),
    ("gsam", 2, 2.58, 1010.0, H100, {"gsam_alpha": 0.4}),
    ("esam", 0, 2.90, 1500.0, H100, {}), ("esam", 1, 3.00, 1400.0, A100, {}),  # two devices: no ratio
    ("interval_sam", 0, 3.10, 1800.0, H100, {"sam_interval": 4}),  # one seed; 1 + 1/4 passes
    ("looksam", 0, 3.20, 1700.0, RTX, {"looksam_k": 5}),  # no SGD run on this device
    ("fsam", 0, 2.95, 1000.0, H100, None),  # no config.yaml: its passes are not known
]
# Setting B: 200 steps (train_steps) of batch 128 on the JPEG folder copy, ResNet-20.
STEPS = [
    ("sgd", 0, 12.0, 5000.0, H100, {}), ("sgd", 1, 12.4, 5200.0, H100, {}),
    ("vasso", 0, 11.1, 2500.0, H100, {}), ("vasso", 1, 11.5, 2600.0, H100, {}),
    ("gsam", 0, 11.0, 2400.0, H100, {"gsam_alpha": 0.2}), ("gsam", 1, 11.6, 2450.0, H100, {"gsam_alpha": 0.4}),
]
STEP_SETTING = {"model": "resnet20", "batch_size": 128, "device_batch": 128, "m": 128, "train_steps": 200}
LABELS = {"sgd": "SGD", "sam": "SAM", "gsam": "GSAM", "esam": "ESAM", "interval_sam": "IntervalSAM",
          "looksam": "LookSAM", "fsam": "FriendlySAM", "vasso": "VaSSO"}  # the registry's class names
# The passes per step docs/methods.md states (forward / backward), for the hyperparameters above.
PASSES = {"SGD": "1 / 1", "SAM": "2 / 2", "GSAM": "2 / 2", "ESAM": "3 / 2", "IntervalSAM": "1.25 / 1.25",
          "LookSAM": "1.2 / 1.2", "FriendlySAM": "n/a", "VaSSO": "2 / 2"}


def write_method_run(root: Path, name: str, optimizer: str, seed: int, err: float, ips: float, device: str,
                     block: dict[str, Any] | None, source: str = "torchvision", **config: Any) -> Path:
    """A run directory with metrics.json and, unless `block` is None, a config.yaml whose optim block
    names the optimizer and holds `block` (the rest of the resolved config does not matter here)."""
    d = write_run(root, name, test_err=err, seed=seed, optimizer=optimizer, device=device, images_per_s=ips,
                  source=source, **config)
    if block is not None:
        lines = [f"  {k}: {json.dumps(v)}" for k, v in {"name": optimizer, **block}.items()]
        (d / "config.yaml").write_text("seed: %d\noptim:\n%s\n" % (seed, "\n".join(lines)))
    return d


def build(root: Path) -> Path:
    for opt, seed, err, ips, dev, block in PAPER:
        write_method_run(root, f"a/{opt}/{seed}", opt, seed, err, ips, dev, block)
    for opt, seed, err, ips, dev, block in STEPS:
        write_method_run(root, f"b/{opt}/{seed}", opt, seed, err, ips, dev, block, source="folder", **STEP_SETTING)
    # SGD against SAM alone: the paper and budget tables' business, no methods section
    write_method_run(root, "c/sgd", "sgd", 0, 20.0, 2000.0, H100, {}, epochs=15)
    write_method_run(root, "c/sam", "sam", 0, 19.0, 1000.0, H100, {}, epochs=15)
    # synthetic data: a pipeline check, never a result, even with a method
    write_method_run(root, "d/gsam", "gsam", 0, 50.0, 1000.0, H100, {}, source="synthetic", epochs=2)
    return root


@pytest.fixture(scope=module_scope)
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("methods_runs"))


@pytest.fixture(scope=module_scope)
def loaded(root: Path):
    from sam_repro.report.load import load_runs

    return load_runs(root)


@pytest.fixture(scope=module_scope)
def table(loaded):
    from sam_repro.report.methods import methods_table

    return methods_table(loaded.runs)


def runs_of(spec: list, optimizer: str) -> list[tuple]:
    return [r for r in spec if r[0] == optimizer]


def section(table, model: str):
    """The (heading, rows) of the one section whose heading names `model`."""
    found = [(h, df) for h, df in table.sections if f" {model} " in h]
    assert len(found) == 1, [h for h, _ in table.sections]
    return found[0]


def step_time(batch: int, ips: float) -> float:
    return batch / ips  # seconds per optimizer step: the images of a step over the training throughput


def test_one_section_per_setting_with_a_method_and_the_rows_in_registry_order(table) -> None:
    assert len(table.sections) == 2  # not the SGD-vs-SAM-only setting, not the synthetic one
    _, a = section(table, "wrn28_10")
    assert list(a["method"]) == ["SGD", "SAM", "GSAM", "ESAM", "FriendlySAM", "IntervalSAM", "LookSAM"]
    _, b = section(table, "resnet20")
    assert list(b["method"]) == ["SGD", "GSAM (gsam_alpha=0.2)", "GSAM (gsam_alpha=0.4)", "VaSSO"]
    assert set(table.data["setting"]) == set(table.display["setting"]) and len(table.display) == 2


@pytest.mark.parametrize("spec,model", [(PAPER, "wrn28_10"), (STEPS, "resnet20")])
def test_error_mean_interval_and_seeds_are_the_t_interval_over_the_seeds(table, spec, model: str) -> None:
    _, shown = section(table, model)
    data = table.data[table.data["model"] == model]
    for opt in dict.fromkeys(r[0] for r in spec):
        if opt == "gsam" and model == "resnet20":
            groups = {f"GSAM (gsam_alpha={r[5]['gsam_alpha']})": [r[2]] for r in runs_of(spec, opt)}
        else:
            groups = {LABELS[opt]: [r[2] for r in runs_of(spec, opt)]}
        for label, errs in groups.items():
            d, s = row(data, method=label), row(shown, method=label)
            n = len(errs)
            assert d["n"] == n and s["seeds"] == str(n)
            assert math.isclose(d["mean"], float(np.mean(errs)), rel_tol=1e-12)
            if n == 1:
                assert math.isnan(d["ci95"]) and s["test error (%)"] == f"{errs[0]:.2f} (n=1)"
            else:
                half = stats.t.ppf(0.975, n - 1) * np.std(errs, ddof=1) / math.sqrt(n)
                assert math.isclose(d["ci95"], half, rel_tol=1e-9)
            assert s["test error (%)"] == ours_cell(errs)


def test_time_per_epoch_and_relative_to_sgd_on_the_same_device(table) -> None:
    _, shown = section(table, "wrn28_10")
    data = table.data[table.data["model"] == "wrn28_10"]
    assert "train time per epoch (s)" in shown.columns
    sgd = np.mean([step_time(256, r[3]) for r in runs_of(PAPER, "sgd")])
    for opt, label in (("sgd", "SGD"), ("sam", "SAM"), ("gsam", "GSAM"), ("interval_sam", "IntervalSAM")):
        t = np.mean([step_time(256, r[3]) for r in runs_of(PAPER, opt)])
        per_epoch = t * (TRAIN_SIZE // 256)
        d, s = row(data, method=label), row(shown, method=label)
        assert math.isclose(d["time_per_step_s"], t, rel_tol=1e-12)
        assert math.isclose(d["time_per_epoch_s"], per_epoch, rel_tol=1e-12)
        assert math.isclose(d["time_vs_sgd"], t / sgd, rel_tol=1e-12)
        assert s["train time per epoch (s)"] == f"{per_epoch:.2f}" and s["time vs SGD"] == f"{t / sgd:.2f}x"
        assert s["ran on"] == H100
    assert row(shown, method="SAM")["time vs SGD"] != "1.00x"  # a real ratio, not a placeholder


def test_hardware_mismatch_gives_na(table) -> None:
    _, shown = section(table, "wrn28_10")
    data = table.data[table.data["model"] == "wrn28_10"]
    esam, look = row(shown, method="ESAM"), row(shown, method="LookSAM")
    assert esam["time vs SGD"] == "n/a: runs on 2 devices" == esam["train time per epoch (s)"]
    assert esam["ran on"] == ", ".join(sorted([H100, A100]))
    assert look["time vs SGD"] == f"n/a: no SGD run on {RTX}" and look["ran on"] == RTX
    # its own time is still shown: only the ratio needs SGD on the same device
    assert look["train time per epoch (s)"] == f"{step_time(256, 1700.0) * (TRAIN_SIZE // 256):.2f}"
    assert math.isnan(row(data, method="ESAM")["time_vs_sgd"]) and math.isnan(row(data, method="LookSAM")["time_vs_sgd"])


def test_a_step_limited_setting_is_labelled_by_the_training_done_and_timed_per_step(table) -> None:
    heading, shown = section(table, "resnet20")
    per_epoch = TRAIN_SIZE // 128
    label = f"{200 / per_epoch:.2f} epochs (200 steps, {200 * 128:,} images)"
    assert label == "0.51 epochs (200 steps, 25,600 images)"
    assert label in heading and "batch 128" in heading and "data folder" in heading
    assert set(table.data[table.data["model"] == "resnet20"]["trained"]) == {label}
    assert "train time per step (ms)" in shown.columns
    sgd = np.mean([step_time(128, r[3]) for r in runs_of(STEPS, "sgd")])
    vasso = np.mean([step_time(128, r[3]) for r in runs_of(STEPS, "vasso")])
    v = row(shown, method="VaSSO")
    assert v["train time per step (ms)"] == f"{vasso * 1000:.1f}" and v["time vs SGD"] == f"{vasso / sgd:.2f}x"


def test_passes_per_step_as_docs_methods_states_them(table) -> None:
    for model in ("wrn28_10", "resnet20"):
        _, shown = section(table, model)
        for label, passes in zip(shown["method"], shown["passes per step (fwd / bwd)"]):
            assert passes == PASSES[label.split(" (")[0]], label
    d = table.data[table.data["method"] == "IntervalSAM"].iloc[0]
    assert d["forwards"] == d["backwards"] == 1 + 1 / 4


def test_passes_come_from_the_optimizer_registry() -> None:
    from sam_repro.config import OptimConfig
    from sam_repro.optim.factory import METHODS

    # docs/methods.md's table: every optim name, the alternating ones at two hyperparameters each
    stated = {"sgd": (1, 1), "sam": (2, 2), "asam": (2, 2), "gsam": (2, 2), "esam": (3, 2), "fsam": (2, 2),
              "vasso": (2, 2), "samon": (2, 2), "asam_on": (2, 2), "rwp": (2, 2), "wsam": (2, 2)}
    assert set(stated) | {"interval_sam", "looksam"} == set(METHODS)
    for name, passes in stated.items():
        assert METHODS[name].passes_per_step(OptimConfig(name=name)) == passes, name
    for k in (4, 10):
        assert METHODS["interval_sam"].passes_per_step(OptimConfig(name="interval_sam", sam_interval=k)) == (1 + 1 / k,) * 2
        assert METHODS["looksam"].passes_per_step(OptimConfig(name="looksam", looksam_k=k)) == (1 + 1 / k,) * 2


def test_method_runs_never_fill_the_papers_sam_or_sgd_cells(loaded) -> None:
    from sam_repro.report.tables import budget_table, match_runs, paper_cells, paper_table

    runs, cells = loaded.runs, paper_cells()
    matches = match_runs(runs, cells)
    for key, m in matches.items():
        if json.loads(key)["optimizer"] not in ("sgd", "sam"):
            assert m.cells == [], key
    t1 = paper_table(1, runs, cells, matches)
    r = row(t1.data, dataset="cifar10", model="wrn28_10", epochs=200, augment="basic")
    sam, sgd = [p[2] for p in runs_of(PAPER, "sam")], [p[2] for p in runs_of(PAPER, "sgd")]
    assert r["sam_n"] == len(sam) and math.isclose(r["sam_mean"], float(np.mean(sam)), rel_tol=1e-12)
    assert r["sgd_n"] == len(sgd) and math.isclose(r["sgd_mean"], float(np.mean(sgd)), rel_tol=1e-12)
    # ... and they are listed with the non-paper runs, the difference named
    budget = budget_table(runs, cells, matches).data
    gsam = budget[(budget["optimizer"] == "gsam") & (budget["batch_size"] == 256) & (budget["kind"] == "budget")]
    assert len(gsam) == 1 and gsam["differences"].iloc[0] == "optimizer gsam (paper sam)"


def test_a_gsam_run_in_the_papers_exact_setting_matches_no_cell() -> None:
    from sam_repro.report.tables import match_setting, paper_cells

    cells = paper_cells()
    base = {"dataset": "cifar10", "model": "wrn28_10", "augment": "basic", "optimizer": "sam", "rho": 0.05,
            "p": 2, "adaptive": False, "m": 32, "device_batch": 32, "label_noise": 0.0, "epochs": 200,
            "batch_size": 256, "data.source": "torchvision", "val_fraction": 0.0, "train_steps": None}
    assert match_setting(base, cells).cells  # the SAM run fills its cell ...
    for name in ("gsam", "esam", "fsam", "vasso", "samon", "asam_on", "interval_sam", "looksam", "rwp", "wsam"):
        assert match_setting({**base, "optimizer": name}, cells).cells == [], name  # ... a method's never


def test_the_plot_draws_the_tables_numbers(table, tmp_path: Path) -> None:
    from sam_repro.report import plots

    drawn = plots.methods_comparison(table, tmp_path)
    assert sorted(f.name for f in drawn.files) == sorted(f"methods_{s}.png" for s in table.display["setting"])
    for f in drawn.files:
        assert_valid_png(f)
    for _, d in table.data.iterrows():
        p = row(drawn.data, figure=f"methods_{d['setting']}", method=d["method"])
        assert p["n"] == d["n"] and math.isclose(p["mean"], d["mean"])
        assert (math.isnan(p["time_vs_sgd"]) and math.isnan(d["time_vs_sgd"])) or p["time_vs_sgd"] == d["time_vs_sgd"]


def test_generate_writes_the_methods_table_and_links_it(root: Path, tmp_path: Path) -> None:
    from sam_repro.report import generate

    report = generate(root, tmp_path)
    text = (tmp_path / "methods.md").read_text()
    for heading, _ in report.methods.sections:
        assert f"## {heading}" in text
    assert "| GSAM (gsam_alpha=0.2) " in text and "| IntervalSAM " in text
    assert "(methods.md)" in (tmp_path / "README.md").read_text()
    assert (tmp_path / "methods.csv").exists() and len(list(tmp_path.glob("methods_*.png"))) == 2


def test_no_method_runs_gives_an_empty_table(tmp_path: Path) -> None:
    from sam_repro.report.load import load_runs
    from sam_repro.report.methods import methods_table
    from sam_repro.report.tables import to_markdown

    write_method_run(tmp_path, "sgd", "sgd", 0, 3.0, 1000.0, H100, {})
    t = methods_table(load_runs(tmp_path).runs)
    assert t.sections == [] and t.data.empty and "_(none)_" in to_markdown(t)
    assert "optim=sgd,sam,gsam" in t.notes[0]
    assert methods_table(load_runs(tmp_path / "absent").runs).data.empty
