"""The package's import graph, read from the code (shared by the layering and the DVC
dependency tests)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}


def lazy_exports(package: str) -> dict[str, str]:
    """{name: module} of a package ``__init__`` that exports names lazily (``_EXPORTS``)."""
    path = MODULES.get(package)
    if path is None or path.name != "__init__.py":
        return {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "_EXPORTS" for target in node.targets
        ):
            return ast.literal_eval(node.value)
    return {}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(path: Path, module_level_only: bool = False) -> set[str]:
    """The metalab modules `path` imports at run time (not under ``if TYPE_CHECKING``);
    with `module_level_only`, only those imported when the file itself is imported."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if module_level_only and isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            ):
                continue
            if (
                not module_level_only
                and isinstance(child, ast.Constant)
                and isinstance(child.value, str)
                and child.value.startswith("metalab.")
                and child.value in MODULES
            ):
                # A module named in a string is one imported by name (the algorithm registry's
                # importlib calls, lazy exports): count it where such a call can run.
                found.add(child.value)
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                exports = lazy_exports(child.module)
                for alias in child.names:
                    candidate = f"{child.module}.{alias.name}"
                    if candidate in MODULES:
                        found.add(candidate)
                    else:  # a name: from the package itself, or the module it exports it from
                        found.add(exports.get(alias.name, child.module))
            visit(child)

    visit(tree)
    return {name for name in found if name == "metalab" or name.startswith("metalab.")}


def graph(module_level_only: bool = False) -> dict[str, set[str]]:
    return {
        name: {target for target in imported_modules(path, module_level_only) if target != name}
        for name, path in MODULES.items()
    }


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `edges` as a list of modules, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def closure(
    start: set[str], edges: dict[str, set[str]], package_edges: dict[str, set[str]] | None = None
) -> set[str]:
    """Every module importing `start` can run, following `edges`. Importing a submodule
    runs its packages' ``__init__`` first; for those, `package_edges` (default `edges`) says
    what they import (module-level only, so lazy exports do not count)."""
    package_edges = edges if package_edges is None else package_edges
    seen: set[str] = set()
    todo = [(module, edges) for module in start]
    while todo:
        module, via = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend((target, edges) for target in via.get(module, set()))
        parent = module.rpartition(".")[0]
        if parent:
            todo.append((parent, package_edges))
    return seen
