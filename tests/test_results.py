"""The committed results: results/tables/ is exactly what `make table` makes of results/runs/."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from sam_repro.report import generate

REPO = Path(__file__).resolve().parent.parent


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
