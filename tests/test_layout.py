"""The architecture, read off the import graph: no cycle, no arrow running back up the layers, no OHLC in the core.

Layers, bottom up (a module may import its own layer and the ones below)::

    foundation   moola_engine.{errors, config, logs, safeio, jsonsafe, version}
    core         moola_engine.core.*          the loop and its contract
    checks       moola_engine.checks.delta.*        proofs a run did what it promised
    runs         moola_engine.runs.*          one run from config: folders, checkpoints, sinks
    experiments  moola_engine.experiments.*   many runs: the ablation, statistics, report
    cli          moola_engine.cli.*           the commands
    api          moola_engine (the package), strategy_kit, testing: what users import

Every import counts, including those inside functions and under ``TYPE_CHECKING``: they are arrows of the
design all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PKG = ROOT / "moola_engine"
LAYERS = ["foundation", "core", "checks", "runs", "experiments", "cli", "api"]
FOUNDATION = {"errors", "config", "logs", "safeio", "jsonsafe", "version"}
API = {"", "strategy_kit", "testing"}


def modules() -> dict[str, Path]:
    found = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of the package ``path`` imports (``from a.b import c`` counts as ``a.b.c`` when that is a module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import (the package uses absolute imports only)")
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {d for d in imports(path, known) if d in known and d != name} for name, path in known.items()}


def layer(module: str) -> str:
    parts = module.split(".")[1:]
    head = parts[0] if parts else ""
    if head in FOUNDATION:
        return "foundation"
    if head in API:
        return "api"
    assert head in LAYERS, f"{module}: not in any layer (add it to tests/test_layout.py's docstring and lists)"
    return head


def test_the_import_graph_has_no_cycle() -> None:
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)


def test_no_arrow_runs_back_up_the_layers() -> None:
    up = [f"{a} ({layer(a)}) -> {b} ({layer(b)})" for a, deps in sorted(graph().items()) for b in sorted(deps)
          if LAYERS.index(layer(b)) > LAYERS.index(layer(a))]
    assert up == []


def test_the_engine_imports_nothing_of_the_ohlc_package_or_the_builtin_strategies() -> None:
    known = modules()
    bad = [f"{name} -> {d}" for name, path in sorted(known.items()) for d in sorted(imports(path, known))
           if d.split(".")[0] in ("moola_ohlc", "moola_plugins")]
    assert bad == []


def test_the_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The checks above can fail: a core module importing from runs is an upward arrow."""
    fake = tmp_path / "mod.py"
    fake.write_text("from moola_engine.runs.folders import write_json_atomic\n")
    deps = imports(fake, modules())
    assert deps & {"moola_engine.runs.folders"}
    assert LAYERS.index(layer("moola_engine.runs.folders")) > LAYERS.index(layer("moola_engine.core.engine"))


def test_the_engine_module_is_the_loop_in_at_most_300_lines() -> None:
    """engine.py reads top to bottom as the loop; its other jobs live in dispatch, state, stopping and guards."""
    lines = (PKG / "core" / "engine.py").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"core/engine.py has {len(lines)} lines: move a job that is not the loop out of it"
