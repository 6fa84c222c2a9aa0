"""The import graph points down only: ops → layers → models → data / hf → train / generation →
eval / bench → serve / demo → cli; no module imports from a package above it (not even inside a
function) and there are no import cycles, between packages or between modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "linearize"
LEVEL = {
    "paths": -1,
    "config": -1,
    "seeding": -1,
    "ops": 0,
    "layers": 1,
    "models": 2,
    "data": 3,
    "hf": 3,
    "train": 4,
    "generation": 4,
    "engine": 4,
    "eval": 5,
    "bench": 5,
    "serve": 6,
    "demo": 7,
    "check": 7,
    "cli": 8,
}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("linearize", *parts)).removesuffix(".__init__")


def _package(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def _imports(path: Path) -> set[str]:
    """Every ``linearize...`` module ``path`` imports, function-local imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from linearize.models import checkpoint` imports the module models.checkpoint.
            names = [
                f"{node.module}.{a.name}" if _exists(f"{node.module}.{a.name}") else node.module
                for a in node.names
            ]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("linearize."):
                while name and not _exists(name):
                    name = name.rpartition(".")[0]
                if name.count("."):
                    found.add(name)
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


GRAPH = {_module(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}


def test_every_package_has_a_level():
    packages = {_package(m) for m in GRAPH if m.count(".")} - {"__main__"}
    assert packages <= set(LEVEL), f"packages without a level: {packages - set(LEVEL)}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if not m.endswith("__main__")))
def test_no_upward_import(module: str):
    source = _package(module)
    if module == "linearize" or source not in LEVEL:
        return
    upward = [m for m in GRAPH[module] if LEVEL.get(_package(m), -1) > LEVEL[source]]
    assert not upward, f"{module} imports from above its level {LEVEL[source]}: {upward}"


def test_no_import_cycle():
    # Package __init__ files only re-export their own modules: skip them as edges.
    edges = {m: {d for d in deps if d != m} for m, deps in GRAPH.items() if m != "linearize"}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif not state.get(nxt):
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if not state.get(node):
            visit(node, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
