"""``moola-engine train --config FILE --strategy NAME``: one run, with its run folder and event log."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

import attrs

from moola_engine.cli.commands.argtypes import positive_int, seed_int, writable_output
from moola_engine.config import ExperimentConfig, load_config
from moola_engine.errors import ConfigError, MoolaError
from moola_engine.runs.progress import TrainProgress
from moola_engine.runs.resume import run_config
from moola_engine.runs.train import resolve_run_dir, train


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


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train one model with a named strategy",
                       description="Train one model with a named strategy. The last line printed names the run "
                                   "folder; --run-dir-file writes it to a file (race-free under concurrent runs).")
    p.add_argument("--config", help="experiment TOML (required unless --resume)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue runs/<id> from its newest checkpoint, in the same folder (config and strategy as "
                        "recorded); a symlink such as runs/latest is resolved once, before anything is written")
    p.add_argument("--strategy", help="name of a [strategy.NAME] table (default: run.strategy)")
    p.add_argument("--strategies", metavar="FILE", help="strategies.toml (default: run.strategies_file or ./strategies.toml)")
    p.add_argument("--epochs", type=positive_int, help="override train.epochs (an integer >= 1)")
    p.add_argument("--seed", type=seed_int, help="override train.seed (an integer >= 0)")
    p.add_argument("--runs-dir", help="override run.runs_dir")
    p.add_argument("--allow", action="append", default=[], metavar="OVERRIDE",
                   help="accept a schedule validation failure explicitly (recorded in the log)")
    p.add_argument("--console", choices=["pretty", "json", "none"],
                   help="what the terminal shows: pretty lines, JSON events, or nothing (the log file is the same)")
    p.add_argument("--run-dir-file", metavar="PATH",
                   help="write this run's folder (absolute path, one line) to PATH as soon as it exists: the "
                        "race-free way for a script to find the run (runs/latest may point at a concurrent run)")
    return p


def _writer(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The on_run_dir callback of --run-dir-file (its folder is proven writable before any work)."""
    if not args.run_dir_file:
        return None
    target = Path(args.run_dir_file)
    writable_output(target, flag="--run-dir-file", is_dir=False)

    def write(run_dir: Path) -> None:
        try:
            target.write_text(f"{Path(run_dir).resolve()}\n", encoding="utf-8")
        except OSError as exc:
            raise MoolaError(f"--run-dir-file {target}: cannot write it ({exc.strerror or exc})") from None

    return write


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
        run_cfg = attrs.evolve(run_cfg, runs_dir=str(Path(args.runs_dir).resolve()))  # a CLI path: against the cwd
    if args.console:
        run_cfg = attrs.evolve(run_cfg, console=args.console)
    cfg = attrs.evolve(cfg, train=train_cfg, run=run_cfg)
    pinned = {"epochs": args.epochs} if args.epochs is not None else None  # wins over [strategy.NAME.train]
    with progress(cfg) as plugins:
        outcome = train(cfg, strategy=args.strategy, strategies_file=args.strategies, extra_plugins=plugins,
                        on_run_dir=_writer(args), pinned=pinned)
    print(f"run folder: {outcome.run_dir}/  (events.jsonl, metrics.csv, result.json)")
    return 0


def resume(args: argparse.Namespace) -> int:
    given = [f"--{k.replace('_', '-')}" for k in ("config", "strategy", "strategies", "epochs", "seed", "runs_dir")
             if getattr(args, k) is not None] + (["--allow"] if args.allow else [])
    if given:
        raise ConfigError(", ".join(given), "cannot be combined with --resume: a resumed run continues with the "
                                            "config and strategy it was started with")
    run_dir = resolve_run_dir(args.resume)  # runs/latest -> its real folder, now, before anything is written
    cfg = run_config(run_dir)
    if args.console:
        cfg = attrs.evolve(cfg, run=attrs.evolve(cfg.run, console=args.console))
    with progress(cfg) as plugins:
        outcome = train(cfg, resume=run_dir, extra_plugins=plugins, on_run_dir=_writer(args))
    print(f"run folder: {outcome.run_dir}/  (resumed; events.jsonl, metrics.csv, result.json)")
    return 0
