"""`make mutate` only: which tests run against a mutant, and in which order (docs/testing.md).

mutmut runs, for each mutant, the tests its first (recorded) pass saw reach the mutated function.
That set is wide: `validate()` is reached by every test that composes a preset, the report's
helpers by every report test. Two rules cut a mutant's cost without weakening the check:

- SCOPE: a mutant in module M runs only the test files listed for M: the unit tests of M
  (a mutant that only a test of another module notices is a gap in M's own tests).
- ORDER: cheapest file first, cheapest test first within a file (the durations mutmut recorded,
  plus FIXTURE_SETUP_S for the expensive fixtures a test needs), so a mutant is killed by its fastest failing test; `-x` stops there. Files stay contiguous, so
  a module-scoped fixture is built once per file.

Active only inside a mutant's test process: mutmut names the mutant in MUTANT_UNDER_TEST
("sam_repro.engine.schedule.x_cosine__mutmut_3"). Its other passes ("stats", clean run,
forced fail) and every ordinary pytest run are left untouched.
"""
from __future__ import annotations

import fnmatch
import io
import json
import os
import sys
from pathlib import Path

import pytest

# module (dotted; the longest matching prefix wins) -> the test files that may kill its mutants
SCOPE: dict[str, tuple[str, ...]] = {
    "sam_repro.optim.sam": ("tests/test_sam.py", "tests/test_sam_grouped.py", "tests/test_sam_norms.py"),
    "sam_repro.optim.factory": ("tests/test_optim_factory.py", "tests/test_sam_grouped.py", "tests/test_step.py"),
    "sam_repro.engine.step": ("tests/test_step.py", "tests/test_per_device.py", "tests/test_sam_norms.py",
                              "tests/test_step_layouts.py", "tests/test_step_grad_reduce.py"),
    "sam_repro.engine.passes": ("tests/test_step.py", "tests/test_per_device.py", "tests/test_sam_norms.py",
                                "tests/test_step_layouts.py", "tests/test_step_grad_reduce.py"),
    "sam_repro.engine.eager": ("tests/test_step.py", "tests/test_sam_norms.py", "tests/test_step_grad_reduce.py"),
    "sam_repro.engine.grid": ("tests/test_step.py", "tests/test_per_device.py", "tests/test_step_layouts.py",
                              "tests/test_step_grad_reduce.py", "tests/test_sam_norms.py"),
    "sam_repro.engine.loop": ("tests/test_loop.py", "tests/test_packing.py"),
    "sam_repro.engine.packing": ("tests/test_packing.py",),
    "sam_repro.engine.schedule": ("tests/test_schedule.py",),
    "sam_repro.rundir": ("tests/test_checkpoint.py", "tests/test_rundir_faults.py"),
    "sam_repro.data.noise": ("tests/test_label_noise.py", "tests/test_data_sources.py"),
    "sam_repro.data.augment": (
        "tests/test_augment.py", "tests/test_augment_draws.py", "tests/test_loaders.py", "tests/test_finetune.py"),
    # the report, per module: its own tests (the whole report's tests take ~30 s, a survivor's cost)
    "sam_repro.report": ("tests/test_report_generate.py", "tests/test_results.py"),  # generate, README
    "sam_repro.report.cli": ("tests/test_report_generate.py",),
    "sam_repro.report.load": ("tests/test_report_load.py", "tests/test_report_cells.py"),
    "sam_repro.report.paper": ("tests/test_report_paper.py", "tests/test_report_cells.py", "tests/test_report_tables.py"),
    "sam_repro.report.tables": ("tests/test_report_tables.py", "tests/test_report_cells.py"),
    "sam_repro.report.plots": ("tests/test_report_plots.py", "tests/test_report_plot_content.py"),
    "sam_repro.report.sharpness": ("tests/test_report_sharpness.py", "tests/test_report_landscape.py"),
    "sam_repro.report.landscape": ("tests/test_report_landscape.py",),
    "sam_repro.report.budget": ("tests/test_report_budget.py", "tests/test_report_load.py"),
    "sam_repro.validate": ("tests/test_validate.py", "tests/test_configs.py"),
    "sam_repro.runlog": ("tests/test_runlog.py",),
}
STATS = Path("mutmut-stats.json")
# Module-scoped fixtures that cost seconds to build (measured on 2 cores): a test that needs one runs
# after the tests that do not, so that a mutant a cheap test kills never pays for them.
FIXTURE_SETUP_S = {"report": 3.0, "tabled": 0.8, "plotted": 0.6, "runs_root": 0.3, "cells": 0.2}  # mutmut runs the tests from mutants/, where it keeps this file


def module_scope(fixture_name: str, config: pytest.Config) -> str:
    """The scope of a module-wide fixture that runs code under mutation (`@pytest.fixture(scope=module_scope)`).

    mutmut's recorded pass ("stats") credits a function to the tests during which it ran; a
    module-scoped fixture runs once, inside the first test that asks for it, so every later test of
    the module looked as if it never reached the code it checks, and mutmut never ran it against a
    mutant of that code (the README and deviations tests against report/__init__.py did not run).
    In that pass alone the fixture is rebuilt per test; everywhere else it is built once per module."""
    return "function" if os.environ.get("MUTANT_UNDER_TEST") == "stats" else "module"


def warm_fork_server(config: pytest.Config) -> None:
    """In mutmut's fork server (a collect-only session with mutmut loaded), pay the lazy first-use
    costs that every mutant's process would otherwise pay again: Hydra's plugin discovery and config
    registration, the model registry's imports (together about 1 s per mutant of validate) and matplotlib's first figure."""
    if not (config.option.collectonly and "mutmut" in sys.modules
            and "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", "")):
        return
    from matplotlib.figure import Figure

    from sam_repro.validate import validate
    from tests.conftest import composed_shared

    validate(composed_shared(["experiment=smoke"]))  # also imports the model registry's families
    for overrides in (["experiment=t2_imagenet_resnet50_100ep"], ["experiment=smoke", "logger=wandb"]):
        composed_shared(overrides)  # the other configs tests/test_validate.py changes and restores
    fig = Figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], label="warm")
    ax.legend()
    fig.savefig(io.BytesIO(), format="png")


def module_of(mutant: str) -> str:
    """'sam_repro.report.xǁReportǁfilled__mutmut_2' -> 'sam_repro.report' (mutmut drops '__init__')."""
    return mutant.split("__mutmut_")[0].rpartition(".")[0]


def scope_of(module: str) -> tuple[str, ...] | None:
    keys = [k for k in SCOPE if module == k or module.startswith(k + ".")]
    return SCOPE[max(keys, key=len)] if keys else None


def scope_items(config: pytest.Config, items: list[pytest.Item]) -> None:
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if "__mutmut_" not in mutant:
        return
    files = scope_of(module_of(mutant))
    if files is not None:
        keep = [i for i in items if any(fnmatch.fnmatch(i.nodeid.split("::")[0], f) for f in files)]
        dropped = [i for i in items if i not in keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    durations = json.loads(STATS.read_text())["duration_by_test"] if STATS.is_file() else {}

    def cost(item: pytest.Item) -> float:  # mutmut records a test's call only, not its fixtures' setup
        return durations.get(item.nodeid, 0.0) + sum(FIXTURE_SETUP_S.get(f, 0.0) for f in item.fixturenames)

    per_file: dict[str, float] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        per_file[path] = per_file.get(path, 0.0) + cost(item)
    items.sort(key=lambda i: (per_file[i.nodeid.split("::")[0]], i.nodeid.split("::")[0], cost(i)))
