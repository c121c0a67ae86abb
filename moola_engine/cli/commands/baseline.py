"""``moola-engine baseline --config FILE --seeds N``: the reference baselines plugins registered, per seed.

The reference a network must beat (the OHLC package registers a logistic regression on three range
features): each seed draws another labeled training set (as a ``train`` run with that seed would); the
validation and test rows stay the same.
"""

from __future__ import annotations

import argparse
import json
import math

import attrs
import numpy as np

from moola_engine.cli.commands.argtypes import positive_int
from moola_engine.config import DataConfig, ExperimentConfig, load_config
from moola_engine.core.components import default_registries
from moola_engine.core.data import DataRequest, build_splits
from moola_engine.core.registry import resolve
from moola_engine.core.tasks import build_task
from moola_engine.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("baseline", help="reference baselines (e.g. logistic regression on range features), per seed")
    p.add_argument("--config", help="experiment TOML (default: data.kind = \"ohlc\" with its defaults)")
    p.add_argument("--baseline", help="one registered baseline (default: every one that can read this data)")
    p.add_argument("--seeds", type=positive_int, default=5, help="labeled draws, seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--label-budget", help="override data.options.label_budget (an integer or \"all\")")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def run(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise ConfigError("--seeds", f"expected a value >= 1, got {args.seeds}")
    cfg = load_config(args.config) if args.config else ExperimentConfig(data=DataConfig(kind="ohlc"))
    data = cfg.data
    if args.label_budget is not None:
        budget: int | str = int(args.label_budget) if args.label_budget.isdigit() else args.label_budget
        data = attrs.evolve(data, options={**data.options, "label_budget": budget})
    registry = default_registries()["baseline"]
    comps = ([resolve(registry, args.baseline, source="--baseline", key="--baseline", base_dir=cfg.base_dir)]
             if args.baseline else registry.items())
    task = build_task(cfg.task, source=cfg.source, base_dir=cfg.base_dir)
    report: dict[str, list[dict[str, float]]] = {}
    for seed in range(args.seeds):
        splits = build_splits(data, base_dir=cfg.base_dir, seed=seed, source=cfg.source, task=task)
        req = DataRequest(cfg=data, options=data.options, base_dir=cfg.base_dir, seed=seed, source=cfg.source,
                          task=task)
        for comp in comps:
            res = comp.factory(splits, req)
            if res is None:
                continue
            row = {"seed": seed, **{f"{split}_{k}": v for split in ("val", "test") if split in res
                                    for k, v in res[split].items()}}
            report.setdefault(comp.name, []).append(row)
    if not report:
        names = ", ".join(c.name for c in comps) or "none installed"
        raise ConfigError(cfg.source, f"no baseline can read data.kind = {data.kind!r} (tried: {names})")
    if args.json:
        print(json.dumps({"config": cfg.source, "seeds": args.seeds, "baselines": {
            name: {"runs": rows, "summary": {k: _mean_ci([r[k] for r in rows]) for k in rows[0] if k != "seed"}}
            for name, rows in report.items()}}, indent=2))
        return 0
    for name, rows in report.items():
        comp = registry[name] if name in registry else comps[0]
        print(f"{comp.description or name} [{name}], {args.seeds} seed(s), config {cfg.source}")
        print(f"{'metric':<24} {'mean':>7}  95% interval")
        for k in (k for k in rows[0] if k != "seed"):
            m, lo, hi = _mean_ci([r[k] for r in rows])
            print(f"{k:<24} {m:7.3f}  {lo:.3f}-{hi:.3f}")
    return 0


def _mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and a normal-approximation 95% interval over seeds (t quantile for small n)."""
    a = np.asarray(values, dtype=np.float64)
    m = float(a.mean())
    if len(a) < 2:
        return m, m, m
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}.get(len(a), 1.96)
    half = t * float(a.std(ddof=1)) / math.sqrt(len(a))
    return m, m - half, m + half
