"""The seed-size ablation grid on one GPU: wall time for ``ablate --jobs 1, 2, 4, 8, ...`` and the speedup curve.

    python benchmarks/gpu_grid.py --json gpu_grid.json               # on a GPU machine: the seed preset's grid
    python benchmarks/gpu_grid.py --task mlp --points 1,2,4,8,auto,b1   # the MLP grid, batched too
    python benchmarks/gpu_grid.py --smoke                            # CPU smoke test: a tiny MLP grid, seconds

The grid is the seed preset's: 5 arms (the random-encoder control, frozen, immediate, two_phase, gradual) x 10 seeds
x 1 fold = 50 cells.  ``--task seed`` (the default when ``moola_ohlc`` is installed) runs ``examples/seed.toml``
(SimpleLSTM on the bundled SPX windows; an encoder is pretrained first, on the device, into a temporary folder);
``--task mlp`` runs the same grid shape on an MLP (64 x 4 windows flattened, 256 -> 256, head) over 89 random-walk
windows, which ``--batched`` can stack (an LSTM cannot be vmapped: batched seed cells fall back to separate runs).

Each point is a fresh grid folder run by :func:`moola_engine.experiments.ablation.run_grid` in this process, as
``moola-engine ablate`` runs it: ``N`` is ``--jobs N`` (workers spread round-robin over the visible GPUs, or the ones
``--devices`` names), ``auto`` is the memory-aware default (no ``--jobs``: the first cell measured, its decision line
printed), ``bN`` is ``--batched --jobs N``.  An untimed one-cell warm-up runs first.  Points that would not fit the
``--budget-s`` (judged from the ``--jobs 1`` wall time divided by the point's jobs) are skipped and say so.  The JSON
(``--json``) is rewritten after every point, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(Path(__file__).resolve().parent)):  # spawned workers import GridMlp from this folder
    if p not in sys.path:
        sys.path.insert(0, p)

import importlib.metadata as md  # noqa: E402

if not any(ep.name == "two-phase" for ep in md.entry_points(group="moola_engine")):
    os.environ.setdefault("MOOLA_BUILTIN_PLUGINS", "1")  # a checkout on PYTHONPATH, not pip-installed

import attrs  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

ARMS = ["frozen", "immediate", "two_phase", "gradual"]  # plus the control: the seed preset's 5 arms


class GridMlp(nn.Module):
    """(N, T, C) -> flatten -> encoder 256 -> 256 -> head 32 -> 2."""

    def __init__(self, t: int = 64, c: int = 4, hidden: int = 256) -> None:
        super().__init__()
        self.enc0 = nn.Linear(t * c, hidden)
        self.enc1 = nn.Linear(hidden, hidden)
        self.head = nn.Sequential(nn.Linear(hidden, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.enc1(torch.relu(self.enc0(x.flatten(1))))))


def mlp_config(work: Path, *, samples: int, epochs: int, hidden: int) -> Path:
    rng = np.random.default_rng(0)
    n = samples + 40
    x = (rng.normal(size=(n, 64, 4)).cumsum(axis=1) * 0.1).astype(np.float32)
    y = (x[:, -1, 3] > x[:, 0, 3]).astype(np.int64)
    np.savez(work / "walks.npz", x=x[:samples], y=y[:samples], x_test=x[samples:], y_test=y[samples:])
    cfg = work / "mlp.toml"
    cfg.write_text(f"""
[run]
strategies_file = "{ROOT / 'strategies.toml'}"
runs_dir = "runs"
[train]
epochs = {epochs}
batch_size = 16
lr = 1e-3
weight_decay = 1e-4
[train.early_stopping]
metric = "val_loss"
patience = 8
[model]
name = "gpu_grid:GridMlp"
params = {{ hidden = {hidden} }}
groups = [{{name = "encoder.layer0", modules = ["enc0"]}}, {{name = "encoder.layer1", modules = ["enc1"]}},
          {{name = "head", modules = ["head"], head = true}}]
