"""What the checks cost as the model grows: checks off / exact snapshots / fingerprints, time and peak memory.

    python benchmarks/check_scaling.py                         # 0.2M, 2.4M, 8.9M, 35M parameters, 5 rounds
    python benchmarks/check_scaling.py --sizes 0.2M --rounds 1 # smoke (tests/test_speed.py)
    python benchmarks/check_scaling.py --json out.json
    python benchmarks/check_scaling.py --hooks 5               # the checks' own time (inside their hooks) per fit

The setup of issue 18: a two-phase fine-tuning run (encoder frozen for ``--unfreeze-after`` epochs, then
unfrozen at 0.3x lr; AdamW) of an MLP encoder (256 inputs -> H -> H -> H, ReLU) with a head (H -> 32 -> 2),
89 training and 18 validation samples, batch 16, 6 epochs, CPU, 1 thread.  The encoder's initial weights are
passed to the engine as the pretrained weights (as ``train`` does after loading them), so the checks also
measure the distance from them.  H = 256, 1024, 2048, 4096 gives 0.2M, 2.4M, 8.9M and 35M parameters.

Variants: ``off`` (the engine, no checks), ``exact`` (every check on, ``checks.snapshots = "exact"``) and
``fingerprint`` (every check on, ``"fingerprint"``).

Time: ``--repeat`` fresh processes (default 3), each running ``--rounds`` rounds (default 5) after one untimed
warm-up fit per variant (H = 16); a round runs every variant once, in an order rotated from round to round, and its
ratios are each variant's time / the same round's ``off`` time.  The reported ratio is the median over all rounds of
all processes (pooled), as ``benchmarks/overhead.py --repeat`` does: the same fit runs up to 20-30% faster or slower
from one fresh process to the next (docs/performance.md), which a one-run-per-process design turns into noise of the
size of what it measures.  A run is timed from model construction to the end of ``fit()``.

Memory: one more fresh process per variant runs one fit and reports its peak RSS (``ru_maxrss``); the table gives it
and its ratio to ``off``.  Targets (issue 18): every check within 1.05 of ``off`` in time in both modes, and
fingerprints adding at most 5% to peak memory; exact mode's memory is reported, not targeted.
Exit status 0 whatever the figures (a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

SIZES = {"0.2M": 256, "2.4M": 1024, "8.9M": 2048, "35M": 4096}  # label -> hidden width H
EXTRA_SIZES = {"tiny": 16}  # for the smoke test (tests/test_speed.py), not in the default list
VARIANTS = ("off", "exact", "fingerprint")
TIME_TARGET = 1.05
FP_MEMORY_TARGET = 1.05


def worker(hidden: int, variant: str, epochs: int, unfreeze_after: int, pretrained: bool,
           every: int = 1) -> dict[str, Any]:
    """One run in this (fresh) process: seconds and peak RSS."""
    import resource

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch


    torch.set_num_threads(1)
    fit_once(16, variant, 2, 1, pretrained, every)  # warm-up: lazy imports and first calls, not timed
    seconds, params = fit_once(hidden, variant, epochs, unfreeze_after, pretrained, every)
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "params": params}


def _timed(obs: Any, spent: list[float]) -> Any:
    """``obs`` with each of its hook implementations timed into ``spent[0]`` (seconds), before registration."""
    import functools

    for attr in dir(type(obs)):
        if attr.startswith(("on_", "after_", "before_")):
            method = getattr(obs, attr)
            if callable(method) and hasattr(method, "__func__"):
                def timed(*a: Any, _m: Any = method, **k: Any) -> Any:
                    t0 = time.perf_counter()
                    try:
                        return _m(*a, **k)
                    finally:
                        spent[0] += time.perf_counter() - t0
                setattr(obs, attr, functools.update_wrapper(timed, method))  # keeps pluggy's hookimpl marker
    return obs


def fit_once(hidden: int, variant: str, epochs: int, unfreeze_after: int, pretrained: bool,
             every: int = 1, spent: list[float] | None = None) -> tuple[float, int]:
    """(seconds from model construction to the end of fit, parameters) of one run in this process; ``spent``:
    the seconds inside the check observers' hooks are added to ``spent[0]``."""
    import attrs
    import torch
    from torch import nn

    from moola_engine.config import CheckpointConfig, ChecksConfig, ExperimentConfig, GroupSpec, TrainConfig, structure
    from moola_engine.core.data import TensorData
    from moola_engine.core.engine import Engine
    from moola_engine.core.plugins import build_plugin_manager, register_checked
    from moola_engine.logs import RunLog, clear_contextvars
    from moola_engine.runs.observers import build_observers

    g = torch.Generator().manual_seed(0)
    x = torch.randn(89 + 18, 256, generator=g)
    y = (x[:, :128].sum(1) > x[:, 128:].sum(1)).long()
    train, val = TensorData(x=x[:89], y=y[:89]), TensorData(x=x[89:], y=y[89:])

    pm, registry = build_plugin_manager()
    info = registry["two-phase"]
    strat = info.factory(structure({"unfreeze_after": unfreeze_after, "lr_scale": 0.3}, info.params,
                                   source="benchmark"))
    strat.name = "two-phase"
    on = variant != "off"
    checks = ChecksConfig(**{f.name: on for f in attrs.fields(ChecksConfig)
                             if f.name != "strict" and f.type in (bool, "bool")},
                          snapshots="fingerprint" if variant == "fingerprint" else "exact", every=every)
    train_cfg = TrainConfig(epochs=epochs, batch_size=16, lr=1e-3, seed=0, device="cpu", threads=1)
    with tempfile.TemporaryDirectory(prefix="moola-check-scaling-") as tmp:
        run_dir = Path(tmp)
        if on:
            cfg = ExperimentConfig(train=train_cfg, checks=checks, checkpoint=CheckpointConfig(enabled=False))
            for name, obs in build_observers(cfg, run_dir):
                register_checked(pm, obs if spent is None else _timed(obs, spent), name=name)
        register_checked(pm, strat, name="strategy:two-phase")
        runlog = RunLog(run_dir / "events.jsonl", console="none")
        try:
            t0 = time.perf_counter()
            torch.manual_seed(0)
            model = nn.Sequential()
            model.add_module("encoder", nn.Sequential(nn.Linear(256, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                                      nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()))
            model.add_module("head", nn.Sequential(nn.Linear(hidden, 32), nn.ReLU(), nn.Linear(32, 2)))
            loaded = ({f"encoder.{k}": v.clone() for k, v in model.encoder.state_dict().items()}
                      if pretrained else None)
            engine = Engine(model, train=train_cfg, pm=pm, strategy=strat, train_data=train, val_data=val,
                            groups=[GroupSpec(name="encoder", modules=["encoder"]),
                                    GroupSpec(name="head", modules=["head"], head=True)],
                            checks=checks, logger=runlog.logger, run_dir=run_dir, strategy_name="two-phase",
                            pretrained=loaded)
            engine.fit()
            seconds = time.perf_counter() - t0
        finally:
            runlog.close()
            clear_contextvars()
    return seconds, sum(p.numel() for p in model.parameters())


def rounds_worker(hidden: int, rounds: int, epochs: int, unfreeze_after: int, pretrained: bool,
                  every: int) -> list[dict[str, float]]:
    """``rounds`` rounds of every variant in this (fresh) process, the order rotated each round: seconds per run."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    for v in VARIANTS:
        fit_once(16, v, 2, 1, pretrained, every)  # warm-up: lazy imports and first calls, not timed
    out = []
    for r in range(rounds):
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
        out.append({v: fit_once(hidden, v, epochs, unfreeze_after, pretrained, every)[0] for v in order})
    return out


def hooks_worker(hidden: int, fits: int, epochs: int, unfreeze_after: int, pretrained: bool,
                 every: int) -> dict[str, dict[str, float]]:
    """In this (fresh) process, per snapshot mode: the median over ``fits`` fits of the fit's seconds and of the
    seconds spent inside the check observers' hooks (their direct cost, without the run-to-run noise of a
    checks-off comparison)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    out: dict[str, dict[str, float]] = {}
    for v in VARIANTS[1:]:
        fit_once(16, v, 2, 1, pretrained, every)  # warm-up
        fit_s, hook_s = [], []
        for _ in range(fits):
            spent = [0.0]
            fit_s.append(fit_once(hidden, v, epochs, unfreeze_after, pretrained, every, spent)[0])
            hook_s.append(spent[0])
        out[v] = {"fit_seconds": statistics.median(fit_s), "check_seconds": statistics.median(hook_s),
                  "share": statistics.median(h / f for h, f in zip(hook_s, fit_s, strict=True))}
    return out


