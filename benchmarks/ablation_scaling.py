"""Wall time of an ablation grid with 1 worker vs 2 (or more): does the grid scale with processes?

Target (issue 6): >= 1.8x from 1 to 2 workers on the fine-tuning-size task (the seed's SimpleLSTM,
hidden 128, ~100 labelled windows of 105 bars x 4 features).  Run it on a quiet machine:

    .venv/bin/python benchmarks/ablation_scaling.py              # default grid: 3 arms x 4 seeds x 2 folds, 30 epochs
    .venv/bin/python benchmarks/ablation_scaling.py --jobs 1 2 4 --seeds 4

Each worker count gets a fresh grid folder; ``--jobs 1`` runs in-process with all cores as torch threads,
``--jobs J`` spawns J workers with cores // J threads each (what ``moola-engine ablate`` does).  Prints one
line per worker count and a JSON summary; exits 1 when the 1 -> 2 speedup is below ``--target``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moola_engine.ablation import build_grid, default_jobs, run_grid
from moola_engine.config import load_config

STRATEGIES = """
[strategy.frozen]
plugin = "frozen"
[strategy.immediate]
plugin = "immediate"
[strategy.two_phase]
plugin = "two-phase"
unfreeze_after = 3
lr_scale = 0.3
"""


def write_task(root: Path, *, n: int, bars: int, epochs: int, hidden: int, folds: int) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, bars, 4)).astype(np.float32)
    y = (x[:, -10:, 3].mean(1) + 0.5 * rng.normal(size=n) > 0).astype(np.int64)
    np.savez(root / "task.npz", x=x, y=y)
    (root / "strategies.toml").write_text(STRATEGIES)
    cfg = root / "task.toml"
    cfg.write_text(f"""
[train]
epochs = {epochs}
batch_size = 16
lr = 0.001
device = "cpu"
[model]
name = "simple_lstm"
params = {{ hidden_size = {hidden} }}
[data]
kind = "npz"
path = "task.npz"
folds = {folds}
[run]
strategies_file = "strategies.toml"
""")
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--samples", type=int, default=110)
    ap.add_argument("--bars", type=int, default=105)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--target", type=float, default=1.8)
    ap.add_argument("--threads", type=int, help="torch threads per worker (default: cores // jobs, as ablate does)")
    args = ap.parse_args(argv)
    cores = default_jobs()
    rows = []
    with tempfile.TemporaryDirectory(prefix="moola-scaling-") as tmp:
        root = Path(tmp)
        cfg = load_config(write_task(root, n=args.samples, bars=args.bars, epochs=args.epochs, hidden=args.hidden,
                                     folds=args.folds))
        for jobs in args.jobs:
            grid = build_grid(cfg, strategies=["frozen", "two_phase"], seeds=args.seeds, folds=args.folds,
                              out=root / f"grid-j{jobs}")
            t0 = time.perf_counter()
            threads = args.threads or max(1, cores // jobs)
            run_grid(grid, jobs=jobs, threads=threads, stream=io.StringIO())
            wall = time.perf_counter() - t0
            rows.append({"jobs": jobs, "threads_per_job": threads, "runs": len(grid.cells()), "wall_s": round(wall, 2)})
            print(f"jobs {jobs}  threads/job {threads}  {len(grid.cells())} runs  {wall:.1f} s", flush=True)
    base = next((r["wall_s"] for r in rows if r["jobs"] == 1), None)
    for r in rows:
        r["speedup"] = round(base / r["wall_s"], 2) if base else None
    two = next((r["speedup"] for r in rows if r["jobs"] == 2), None)
    print(json.dumps({"cores": cores, "task": vars(args), "results": rows}, indent=2))
    if two is not None and two < args.target:
        print(f"1 -> 2 workers: {two}x, below the {args.target}x target", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
