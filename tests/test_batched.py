"""Batched multi-run training (moola_engine.batched) against separate runs of the same configs.

Tolerance: the stacked path runs the per-run matmuls as batched ones under vmap, whose reductions sum in
another order, and its Adam computes bias corrections in float64 tensors rather than Python floats; so weights
and outputs agree to float32 rounding amplified by a few epochs of training, not bitwise.  ``ATOL``/``RTOL``
below bound that on these tiny models; the events (freeze transitions, check results, their steps) must be
identical, and frozen parameters bitwise unchanged on both paths (the weight-delta check says so).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from moola_engine import models
from moola_engine.batched import StackedOptimizer, train_batched
from moola_engine.config import ExperimentConfig, structure
from moola_engine.logs import read_events
from moola_engine.train import RunOutcome, train

ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-4
RTOL = 1e-4


class Mlp(nn.Module):
    """(N, T, C) -> mean over T -> two encoder layers -> head."""

    def __init__(self, c: int = 3, h: int = 8, classes: int = 2) -> None:
        super().__init__()
        self.enc0 = nn.Linear(c, h)
        self.enc1 = nn.Linear(h, h)
        self.head = nn.Linear(h, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.enc1(torch.relu(self.enc0(x.mean(dim=1))))))


GROUPS = [{"name": "encoder.layer0", "modules": ["enc0"]}, {"name": "encoder.layer1", "modules": ["enc1"]},
          {"name": "head", "modules": ["head"], "head": True}]


@pytest.fixture(autouse=True)
def _mlp_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(models.MODELS, "batched_mlp", Mlp)


def write_data(path: Path, n: int = 60) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 5, 3)).astype(np.float32)
    y = (x[:, :, 0].mean(axis=1) > 0).astype(np.int64)
    np.savez(path, x=x, y=y, x_test=x[:20], y_test=y[:20])


def config(tmp: Path, seed: int, runs: str, *, model: str = "batched_mlp", params: dict[str, Any] | None = None,
           groups: list[dict[str, Any]] | None = GROUPS, **train_kw: Any) -> ExperimentConfig:
    data = {
        "run": {"strategies_file": str(ROOT / "strategies.toml"), "console": "none", "runs_dir": str(tmp / runs)},
        "train": {"epochs": 5, "batch_size": 8, "lr": 0.01, "seed": seed, "device": "cpu", "threads": 1, **train_kw},
        "model": {"name": model, "params": params or {}, "groups": groups or []},
        "data": {"kind": "npz", "path": str(tmp / "d.npz")},
        "checkpoint": {"enabled": False},
    }
    cfg = structure(data, ExperimentConfig, source="test")
    return cfg


def _events(outcome: RunOutcome) -> list[dict[str, Any]]:
    return read_events(outcome.run_dir / "events.jsonl")


KEYS = ("event", "group", "to_state", "from_state", "epoch", "step", "ok", "scope", "expected", "moved", "steps",
        "trainable", "phase", "first_step", "reason", "from_step", "to_step", "lr")
COMPARED = {"freeze.transition", "weight_delta.check", "weight_delta.violation", "grad_flow.check", "epoch.completed",
            "lr.changed", "freeze.params", "early_stop.triggered", "check.failed", "strategy.plateau"}


def comparable(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [tuple(e.get(k) for k in KEYS) for e in events if e["event"] in COMPARED]


def _outputs(outcome: RunOutcome) -> dict[str, np.ndarray]:
    with np.load(outcome.run_dir / "predictions.npz") as z:
        return {k: z[k] for k in z.files}


def both_paths(tmp_path: Path, strategy: str, seeds: list[int], **kw: Any) -> tuple[list[Any], list[Any]]:
    write_data(tmp_path / "d.npz")
    separate = [train(config(tmp_path, s, "sep", **kw), strategy=strategy) for s in seeds]
    batched = train_batched([config(tmp_path, s, "bat", **kw) for s in seeds], strategy=strategy)
    return separate, batched


def assert_same(separate: list[Any], batched: list[Any]) -> None:
    for sep, bat in zip(separate, batched, strict=True):
        assert isinstance(bat, RunOutcome), bat
        bat_events = _events(bat)
        assert any(e["event"] == "batched.started" for e in bat_events)
        assert comparable(_events(sep)) == comparable(bat_events)
        a, b = _outputs(sep), _outputs(bat)
        for key in a:
            np.testing.assert_allclose(b[key], a[key], atol=ATOL, rtol=RTOL, err_msg=key)
        sep_loss = [e["train_loss"] for e in _events(sep) if e["event"] == "epoch.completed"]
        bat_loss = [e["train_loss"] for e in bat_events if e["event"] == "epoch.completed"]
        np.testing.assert_allclose(bat_loss, sep_loss, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("strategy", ["two_phase_short", "gradual", "bitfit"])
def test_batched_equals_separate_runs(tmp_path: Path, strategy: str) -> None:
    strategies = tmp_path / "strategies.toml"
    strategies.write_text((ROOT / "strategies.toml").read_text() + '\n[strategy.two_phase_short]\nplugin = "two-phase"\n'
                          'unfreeze_after = 2\nlr_scale = 0.3\n')
    write_data(tmp_path / "d.npz")

    def cfg(seed: int, runs: str) -> ExperimentConfig:
        c = config(tmp_path, seed, runs, weight_decay=0.01)
        import attrs
        return attrs.evolve(c, run=attrs.evolve(c.run, strategies_file=str(strategies)))

    separate = [train(cfg(s, "sep"), strategy=strategy) for s in (0, 1, 2)]
    batched = train_batched([cfg(s, "bat") for s in (0, 1, 2)], strategy=strategy)
    assert_same(separate, batched)
