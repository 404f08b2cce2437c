"""The package's layering (README "Layout"): inner layers never import outer ones, no import circles.

Module-level imports only: an import under `if TYPE_CHECKING:` is for annotations and never runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.fast  # pure: no sockets, no processes

PACKAGE = ROOT / "mtasts_policyd"
# README "Layout", inner first: a module may import from its own layer and the ones before it.
LAYERS = ("core", "net", "store", "resolution", "answers", "frontends", "ops", "runtime", "commands")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """Modules of the package imported when `path` is imported (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mtasts_policyd"):
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    found.add(candidate if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists()
                              else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("mtasts_policyd"))
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
    visit(tree.body)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): runtime_imports(p) for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 and parts[1] in LAYERS else None


def test_every_module_lives_in_a_layer():
    loose = sorted(m for m in graph() if layer(m) is None and m not in (
        "mtasts_policyd", "mtasts_policyd.__main__") and not m.endswith(tuple(f".{name}" for name in LAYERS)))
    assert loose == []


def test_inner_layers_never_import_outer_ones():
    wrong = sorted(f"{m} -> {target}" for m, targets in graph().items() for target in targets
                   if layer(m) is not None and layer(target) is not None and layer(target) > layer(m))
    assert wrong == []


def test_no_import_circles():
    edges = graph()
    cycles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        for target in sorted(edges.get(node, ())):
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif target in edges and len(path) < 40:
                walk(target, path + [target])

    for start in sorted(edges):
        walk(start, [start])
    assert cycles == []


def test_logger_names_in_the_readme_are_the_ones_used():
    """README "Logs" documents grep-able logger names; moving a module must not rename its logger."""
    import re

    documented = set(re.findall(r"\b(?:DEBUG|INFO|WARNING|ERROR) (mtasts_policyd[\w.]*):", (ROOT / "README.md").read_text()))
    used = set(re.findall(r'getLogger\("(mtasts_policyd[\w.]*)"\)',
                          "".join(p.read_text() for p in PACKAGE.rglob("*.py"))))
    assert documented and documented <= used
