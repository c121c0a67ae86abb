"""``moola-engine components [KIND]``: the installed models, data kinds, tasks, objectives, baselines and presets."""

from __future__ import annotations

import argparse
import json

from moola_engine.cli.commands.strategies import _table
from moola_engine.core.components import default_registries
from moola_engine.core.registry import KINDS


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("components", help="list installed models, data kinds, tasks, objectives, baselines, presets")
    p.add_argument("kind", nargs="?", choices=sorted(KINDS), help="only this kind (default: every kind)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def run(args: argparse.Namespace) -> int:
    regs = default_registries()
    kinds = [args.kind] if args.kind else list(KINDS)
    found = {k: [{"name": c.name, "source": c.source, "description": c.description} for c in regs[k].items()]
             for k in kinds}
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    for i, kind in enumerate(kinds):
        if i:
            print()
        print(f"{kind}s ({KINDS[kind]}):")
        _table(["name", "from", "what it is"], [[r["name"], r["source"], r["description"]] for r in found[kind]]
               or [["(none installed)", "", ""]])
    print('\nIn TOML, name one of these or an import path "package.module:callable" (docs/writing-plugins.md).')
    return 0
