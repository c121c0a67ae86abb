"""Checkpoints and resume, in process (fast).  The kill -9 matrix is in test_kill_resume.py."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY_GROUPS, TinyNet, named, tiny_data

from moola_engine import hookimpl
from moola_engine.config import CheckpointConfig, EarlyStoppingConfig, TrainConfig
from moola_engine.core.engine import Engine
from moola_engine.core.plugins import build_plugin_manager, register_checked
from moola_engine.core.state import decode, encode, strategy_state
from moola_engine.errors import CheckFailed, CheckpointError
from moola_engine.logs import RunLog
from moola_engine.runs.checkpoint import Checkpointer, list_checkpoints
from moola_engine.runs.resume import ResumeState


class Killed(BaseException):
    """Stands in for SIGKILL in process: not an Exception, so no plugin wrapper catches it."""


class StopAt:
    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def before_step(self, step: int) -> None:
        if step == self.step:
            raise Killed


class Plateau:
    """Test strategy with a counter: unfreezes the encoder after ``wait`` epochs without val_loss improvement
    (at the latest from epoch ``max_epoch``, which is what a dry run plans)."""

    name = "plateau-test"

    def __init__(self, wait: int = 1, max_epoch: int = 4) -> None:
        self.wait = wait
        self.max_epoch = max_epoch
        self.best = math.inf
        self.bad_epochs = 0
        self.unfrozen = False

    @hookimpl
    def on_fit_start(self, engine: Any) -> None:
        for g in engine.freezer.encoder_groups:
            engine.freezer.freeze(g, reason="initial")

    @hookimpl
    def on_validation_end(self, engine: Any, epoch: int, metrics: Any) -> None:
        if self.unfrozen:
            return
        if metrics:
            if metrics["val_loss"] < self.best - 1e-9:
                self.best, self.bad_epochs = metrics["val_loss"], 0
            else:
                self.bad_epochs += 1
        if self.bad_epochs >= self.wait or epoch + 1 >= self.max_epoch:
            self.unfrozen = True
            for g in engine.freezer.encoder_groups:
                engine.freezer.unfreeze(g, lr_scale=0.5, reason="plateau")


class Forgetful(Plateau):
    """Loses its phase on resume (its state_dict omits it) and re-freezes: the Lightning 21901 failure."""

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]

    @hookimpl
    def on_epoch_start(self, engine: Any) -> None:
        if not self.unfrozen:
            for g in engine.freezer.encoder_groups:
                engine.freezer.freeze(g, reason="not yet")


def build(strategy: Any, tmp: Path, *, epochs: int = 5, extra: tuple[Any, ...] = (), keep: int = 3,
          every: int = 1, runlog: RunLog | None = None, **train: Any) -> Engine:
    """make_engine's TinyNet run, with a checkpointer writing to ``tmp``."""
    torch.manual_seed(0)
    pm, _ = build_plugin_manager()
    for i, plugin in enumerate((Checkpointer(tmp, CheckpointConfig(keep=keep, every=every)), *extra)):
        register_checked(pm, plugin, name=f"extra-{i}")
    register_checked(pm, strategy, name="strategy")
    cfg = TrainConfig(**{"epochs": epochs, "batch_size": 16, "lr": 0.05, "seed": 0, "device": "cpu", **train})
    return Engine(TinyNet(), train=cfg, groups=TINY_GROUPS, pm=pm, strategy=strategy, train_data=tiny_data(),
                  val_data=tiny_data(n=32, seed=100), logger=runlog.logger if runlog else None, run_dir=tmp)


