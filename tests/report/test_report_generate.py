"""sam_repro.report as a whole: generate (README, deviations, hardware, bytes, stale plots) and the sam-report CLI."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tests.report.conftest_report import FIX, SKIPPED_REASONS, assert_valid_png, ours_cell, report, runs_root, write_run  # noqa: F401

from sam_repro.report import generate, plots
from sam_repro.report.cli import main


def test_readme_summary(report) -> None:
    text = (Path(report.files[0])).read_text()
    assert "Paper cells filled: **8 of 156** (Table 1: 3/60, Table 2: 2/36, Table 3: 0/36, " \
           "Table 4: 2/8, Table 5: 1/16)" in text
    assert "NVIDIA H100 80GB HBM3 (23 runs)" in text
    assert "RTX 4090" not in text  # only budget runs ran there
    dev = text.split("## Largest deviations")[1].split("## Files")[0]
    # Ours minus paper, largest first: SGD at 20 % noise (82.0 vs 84.8) leads.
    body = [line for line in dev.splitlines() if line.startswith("| table")]  # header is "| table "
    assert len(body) == 1 + 5

    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in dev.splitlines() if line.startswith("| ")]
    sgd100 = FIX["t1_c100_sgd"] if np.mean(FIX["t1_c100_sgd"]) < np.mean(FIX["t1_c100_sgd_400"]) else FIX["t1_c100_sgd_400"]
    assert rows == [  # largest |ours - paper| first; a tie (0.10) in table order
        ["table", "cell", "method", "ours", "paper", "ours - paper"],
        ["table4", "20%", "SGD", ours_cell(FIX["t4_sgd_acc"]), "84.8", f"{np.mean(FIX['t4_sgd_acc']) - 84.8:+.2f}"],
        ["table1", "cifar100 wrn28_10 200 basic", "SGD", ours_cell(sgd100), "18.8 ± 0.2", f"{np.mean(sgd100) - 18.8:+.2f}"],
        ["table4", "20%", "SAM", ours_cell(FIX["t4_sam_acc"]), "95.1", f"{np.mean(FIX['t4_sam_acc']) - 95.1:+.2f}"],
        ["table5", "fashion_mnist wrn28_10 autoaugment", "SAM", ours_cell(FIX["t5_fmnist_cutout_sam"]), "3.61 ± 0.06",
         f"{FIX['t5_fmnist_cutout_sam'][0] - 3.61:+.2f}"],
        ["table1", "cifar10 wrn28_10 200 basic", "SAM", ours_cell(FIX["t1_c10_sam"]), "2.7 ± 0.1",
         f"{np.mean(FIX['t1_c10_sam']) - 2.7:+.2f}"]]
    assert "- Runs: 32 completed (23 in paper cells, 9 budget / non-paper or synthetic); 8 skipped or not final " \
           "(listed below)." in text
    for name in ("table1.md", "table5.csv", "budget.md", "label_noise.png",
                 "curves_cifar10_wrn28_10_basic_200ep.png", "rho_cifar10_wrn28_10_basic_15ep.png"):
        assert f"({name})" in text
    for kind, name in (("learning curves", "curves_cifar10_wrn28_10_basic_200ep.png"), ("label noise", "label_noise.png"),
                       ("rho sweep", "rho_cifar10_wrn28_10_basic_15ep.png")):
        assert f"\n- {kind}: [{name}]({name})\n" in text
    assert sorted(set(report.plots["label noise"].data["noise"])) == [20, 40, 60, 80]  # drawn from Table 4
    skipped = text.split("## Skipped / not final")[1]
    assert skipped.lstrip("\n").startswith("| run directory ")
    assert [c.strip() for c in skipped.lstrip("\n").splitlines()[0].split("|")[1:-1]] == ["run directory", "status", "reason"]
    for run_dir, reason in SKIPPED_REASONS.items():
        assert run_dir in skipped and reason in skipped


def test_two_generations_are_byte_identical(runs_root: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    generate(runs_root, a)
    generate(runs_root, b)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert any(f.endswith(".png") for f in files) and "README.md" in files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_regenerating_removes_plots_of_settings_that_are_gone(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "new" / "out"  # the output folder and its parent are made
    write_run(runs, "r", test_err=3.0, curve=[10.0, 3.0])
    generate(runs, out)
    assert (out / "curves_cifar10_wrn28_10_basic_200ep.png").exists()
    (runs / "r" / "metrics.json").unlink()
    generate(runs, out)
    assert not (out / "curves_cifar10_wrn28_10_basic_200ep.png").exists()


def test_cli_on_an_empty_runs_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "runs").mkdir()
    out = tmp_path / "tables"
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "0 completed runs" in printed and "table1: 0/60 paper cells filled" in printed
    assert "sam-train -m experiment=t1_cifar10_wrn28_10_200ep augment=basic optim=sam,sgd seed=0,1,2,3,4" in printed
    assert "bash scripts/table4.sh" in printed
    for n in range(1, 6):
        data = pd.read_csv(out / f"table{n}.csv")
        assert (data["sam_n"] == 0).all() and data["sam_mean"].isna().all()
        assert "| —  " in (out / f"table{n}.md").read_text()
    assert "**0 of 156**" in (out / "README.md").read_text()


def test_cli_on_a_missing_runs_dir_and_with_fixture_runs(runs_root: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--runs", str(tmp_path / "absent"), "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "table1.md").exists()
    capsys.readouterr()
    assert main(["--runs", str(runs_root), "--out", str(tmp_path / "u")]) == 0
    printed = capsys.readouterr().out
    assert "32 completed runs" in printed and "8 skipped" in printed
    assert f"skipped bad/running: {SKIPPED_REASONS['bad/running']}" in printed
    assert "table1: 3/60 paper cells filled" in printed
    kinds = pd.read_csv(tmp_path / "u" / "budget.csv")["kind"]
    assert 0 < (kinds == "synthetic").sum() < (kinds == "budget").sum()
    assert (f"budget / non-paper settings: {(kinds == 'budget').sum()} (budget.md); "
            f"synthetic-data pipeline checks: {(kinds == 'synthetic').sum()}\n") in printed


def test_cli_defaults_read_results_runs_and_write_results_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "results" / "runs", "r", test_err=3.0)
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("sam-report: 1 completed runs read from results/runs, 0 skipped\n")
    assert printed.endswith(f"wrote {len(list((tmp_path / 'results/tables').iterdir()))} files to results/tables "
                            "(summary: results/tables/README.md)\n")
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    usage = " ".join(capsys.readouterr().out.split())  # argparse wraps lines to the terminal's width
    assert usage.startswith("usage: sam-report [-h] [--runs RUNS] [--out OUT] Aggregate sam-train run directories "
                            "into the SAM paper's tables, plots and a summary.")
    assert "--runs RUNS searched recursively for metrics.json (default: results/runs)" in usage
    assert "--out OUT where tables, plots and README.md go (default: results/tables)" in usage
    with pytest.raises(SystemExit) as exit_:
        main(["--nope"])
    assert exit_.value.code == 2  # a bad command line


def test_cli_names_the_one_empty_cell_of_a_nearly_full_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    for noise in (0.2, 0.4, 0.6, 0.8):
        for method in ("sam", "sgd"):
            if (noise, method) == (0.8, "sgd"):
                continue
            write_run(runs, f"{method}{noise}", test_err=20.0, model="resnet32", optimizer=method, label_noise=noise,
                      rho=0.05 if noise == 0.8 else 0.1)
    assert main(["--runs", str(runs), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert ("table4: 7/8 paper cells filled\n  empty cells (whole table: bash scripts/table4.sh):\n"
            "    80% [sgd]: sam-train -m experiment=t4_cifar10_resnet32_noise80 optim=sgd seed=0,1,2,3,4\n") in printed
    assert " [sam, sgd]: sam-train -m experiment=t1_cifar10_wrn28_10_200ep augment=basic optim=sam,sgd seed=0,1,2,3,4\n" \
        in printed


def test_deviations_rank_by_size_then_table_cell_and_method_and_ignore_float_noise() -> None:
    from sam_repro.report import _deviations
    from sam_repro.report.tables import Table

    def table(name: str, cells: dict[str, tuple[float, float]], paper: float = 10.0, n: tuple[int, int] = (2, 2)) -> Table:
        """cells: label -> (SAM mean, SGD mean), each over n seeds with ci95 0.1 against the paper's 10."""
        display = pd.DataFrame([{"dataset": c, "SAM (paper)": "10", "SGD (paper)": "10.0 ± 0.1"} for c in cells])
        data = pd.DataFrame([{"sam_n": n[0], "sam_mean": s, "sam_ci95": 0.1, "sam_paper": paper,
                              "sgd_n": n[1], "sgd_mean": g, "sgd_ci95": 0.1, "sgd_paper": paper} for s, g in cells.values()])
        return Table(name, name, display, data)

    got = _deviations([table("table2", {"b": (10.5 + 6e-8, 9.5), "a": (10.5, 9.5)}),
                       table("table1", {"z": (9.0, 10.0)}), table("table3", {"c": (10.2, 10.0)})], top=6)
    assert list(got.columns) == ["table", "cell", "method", "ours", "paper", "ours - paper"]
    assert got.values.tolist() == [
        ["table1", "z", "SAM", "9.00 ± 0.10 (n=2)", "10", "-1.00"],
        ["table2", "a", "SAM", "10.50 ± 0.10 (n=2)", "10", "+0.50"],  # four ties at 0.5 (to 1e-6):
        ["table2", "a", "SGD", "9.50 ± 0.10 (n=2)", "10.0 ± 0.1", "-0.50"],  # by cell, then method
        ["table2", "b", "SAM", "10.50 ± 0.10 (n=2)", "10", "+0.50"],
        ["table2", "b", "SGD", "9.50 ± 0.10 (n=2)", "10.0 ± 0.1", "-0.50"],
        ["table3", "c", "SAM", "10.20 ± 0.10 (n=2)", "10", "+0.20"]]
    assert len(_deviations([table("table1", {"z": (9.0, 10.0)})])) == 2  # top 5 of 2
    assert _deviations([table("table1", {"z": (9.0, 10.0)})], top=1)["method"].tolist() == ["SAM"]
    one_seed = _deviations([table("table1", {"z": (math.nan, 12.0)}, n=(0, 1))])  # an empty cell is no deviation
    assert one_seed.values.tolist() == [["table1", "z", "SGD", "12.00 ± 0.10 (n=1)", "10.0 ± 0.1", "+2.00"]]


