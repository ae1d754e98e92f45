"""The module map of docs/architecture.md, checked on the source: which package may import which, no import
cycles (function-local imports included), and an engine that discovers nothing by probing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mfrae

ROOT = Path(mfrae.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """Every mfrae module `name` imports, at the top or inside a function (`from a import b` counts as a.b when
    a.b is a module, else as a)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _reaches(start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for nxt in GRAPH[node]:
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


def test_the_import_walk_sees_function_local_imports():
    # mfrae.cli imports its commands only when they run (importlib), but demo's local imports are real edges
    assert "mfrae.train.engine" in GRAPH["mfrae.train.stages"]
    assert any(name.startswith("mfrae.") for name in GRAPH["mfrae.demo"])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_module_that_imports_it_back(name):
    cycle = [other for other in GRAPH[name] if _reaches(other, name)]
    assert not cycle, f"{name} imports {cycle}, which import {name} back"


def _imports_from(prefix: str) -> dict[str, set[str]]:
    return {name: deps for name, deps in GRAPH.items() if name == prefix or name.startswith(prefix + ".")}


@pytest.mark.parametrize(
    "package,forbidden",
    [
        ("mfrae.models", ("mfrae.train", "mfrae.flow", "mfrae.eval", "mfrae.demo", "mfrae.pipeline")),
        ("mfrae.flow", ("mfrae.train", "mfrae.eval", "mfrae.demo", "mfrae.pipeline")),
        ("mfrae.eval", ("mfrae.train", "mfrae.flow", "mfrae.demo")),
        ("mfrae.data", ("mfrae.train", "mfrae.flow", "mfrae.eval", "mfrae.models", "mfrae.demo")),
        ("mfrae.layers", ("mfrae.train", "mfrae.flow", "mfrae.eval", "mfrae.models", "mfrae.data")),
    ],
)
def test_layers_import_only_downwards(package, forbidden):
    for name, deps in _imports_from(package).items():
        bad = sorted(d for d in deps if d.startswith(forbidden))
        assert not bad, f"{name} imports {bad}"


def test_the_engine_knows_no_stage_and_probes_nothing():
    engine = MODULES["mfrae.train.engine"].read_text()
    assert "hasattr(" not in engine and "getattr(" not in engine
    assert not {d for d in GRAPH["mfrae.train.engine"] if d in ("mfrae.train.stages", "mfrae.flow.objectives")}
    assert "mfrae.train.parts" in GRAPH["mfrae.train.engine"]


def test_objectives_know_nothing_about_data_loading():
    for name in ("mfrae.flow.objectives", "mfrae.train.decoder_loss"):
        assert not {d for d in GRAPH[name] if d.startswith(("mfrae.data", "mfrae.pipeline"))}, name


def test_the_registry_covers_every_stage():
    from mfrae.train.config import STAGES
    from mfrae.train.stages import REGISTRY

    assert tuple(REGISTRY) == STAGES