def weights(engine: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert diff == [], f"tensors differ: {diff}"


def interrupted_then_resumed(make: Any, tmp: Path, kill_step: int, **kw: Any) -> Any:
    first = build(make(), tmp, extra=(StopAt(kill_step),), **kw)
    with pytest.raises(Killed):
        first.fit()
    second = build(make(), tmp, **kw)
    second.fit(start=ResumeState.latest(tmp))
    return second


# --------------------------------------------------------------------------- codec


def test_codec_round_trips_optimizer_rng_and_odd_containers() -> None:
    opt_like = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
                "param_groups": [{"params": [0], "lr": 0.1, "betas": (0.9, 0.999), "foreach": None}]}
    obj = {"opt": opt_like, "np": np.random.get_state(legacy=False), "t": (1, (2, 3.5), None), "__x": 1,
           "inf": math.inf}
    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps(encode(obj, "root", tensors))
    back = decode(json.loads(text), tensors)
    assert back["t"] == (1, (2, 3.5), None) and back["__x"] == 1 and back["inf"] == math.inf
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], opt_like["state"][0]["exp_avg"])
    assert back["np"]["state"]["key"].dtype == np.uint32
    assert np.array_equal(back["np"]["state"]["key"], obj["np"]["state"]["key"])


def test_strategy_state_default_is_json_safe_attributes_and_names_the_rest() -> None:
    s = Plateau()
    s.params = "ignored"
    s.lock = object()
    state, unsaved = strategy_state(s)
    assert state == {"wait": 1, "max_epoch": 4, "best": math.inf, "bad_epochs": 0, "unfrozen": False}
    assert unsaved == ["lock (object)"]


# --------------------------------------------------------------------------- writing


def test_checkpoints_every_epoch_keep_last_k_and_transition_reasons(tmp_path: Path) -> None:
    runlog = RunLog(tmp_path / "events.jsonl", console="none", capture=True)
    engine = build(named("two-phase", unfreeze_after=2, lr_scale=0.5), tmp_path, epochs=6, keep=2, every=3,
                   runlog=runlog)
    engine.fit()
    runlog.close()
    saved = {e["path"].rsplit("/", 1)[1]: e["reasons"] for e in runlog.events if e["event"] == "checkpoint.saved"}
    assert saved == {"epoch-0000": ["transition"], "epoch-0001": ["before-transition"],
                     "epoch-0002": ["every", "transition"], "epoch-0005": ["every", "last"]}
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-0002", "epoch-0005"]
    meta = json.loads((tmp_path / "checkpoints/epoch-0002/state.json").read_text())
    assert meta["freezer"]["trainable"] == {"encoder.layer0": True, "encoder.layer1": True, "head": True}
    assert meta["trainable_params"]["enc0.weight"] is True
    assert meta["lr"]["encoder.layer0"] == {"lr": 0.025, "lr_scale": 0.5}
    assert meta["next_epoch"] == 3 and meta["step"] == 12
    assert engine.last_checkpoint == tmp_path / "checkpoints/epoch-0005"


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: Any) -> None:
    import moola_engine.runs.checkpoint as ck

    engine = build(named("immediate"), tmp_path, epochs=4)
    real = ck.save_file
    calls = {"n": 0}

    def save_file(*a: Any, **kw: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 5:  # two save_file calls per checkpoint (model, state): the first of epoch 2
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*a, **kw)

    monkeypatch.setattr(ck, "save_file", save_file)
    with pytest.raises(CheckpointError, match=r"epoch-0002: No space left on device; the previous checkpoint .*"
                                              r"epoch-0001 is intact"):
        engine.fit()
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-0000", "epoch-0001"]
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no half-written folder left
    ResumeState.latest(tmp_path)  # and it still reads back


