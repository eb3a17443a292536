"""The layers import one way: config (schemas) ← tasks ← recipes ← compose ← train ← eval ←
export. Every import counts, those inside functions too (a lazy import is still a cycle)."""

from __future__ import annotations

import ast
from collections import defaultdict
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

from conftest import REPO

LAYERS = ("config", "compose", "tasks", "metrics", "recipes", "train", "eval", "export")
# The package directories installed under other names (pyproject's package-dir).
SOURCES = {"foundation": REPO / "foundation", "foundation.recipes": REPO / "recipes"}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "foundation" and len(parts) > 1 and parts[1] in LAYERS else None


def imported_modules(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append(node.module)
    return found


def layer_imports() -> dict[str, dict[str, list[str]]]:
    """layer → imported layer → the files importing it."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for package, root in SOURCES.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            layer = layer_of(".".join([package, *parts]))
            for module in imported_modules(path) if layer else []:
                target = layer_of(module)
                if target and target != layer:
                    graph[layer][target].append(str(path.relative_to(REPO)))
    return graph


def test_the_layers_import_without_cycles():
    graph = layer_imports()
    assert {"train", "eval", "export", "recipes"} <= graph.keys()  # the scan found them
    try:
        order = list(TopologicalSorter({k: set(v) for k, v in graph.items()}).static_order())
    except CycleError as err:
        cycle = err.args[1]
        raise AssertionError("import cycle: " + "; ".join(
            f"{b} imports {a} ({graph[b][a][0]})" for a, b in zip(cycle, cycle[1:]))) from None
    assert order.index("config") < order.index("recipes") < order.index("train")


def test_config_is_a_leaf_of_schemas():
    imports = imported_modules(REPO / "foundation" / "config.py")
    assert imports and not [m for m in imports if layer_of(m)], imports
