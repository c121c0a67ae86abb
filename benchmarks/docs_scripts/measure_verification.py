"""Figures for docs/verification.md: cost of the checks, and the fresh-init detector at the seed's size.

    .venv/bin/python benchmarks/docs_scripts/measure_verification.py [SPX.csv[.gz]]

CPU, one thread.  Real data: 64-bar OHLC windows of the S&P 500 (normalised by each window's first close).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from moola_engine.checks.delta import build_checks
from moola_engine.checks.loading import load_into
from moola_engine.config import ChecksConfig, PretrainedConfig, TrainConfig
from moola_engine.core.data import TensorData
from moola_engine.core.engine import Engine
from moola_engine.core.freezing import resolve_groups
from moola_engine.core.plugins import build_plugin_manager, register_checked
from moola_ohlc.models import SimpleLSTM

torch.set_num_threads(1)
# the S&P 500 bars bundled with the moola-ohlc package (provenance: ohlc/moola_ohlc/datasets/NOTICE.md)
BUNDLED_SPX = Path(__file__).resolve().parents[2] / "ohlc" / "moola_ohlc" / "datasets" / "ohlc" / "SPX.csv.gz"


def windows(csv: Path, n: int, length: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.loadtxt(csv, delimiter=",", skiprows=1, usecols=(1, 2, 3, 4), dtype=np.float64)
    starts = np.random.default_rng(seed).choice(len(rows) - length - 1, size=n, replace=False)
    x = np.stack([rows[s:s + length] / rows[s, 3] - 1.0 for s in starts]).astype(np.float32)
    y = np.array([rows[s + length, 3] > rows[s + length - 1, 3] for s in starts], dtype=np.int64)
    return torch.from_numpy(x * 10), torch.from_numpy(y)


def fit_seconds(x: torch.Tensor, y: torch.Tensor, checks: ChecksConfig | None) -> float:
    from moola_plugins.two_phase import TwoPhase, TwoPhaseParams

    torch.manual_seed(0)
    pm, _ = build_plugin_manager()
    if checks is not None:
        for name, obs in build_checks(checks):
            register_checked(pm, obs, name=name)
    strat = TwoPhase(TwoPhaseParams(unfreeze_after=10, lr_scale=0.3))
    register_checked(pm, strat, name="strategy")
    engine = Engine(SimpleLSTM(), train=TrainConfig(epochs=30, batch_size=16, device="cpu", seed=0), pm=pm,
                    strategy=strat, train_data=TensorData(x=x[:89], y=y[:89]), val_data=TensorData(x=x[89:], y=y[89:]),
                    checks=checks)
    t0 = time.perf_counter()
    engine.fit()
    return time.perf_counter() - t0


def main() -> None:
    csv = Path(sys.argv[1]) if len(sys.argv) > 1 else BUNDLED_SPX
    x, y = windows(csv, 89 + 13)
    print("check overhead: SimpleLSTM (hidden 128), 89 train / 13 val windows, 30 epochs, two-phase, CPU 1 thread")
    for label, checks in [("no checks", None), ("checks, exact", ChecksConfig()),
                          ("checks, fingerprint", ChecksConfig(snapshots="fingerprint"))]:
        times = [fit_seconds(x, y, checks) for _ in range(3)]
        print(f"  {label:22s} median {statistics.median(times):.2f} s  (runs: {', '.join(f'{t:.2f}' for t in times)})")

    print("fresh-init detector at the seed's size (2-layer biLSTM hidden 128 -> layer 0 into SimpleLSTM):")
    xs, _ = windows(csv, 512, seed=1)
    for steps in (0, 50, 200):
        torch.manual_seed(3)
        enc = nn.LSTM(4, 128, num_layers=2, batch_first=True, bidirectional=True)
        dec = nn.Linear(256, 4)
        opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
        for i in range(steps):  # masked-free reconstruction of the window: a real, if short, pretraining signal
            b = xs[(i * 32) % 512:(i * 32) % 512 + 32]
            loss = (dec(enc(b)[0]) - b).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "enc.safetensors"
            save_file({f"lstm.{k}": v.detach().contiguous() for k, v in enc.state_dict().items()}, str(path))
            model = SimpleLSTM()
            groups = resolve_groups(model, model.default_groups())
            report, _ = load_into(model, path, PretrainedConfig(path=str(path), lstm_layers=[0], allow_fresh_init=True),
                                  groups=groups)
        ratios = [t.std_ratio for t in report.tensors if t.std_ratio is not None]
        fresh = sum(bool(t.looks_fresh) for t in report.tensors)
        print(f"  after {steps:3d} Adam steps: std/init std {min(ratios):.3f}..{max(ratios):.3f}, "
              f"{fresh}/{len(report.tensors)} tensors look fresh -> {'REFUSED' if report.all_fresh else 'accepted'}")


if __name__ == "__main__":
    main()