def test_checkpoints_are_written_on_a_background_thread_and_complete_when_fit_returns(tmp_path: Path,
                                                                                     monkeypatch: Any) -> None:
    import threading

    import moola_engine.runs.checkpoint as ck

    real = ck.write_checkpoint
    writers: list[tuple[str, bool]] = []

    def write_checkpoint(*a: Any, **kw: Any) -> Path:
        path = real(*a, **kw)
        writers.append((threading.current_thread().name, threading.current_thread() is threading.main_thread()))
        return path

    monkeypatch.setattr(ck, "write_checkpoint", write_checkpoint)
    runlog = RunLog(tmp_path / "events.jsonl", console="none", capture=True)
    engine = build(named("immediate"), tmp_path, epochs=3, runlog=runlog)
    engine.fit()
    runlog.close()
    assert writers == [("moola-checkpoint", False)] * 3
    assert not [t for t in threading.enumerate() if t.name == "moola-checkpoint"]  # fit waited for the last one
    saved = [e for e in runlog.events if e["event"] == "checkpoint.saved"]
    assert [Path(e["path"]).name for e in saved] == ["epoch-0000", "epoch-0001", "epoch-0002"]
    assert all(0 <= e["blocking_seconds"] <= e["seconds"] for e in saved)
    assert engine.last_checkpoint == tmp_path / "checkpoints/epoch-0002"
    ResumeState.latest(tmp_path)  # complete and readable


def test_a_failed_background_write_of_the_last_checkpoint_is_raised_by_fit(tmp_path: Path, monkeypatch: Any) -> None:
    import moola_engine.runs.checkpoint as ck

    real = ck.save_file

    def save_file(tensors: Any, path: str, *a: Any, **kw: Any) -> None:
        if "epoch-0002" in path:
            raise OSError(errno.EIO, "Input/output error")
        real(tensors, path, *a, **kw)

    monkeypatch.setattr(ck, "save_file", save_file)
    engine = build(named("immediate"), tmp_path, epochs=3)
    with pytest.raises(CheckpointError, match=r"epoch-0002: Input/output error; the previous checkpoint .*epoch-0001"):
        engine.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-0000", "epoch-0001"]
    assert engine.last_checkpoint == tmp_path / "checkpoints/epoch-0001"


def test_a_failing_run_waits_for_its_write_and_logs_a_failed_one_under_its_own_error(tmp_path: Path,
                                                                                   monkeypatch: Any) -> None:
    import moola_engine.runs.checkpoint as ck

    real = ck.save_file

    def save_file(tensors: Any, path: str, *a: Any, **kw: Any) -> None:
        if "epoch-0001" in path:
            raise OSError(errno.EIO, "Input/output error")
        real(tensors, path, *a, **kw)

    # the run stops (Killed) at step 10, in epoch 2 (4 steps an epoch), after epoch 1's checkpoint was handed to
    # the writer
    runlog = RunLog(tmp_path / "events.jsonl", console="none", capture=True)
    first = build(named("immediate"), tmp_path, epochs=4, extra=(StopAt(10),), runlog=runlog)
    with pytest.raises(Killed):
        first.fit()
    assert first.last_checkpoint == tmp_path / "checkpoints/epoch-0001"  # waited for, before fit raised
    monkeypatch.setattr(ck, "save_file", save_file)
    second = build(named("immediate"), tmp_path / "b", epochs=4, extra=(StopAt(10),), runlog=runlog)
    with pytest.raises(Killed):  # the run's own error wins over the failed write ...
        second.fit()
    runlog.close()
    failed = [e for e in runlog.events if e["event"] == "checkpoint.failed"]
    assert len(failed) == 1 and "epoch-0001: Input/output error" in failed[0]["error"]  # ... which is logged
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["epoch-0000"]


# --------------------------------------------------------------------------- resuming


@pytest.mark.parametrize("kill_step", [7, 8, 9, 13])  # unfreeze at epoch 2 = step 8 (4 steps per epoch)
def test_resume_across_unfreeze_is_bitwise_equal(tmp_path: Path, kill_step: int) -> None:
    def make() -> Any:
        return named("two-phase", unfreeze_after=2, lr_scale=0.5)

    ref = build(make(), tmp_path / "ref")
    ref.fit()
    resumed = interrupted_then_resumed(make, tmp_path / "run", kill_step)
    assert_same(weights(ref), weights(resumed))
    assert resumed.history == ref.history
    assert resumed.freezer.state() == ref.freezer.state()
    a, b = ref.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k])


