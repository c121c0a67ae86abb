"""``moola-engine train --config FILE --strategy NAME``: one run, with its run folder and event log."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import attrs

from ..checkpoint import run_config
from ..config import ExperimentConfig, load_config
from ..errors import ConfigError
from ..progress import TrainProgress
from ..train import train


@contextlib.contextmanager
def progress(cfg: ExperimentConfig) -> Iterator[tuple[TrainProgress, ...]]:
    """A progress bar over the epochs when the console is for people (``run.console = "pretty"``)."""
    if cfg.run.console != "pretty":
        yield ()
        return
    bar = TrainProgress(cfg.train.epochs)
    try:
        yield (bar,)
    finally:
        bar.close()


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train one model with a named strategy")
    p.add_argument("--config", help="experiment TOML (required unless --resume)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue runs/<id> from its newest checkpoint, in the same folder (config and strategy as recorded)")
    p.add_argument("--strategy", help="name of a [strategy.NAME] table (default: run.strategy)")
    p.add_argument("--strategies", metavar="FILE", help="strategies.toml (default: run.strategies_file or ./strategies.toml)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--runs-dir", help="override run.runs_dir")
    p.add_argument("--allow", action="append", default=[], metavar="OVERRIDE",
                   help="accept a schedule validation failure explicitly (recorded in the log)")
    p.add_argument("--console", choices=["pretty", "json", "none"])
    return p


def run(args: argparse.Namespace) -> int:
    if args.resume:
        return resume(args)
    if not args.config:
        raise ConfigError("--config", "required (or --resume RUN_DIR to continue a run)")
    cfg = load_config(args.config)
    train_cfg = cfg.train
    if args.epochs is not None:
        train_cfg = attrs.evolve(train_cfg, epochs=args.epochs)
    if args.seed is not None:
        train_cfg = attrs.evolve(train_cfg, seed=args.seed)
    run_cfg = attrs.evolve(cfg.run, allow=[*cfg.run.allow, *args.allow])
    if args.runs_dir:
        run_cfg = attrs.evolve(run_cfg, runs_dir=args.runs_dir)
    if args.console:
        run_cfg = attrs.evolve(run_cfg, console=args.console)
    cfg = attrs.evolve(cfg, train=train_cfg, run=run_cfg)
    with progress(cfg) as plugins:
        outcome = train(cfg, strategy=args.strategy, strategies_file=args.strategies, extra_plugins=plugins)
    print(f"run folder: {outcome.run_dir}/  (events.jsonl, metrics.csv, result.json)")
    return 0


def resume(args: argparse.Namespace) -> int:
    given = [f"--{k.replace('_', '-')}" for k in ("config", "strategy", "strategies", "epochs", "seed", "runs_dir")
             if getattr(args, k) is not None] + (["--allow"] if args.allow else [])
    if given:
        raise ConfigError(", ".join(given), "cannot be combined with --resume: a resumed run continues with the "
                                            "config and strategy it was started with")
    cfg = run_config(args.resume)
    if args.console:
        cfg = attrs.evolve(cfg, run=attrs.evolve(cfg.run, console=args.console))
    with progress(cfg) as plugins:
        outcome = train(cfg, resume=args.resume, extra_plugins=plugins)
    print(f"run folder: {outcome.run_dir}/  (resumed; events.jsonl, metrics.csv, result.json)")
    return 0
