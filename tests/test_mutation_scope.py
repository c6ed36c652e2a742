"""`make mutate`'s configuration names real tests for every module it mutates.

mutmut runs only pyproject's `pytest_add_cli_args_test_selection`, and tests/mutation_scope.py's SCOPE
narrows each mutant to its module's files: a module whose tests are in neither would have every mutant
"survive" (the SAM family's modules did, until their tests were listed), a file named but gone would
silently test nothing.
"""
from __future__ import annotations

import ast
import fnmatch
import tomllib
from pathlib import Path

from tests.mutation_scope import SCOPE, scope_of

ROOT = Path(__file__).resolve().parents[1]
MUTMUT = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]


def mutated_modules() -> dict[str, Path]:
    """Every module `only_mutate` matches that defines a function (mutmut mutates function bodies)."""
    out = {}
    for path in sorted((ROOT / "sam_repro").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if not any(fnmatch.fnmatch(rel, pattern) for pattern in MUTMUT["only_mutate"]):
            continue
        tree = ast.parse(path.read_text())
        if any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) for node in ast.walk(tree)):
            out[rel[:-3].replace("/", ".").removesuffix(".__init__")] = path
    return out


def test_every_mutated_module_has_its_test_files_and_they_are_run() -> None:
    selection = set(MUTMUT["pytest_add_cli_args_test_selection"])
    modules = mutated_modules()
    assert "sam_repro.optim.methods.gsam" in modules and "sam_repro.engine.eager" in modules
    unscoped = [m for m in modules if scope_of(m) is None]
    assert not unscoped, f"modules under mutation without a SCOPE entry in tests/mutation_scope.py: {unscoped}"
    for module in modules:
        files = scope_of(module)
        assert set(files) <= selection, (module, sorted(set(files) - selection))


def test_every_named_test_file_exists() -> None:
    named = set(MUTMUT["pytest_add_cli_args_test_selection"]) | {f for files in SCOPE.values() for f in files}
    missing = sorted(f for f in named if not (ROOT / f).is_file())
    assert not missing, missing