def _cmd(args: argparse.Namespace, hidden: int) -> list[str]:
    cmd = [sys.executable, __file__, "--hidden", str(hidden), "--epochs", str(args.epochs),
           "--unfreeze-after", str(args.unfreeze_after), "--every", str(args.every)]
    return cmd + ([] if args.pretrained else ["--no-pretrained"])


def run_one(hidden: int, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    out = subprocess.run(_cmd(args, hidden) + ["--worker", variant], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_rounds(hidden: int, args: argparse.Namespace) -> list[dict[str, float]]:
    out = subprocess.run(_cmd(args, hidden) + ["--worker-rounds", str(args.rounds)], check=True, capture_output=True,
                         text=True)
    rounds: list[dict[str, float]] = json.loads(out.stdout.strip().splitlines()[-1])
    return rounds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES),
                    help=f"of {', '.join(SIZES)} (default all), or tiny (a smoke test)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per process (default 5)")
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per size, their rounds pooled (default 3)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--unfreeze-after", type=int, default=3)
    ap.add_argument("--every", type=int, default=1, help="checks.every: interval checks every N epochs (default 1)")
    ap.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                    help="no pretrained weights (no distance-from-pretrained measurements)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--worker-rounds", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--hooks", type=int, metavar="FITS",
                    help="instead: the checks' direct cost, the time inside their hooks over FITS fits per mode in "
                         "one fresh process per size (median), as a share of the fit")
    ap.add_argument("--worker-hooks", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker_hooks:
        print(json.dumps(hooks_worker(args.hidden, args.worker_hooks, args.epochs, args.unfreeze_after,
                                      args.pretrained, args.every)))
        return 0
    if args.worker_rounds:
        print(json.dumps(rounds_worker(args.hidden, args.worker_rounds, args.epochs, args.unfreeze_after,
                                       args.pretrained, args.every)))
        return 0
    if args.worker:
        print(json.dumps(worker(args.hidden, args.worker, args.epochs, args.unfreeze_after, args.pretrained,
                                args.every)))
        return 0
    sizes = {**SIZES, **EXTRA_SIZES}
    unknown = [s for s in args.sizes if s not in sizes]
    if unknown:
        ap.error(f"unknown size(s) {unknown}; expected some of {', '.join(sizes)}")

    if args.hooks:
        hooks: dict[str, Any] = {}
        print("| params | exact: fit, inside the checks (share) | fingerprint: fit, inside the checks (share) |")
        print("|---:|---:|---:|")
        for label in args.sizes:
            got = subprocess.run(_cmd(args, sizes[label]) + ["--worker-hooks", str(args.hooks)], check=True,
                                 capture_output=True, text=True)
            row = hooks[label] = json.loads(got.stdout.strip().splitlines()[-1])
            print(f"| {label} | " + " | ".join(
                f"{row[v]['fit_seconds'] * 1e3:.0f} ms, {row[v]['check_seconds'] * 1e3:.1f} ms "
                f"({row[v]['share'] * 100:.1f}%)" for v in VARIANTS[1:]) + " |", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "hooks": hooks}, indent=2) + "\n")
        return 0

    results: dict[str, Any] = {}
    for label in args.sizes:
        processes = [run_rounds(sizes[label], args) for _ in range(args.repeat)]
        pooled = [r for rounds in processes for r in rounds]
        rss = {v: run_one(sizes[label], v, args) for v in VARIANTS}
        row: dict[str, Any] = {"params": rss["off"]["params"], "processes": processes, "rss_runs": rss}
        for v in VARIANTS:
            row[v] = {"median_seconds": statistics.median(r[v] for r in pooled),
                      "median_ratio": statistics.median(r[v] / r["off"] for r in pooled),
                      "process_ratios": [statistics.median(r[v] / r["off"] for r in rounds) for rounds in processes],
                      "peak_rss_mb": rss[v]["peak_rss_mb"], "rss_ratio": rss[v]["peak_rss_mb"] / rss["off"]["peak_rss_mb"]}
        results[label] = row
        print(f"{label}: done", file=sys.stderr, flush=True)

    lines = ["| params | off: s, peak RSS | exact: time vs off (per process) | exact: peak RSS "
             "| fingerprint: time vs off (per process) | fingerprint: peak RSS |", "|---:|---:|---:|---:|---:|---:|"]

    def each(v: dict[str, Any]) -> str:
        return ", ".join(f"{x:.3f}" for x in v["process_ratios"])

    for label, row in results.items():
        off, ex, fp = row["off"], row["exact"], row["fingerprint"]
        lines.append(f"| {label} ({row['params'] / 1e6:.2f}M) | {off['median_seconds']:.2f} s, "
                     f"{off['peak_rss_mb']:.0f} MB | {ex['median_ratio']:.3f} ({each(ex)}) | {ex['peak_rss_mb']:.0f} MB "
                     f"(x{ex['rss_ratio']:.3f}) | {fp['median_ratio']:.3f} ({each(fp)}) | {fp['peak_rss_mb']:.0f} MB "
                     f"(x{fp['rss_ratio']:.3f}) |")
    missed = [f"{label} {v} time {row[v]['median_ratio']:.3f}" for label, row in results.items()
              for v in ("exact", "fingerprint") if row[v]["median_ratio"] > TIME_TARGET]
    missed += [f"{label} fingerprint memory x{row['fingerprint']['rss_ratio']:.3f}" for label, row in results.items()
               if row["fingerprint"]["rss_ratio"] > FP_MEMORY_TARGET]
    import torch

    print(f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"1 thread; {args.repeat} process(es) x {args.rounds} round(s), pooled; {args.epochs} epochs, unfreeze after "
          f"{args.unfreeze_after}, pretrained {'yes' if args.pretrained else 'no'}, checks.every {args.every}")
    print("\n".join(lines))
    print("targets (time <= 1.05 x off, fingerprint RSS <= 1.05 x off): "
          + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