def test_resume_restores_early_stopping_and_best_weights(tmp_path: Path) -> None:
    es = {"early_stopping": EarlyStoppingConfig(metric="val_loss", patience=2), "restore_best": True,
          "lr": 0.5, "optimizer": "sgd"}

    def make() -> Any:
        return named("immediate")

    ref = build(make(), tmp_path / "ref", epochs=8, **es)
    r1 = ref.fit()
    resumed = interrupted_then_resumed(make, tmp_path / "run", 4 * 5 + 1, epochs=8, **es)
    assert r1.stopped_early == resumed.result.stopped_early
    assert (r1.best_epoch, r1.epochs_run) == (resumed.result.best_epoch, resumed.result.epochs_run)
    assert_same(weights(ref), weights(resumed))  # the restored best weights


def test_plateau_counter_strategy_round_trips(tmp_path: Path) -> None:
    ref = build(Plateau(), tmp_path / "ref", epochs=6, lr=0.5)
    ref.fit()
    unfreeze = [t.epoch for t in ref.freezer.history if t.to_state == "trainable"]
    assert unfreeze, "the test needs the plateau to fire"
    resumed = interrupted_then_resumed(Plateau, tmp_path / "run", 4 * unfreeze[0] + 6, epochs=6, lr=0.5)
    assert_same(weights(ref), weights(resumed))
    assert resumed.strategy.unfrozen and resumed.strategy.bad_epochs == ref.strategy.bad_epochs


def test_resume_check_catches_a_strategy_that_refreezes_on_resume(tmp_path: Path) -> None:
    ref = build(Forgetful(), tmp_path / "ref", epochs=6, lr=0.5)
    ref.fit()
    unfreeze = next(t.epoch for t in ref.freezer.history if t.to_state == "trainable")
    first = build(Forgetful(), tmp_path / "run", epochs=6, lr=0.5, extra=(StopAt(4 * (unfreeze + 1) + 1),))
    with pytest.raises(Killed):
        first.fit()
    runlog = RunLog(tmp_path / "events.jsonl", console="none", capture=True)
    second = build(Forgetful(), tmp_path / "run", epochs=6, lr=0.5, runlog=runlog)
    w = weights(second)
    with pytest.raises(CheckFailed, match=r"resume check failed at epoch \d after restoring .*epoch-\d+: "
                                          r"group encoder.layer0 is frozen but the strategy says trainable"):
        second.fit(start=ResumeState.latest(tmp_path / "run"))
    runlog.close()
    check = [e for e in runlog.events if e["event"] == "resume.check"]
    assert check[0]["status"] == "mismatch" and check[0]["expected"]["encoder.layer0"] is True
    assert not all(torch.equal(w[k], v) for k, v in weights(second).items())  # the checkpoint was restored
    assert second.step == 4 * (unfreeze + 1)  # no step ran after the check


def test_resume_refuses_unsaved_strategy_state_by_name(tmp_path: Path) -> None:
    class Holds(Plateau):
        @hookimpl
        def on_fit_start(self, engine: Any) -> None:
            self.engine = engine

    first = build(Holds(), tmp_path, extra=(StopAt(6),))
    with pytest.raises(Killed):
        first.fit()
    with pytest.raises(CheckpointError, match=r"keeps state that was not saved: engine \(Engine\); give it "
                                              r"state_dict\(\)/load_state_dict\(\)"):
        build(Holds(), tmp_path).fit(start=ResumeState.latest(tmp_path))


def test_resume_refuses_other_settings_and_corrupt_files(tmp_path: Path) -> None:
    first = build(named("immediate"), tmp_path, extra=(StopAt(6),))
    with pytest.raises(Killed):
        first.fit()
    with pytest.raises(CheckpointError, match=r"train.epochs: checkpoint 5, this run 7"):
        build(named("immediate"), tmp_path, epochs=7).fit(start=ResumeState.latest(tmp_path))
    blob = tmp_path / "checkpoints/epoch-0000/model.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"epoch-0000/model.safetensors: missing or corrupt"):
        ResumeState.latest(tmp_path)