def test_readme_names_the_hardware_of_paper_cell_runs_unknown_included(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed, device in enumerate(["GPU B", None, "GPU B"]):
        write_run(runs, f"t4/{seed}", test_err=20.0, seed=seed, model="resnet32", label_noise=0.2, rho=0.1, device=device)
    write_run(runs, "budget", test_err=30.0, epochs=15, device="Laptop")  # not in a paper cell: not named
    generate(runs, tmp_path / "out")
    text = (tmp_path / "out" / "README.md").read_text()
    assert "- Hardware (env.device of the runs in paper cells): GPU B (2 runs); unknown (1 runs).\n" in text
    # runs that log no device at all (no env.device column) and no runs in paper cells
    bare = tmp_path / "bare"
    doc = json.loads((write_run(bare, "r", test_err=30.0, epochs=15) / "metrics.json").read_text())
    del doc["env"]["device"]
    (bare / "r" / "metrics.json").write_text(json.dumps(doc))
    generate(bare, tmp_path / "out2")
    assert "- Hardware (env.device of the runs in paper cells): none (no runs in paper cells).\n" in \
        (tmp_path / "out2" / "README.md").read_text()


def test_every_plot_file_generate_writes_is_a_valid_png_of_the_figure_drawn(runs_root: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    figures = {}
    save = plots.save_figure

    def capture(fig, path: Path) -> Path:
        figures[Path(path).stem] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "save_figure", capture)
    report = generate(runs_root, tmp_path)
    files = [f for p in report.plots.values() for f in p.files]
    assert sorted(f.name for f in files if not f.name.startswith("sharpness_")) == [
        "curves_cifar10_wrn28_10_basic_15ep.png",
        "curves_cifar10_wrn28_10_basic_200ep.png",
        "label_noise.png",
        "rho_cifar10_wrn28_10_basic_15ep.png",
    ]
    for f in files:
        assert_valid_png(f)
        buf = io.BytesIO()  # the file is the figure the plot function drew, rendered once
        figures[f.stem].savefig(buf, format="png", dpi=100, metadata=plots.PNG_METADATA)
        assert f.read_bytes() == buf.getvalue(), f.name
