"""``moola-engine strategies list``: the named strategies and the installed strategy plugins."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from moola_engine.core.plugins import build_plugin_manager, default_strategies_file, load_strategies


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("strategies", help="list named strategies and strategy plugins")
    p.add_argument("action", choices=["list"], nargs="?", default="list",
                   help="what to do (only \"list\", the default): print the named strategies and the plugins")
    p.add_argument("--strategies", metavar="FILE", help="strategies.toml to read (default: ./strategies.toml)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def run(args: argparse.Namespace) -> int:
    _, registry = build_plugin_manager()
    path = args.strategies or default_strategies_file()
    named = load_strategies(path, registry) if path else {}
    rows = [{"name": n.name, "plugin": n.plugin, "source": n.info.source, "description": n.description}
            for n in named.values()]
    used = {n.plugin for n in named.values()}
    plugins = [{"plugin": i.name, "source": i.source, "description": i.description,
                "named_in_file": i.name in used} for i in registry.items()]
    if args.json:
        print(json.dumps({"strategies_file": str(path) if path else None, "strategies": rows, "plugins": plugins},
                         indent=2))
        return 0
    print(f"named strategies ({path}):")
    _table(["name", "plugin", "from", "what it does"],
           [[r["name"], r["plugin"], r["source"], r["description"]] for r in rows])
    print("\ninstalled strategy plugins:")
    _table(["plugin", "from", "what it does"], [[p["plugin"], p["source"], p["description"]] for p in plugins])
    return 0


def _table(header: list[str], rows: Sequence[Sequence[object]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
