"""Wall time of an ablation grid with 1 worker vs 2 (or more): does the grid scale with processes?

Target (issue 8): >= 1.8x from 1 to 2 workers on the fine-tuning-size task (the seed's SimpleLSTM,
hidden 128, ~100 labelled windows of 105 bars x 4 features), threads per worker set so they do not
fight.  Run it on a quiet machine:

    .venv/bin/python benchmarks/ablation_scaling.py              # 3 arms x 4 seeds x 2 folds, 30 epochs
    .venv/bin/python benchmarks/ablation_scaling.py --jobs 1 2 4 --seeds 4

For each worker count J it runs a fresh copy of the grid with J workers x (cores // J) torch threads
(what ``moola-engine ablate --jobs J`` does; J = 1 runs in-process).  Unless ``--no-same-threads``,
it also runs one worker with the threads each of 2 workers gets, so two scalings are reported:

* **workers, threads per worker held**: t(1 x k) / t(2 x k) with k = cores // 2 (1 here), the
  process scaling itself;
* **against one worker using every core as threads**: t(1 x cores) / t(2 x k).  Two k-threaded
  processes can do at most twice the work of one k-threaded process, so this one can never exceed
  2 x t(1 x cores) / t(1 x k): the benchmark prints that ceiling next to it.

Prints one line per configuration and a JSON summary; exits 1 when the process scaling (threads per
worker held) from 1 to 2 workers is below ``--target``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from moola_engine.config import load_config
from moola_engine.experiments.ablation import run_grid
from moola_engine.experiments.grid import build_grid
from moola_engine.experiments.workers import default_jobs

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
    ap.add_argument("--no-same-threads", dest="same_threads", action="store_false",
                    help="skip the 1 worker x 1 thread run")
    args = ap.parse_args(argv)
    cores = default_jobs()
    configs = [(jobs, args.threads or max(1, cores // jobs)) for jobs in args.jobs]
    per_worker = args.threads or max(1, cores // 2)  # threads of each of 2 workers
    if args.same_threads and {1, 2} <= set(args.jobs) and (1, per_worker) not in configs:
        configs.insert(1, (1, per_worker))
    rows = []
    with tempfile.TemporaryDirectory(prefix="moola-scaling-") as tmp:
        root = Path(tmp)
        cfg = load_config(write_task(root, n=args.samples, bars=args.bars, epochs=args.epochs, hidden=args.hidden,
                                     folds=args.folds))
        # untimed warm-up in this process (imports, plugin discovery, first-call costs), so that whichever
        # in-process configuration runs first does not pay them
        warm = attrs.evolve(cfg, train=attrs.evolve(cfg.train, epochs=1))
        run_grid(build_grid(warm, strategies=["frozen"], seeds=1, folds=1, out=root / "warm-up"), jobs=1,
                 stream=io.StringIO())
        for jobs, threads in configs:
            grid = build_grid(cfg, strategies=["frozen", "two_phase"], seeds=args.seeds, folds=args.folds,
                              out=root / f"grid-j{jobs}-t{threads}")
            t0 = time.perf_counter()
            run_grid(grid, jobs=jobs, threads=threads, stream=io.StringIO())
            wall = time.perf_counter() - t0
            # per-run seconds from the done markers: longer runs under 2 workers mean contention (disk, memory),
            # equal ones mean the wall-time difference is start-up and the tail
            run_s = [json.loads(m.read_text())["seconds"] for m in sorted((grid.out / "cells").glob("*.json"))]
            pids = {json.loads(m.read_text()).get("pid") for m in (grid.out / "cells").glob("*.json")}
            rows.append({"jobs": jobs, "threads_per_job": threads, "runs": len(grid.cells()), "wall_s": round(wall, 2),
                         "run_s_sum": round(sum(run_s), 2), "processes": len(pids)})
            print(f"jobs {jobs}  threads/job {threads}  {len(grid.cells())} runs  {wall:.1f} s  "
                  f"(sum of run times {sum(run_s):.1f} s in {len(pids)} process(es))", flush=True)
    wall = {(r["jobs"], r["threads_per_job"]): r["wall_s"] for r in rows}
    summary: dict[str, Any] = {"cores": cores, "task": vars(args), "results": rows}
    two = wall.get((2, per_worker))
    all_cores = args.threads or cores
    one_all, one_same = wall.get((1, all_cores)), wall.get((1, per_worker))
    verdict = None
    if two is not None and one_same is not None:
        summary[f"speedup_threads_held_at_{per_worker}"] = verdict = round(one_same / two, 2)
    if two is not None and one_all is not None and all_cores != per_worker:
        summary["speedup_vs_1_worker_all_cores"] = round(one_all / two, 2)
        if one_same is not None:
            summary["ceiling_vs_1_worker_all_cores"] = round(2 * one_all / one_same, 2)
    print(json.dumps(summary, indent=2))
    if verdict is not None and verdict < args.target:
        print(f"1 -> 2 workers ({per_worker} thread(s) each): {verdict}x, below the {args.target}x target", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
