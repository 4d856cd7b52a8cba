"""The package's layers, declared here once and checked by parsing every module's imports.

A module may import from its own layer and the layers below it, never from one above; the
import graph has no cycle; an import inside a function is allowed only for an optional
dependency (matplotlib, tensorboard, triton, torch-pruning...) or to keep ``import sparsekern``
cheap, and then only downwards like any other. The order is ../shared/DESIGN.md's; the
README's architecture section draws it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sparsekern"

# Lowest first. A module belongs to the first entry that is it or one of its packages.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("leaves", ("errors", "_types", "_fx", "_layout", "_denormals", "_deprecated", "_flags", "models", "data",
                "regularize")),
    ("kernels and ops", ("_backend", "triton", "ops", "__init__")),
    ("statistics", ("stats",)),
    ("pruning", ("prune",)),
    ("reports", ("report",)),
    ("training and experiments", ("train", "bench", "experiments")),
    ("command line", ("cli", "cli_prune", "demo", "__main__")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def layer_of(module: str) -> int:
    """Index in LAYERS of ``sparsekern.<...>``; the package itself (``sparsekern``) is its __init__."""
    rest = module.split(".")[1:] or ["__init__"]
    for index, (_, members) in enumerate(LAYERS):
        if rest[0] in members:
            return index
    raise AssertionError(f"{module} is in no layer of python_tests/test_layers.py: add it to LAYERS")


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported sparsekern module, line, inside a function?) for every import of ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from sparsekern.prune import surgery` imports sparsekern.prune.surgery
            names = [f"{target}.{a.name}" if (PACKAGE.parent / f"{target}.{a.name}".replace(".", "/")).exists()
                     or (PACKAGE.parent / (f"{target}.{a.name}".replace(".", "/") + ".py")).exists() else target
                     for a in node.names]
        else:
            continue
        for name in dict.fromkeys(names):
            if name == "sparsekern" or name.startswith("sparsekern."):
                found.append((name, node.lineno, id(node) in in_function))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    for path in MODULES:
        layer_of(module_name(path))


def test_no_module_imports_a_higher_layer():
    violations = []
    for path in MODULES:
        source = module_name(path)
        for target, line, _ in imports(path):
            if layer_of(target) > layer_of(source):
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {source} "
                                  f"({LAYERS[layer_of(source)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not violations, "imports up the layers:\n" + "\n".join(violations)


def test_no_module_imports_the_package_itself():
    """``import sparsekern`` / ``from sparsekern import x`` inside the package runs its __init__, which
    sits above every leaf: a module imports what it needs from the module that defines it."""
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{line}: imports the package sparsekern"
                 for path in MODULES if module_name(path) not in ("sparsekern", "sparsekern.__main__")
                 for target, line, _ in imports(path) if target == "sparsekern"]
    assert not offenders, "\n".join(offenders)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        source = module_name(path)
        # A package's __init__ re-exporting its own modules is not a cycle of theirs.
        graph[source] = {t for t, _, _ in imports(path) if t != source and not t.startswith(source + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt in graph and not state.get(nxt):
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node)


# Function-level imports of the package's own modules, allowed where the import is deferred on
# purpose: the package __init__ and the CLI load subcommands lazily (import time of
# `import sparsekern` / `sparsekern --help`), and kernels load Triton only when used.
LAZY_ALLOWED = ("sparsekern", "sparsekern.cli", "sparsekern.cli_prune", "sparsekern.ops", "sparsekern._backend")


def test_function_level_imports_only_where_deferred_on_purpose():
    offenders = []
    for path in MODULES:
        source = module_name(path)
        if source in LAZY_ALLOWED or any(source.startswith(p + ".") for p in LAZY_ALLOWED[3:]):
            continue
        for target, line, inside in imports(path):
            if inside and not target.startswith("sparsekern.triton"):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}: imports {target} inside a function")
    assert not offenders, "imports inside functions (move them to the top):\n" + "\n".join(offenders)
