"""Batched multi-run training (moola_engine.experiments.batched) against separate runs of the same configs.

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

from moola_engine.config import ExperimentConfig, structure
from moola_engine.experiments.batched import StackedOptimizer, train_batched
from moola_engine.logs import read_events
from moola_engine.runs.train import RunOutcome, train

ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-5
RTOL = 1e-5


# conftest.TinyNet: (N, T, C) -> mean over T -> enc0 -> enc1 -> head
GROUPS = [{"name": "encoder.layer0", "modules": ["enc0"]}, {"name": "encoder.layer1", "modules": ["enc1"]},
          {"name": "head", "modules": ["head"], "head": True}]


def write_data(path: Path, n: int = 60) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 5, 3)).astype(np.float32)
    y = (x[:, :, 0].mean(axis=1) > 0).astype(np.int64)
    np.savez(path, x=x, y=y, x_test=x[:20], y_test=y[:20])


def config(tmp: Path, seed: int, runs: str, *, model: str = "tests.conftest:TinyNet", params: dict[str, Any] | None = None,
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


def test_plateau_schedule_and_per_run_lr_batched(tmp_path: Path) -> None:
    """Metric-driven transitions (plateau) and runs that differ in lr and optimizer settings share one stack."""
    write_data(tmp_path / "d.npz")
    kws = [{"lr": 0.01, "seed": 0}, {"lr": 0.05, "seed": 1, "weight_decay": 0.1}, {"lr": 0.002, "seed": 2,
                                                                                   "grad_clip": 0.05}]

    def cfg(kw: dict[str, Any], runs: str) -> ExperimentConfig:
        kw = dict(kw)
        return config(tmp_path, kw.pop("seed"), runs, epochs=6, **kw)

    strategies = tmp_path / "strategies.toml"
    strategies.write_text('[strategy.plateau]\nplugin = "two-phase"\nunfreeze_on = "plateau"\npatience = 1\n'
                          'max_epoch = 4\nlr_scale = 0.3\n')
    separate = [train(cfg(kw, "sep"), strategy="plateau", strategies_file=str(strategies)) for kw in kws]
    batched = train_batched([cfg(kw, "bat") for kw in kws], strategy="plateau", strategies_file=str(strategies))
    assert_same(separate, batched)
    transitions = [[e["epoch"] for e in _events(b) if e["event"] == "freeze.transition" and e["epoch"] > 0]
                   for b in batched]
    assert all(transitions), transitions  # every run unfroze its encoder after fit start


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_other_optimizers_batched(tmp_path: Path, optimizer: str) -> None:
    separate, batched = both_paths(tmp_path, "discriminative", [0, 1], optimizer=optimizer, weight_decay=0.05, epochs=4)
    assert_same(separate, batched)


def test_l2_sp_falls_back_to_separate_runs(tmp_path: Path) -> None:
    separate, batched = both_paths(tmp_path, "l2_sp", [0, 1], epochs=2)
    for sep, bat in zip(separate, batched, strict=True):
        events = _events(bat)
        fallback = [e for e in events if e["event"] == "batched.fallback"]
        assert len(fallback) == 1 and "l2_sp implements on_fit_end" in fallback[0]["reason"]
        assert not any(e["event"] == "batched.started" for e in events)
        assert comparable(_events(sep)) == comparable(events)
        a, b = _outputs(sep), _outputs(bat)
        for key in a:  # a separate run through engine.fit: bitwise what train() gives
            np.testing.assert_array_equal(b[key], a[key])


def test_lstm_cannot_be_vmapped_and_falls_back(tmp_path: Path) -> None:
    write_data(tmp_path / "d.npz")
    cfgs = [config(tmp_path, s, "bat", model="simple_lstm", groups=None, epochs=1,
                   params={"input_size": 3, "hidden_size": 4, "head_hidden": 4}) for s in (0, 1)]
    outcomes = train_batched(cfgs, strategy="immediate")
    for out in outcomes:
        assert isinstance(out, RunOutcome), out
        fallback = [e for e in _events(out) if e["event"] == "batched.fallback"]
        assert len(fallback) == 1 and "vmap cannot batch" in fallback[0]["reason"]
        assert "rnn" in fallback[0]["reason"] or "lstm" in fallback[0]["reason"], fallback[0]["reason"]
        assert any(e["event"] == "epoch.completed" for e in _events(out))


def test_alone_in_its_shape_group_falls_back(tmp_path: Path) -> None:
    write_data(tmp_path / "d.npz")
    cfgs = [config(tmp_path, 0, "bat"), config(tmp_path, 1, "bat", params={"h": 6})]
    outcomes = train_batched(cfgs, strategy="immediate")
    for out in outcomes:
        reasons = [e["reason"] for e in _events(out) if e["event"] == "batched.fallback"]
        assert reasons == ["no other run of the same shape to batch with"]


def test_a_failing_run_ends_alone(tmp_path: Path) -> None:
    """A run whose schedule is refused fails with its own error; the others of its group still train batched."""
    write_data(tmp_path / "d.npz")
    cfgs = [config(tmp_path, s, "bat", epochs=3) for s in (0, 1, 2)]
    outcomes = train_batched(cfgs, strategy=["immediate", "two_phase", "immediate"])  # two_phase: unfreeze_after 10
    assert "would never" in str(outcomes[1]) or "never" in str(outcomes[1]), outcomes[1]
    for out in (outcomes[0], outcomes[2]):
        assert isinstance(out, RunOutcome), out
        assert any(e["event"] == "batched.started" for e in _events(out))


def _torch_reference(kind: str, p0: torch.Tensor, grads: list[torch.Tensor], frozen_until: int, **kw: Any) -> torch.Tensor:
    p = nn.Parameter(p0.clone())
    opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]([p], **kw)
    for i, g in enumerate(grads):
        p.grad = None if i < frozen_until else g.clone()  # frozen: grad None, as the Freezer leaves it
        opt.step()
    return p.detach()


@pytest.mark.parametrize("frozen_until", [[0, 3, 6], [0, 0, 0]], ids=["mixed-masks", "all-train"])
@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_stacked_optimizer_matches_torch_and_keeps_frozen_bitwise(kind: str, frozen_until: list[int]) -> None:
    gen = torch.Generator().manual_seed(0)
    k, steps = 3, 6
    p0 = torch.randn(k, 4, 5, generator=gen)
    grads = [torch.randn(k, 4, 5, generator=gen) for _ in range(steps)]
    lrs, wds, moms = [0.1, 0.01, 0.03], [0.0, 0.1, 0.01], [0.9, 0.0, 0.5]
    # mixed: run 1 trains from step 3 and run 2 is frozen throughout (the torch.where path); all-train: in place
    opt = StackedOptimizer(kind)
    params = {"w": p0.clone()}
    for i, g in enumerate(grads):
        mask = torch.tensor([i >= f for f in frozen_until])
        opt.step(params, {"w": g}, lr={"w": torch.tensor(lrs)}, mask={"w": mask},
                 weight_decay=torch.tensor(wds), momentum=torch.tensor(moms))
    for r in range(k):
        kw: dict[str, Any] = {"lr": lrs[r], "weight_decay": wds[r]}
        if kind == "sgd":
            kw["momentum"] = moms[r]
        ref = _torch_reference(kind, p0[r], [g[r] for g in grads], frozen_until[r], **kw)
        torch.testing.assert_close(params["w"][r], ref, atol=1e-6, rtol=1e-6)
    if frozen_until[2] == steps:
        assert torch.equal(params["w"][2], p0[2])  # frozen: bitwise unchanged, weight decay included


def test_early_stopping_restore_best_and_per_step_scheduler_batched(tmp_path: Path) -> None:
    """Runs stop at their own epochs (the others go on), restore their own best weights, follow a cosine lr."""
    separate, batched = both_paths(tmp_path, "immediate", [0, 1, 2], epochs=8, lr=0.05, scheduler="cosine",
                                   early_stopping={"metric": "val_loss", "patience": 1})
    assert_same(separate, batched)
    stopped = [len([e for e in _events(b) if e["event"] == "epoch.completed"]) for b in batched]
    assert min(stopped) < 8, stopped  # at least one run stopped early: the case this test is about


def test_a_failed_check_ends_its_run_only(tmp_path: Path) -> None:
    """lr 1e-30 leaves run 1's weights bitwise unchanged: its weight-delta check fails, as in a separate run."""
    from moola_engine.errors import CheckFailed

    write_data(tmp_path / "d.npz")
    separate = train_batched([config(tmp_path, 1, "sep", lr=1e-30, epochs=3)], strategy="immediate")  # alone: fit
    cfgs = [config(tmp_path, s, "bat", lr=1e-30 if s == 1 else 0.01, epochs=3) for s in (0, 1, 2)]
    outcomes = train_batched(cfgs, strategy="immediate")
    assert isinstance(separate[0], CheckFailed) and isinstance(outcomes[1], CheckFailed)
    assert str(outcomes[1]) == str(separate[0])
    for out in (outcomes[0], outcomes[2]):
        assert isinstance(out, RunOutcome), out
        assert len([e for e in _events(out) if e["event"] == "epoch.completed"]) == 3
    failed_log = next((tmp_path / "bat").glob("*-s1"))
    events = read_events(failed_log / "events.jsonl")
    assert [e["event"] for e in events if e["event"] in ("batched.started", "run.failed")] == ["batched.started",
                                                                                              "run.failed"]
