"""Regenerate the generated blocks of docs/strategies.md: ``python benchmarks/docs_scripts/gen_strategies.py``.

Two kinds of block, each between an opening marker and ``<!-- end -->``:

* ``<!-- plan: NAME -->``: the output of
  ``moola-engine plan --strategy NAME --epochs 30 --config examples/plan-example.toml``
  (a 3-layer SimpleLSTM, so layer-wise strategies have something to show);
* ``<!-- params: PLUGIN -->``: the plugin's parameter class, read from the code
  (name, type, default, and the docstring under each field).

``tests/test_plan.py`` checks the committed file equals what this script writes.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import itertools
import os
import re
import sys
import textwrap
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "strategies.md"
EPOCHS = 30
CONFIG = "examples/plan-example.toml"
BLOCK = re.compile(r"(<!-- (plan|params): ([\w-]+) -->\n)(.*?)(<!-- end -->)", re.S)


def plan_block(name: str) -> str:
    from moola_engine.cli import main

    argv = ["plan", "--strategy", name, "--epochs", str(EPOCHS), "--config", CONFIG]
    out = io.StringIO()
    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out):
            code = main(argv)
    finally:
        os.chdir(cwd)
    if code != 0:
        raise SystemExit(f"moola-engine {' '.join(argv)} exited {code}")
    return f"```text\n$ moola-engine {' '.join(argv)}\n{out.getvalue()}```\n"


def _field_docs(cls: type) -> dict[str, str]:
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not attrs.has(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in itertools.pairwise(body):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def params_block(plugin: str) -> str:
    from moola_engine.core.plugins import build_plugin_manager

    _, registry = build_plugin_manager()
    cls = registry[plugin].params
    fields = attrs.fields(cls)
    if not fields:
        return "No parameters.\n"
    docs = _field_docs(cls)
    rows = ["| parameter | type | default | meaning |", "|---|---|---|---|"]
    for f in fields:
        typ = (f.type.__name__ if isinstance(f.type, type) else str(f.type)).replace("typing.", "").replace("|", "\\|")
        default = "" if f.default is attrs.NOTHING else repr(f.default).replace("'", '"')
        rows.append(f"| `{f.name}` | `{typ}` | `{default}` | {docs.get(f.name, '')} |")
    return "\n".join(rows) + "\n"


def render(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        body = plan_block(m.group(3)) if m.group(2) == "plan" else params_block(m.group(3))
        return m.group(1) + body + m.group(5)

    return BLOCK.sub(sub, text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    text = DOC.read_text(encoding="utf-8")
    new = render(text)
    if new != text:
        DOC.write_text(new, encoding="utf-8")
        print(f"updated {DOC.relative_to(ROOT)}")
    else:
        print(f"{DOC.relative_to(ROOT)} is up to date")
