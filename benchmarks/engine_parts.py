"""Where the engine's time goes inside a run: perf_counter around its per-epoch pieces.

    python benchmarks/engine_parts.py                  # engine + every check, 5 runs, fine-tuning scenario
    python benchmarks/engine_parts.py --no-checks      # the engine alone
    python benchmarks/engine_parts.py --cold-probe     # also: one small numpy call, hot vs right after a step

Runs the ``overhead.py`` fine-tuning scenario (same model, data and two-phase schedule) several times in
this process after one warm-up run, with the engine's methods, the metrics, the event sink and the checks'
hooks wrapped in timers, and prints milliseconds per run for each piece, largest first.  Pieces nest
(``fit`` holds everything), so the column does not add up.  The wrappers cost a few microseconds a call:
use ``overhead.py`` for ratios, this for where a ratio comes from.
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

import overhead  # noqa: E402

from moola_engine import logs as L  # noqa: E402
from moola_engine.checks import delta as C  # noqa: E402
from moola_engine.core import engine as E  # noqa: E402
from moola_engine.core import plan as P  # noqa: E402

SPENT: collections.Counter[str] = collections.Counter()
CALLS: collections.Counter[str] = collections.Counter()


def timed(owner: Any, name: str, label: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - t0
            CALLS[label] += 1

    setattr(owner, name, wrapper)


def instrument() -> None:
    for name in ("fit", "_train_epoch", "_epoch_loss", "evaluate", "predict", "_fire", "_early_stopping"):
        timed(E.Engine, name, f"Engine.{name}")
    timed(E, "classification_metrics", "classification_metrics")
    timed(E, "apply_module_modes", "apply_module_modes")
    timed(E, "bind", "bind (log context)")
    timed(P, "compute_plan", "compute_plan")
    timed(L.JsonlSink, "__call__", "event sink (encode, write, flush, fsync)")
    timed(L.os, "fsync", "fsync")
    for cls in (C._DeltaObserver, C.GradFlowCheck):
        for name in ("_checkpoint", "_measure", "_log", "after_step", "flush"):
            if name in vars(cls):
                timed(cls, name, f"{cls.__name__}.{name}")


def cold_probe() -> None:
    """A 1-2 us numpy call, hot, then right after a training step of the scenario's model."""
    import numpy as np

    from moola_ohlc.models import SimpleLSTM

    model, x, y = SimpleLSTM(), torch.randn(16, 64, 4), torch.randint(0, 2, (16,))
    a, b = np.random.default_rng(0).integers(0, 2, 18), np.random.default_rng(1).integers(0, 2, 18)

    def call() -> float:
        t0 = time.perf_counter()
        np.count_nonzero(a == b)
        return time.perf_counter() - t0

    hot = [call() for _ in range(200)]
    after, second = [], []
    for _ in range(30):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        after.append(call())
        second.append(call())
    print(f"cold probe: a small numpy call takes {statistics.median(hot) * 1e6:.1f} us hot, "
          f"{statistics.median(after) * 1e6:.1f} us right after a training step, "
          f"{statistics.median(second) * 1e6:.1f} us when called again at once (medians)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-checks", dest="checks", action="store_false", help="the engine without check observers")
    ap.add_argument("--cold-probe", action="store_true", help="also time one small numpy call hot and cold")
    ap.add_argument("--quick", action="store_true", help="overhead.py's small fine-tuning scenario (CI smoke)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    sc = (overhead.QUICK if args.quick else overhead.SCENARIOS)["finetune"]
    train, val = overhead.make_data(sc, device)
    runner = overhead.EngineRunner(checks=args.checks, device=device)
    instrument()
    runner(sc, train, val, device, prepared=runner.prepare(sc))  # warm-up, not counted
    SPENT.clear()
    CALLS.clear()
    total = 0.0
    for _ in range(args.runs):
        prepared = runner.prepare(sc)
        t0 = time.perf_counter()
        runner(sc, train, val, device, prepared=prepared)
        total += time.perf_counter() - t0
    print(f"{'engine + every check' if args.checks else 'engine'}, fine-tuning scenario, {args.runs} runs: "
          f"{total / args.runs * 1e3:.1f} ms a run")
    for label, secs in SPENT.most_common():
        print(f"  {label:44s} {secs / args.runs * 1e3:8.2f} ms/run  {CALLS[label] / args.runs:6.0f} calls/run")
    if args.cold_probe:
        cold_probe()
    return 0


if __name__ == "__main__":
    sys.exit(main())
