"""The import rules of docs/architecture.md, read from the source (every import, top-level or deferred;
not those under `if TYPE_CHECKING:`, which exist for annotations only):
no import circle, each layer imports only the layers below it, nothing below the engine imports the
engine, the readers of run directories (report, sharpness) never import it, and no module reaches
into another module's private names."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# layer -> the module prefixes in it (docs/architecture.md, "Which module may import which")
LAYERS = {
    "plumbing": ("sam_repro.errors", "sam_repro.rundir", "sam_repro.config"),
    "parts": ("sam_repro.models", "sam_repro.data", "sam_repro.optim", "sam_repro.runlog", "sam_repro.trackers",
              "sam_repro.sweep"),
    "engine": ("sam_repro.engine",),
    "readers": ("sam_repro.report", "sam_repro.sharpness"),
    "entry": ("sam_repro.validate", "sam_repro.cli", "hydra_plugins", "sam_repro"),
}
MAY_IMPORT = {
    "plumbing": {"plumbing"},
    "parts": {"plumbing", "parts"},
    "engine": {"plumbing", "parts", "engine"},
    "readers": {"plumbing", "parts", "readers"},
    "entry": set(LAYERS),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    best = max((prefix for names in LAYERS.values() for prefix in names
                if module == prefix or module.startswith(prefix + ".")), key=len)
    return next(layer for layer, names in LAYERS.items() if best in names)


SOURCES = {module_name(p): p for base in ("sam_repro", "hydra_plugins") for p in (ROOT / base).rglob("*.py")}


def imports_of(module: str) -> list[tuple[str, ast.AST, list[str]]]:
    """(imported project module, the node, the names imported from it) for every import in `module`."""
    path = SOURCES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    tree = ast.parse(path.read_text())
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
                 for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in type_only:  # `if TYPE_CHECKING:` imports are for annotations: no dependency at run time
            continue
        if isinstance(node, ast.Import):
            out += [(alias.name, node, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [alias.name for alias in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in SOURCES]
            others = [n for n in names if f"{base}.{n}" not in SOURCES]
            if others:  # `from package import submodule` depends on the submodule, not on the package's own code
                out.append((base, node, others))
            out += [(sub, node, []) for sub in submodules]
    return [(m, node, names) for m, node, names in out if m.split(".")[0] in ("sam_repro", "hydra_plugins")]


def resolve(module: str) -> str:
    """The project module an import names (a package's submodule, or the package's __init__)."""
    while module not in SOURCES and "." in module:
        module = module.rpartition(".")[0]
    return module


GRAPH = {m: sorted({resolve(i) for i, _, _ in imports_of(m)} - {m}) for m in SOURCES}


def test_no_import_circle() -> None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in GRAPH[m]:
            if state.get(n) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_each_layer_imports_only_what_lies_below_it() -> None:
    wrong = [f"{m} ({layer_of(m)}) imports {n} ({layer_of(n)})" for m, deps in GRAPH.items() for n in deps
             if layer_of(n) not in MAY_IMPORT[layer_of(m)]]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_another_modules_private_names() -> None:
    wrong = [f"{m}:{node.lineno} imports {name} from {i}" for m in SOURCES for i, node, names in imports_of(m)
             for name in names if name.startswith("_") and not name.startswith("__") and resolve(i) != m]
    assert not wrong, "\n".join(wrong)


def private_members(module: str) -> set[str]:
    """The single-underscore members a module's classes define: methods and `self._x` attributes."""
    names = set()
    for cls in ast.walk(ast.parse(SOURCES[module].read_text())):
        if not isinstance(cls, ast.ClassDef):
            continue
        for node in ast.walk(cls):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id == "self"):
                names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_module_reaches_into_the_private_parts_of_another_modules_objects() -> None:
    """`obj._name` where `_name` is private to another of our modules (the pack once called its
    members' `trainer._evaluate` and `trainer._state`); third-party private names are not ours to police."""
    own = {m: private_members(m) for m in SOURCES}
    wrong = []
    for m, path in SOURCES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owners = [o for o, names in own.items() if node.attr in names]
                if owners and m not in owners:
                    wrong.append(f"{m}:{node.lineno} uses {node.attr} of {', '.join(owners)}")
    assert not wrong, "\n".join(wrong)


def test_the_layers_cover_every_module_and_the_doc_states_them() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for layer, prefixes in LAYERS.items():
        assert f"**{layer}**" in doc, layer
        for prefix in prefixes:
            if prefix != "sam_repro":
                assert f"`{prefix.removeprefix('sam_repro.').replace('.', '/')}" in doc, prefix
    assert all(layer_of(m) for m in SOURCES)
