"""Throughput of batched multi-run training: N seeds of one arm as one stacked computation vs one at a time.

    python benchmarks/batched.py                          # 16 seeds, CPU, 1 and 2 threads, 3 rounds
    python benchmarks/batched.py --threads 1 --rounds 1   # quick look
    python benchmarks/batched.py --device cuda --threads 0 --json out.json   # on a GPU (threads 0: torch's default)

Both variants go through the public paths a user takes, with every check on and an event log per run:
``train()`` once per seed (``sequential``) and ``train_batched()`` over the same configs (``batched``).  Each
variant's time runs from the first run's setup to the last run's result.json (data loading, model
construction, validation per epoch, test evaluation and predictions included), so the figure is runs per
second as a user sees it.  The model is an MLP encoder (two hidden layers) with a head, the data 89 labelled
windows (the seed's size), batch 16, a two-phase schedule (encoder frozen for the first third of the epochs).
Rounds alternate the order of the two variants; the table reports the median time over rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moola_engine.config import ExperimentConfig, structure  # noqa: E402
from moola_engine.experiments.batched import train_batched  # noqa: E402
from moola_engine.runs.train import RunOutcome, train  # noqa: E402


class BenchMlp(nn.Module):
    """(N, T, C) -> flatten -> encoder (2 hidden layers) -> head."""

    def __init__(self, t: int = 32, c: int = 4, hidden: int = 256, classes: int = 2) -> None:
        super().__init__()
        self.enc0 = nn.Linear(t * c, hidden)
        self.enc1 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.enc1(torch.relu(self.enc0(x.flatten(1))))))


GROUPS = [{"name": "encoder.layer0", "modules": ["enc0"]}, {"name": "encoder.layer1", "modules": ["enc1"]},
          {"name": "head", "modules": ["head"], "head": True}]


def configs(tmp: Path, args: argparse.Namespace, tag: str) -> list[ExperimentConfig]:
    strategies = tmp / "strategies.toml"
    strategies.write_text(f'[strategy.arm]\nplugin = "two-phase"\nunfreeze_after = {max(1, args.epochs // 3)}\n'
                          'lr_scale = 0.3\n')
    out = []
    for seed in range(args.seeds):
        data = {
            "run": {"strategies_file": str(strategies), "console": "none", "runs_dir": str(tmp / f"runs-{tag}"),
                    "strategy": "arm"},
            "train": {"epochs": args.epochs, "batch_size": 16, "lr": 1e-3, "seed": seed, "device": args.device,
                      "threads": args.threads_now or None},
            "model": {"name": "__main__:BenchMlp", "params": {"hidden": args.hidden}, "groups": GROUPS},
            "data": {"kind": "npz", "path": str(tmp / "d.npz")},
            "checkpoint": {"enabled": False},
        }
        out.append(structure(data, ExperimentConfig, source="benchmarks/batched.py"))
    return out


def time_variant(name: str, cfgs: list[ExperimentConfig]) -> float:
    t0 = time.perf_counter()
    if name == "sequential":
        outcomes: list[Any] = [train(c) for c in cfgs]
    else:
        outcomes = train_batched(cfgs)
    seconds = time.perf_counter() - t0
    bad = [o for o in outcomes if not isinstance(o, RunOutcome)]
    if bad:
        raise SystemExit(f"{name}: {len(bad)} run(s) failed: {bad[0]}")
    if name == "batched":
        for o in outcomes:
            text = (o.run_dir / "events.jsonl").read_text()
            if "batched.started" not in text:
                raise SystemExit(f"batched: run {o.run_id} was not batched (see its batched.fallback event)")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(89 + 40, 32, 4)).astype(np.float32)
        y = (x[:, :, 0].mean(axis=1) > 0).astype(np.int64)
        np.savez(tmp / "d.npz", x=x[:89], y=y[:89], x_test=x[89:], y_test=y[89:])
        for threads in args.threads:
            args.threads_now = threads
            if threads:
                torch.set_num_threads(threads)
            times: dict[str, list[float]] = {"sequential": [], "batched": []}
            for r in range(args.rounds):
                order = ["sequential", "batched"] if r % 2 == 0 else ["batched", "sequential"]
                for name in order:
                    times[name].append(time_variant(name, configs(tmp, args, f"{name}-{threads}-{r}")))
            seq, bat = statistics.median(times["sequential"]), statistics.median(times["batched"])
            rows.append({"threads": threads, "sequential_s": seq, "batched_s": bat, "speedup": seq / bat,
                         "runs_per_s_sequential": args.seeds / seq, "runs_per_s_batched": args.seeds / bat,
                         "rounds": times})
    print(f"{args.seeds} seeds of one arm, MLP hidden {args.hidden}, {args.epochs} epochs, 89 samples, batch 16, "
          f"every check on, device {args.device}, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("| threads | one at a time (s) | batched (s) | runs/s one at a time | runs/s batched | speedup |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['threads'] or 'default'} | {row['sequential_s']:.2f} | {row['batched_s']:.2f} | "
              f"{row['runs_per_s_sequential']:.2f} | {row['runs_per_s_batched']:.2f} | {row['speedup']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows},
                                        indent=2, default=str))


if __name__ == "__main__":
    main()
