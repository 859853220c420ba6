"""The package layering of docs/architecture.md, checked by parsing every import in surge/.

Each rule is a direction users and contributors rely on: the model code runs without the
engine (so `surge eval` and `surge optimize` can load a model alone), the server composes no
feature (features plug in from `surge.entrypoints`), the router runs beside any replica
(local process, Ray actor) without importing the engine. A cycle between packages would make
each of these false, so cycles are refused too.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import surge

PACKAGE_ROOT = Path(surge.__file__).parent

# package -> packages it must never import (directly or through a function-level import).
FORBIDDEN: dict[str, set[str]] = {
    "models": {"engine", "server", "router", "entrypoints", "batch", "apps", "http", "eval"},
    "engine": {"server", "router", "entrypoints", "batch", "apps", "http", "eval"},
    "http": {"server", "engine", "router", "models", "entrypoints", "batch", "apps"},
    "server": {"batch", "apps", "router", "entrypoints", "eval", "cache", "stages"},
    "router": {"engine", "entrypoints", "apps", "server", "models", "batch"},
    "batching": {"engine", "server", "router", "entrypoints", "batch", "apps"},
    "tokenizer": {"engine", "server", "router", "entrypoints", "batch", "apps"},
    "batch": {"router", "entrypoints", "apps"},
    "apps": {"router", "entrypoints", "batch"},
    "cache": {"engine", "router", "entrypoints", "batch", "apps", "eval"},
    "stages": {"engine", "models", "router", "entrypoints", "batch", "apps", "cache", "eval"},
    "hub": {"engine", "server", "router", "http", "entrypoints", "batch", "apps", "eval"},
    "eval": {"server", "router", "http", "entrypoints", "batch", "apps"},
    "optimize": {"server", "router", "http", "entrypoints", "batch", "apps", "cache"},
}
# Modules whose job is to compose everything; they are outside the layering.
COMPOSERS = {"__init__", "cli", "entrypoints"}


def _package_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE_ROOT)
    return relative.parts[0].removesuffix(".py")


def _imported_packages(path: Path) -> set[str]:
    """The top-level surge packages one file imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module_parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module_parts[:-node.level]
                names = [".".join([*base, *([node.module] if node.module else [])])]
            elif node.module:
                names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "surge" and len(parts) > 1:
                found.add(parts[1])
    return found


def _package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE_ROOT.rglob("*.py"):
        package = _package_of(path)
        graph[package] |= _imported_packages(path) - {package}
    return graph


def _edges_from(package: str) -> dict[str, list[str]]:
    """imported package -> files of ``package`` that import it."""
    edges: dict[str, list[str]] = defaultdict(list)
    for path in PACKAGE_ROOT.rglob("*.py"):
        if _package_of(path) == package:
            for imported in _imported_packages(path):
                edges[imported].append(str(path.relative_to(PACKAGE_ROOT)))
    return edges


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_downward(package: str) -> None:
    edges = _edges_from(package)
    broken = {imported: files for imported, files in edges.items()
              if imported in FORBIDDEN[package]}
    assert not broken, f"surge.{package} must not import {sorted(broken)}: {broken}"


def test_no_cycles_between_packages() -> None:
    graph = {package: targets - COMPOSERS for package, targets in _package_graph().items()
             if package not in COMPOSERS}
    cycle = _find_cycle(graph)
    assert cycle is None, f"import cycle between packages: {' -> '.join(cycle or [])}"


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "visiting" | "done"
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "visiting"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "visiting":
                return [*stack[stack.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_sees_a_known_import() -> None:
    """Guards the parser itself: the engine's runner does import the model code."""
    assert "models" in _edges_from("engine")


def test_the_api_server_process_never_imports_torch() -> None:
    """DESIGN: HTTP, tokenization and JSON live in a process without torch (the engine has its
    own), so the API server stays small and never contends with the step loop for torch's
    threads. Checked in a fresh interpreter: everything `surge serve` imports for an LLM."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import surge.entrypoints.serve, surge.server.app, surge.server.completions\n"
            "import surge.engine.mp_client, surge.tokenizer, surge.models.tasks\n"
            "import surge.apps.config, surge.batch.config, surge.cache\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "[]", result.stdout[:500]