def test_no_checkpoint_to_resume_from(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        ResumeState.latest(tmp_path)


# --------------------------------------------------------------------------- lr schedulers and the engine's state


@pytest.mark.parametrize("scheduler", ["onecycle", "cosine", "plateau"])
@pytest.mark.parametrize("kill_step", [7, 9])  # unfreeze at epoch 2 = step 8: right before and after it
def test_resume_with_a_scheduler_across_unfreeze_is_bitwise_equal(tmp_path: Path, scheduler: str,
                                                                  kill_step: int) -> None:
    # plateau: mode "max" on a falling val_loss halves the lr after every epoch but the first, so it acts before
    # each kill point
    sched = {"scheduler": scheduler, "plateau_patience": 0, "scheduler_mode": "max", "epochs": 5}

    def make() -> Any:
        return named("two-phase", unfreeze_after=2, lr_scale=0.5)

    ref = build(make(), tmp_path / "ref", **sched)
    ref.fit()
    assert ref.optimizer.param_groups[-1]["lr"] < 0.05 * 0.9  # the schedule acted (head: base lr x scale 1)
    resumed = interrupted_then_resumed(make, tmp_path / "run", kill_step, **sched)
    assert_same(weights(ref), weights(resumed))
    assert resumed.history == ref.history
    assert resumed.lr_schedule.state_dict() == ref.lr_schedule.state_dict()
    assert [pg["lr"] for pg in resumed.optimizer.param_groups] == [pg["lr"] for pg in ref.optimizer.param_groups]
    meta = json.loads((list_checkpoints(tmp_path / "run")[-1] / "state.json").read_text())
    assert meta["scheduler"]["kind"] == scheduler and meta["scheduler"]["scheduler"] is not None


def test_old_checkpoint_without_scheduler_state_is_refused_when_a_scheduler_is_configured(tmp_path: Path) -> None:
    first = build(named("immediate"), tmp_path, extra=(StopAt(9),), scheduler="cosine")
    with pytest.raises(Killed):
        first.fit()
    last = list_checkpoints(tmp_path)[-1]
    meta = json.loads((last / "state.json").read_text())
    meta["scheduler"] = None  # what every checkpoint written before the fix holds
    (last / "state.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="no lr scheduler state.*cosine"):
        build(named("immediate"), tmp_path, scheduler="cosine").fit(start=ResumeState(last))
    # without a scheduler, the same old checkpoint still resumes
    plain = build(named("immediate"), tmp_path / "plain", extra=(StopAt(9),))
    with pytest.raises(Killed):
        plain.fit()
    last = list_checkpoints(tmp_path / "plain")[-1]
    meta = json.loads((last / "state.json").read_text())
    meta["scheduler"] = None
    (last / "state.json").write_text(json.dumps(meta))
    build(named("immediate"), tmp_path / "plain").fit(start=ResumeState(last))


def test_engine_state_dict_round_trips_without_a_checkpoint_file() -> None:
    """The engine owns its resumable state: a second engine loaded from the first's state_dict continues alike."""
    from conftest import make_engine

    cfg = {"scheduler": "onecycle"}
    a = make_engine(named("two-phase", unfreeze_after=1, lr_scale=0.5), epochs=4, train_kwargs=cfg)
    a.fit()
    state = a.state_dict()
    assert {"step", "epoch", "history", "freezer", "optimizer", "scheduler", "rng", "early_stopping",
            "strategy"} <= set(state)
    assert state["scheduler"]["scheduler"]["_step_count"] == a.lr_schedule.scheduler._step_count
    b = make_engine(named("two-phase", unfreeze_after=1, lr_scale=0.5), epochs=4, train_kwargs=cfg)
    b.model.load_state_dict(a.model.state_dict())
    b.load_state_dict(state)
    assert b.step == a.step and b.history == a.history
    assert b.lr_schedule.state_dict() == a.lr_schedule.state_dict()
    assert torch.equal(b.rng_state()["engine"], a.rng_state()["engine"])
    assert b.freezer.state() == a.freezer.state()
