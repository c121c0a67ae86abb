"""``moola-engine demo``: pretrain the encoder of a preset if needed, then its ablation at a modest size.

The default preset is ``seed`` (registered by the OHLC package: the bundled real data): 6 seeds, the fewest
with which the paired Wilcoxon test can reach p < 0.05, so a first run on a laptop finishes in minutes;
``moola-engine ablate --preset seed`` runs the full one.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from moola_engine.cli.commands.argtypes import positive_int, writable_output
from moola_engine.errors import MoolaError
from moola_engine.experiments.ablation import run_grid
from moola_engine.experiments.grid import build_grid, default_out, get_preset, load_grid_config


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="pretrain on the bundled data (if needed) and run a small seed ablation")
    p.add_argument("--preset", default="seed", help="the preset to run, registered by a plugin (default: %(default)s)")
    p.add_argument("--seeds", type=positive_int, help="seeds (default: the preset's demo size, 6 for seed)")
    p.add_argument("--jobs", type=positive_int, help="worker processes (default: cores)")
    p.add_argument("--out", help="grid folder (default: <run.runs_dir>/ablate-demo)")
    return p


def encoder_path(cfg: object) -> Path | None:
    pre = getattr(getattr(cfg, "model", None), "pretrained", None)
    if pre is None:
        return None
    p = Path(pre.path)
    return p if p.is_absolute() else Path(cfg.source).parent / p  # type: ignore[attr-defined]


def pretrain_if_missing(config: Path) -> None:
    """Run ``moola-engine pretrain --config CONFIG`` when the config's encoder file does not exist."""
    cfg = load_grid_config(str(config), None)
    path = encoder_path(cfg)
    if path is None:
        raise MoolaError(f"{config}: no [model.pretrained] table, so there is no encoder to pretrain for the demo")
    if path.is_file():
        print(f"demo: using the pretrained encoder {path}", file=sys.stderr)
        return
    try:
        command = importlib.import_module("moola_engine.cli.commands.pretrain")
    except ImportError as exc:
        raise MoolaError(f"{path} does not exist and this installation has no `moola-engine pretrain` command to "
                         f"make it ({exc}); pretrain the encoder first") from exc
    print(f"demo: {path} is missing: pretraining it first (moola-engine pretrain --config {config})", file=sys.stderr)
    parser = argparse.ArgumentParser(prog="moola-engine")
    command.add_parser(parser.add_subparsers(dest="command"))
    rc = command.run(parser.parse_args(["pretrain", "--config", str(config), "--out", str(path)]))
    if rc or not path.is_file():
        raise MoolaError(f"pretraining did not produce {path} (exit {rc})")


def run(args: argparse.Namespace) -> int:
    from moola_engine.experiments.report import console_summary, write_report
    from moola_engine.experiments.summary import collect, summarize

    preset = get_preset(args.preset)
    seeds = args.seeds if args.seeds is not None else (preset.demo_seeds or preset.seeds)
    cfg = load_grid_config(None, preset)
    out = Path(args.out) if args.out else default_out(cfg, "demo")
    writable_output(out, flag="--out" if args.out else "run.runs_dir", is_dir=True)  # before pretraining
    pretrain_if_missing(preset.config)
    grid = build_grid(cfg, strategies=preset.strategies, control=preset.control, seeds=seeds,
                      folds=preset.folds, out=out)
    for w in grid.warnings:
        print(f"WARNING: {w}", file=sys.stderr)
    run_grid(grid, jobs=args.jobs)
    records, missing = collect(grid)
    results = summarize(grid, records=records, missing=missing)
    command = f"moola-engine demo --preset {preset.name} --seeds {seeds} --out {grid.out}"
    paths = write_report(grid, results, records, command=command)
    print(console_summary(results))
    print(f"report: {paths['html']}")
    return 0
