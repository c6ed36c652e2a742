"""The committed results: results/tables/ is exactly what `make table` makes of results/runs/."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from sam_repro.report import generate

REPO = Path(__file__).resolve().parent.parent
STEP_RUNS = REPO / "results" / "runs" / "budget_cpu_cifar10jpeg_resnet20_sharpness"


def test_committed_tables_regenerate_from_committed_runs(tmp_path: Path) -> None:
    generate(REPO / "results" / "runs", tmp_path)
    committed = {p.name for p in (REPO / "results" / "tables").iterdir() if p.is_file()}
    fresh = {p.name for p in tmp_path.iterdir() if p.is_file()}
    assert committed == fresh, "results/tables is stale: run `make table` and commit it"
    for name in sorted(fresh):
        ours, theirs = tmp_path / name, REPO / "results" / "tables" / name
        if name.endswith(".png"):
            # PNG bytes depend on the matplotlib release; the figure's content must match.
            with Image.open(ours) as a, Image.open(theirs) as b:
                assert a.size == b.size, name
        else:
            assert ours.read_bytes() == theirs.read_bytes(), f"results/tables/{name} is stale: run `make table`"


def test_every_committed_run_is_compact_and_complete() -> None:
    """results/runs keeps logs, never checkpoints or data; each run has its three files."""
    runs = [p.parent for p in (REPO / "results" / "runs").rglob("metrics.json")]
    for run in runs:
        assert {"config.yaml", "metrics.json", "metrics.jsonl"} <= {p.name for p in run.iterdir()}, run
    assert not list((REPO / "results" / "runs").rglob("*.pt")), "checkpoints do not belong in results/runs"


# ---- the committed step-limited runs, labelled by what they trained (report/budget.py) ---------

@pytest.fixture(scope="module")
def step_runs() -> list[dict]:
    docs = [json.loads(p.read_text()) for p in sorted(STEP_RUNS.rglob("metrics.json"))]
    assert len(docs) == 2 and all(d["config"]["train_steps"] for d in docs)
    return docs


@pytest.fixture(scope="module")
def committed(tmp_path_factory: pytest.TempPathFactory):
    """The report of the committed runs, figures captured (not rendered): (out folder, figures by stem)."""
    figures: dict[str, Any] = {}

    def capture(fig, path, **_):
        figures[Path(path).stem] = fig

    out = tmp_path_factory.mktemp("tables")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Figure, "savefig", capture)
        generate(REPO / "results" / "runs", out)
    return out, figures


def trained_label(d: dict) -> str:
    """The label of a step-limited run, counted here from its metrics.json."""
    steps, batch = d["config"]["train_steps"], d["config"]["batch_size"]
    per_epoch = d["data"]["train_size"] // batch
    return f"{steps / per_epoch:.2f} epochs ({steps} steps, {steps * batch:,} images)"


def test_committed_step_limited_runs_are_labelled_by_the_training_done(step_runs, committed) -> None:
    out, figures = committed
    label = {trained_label(d) for d in step_runs}
    assert label == {"0.38 epochs (150 steps, 19,200 images)"}  # 150 of 390 steps of one epoch
    (label,) = label
    steps = step_runs[0]["config"]["train_steps"]
    configured = step_runs[0]["config"]["epochs"]
    assert configured == 200  # what they were configured with, and must not be labelled by
    # budget.md: one row per method with the training done, never 'epochs 200'
    md = (out / "budget.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| cifar10") and label in line]
    assert len(rows) == 2 and {r.split("|")[5].strip() for r in rows} == {"sam", "sgd"}
    assert f"| {configured} " not in md and f"{configured} epochs" not in md
    csv = pd.read_csv(out / "budget.csv")
    cut = csv[csv["steps"] == steps]
    assert len(cut) == 2
    per_epoch = step_runs[0]["data"]["train_size"] // step_runs[0]["config"]["batch_size"]
    assert cut["epochs_trained"].tolist() == [round(steps / per_epoch, 4)] * 2
    assert cut["images"].tolist() == [steps * step_runs[0]["config"]["batch_size"]] * 2
    # the sharpness table: the setting named by its steps, the training done in its own column
    sharp = (out / "sharpness.md").read_text()
    assert f"_{steps}steps_" in sharp and f"_{configured}ep_" not in sharp and sharp.count(label) == 2
    # every figure: the file names and titles
    names = sorted(figures)
    assert f"curves_cifar10_resnet20_basic_{steps}steps_bs128_folder" in names
    assert f"sharpness_cifar10_resnet20_basic_{steps}steps_bs128_folder" in names
    assert not any(f"_{configured}ep" in n for n in names)
    curves = figures[f"curves_cifar10_resnet20_basic_{steps}steps_bs128_folder"].axes[0]
    assert curves.get_title().endswith(f"\ntrained {label}")
    assert [line.get_xdata().tolist() for line in curves.get_lines()] == [[steps / per_epoch]] * 2  # x: epochs done
    sharp_fig = figures[f"sharpness_cifar10_resnet20_basic_{steps}steps_bs128_folder"]
    assert f"trained {label}" in sharp_fig._suptitle.get_text()
    readme = (out / "README.md").read_text()
    assert f"sharpness_cifar10_resnet20_basic_{steps}steps_bs128_folder.png" in readme