[data]
kind = "npz"
path = "walks.npz"
folds = 1
""")
    return cfg


def seed_config(work: Path, device: str) -> Path:
    """examples/seed.toml with its encoder pretrained here (beside it: its data and strategies paths are relative)."""
    from moola_engine.cli import main as cli

    src = (ROOT / "examples" / "seed.toml").read_text()
    encoder = work / "encoder.safetensors"
    if "../artifacts/encoder.safetensors" not in src:
        raise SystemExit("examples/seed.toml no longer names ../artifacts/encoder.safetensors: update gpu_grid.py")
    cfg = ROOT / "examples" / f".gpu_grid_seed_{os.getpid()}.toml"
    cfg.write_text(src.replace("../artifacts/encoder.safetensors", str(encoder)))
    t0 = time.perf_counter()
    code = cli(["pretrain", "--config", str(cfg), "--out", str(encoder), "--device", device, "--console", "none"])
    if code != 0:
        cfg.unlink(missing_ok=True)
        raise SystemExit(f"pretraining the seed encoder failed (exit {code})")
    print(f"pretrained the seed encoder on {device} in {time.perf_counter() - t0:.1f} s", flush=True)
    return cfg


def parse_point(text: str) -> tuple[int | None, bool]:
    """``4`` -> (4, False); ``auto`` -> (None, False); ``b4`` -> (4, True)."""
    batched = text.startswith("b")
    body = text[1:] if batched else text
    return (None if body == "auto" else int(body)), batched


def main(argv: list[str] | None = None) -> int:
    # gpu_check.sh runs this under `timeout`: SIGTERM as SystemExit, so the `finally` below removes the config
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["seed", "mlp"], help="default: seed where moola_ohlc is installed, else mlp")
    ap.add_argument("--points", default="1,2,4,8,auto", help="comma-separated: N (--jobs N), auto, bN (--batched)")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--epochs", type=int, help="--epochs of the grid (default: the config's; the seed's two_phase "
                                               "needs at least 11)")
    ap.add_argument("--samples", type=int, default=89, help="--task mlp: labelled training windows")
    ap.add_argument("--hidden", type=int, default=256, help="--task mlp: encoder width")
    ap.add_argument("--devices", help="as ablate --devices (default: every visible GPU; the figure is for one GPU)")
    ap.add_argument("--budget-s", type=float, default=0.0, help="skip points that would end past this (0: no limit)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny MLP grid, 2 seeds, points 1,2,b1")
    args = ap.parse_args(argv)
    if args.smoke:
        args.task, args.points, args.seeds, args.epochs, args.samples, args.hidden = "mlp", "1,2,b1", 2, 12, 40, 16

    from moola_engine.config import load_config
    from moola_engine.experiments.ablation import run_grid
    from moola_engine.experiments.grid import build_grid
    from moola_engine.experiments.placement import gpu_count, parse_devices
    from moola_engine.experiments.workers import default_jobs

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    task = args.task or ("seed" if importlib.util.find_spec("moola_ohlc") else "mlp")
    points = [p.strip() for p in args.points.split(",") if p.strip()]
    devices = parse_devices(args.devices) if args.devices else None
    gpus = len(devices) if devices else gpu_count()
    info: dict[str, Any] = {
        "task": task, "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
        "gpus": gpus, "host_cores": default_jobs(), "torch": torch.__version__, "seeds": args.seeds,
        "epochs": args.epochs, "arms": ["control", *ARMS], "points": points}
    print(f"gpu_grid: {task} grid, 5 arms x {args.seeds} seeds x 1 fold on {info['device']} ({gpus} GPU(s) used, "
          f"{info['host_cores']} host cores), torch {torch.__version__}; points {', '.join(points)}", flush=True)
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()

    def dump() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({**info, "rows": rows}, indent=2))

    with tempfile.TemporaryDirectory(prefix="moola-gpu-grid-") as tmp:
        work = Path(tmp)
        cfg_path = seed_config(work, device) if task == "seed" else mlp_config(
            work, samples=args.samples, epochs=args.epochs or 40, hidden=args.hidden)
        try:
            cfg = load_config(cfg_path)
            cfg = attrs.evolve(cfg, run=attrs.evolve(cfg.run, runs_dir=str(work / "runs")))
            pinned = {"epochs": args.epochs} if args.epochs else None
            if args.epochs:
                cfg = attrs.evolve(cfg, train=attrs.evolve(cfg.train, epochs=args.epochs))
            # untimed warm-up here (imports, CUDA context, cuDNN/cuBLAS handles, first-call costs)
            warm = build_grid(cfg, strategies=["frozen"], seeds=1, folds=1, out=work / "warm-up", pinned={"epochs": 1})
            run_grid(warm, jobs=1, stream=io.StringIO(), devices=devices)
            wall1: float | None = None
            for point in points:
                jobs, batched = parse_point(point)
                if args.budget_s and wall1 is not None:
                    guess = wall1 / (jobs or 16) + 5
                    if time.perf_counter() - t_start + guess > args.budget_s:
                        print(f"  {point}: skipped (about {guess:.0f} s would end past --budget-s {args.budget_s:g})",
                              flush=True)
                        rows.append({"point": point, "skipped": True})
                        dump()
                        continue
                grid = build_grid(cfg, strategies=ARMS, seeds=args.seeds, folds=1, out=work / f"grid-{point}",
                                  pinned=pinned)
                stream = io.StringIO()
                t0 = time.perf_counter()
                counts = run_grid(grid, jobs=jobs, stream=stream, devices=devices, batched=batched)
                wall = time.perf_counter() - t0
                markers = [json.loads(m.read_text()) for m in (grid.out / "cells").glob("*.json")]
                said = [ln for ln in stream.getvalue().splitlines()
                        if "per GPU" in ln or "spawned worker" in ln or "this process" in ln or "--batched:" in ln]
                if jobs == 1 and not batched:
                    wall1 = wall
                row = {"point": point, "jobs": jobs, "batched": batched, "runs": counts["ran"], "wall_s": round(wall, 2),
                       "run_s_sum": round(sum(m["seconds"] for m in markers), 2),
                       "processes": len({m["pid"] for m in markers}), "said": said,
                       "speedup_vs_jobs_1": round(wall1 / wall, 2) if wall1 else None}
                rows.append(row)
                dump()
                print(f"  {point:>5}: {counts['ran']} runs in {wall:7.1f} s  ({row['processes']} process(es), sum of "
                      f"run times {row['run_s_sum']:.1f} s)  speedup vs --jobs 1: {row['speedup_vs_jobs_1']}", flush=True)
                for line in said:
                    print(f"         {line}", flush=True)
        finally:
            if task == "seed":
                cfg_path.unlink(missing_ok=True)
    print("| point | runs | wall (s) | processes | speedup vs --jobs 1 |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if r.get("skipped"):
            print(f"| {r['point']} | skipped | | | |")
        else:
            print(f"| {r['point']} | {r['runs']} | {r['wall_s']:.1f} | {r['processes']} | {r['speedup_vs_jobs_1']} |")
    dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
