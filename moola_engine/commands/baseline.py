"""``moola-engine baseline --config FILE --seeds N``: logistic regression on three range features, per seed.

The reference a network must beat: each seed draws another labeled training set (as a ``train`` run with
that seed would), the validation and test windows stay the same.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import attrs
import numpy as np

from ..baselines import logistic_baseline
from ..config import DataConfig, load_config
from ..data import build_splits
from ..errors import ConfigError
from .argtypes import positive_int


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("baseline", help="logistic-regression baseline on hand-made range features (ohlc data)")
    p.add_argument("--config", help="experiment TOML (default: data.kind = \"ohlc\" with its defaults)")
    p.add_argument("--seeds", type=positive_int, default=5, help="labeled draws, seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--label-budget", help="override data.options.label_budget (an integer or \"all\")")
    p.add_argument("--json", action="store_true", help="print the runs and the summary as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    if args.config:
        cfg = load_config(args.config)
        data, source, base_dir = cfg.data, cfg.source, Path(cfg.source).parent
    else:
        data, source, base_dir = DataConfig(kind="ohlc"), "<defaults>", Path.cwd()
    if data.kind != "ohlc":  # the range features are computed from OHLC bars
        raise ConfigError(source, f"the baseline needs data.kind = \"ohlc\", got {data.kind!r} @ $.data.kind")
    if args.label_budget is not None:
        budget: int | str = int(args.label_budget) if args.label_budget.isdigit() else args.label_budget
        data = attrs.evolve(data, options={**data.options, "label_budget": budget})
    rows = []
    for seed in range(args.seeds):
        splits = build_splits(data, base_dir=base_dir, seed=seed, source=source)
        res = logistic_baseline(splits)
        rows.append({"seed": seed, **{f"{split}_{k}": v for split in ("val", "test") for k, v in res[split].items()}})
    keys = [k for k in rows[0] if k != "seed"]
    summary = {k: _mean_ci([r[k] for r in rows]) for k in keys}
    if args.json:
        print(json.dumps({"config": source, "seeds": args.seeds, "runs": rows, "summary": summary}, indent=2))
        return 0
    print(f"logistic regression on (range5, bar_range, vol20), {args.seeds} seed(s), config {source}")
    print(f"{'metric':<24} {'mean':>7}  95% interval")
    for k, (m, lo, hi) in summary.items():
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
