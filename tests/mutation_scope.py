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
    "sam_repro.optim.sam": ("tests/optim/test_sam.py", "tests/optim/test_sam_devices.py", "tests/optim/test_sam_norms.py"),
    "sam_repro.optim.factory": ("tests/optim/test_optim_factory.py", "tests/optim/test_sam_devices.py", "tests/engine/test_step.py",
                                "tests/report/test_report_methods.py"),  # passes_per_step: the report's column
    "sam_repro.engine.step": ("tests/engine/test_step.py", "tests/engine/test_per_device.py", "tests/optim/test_sam_norms.py",
                              "tests/engine/test_step_layouts.py", "tests/engine/test_step_grad_reduce.py"),
    "sam_repro.engine.passes": ("tests/engine/test_step.py", "tests/engine/test_per_device.py", "tests/optim/test_sam_norms.py",
                                "tests/engine/test_step_layouts.py", "tests/engine/test_step_grad_reduce.py"),
    "sam_repro.engine.eager": ("tests/engine/test_step.py", "tests/optim/test_sam_norms.py", "tests/engine/test_step_grad_reduce.py",
                               "tests/optim/methods/test_methods_engine.py"),  # the methods take it on one device
    "sam_repro.engine.grid": ("tests/engine/test_step.py", "tests/engine/test_per_device.py", "tests/engine/test_step_layouts.py",
                              "tests/engine/test_step_grad_reduce.py", "tests/optim/test_sam_norms.py",
                              "tests/optim/methods/test_methods_engine.py", "tests/optim/methods/test_rwp_engine.py"),
    # the SAM family: each rule against its naive reading, its reductions to SAM, the released code's
    # trajectories (by the class and by the engine's step), its state
    "sam_repro.optim.methods": ("tests/optim/methods/test_methods_rules.py", "tests/optim/methods/test_methods_reductions.py",
                                "tests/optim/methods/test_methods_fixtures.py", "tests/optim/methods/test_methods_state.py",
                                "tests/optim/methods/test_methods_engine.py", "tests/optim/methods/test_rwp_engine.py"),
    "sam_repro.engine.loop": ("tests/engine/test_loop.py", "tests/engine/test_packing.py"),
    "sam_repro.engine.packing": ("tests/engine/test_packing.py",),
    "sam_repro.engine.schedule": ("tests/engine/test_schedule.py",),
    "sam_repro.rundir": ("tests/engine/test_checkpoint.py", "tests/test_rundir_faults.py"),
    "sam_repro.data.noise": ("tests/data/test_label_noise.py", "tests/data/test_data_sources.py"),
    "sam_repro.data.augment": (
        "tests/data/test_augment.py", "tests/data/test_augment_draws.py", "tests/data/test_loaders.py", "tests/models/test_finetune.py"),
    # the report, per module: its own tests (the whole report's tests take ~30 s, a survivor's cost)
    "sam_repro.report": ("tests/report/test_report_generate.py", "tests/test_results.py"),  # generate, README
    "sam_repro.report.cli": ("tests/report/test_report_generate.py",),
    "sam_repro.report.load": ("tests/report/test_report_load.py", "tests/report/test_report_cells.py"),
    "sam_repro.report.paper": ("tests/report/test_report_paper.py", "tests/report/test_report_cells.py", "tests/report/test_report_tables.py"),
    "sam_repro.report.tables": ("tests/report/test_report_tables.py", "tests/report/test_report_cells.py"),
    "sam_repro.report.plots": ("tests/report/test_report_plots.py", "tests/report/test_report_plot_content.py",
                               "tests/report/test_report_methods.py"),
    "sam_repro.report.methods": ("tests/report/test_report_methods.py",),
    "sam_repro.report.sharpness": ("tests/report/test_report_sharpness.py", "tests/report/test_report_landscape.py"),
    "sam_repro.report.landscape": ("tests/report/test_report_landscape.py",),
    "sam_repro.report.budget": ("tests/report/test_report_budget.py", "tests/report/test_report_load.py"),
    "sam_repro.validate": ("tests/test_validate.py", "tests/test_configs.py"),
    "sam_repro.runlog": ("tests/test_runlog.py",),
    "sam_repro.sharpness.hessian": ("tests/sharpness/test_sharpness_trace.py", "tests/sharpness/test_sharpness_units.py", "tests/sharpness/test_sharpness.py"),
    "sam_repro.sharpness.msharpness": ("tests/sharpness/test_msharpness.py", "tests/sharpness/test_sharpness.py"),
    "sam_repro.sharpness.hvp": ("tests/sharpness/test_sharpness_units.py", "tests/sharpness/test_sharpness.py"),
    "sam_repro.sharpness.objective": ("tests/sharpness/test_sharpness_units.py", "tests/sharpness/test_sharpness.py"),
    "sam_repro.sharpness.landscape": ("tests/sharpness/test_sharpness_landscape.py", "tests/sharpness/test_sharpness_units.py",
                                      "tests/sharpness/test_sharpness.py"),  # units: the directions' device
    "sam_repro.sharpness.rundir": ("tests/sharpness/test_sharpness_rundir.py", "tests/sharpness/test_sharpness_cli_units.py"),
    "sam_repro.sharpness.cli": ("tests/sharpness/test_sharpness_cli_units.py", "tests/sharpness/test_sharpness_cli.py"),
    # the models per module: the architectures by their forward references first, the full-size
    # networks of test_models.py last (each family's count and gradient test)
    "sam_repro.models": ("tests/models/test_models_units.py", "tests/models/test_model_forward.py", "tests/models/test_models.py"),
    "sam_repro.models.registry": ("tests/models/test_models_units.py", "tests/models/test_models.py"),
    "sam_repro.models.stochastic": ("tests/models/test_models_units.py", "tests/models/test_stochastic.py", "tests/models/test_model_forward.py"),
    "sam_repro.models.finetune": ("tests/models/test_models_units.py", "tests/models/test_finetune.py"),
    "sam_repro.models.imagenet": ("tests/models/test_model_forward.py", "tests/models/test_models_units.py", "tests/models/test_models.py"),
    "sam_repro.data.loaders": ("tests/data/test_loaders_reference.py", "tests/data/test_loaders.py", "tests/data/test_file_loader.py"),
    "sam_repro.data.file_loader": ("tests/data/test_file_loader.py", "tests/data/test_imagenet.py"),
    "sam_repro.trackers": ("tests/trackers/test_trackers_state.py", "tests/trackers/test_trackers.py"),
    "sam_repro.trackers.tensorboard": ("tests/trackers/test_trackers_adapters.py",),
    "sam_repro.trackers.wandb": ("tests/trackers/test_trackers_adapters.py",),
    "sam_repro.trackers.mlflow": ("tests/trackers/test_trackers_adapters.py",),
}
# Tests left out of every mutmut pass (node-id prefixes; `make test` runs them all):
SKIP: dict[str, str] = {
    # torch.compile(fullgraph=True) cannot trace through mutmut's trampolines (a graph break: fails)
    "tests/models/test_stochastic.py::test_compiled_layers_match_eager_under_replay": "compile",
    # 10-30 s each; tests/sharpness/test_sharpness_units.py and test_sharpness_cli_units.py check the same on
    # smaller problems, and a survivor would pay for them
    "tests/sharpness/test_sharpness.py::test_small_network_matches_the_full_hessian": "cost",
    "tests/sharpness/test_sharpness_cli.py::test_hvp_mode_and_kept_graphs_are_recorded": "cost",
    # the full-size networks (2-30 s each); tests/models/test_model_forward.py checks each family on small members
    "tests/models/test_models.py::test_forward_backward_gives_finite_grad_on_every_parameter[pyramidnet272": "cost",
    "tests/models/test_models.py::test_forward_backward_gives_finite_grad_on_every_parameter[resnet1": "cost",
    "tests/models/test_models.py::test_forward_backward_gives_finite_grad_on_every_parameter[resnet5": "cost",
    "tests/models/test_models.py::test_forward_backward_gives_finite_grad_on_every_parameter[wrn16_8": "cost",
    "tests/models/test_models.py::test_one_channel_28px_input[": "cost",
    # in mutmut's copy of the tree the second W&B session's run file is complete only ~3 s after
    # wandb.teardown() returns (read then, it holds every step); `make test` runs it
    "tests/trackers/test_trackers_adapters.py::test_wandb_one_run_id_every_epoch_once_config_and_summary": "W&B writer",
    # a sam-train subprocess, which an in-process mutant never reaches (it would only cost time)
    "tests/data/test_imagenet.py::test_missing_imagenet_exits_2": "subprocess",
    "tests/trackers/test_trackers.py::test_a_missing_extra_is_one_line_and_exit_2": "subprocess",
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
    registration, the model registry's imports (together about 1 s per mutant of validate), the trackers'
    libraries and matplotlib's first figure."""
    if not (config.option.collectonly and "mutmut" in sys.modules
            and "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", "")):
        return
    from matplotlib.figure import Figure

    from sam_repro.validate import validate
    from tests.conftest import composed_shared

    validate(composed_shared(["experiment=smoke"]))  # also imports the model registry's families
    for overrides in (["experiment=t2_imagenet_resnet50_100ep"], ["experiment=smoke", "logger=wandb"]):
        composed_shared(overrides)  # the other configs tests/test_validate.py changes and restores
    # the trackers' libraries (MLflow alone takes ~3 s to import), for the adapters' mutants
    import mlflow.tracking  # noqa: F401
    import wandb  # noqa: F401
    from tensorboard.backend.event_processing import event_accumulator  # noqa: F401
    from torch.utils import tensorboard  # noqa: F401

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


def skip_items(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under mutmut (any pass that names MUTANT_UNDER_TEST: stats, listing, mutants), leave SKIP out."""
    if not os.environ.get("MUTANT_UNDER_TEST"):
        return
    dropped = [i for i in items if i.nodeid.startswith(tuple(SKIP))]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if i not in dropped]


def scope_items(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_items(config, items)
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
