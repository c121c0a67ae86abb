"""``moola-engine plan --strategy NAME --epochs N``: the schedule, dry-run, without data or training."""

from __future__ import annotations

import argparse
import json

import attrs

from moola_engine.cli.commands.argtypes import positive_int
from moola_engine.config import ExperimentConfig, load_config
from moola_engine.core.plan import Plan
from moola_engine.core.preflight import preflight
from moola_engine.runs.train import resolve_strategy


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("plan", help="print a strategy's schedule: epoch -> trainable groups -> lr")
    p.add_argument("--config", help="experiment TOML (default: built-in SimpleLSTM groups)")
    p.add_argument("--strategy", required=True, help="name of a [strategy.NAME] table of strategies.toml")
    p.add_argument("--strategies", metavar="FILE",
                   help="strategies.toml (default: run.strategies_file or ./strategies.toml)")
    p.add_argument("--epochs", type=positive_int, help="epochs to plan (an integer >= 1; default: train.epochs)")
    p.add_argument("--allow", action="append", default=[], metavar="OVERRIDE",
                   help="accept a schedule validation failure by name (e.g. late-transition), as train --allow does")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (every epoch, group, lr, BN mode)")
    return p


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config) if args.config else ExperimentConfig()
    pm, named = resolve_strategy(cfg, args.strategy, args.strategies)
    cfg = named.configure(cfg)  # [strategy.NAME.train], then the command line
    if args.epochs:
        cfg = attrs.evolve(cfg, train=attrs.evolve(cfg.train, epochs=args.epochs))
    plan = preflight(cfg, pm=pm, named=named, allow=[*cfg.run.allow, *args.allow]).plan  # the one pre-flight
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print(render_plan(plan))
    return 0


def render_plan(plan: Plan) -> str:
    """A table for people: epoch ranges with identical state collapse into one row.

    A cell is ``frozen`` or ``train <lr>``, then what trains when a group is
    partly frozen (``(biases)``), then ``bn:<mode>`` for groups holding BatchNorm.
    """
    has_bn = {g: any(e.bn.get(g, "-") != "-" for e in plan.epochs) for g in plan.groups}
    rows: list[tuple[int, int, list[str]]] = []
    for e in plan.epochs:
        cells = []
        for g in plan.groups:
            cell = f"train {e.lr[g]:.3g}" if e.trainable[g] else "frozen"
            if e.trainable[g] and e.params.get(g, "all") != "all":
                cell += f" ({e.params[g]})"
            if has_bn[g]:
                cell += f" bn:{e.bn[g]}"
            cells.append(cell)
        if rows and rows[-1][2] == cells:
            rows[-1] = (rows[-1][0], e.epoch, cells)
        else:
            rows.append((e.epoch, e.epoch, cells))
    header = ["epochs", *plan.groups]
    body = [[f"{a}" if a == b else f"{a}-{b}", *cells] for a, b, cells in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [f"strategy {plan.strategy}: {len(plan.epochs)} epochs, base lr {plan.base_lr:g}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *body]]
    if not any(has_bn.values()):
        lines.append("BatchNorm: none in any group")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
