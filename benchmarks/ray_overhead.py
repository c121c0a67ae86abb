"""The same small ablation grid on the local worker pool and on a local Ray instance: wall time, per-cell overhead.

    python benchmarks/ray_overhead.py                 # 12 cells: 3 arms x 2 seeds x 2 folds, 5 epochs each
    python benchmarks/ray_overhead.py --json ray.json

The grid is a tiny SimpleLSTM (hidden 4) on 48 synthetic windows, so a cell's own work is under a second and the
backend's cost shows.  Local pool: ``--jobs 2 --threads 1`` (this process and one spawned worker).  Ray:
``ray.init(num_cpus=2)`` (timed separately) and ``RayExecutor(num_cpus=1)``.  Overhead per cell =
(2 x wall time - the cells' own seconds, summed from their done markers) / cells: the time the two slots spent
on anything but training.  Needs the ``[ray]`` extra.
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

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without pip install
    sys.path.insert(0, str(ROOT))

from moola_engine.config import load_config  # noqa: E402
from moola_engine.experiments.ablation import run_grid  # noqa: E402
from moola_engine.experiments.grid import build_grid  # noqa: E402

STRATEGIES = '[strategy.immediate]\nplugin = "immediate"\n[strategy.frozen]\nplugin = "frozen"\n' \
             '[strategy.two_phase]\nplugin = "two-phase"\nunfreeze_after = 2\n'


def experiment(tmp: Path, epochs: int) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 6, 4)).astype(np.float32)
    np.savez(tmp / "tiny.npz", x=x, y=(x[:, :, 0].mean(1) > 0).astype(np.int64))
    (tmp / "strategies.toml").write_text(STRATEGIES)
    (tmp / "tiny.toml").write_text(
        f'[train]\nepochs = {epochs}\nbatch_size = 16\nlr = 0.01\ndevice = "cpu"\n[model]\nname = "simple_lstm"\n'
        'params = { hidden_size = 4, head_hidden = 4 }\n[data]\nkind = "npz"\npath = "tiny.npz"\nfolds = 2\n'
        '[run]\nstrategies_file = "strategies.toml"\nconsole = "none"\n')
    return tmp / "tiny.toml"


def one(out: Path, cfg_path: Path, **run_kw: object) -> dict[str, float]:
    grid = build_grid(load_config(cfg_path), strategies=["frozen", "two_phase"], seeds=2, out=out)
    t0 = time.perf_counter()
    run_grid(grid, stream=io.StringIO(), **run_kw)  # type: ignore[arg-type]
    wall = time.perf_counter() - t0
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    own = sum(c["seconds"] for c in cells)
    return {"cells": len(cells), "wall": wall, "mean_cell": own / len(cells), "overhead_per_cell": (2 * wall - own) / len(cells)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import ray

    from moola_engine.experiments.ray_backend import RayExecutor

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = experiment(tmp, args.epochs)
        one(tmp / "warm", cfg, jobs=1, threads=1)  # imports and first calls, in this process
        local = one(tmp / "local", cfg, jobs=2, threads=1)
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        start = time.perf_counter() - t0
        try:
            remote = one(tmp / "ray", cfg, executor=RayExecutor(num_cpus=1))
        finally:
            ray.shutdown()
    print(f"12-cell grid, {args.epochs} epochs a cell, 2 slots")
    print(f"{'backend':<12} {'wall':>7} {'start':>7} {'mean cell':>10} {'overhead/cell':>14}")
    print(f"{'local pool':<12} {local['wall']:6.1f}s {'-':>7} {local['mean_cell']:9.2f}s {local['overhead_per_cell']:13.2f}s")
    print(f"{'ray (local)':<12} {remote['wall'] + start:6.1f}s {start:6.1f}s {remote['mean_cell']:9.2f}s "
          f"{remote['overhead_per_cell']:13.2f}s  (wall and overhead without starting Ray)")
    if args.json:
        args.json.write_text(json.dumps({"local": local, "ray": remote, "ray_start": start}, indent=2))


if __name__ == "__main__":
    main()
