"""The sweep scripts: every sam-train call they make composes, validates, and together they fill
every SAM/SGD cell of their paper table in the paper's setting (as the report judges it)."""
from __future__ import annotations

import itertools
import os
import subprocess

import pytest

from sam_repro.report.paper import expected
from sam_repro.report.tables import differences, paper_cells
from sam_repro.runlog import summary_config
from sam_repro.validate import validate
from tests.conftest import REPO, composed_copy


def dry_run(script: str, *args: str) -> list[list[str]]:
    """The sam-train argument lists a table script would run (DRY_RUN=1 prints them)."""
    out = subprocess.run(["bash", str(REPO / "scripts" / script), *args], capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1", "SEEDS": "0,1"}, timeout=60, check=True).stdout
    commands = [line.split()[1:] for line in out.splitlines() if line.startswith("sam-train")]
    assert commands, out
    return commands


def expand(args: list[str]) -> list[list[str]]:
    """Hydra's multirun expansion of comma lists (seeds reduced to the first)."""
    assert args[0] == "-m"
    choices = []
    for arg in args[1:]:
        key, _, value = arg.partition("=")
        values = value.split(",")[:1] if key == "seed" else value.split(",")
        choices.append([f"{key}={v}" for v in values])
    return [list(c) for c in itertools.product(*choices)]


@pytest.mark.parametrize("table", [1, 2, 3, 4, 5])
def test_table_script_fills_every_cell_in_the_papers_setting(table: int) -> None:
    cells = paper_cells()
    cells = cells[(cells["table"] == table) & cells["method"].isin(["sam", "sgd"])]
    wanted = {(c["dataset"], c["model"], c["augment"], c["label_noise"], c["method"], c["metric"]) for _, c in cells.iterrows()}
    filled = set()
    for args in dry_run(f"table{table}.sh"):
        assert "seed=0,1" in args
        for overrides in expand(args):
            # composed once per session without the seed (tests/test_fill_presets.py composes the same
            # settings); the seed, a top-level integer, is then set on a copy as its override would
            seeds = [int(o.partition("=")[2]) for o in overrides if o.startswith("seed=")]
            cfg = composed_copy([o for o in overrides if not o.startswith("seed=")])
            for seed in seeds:
                cfg.seed = seed
            validate(cfg)
            setting = {**summary_config(cfg, "bf16"), "data.source": cfg.dataset.source}
            hits = [c for _, c in cells.iterrows() if c["method"] == cfg.optim.name and not differences(setting, expected(c))]
            assert hits, f"{overrides} fills no cell of Table {table}"
            filled |= {(c["dataset"], c["model"], c["augment"], c["label_noise"], c["method"], c["metric"]) for c in hits}
    assert filled == wanted


def test_extra_arguments_reach_every_call_and_sgd_2x_doubles_epochs() -> None:
    commands = dry_run("table4.sh", "hydra/launcher=joblib")
    assert all(c[-1] == "hydra/launcher=joblib" for c in commands)
    plain = dry_run("table1.sh")
    doubled = subprocess.run(["bash", str(REPO / "scripts/table1.sh")], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "DRY_RUN": "1", "SGD_2X": "1"}).stdout.splitlines()
    assert len(doubled) == 2 * len(plain)
    assert "sam-train -m experiment=t1_cifar10_wrn28_10_200ep augment=basic optim=sgd epochs=400 seed=0,1,2,3,4" in doubled
