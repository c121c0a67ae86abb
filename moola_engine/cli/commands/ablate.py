"""``moola-engine ablate``: every strategy against a random-encoder control over seeds x folds, with a report."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable

from moola_engine.cli.commands.argtypes import positive_float, positive_int, writable_output
from moola_engine.errors import ConfigError
from moola_engine.experiments import grid as grid_mod
from moola_engine.experiments.ablation import run_grid
from moola_engine.experiments.grid import Grid, build_grid, default_out, load_grid_config
from moola_engine.experiments.placement import parse_devices
from moola_engine.experiments.workers import default_jobs


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("ablate", help="compare strategies against a random-encoder control (seeds x folds, resumable)")
    p.add_argument("--config", help="experiment TOML (default: the preset's)")
    p.add_argument("--preset", help="a predefined ablation a plugin registered (config, strategies, seeds), e.g. seed")
    p.add_argument("--strategies", help="comma-separated strategy names (tables of strategies.toml)")
    p.add_argument("--strategies-file", metavar="FILE", help="strategies.toml (default: run.strategies_file or "
                                                                "./strategies.toml)")
    p.add_argument("--control", help="strategy of the random-encoder control (default: immediate)")
    p.add_argument("--seeds", type=positive_int, help="seeds 0..N-1 (default: 5, or the preset's)")
    p.add_argument("--labels", metavar="N,N,...",
                   help="label budgets: every arm x seed x fold runs with data.labels = N training labels (stratified, "
                        "drawn per seed), and the report gains a curve of every arm against the control per budget")
    p.add_argument("--folds", type=positive_int, help="folds per seed (default: data.folds of the config)")
    p.add_argument("--epochs", type=positive_int, help="override train.epochs, an arm's own [strategy.NAME.train] epochs too "
                                                       "(a different grid: use a different --out)")
    p.add_argument("--jobs", type=positive_int,
                   help=f"worker processes (default: cores = {default_jobs()}; on CUDA, from the first cell's GPU "
                        "memory: see --cell-memory); on CUDA they share the GPUs round-robin")
    p.add_argument("--threads", type=positive_int, help="torch threads per worker (default: cores // jobs; 1 on CUDA)")
    p.add_argument("--devices", metavar="I,J,...",
                   help="cells on CUDA: the GPUs the workers share, one per worker, round-robin (default: every "
                        "visible GPU, or the N of train.device = \"cuda:N\")")
    p.add_argument("--cell-memory", type=positive_float, metavar="MiB",
                   help="cells on CUDA, no --jobs: the GPU memory one cell (or batched group) takes, CUDA context "
                        "included, instead of measuring the first one; sets the jobs per GPU")
    p.add_argument("--batched", action="store_true",
                   help="train the cells in stacked groups (same fold and label budget, arms and seeds together) as "
                        "one vmapped computation each; every cell keeps its own run folder, events and marker, "
                        "results equal separate runs to float rounding; not with --backend ray (yet)")
    p.add_argument("--batch-size-runs", type=positive_int, metavar="K",
                   help="--batched: at most K runs per group (default: 16)")
    p.add_argument("--out", help="grid folder (default: <run.runs_dir>/ablate-<preset or config name>); "
                                 "rerun with the same folder to resume")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report from finished runs")
    p.add_argument("--no-figures", action="store_true", help="skip matplotlib figures")
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="where cells run: local worker processes (default) or Ray tasks (pip install 'moola-engine[ray]')")
    p.add_argument("--address", help="--backend ray: the cluster to join (e.g. auto, ray://head:10001; default: "
                                     "start a Ray instance on this machine)")
    p.add_argument("--cpus-per-cell", type=float, default=1.0, metavar="N",
                   help="--backend ray: CPUs each cell requests (and its torch threads; default: %(default)s)")
    p.add_argument("--gpus-per-cell", type=float, default=0.0, metavar="N",
                   help="--backend ray: GPUs each cell requests; 0.25 runs four cells per GPU (default: %(default)s)")
    p.add_argument("--retries", type=int, default=0, metavar="N",
                   help="--backend ray: rerun a cell whose worker died up to N times before failing (default: 0)")
    return p


def run(args: argparse.Namespace) -> int:
    import attrs

    from moola_engine.experiments.report import console_summary, write_report
    from moola_engine.experiments.summary import collect, summarize

    if args.batch_size_runs is not None and not args.batched:
        raise ConfigError("--batch-size-runs", "only with --batched")
    devices = parse_devices(args.devices) if args.devices is not None else None
    preset = grid_mod.get_preset(args.preset) if args.preset else None
    cfg = load_grid_config(args.config, preset)
    if args.epochs is not None:
        if args.epochs < 1:
            raise ConfigError("--epochs", f"expected a value >= 1, got {args.epochs}")
        cfg = attrs.evolve(cfg, train=attrs.evolve(cfg.train, epochs=args.epochs))
    if args.strategies:
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    elif preset is not None:
        strategies = list(preset.strategies)
    else:
        raise ConfigError("--strategies", "pass --strategies a,b,c (names of [strategy.NAME] tables) or --preset")
    seeds = args.seeds if args.seeds is not None else (preset.seeds if preset else 5)
    if seeds < 1:
        raise ConfigError("--seeds", f"expected a value >= 1, got {seeds}")
    folds = args.folds if args.folds is not None else (preset.folds if preset else None)
    control = args.control or (preset.control if preset else "immediate")
    from pathlib import Path

    name = preset.name if preset and not args.config else Path(cfg.source).stem
    out = Path(args.out) if args.out else default_out(cfg, name)
    if not args.report_only:
        writable_output(out, flag="--out" if args.out else "run.runs_dir", is_dir=True)  # before any work starts
    labels = parse_labels(args.labels)
    if labels is None:
        labels = manifest_labels(out)
        if labels:
            print(f"ablate: {out} is a label-budget grid: using its budgets {','.join(map(str, labels))} "
                  "(pass --labels to change them)", file=sys.stderr)
    grid = build_grid(cfg, strategies=strategies, control=control, seeds=seeds, folds=folds, out=out,
                      strategies_file=args.strategies_file, labels=labels,
                      pinned={"epochs": args.epochs} if args.epochs is not None else None)
    for w in grid.warnings:
        print(f"WARNING: {w}", file=sys.stderr)
    if not args.report_only:
        run_grid(grid, jobs=args.jobs, threads=args.threads, executor=ray_executor(args), devices=devices,
                 cell_memory_mib=args.cell_memory, batched=args.batched, batch_size_runs=args.batch_size_runs or 16)
    elif not (grid.out / "grid.json").is_file():
        raise ConfigError("--report-only", f"{grid.out} holds no ablation (no grid.json)")
    records, missing = collect(grid)
    if not records:
        raise ConfigError("--report-only", f"{grid.out}: no finished run to report on")
    results = summarize(grid, records=records, missing=missing)
    command = rerun_command(grid, args)
    paths = write_report(grid, results, records, command=command, with_figures=not args.no_figures)
    print(console_summary(results))
    print(f"report: {paths['html']}  (also {paths['markdown'].name}, {paths['results'].name})")
    return 0


def parse_labels(text: str | None) -> list[int] | None:
    """``--labels 10,25,50`` -> [10, 25, 50]; a word, a zero or a duplicate is a usage error naming the flag."""
    if text is None:
        return None
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part.isdigit() or int(part) < 1:
            raise ConfigError("--labels", f"expected comma-separated positive whole numbers like 10,25,50, got {text!r}")
        out.append(int(part))
    if not out:
        raise ConfigError("--labels", "expected at least one budget")
    return out


def manifest_labels(out: object) -> list[int] | None:
    """The label budgets an existing grid folder was run with (None: none, or no readable manifest)."""
    import json
    from pathlib import Path

    try:
        labels = json.loads((Path(str(out)) / "grid.json").read_text(encoding="utf-8")).get("labels")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(labels, list) and labels and all(isinstance(n, int) and not isinstance(n, bool) for n in labels):
        return labels
    return None


def ray_executor(args: argparse.Namespace) -> Callable[..., None] | None:
    """``--backend ray``: a RayExecutor from the flags (None: the local pool)."""
    ray_only = [f for f, v in (("--address", args.address), ("--cpus-per-cell", args.cpus_per_cell != 1.0),
                               ("--gpus-per-cell", args.gpus_per_cell != 0.0), ("--retries", args.retries != 0)) if v]
    if args.backend != "ray":
        if ray_only:
            raise ConfigError(", ".join(ray_only), "only with --backend ray")
        return None
    if args.cpus_per_cell <= 0 or args.gpus_per_cell < 0 or args.retries < 0:
        raise ConfigError("--cpus-per-cell/--gpus-per-cell/--retries", "expected CPUs > 0, GPUs >= 0, retries >= 0")
    if args.jobs is not None or args.threads is not None:
        raise ConfigError("--jobs/--threads", "the local pool's; with --backend ray use --cpus-per-cell")
    from moola_engine.experiments.ray_backend import RayExecutor

    return RayExecutor(address=args.address, num_cpus=args.cpus_per_cell, num_gpus=args.gpus_per_cell,
                       retries=args.retries)


def rerun_command(grid: Grid, args: argparse.Namespace) -> str:
    """The command that reproduces (or resumes) this grid, every default spelled out."""
    parts = ["moola-engine", "ablate"]
    if args.preset:
        parts += ["--preset", args.preset]
    parts += ["--config", grid.cfg.source, "--strategies", ",".join(a.label for a in grid.arms if not a.control),
              "--control", next(a.strategy for a in grid.arms if a.control), "--seeds", str(len(grid.seeds)),
              "--folds", str(grid.folds)]
    if grid.budgets:
        parts += ["--labels", ",".join(str(n) for n in grid.labels)]
    if args.epochs is not None:
        parts += ["--epochs", str(args.epochs)]
    if args.strategies_file:
        parts += ["--strategies-file", args.strategies_file]
    if getattr(args, "batched", False):  # results equal separate runs' only to float rounding: say how they ran
        parts += ["--batched", "--batch-size-runs", str(getattr(args, "batch_size_runs", None) or 16)]
    if getattr(args, "backend", "local") == "ray":
        parts += ["--backend", "ray"] + (["--address", args.address] if args.address else [])
    parts += ["--out", str(grid.out)]
    return " ".join(shlex.quote(p) for p in parts)
