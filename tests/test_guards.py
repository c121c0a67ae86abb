"""Guards: non-finite loss/gradients, a raising plugin, an unwritable or full run folder, a killed event log."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_engine, named
from test_checkpoint import build

from moola_engine import hookimpl
from moola_engine.errors import MoolaError, PluginError
from moola_engine.logs import RunLog, read_events
from moola_engine.runs.checkpoint import list_checkpoints
from moola_engine.runs.folders import create_run_dir


class PoisonGrad:
    """Adds inf to one tensor's gradient at one global step (a backward hook: only gradients go bad)."""

    def __init__(self, step: int, tensor: str) -> None:
        self.step, self.tensor, self.armed = step, tensor, False

    @hookimpl
    def on_fit_start(self, engine: Any) -> None:
        param = dict(engine.model.named_parameters())[self.tensor]
        param.register_hook(lambda g: g + float("inf") if self.armed else g)

    @hookimpl
    def before_step(self, step: int) -> None:
        self.armed = step == self.step


class PoisonInput:
    """Puts a NaN into the batch at one step: the loss and every trainable group's gradient go bad."""

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def before_step(self, step: int, batch: Any) -> None:
        if step == self.step:
            batch[0][0, 0, 0] = float("nan")


def test_nonfinite_gradient_names_step_and_group_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    runlog = RunLog(tmp_path / "events.jsonl", console="none", capture=True)
    engine = build(named("immediate"), tmp_path, epochs=4, extra=(PoisonGrad(9, "enc1.weight"),), runlog=runlog,
                   grad_guard="step")
    with pytest.raises(MoolaError, match=r"^non-finite gradient at step 9 \(epoch 2\) in group encoder.layer1 "
                                         r"\(first tensor: enc1.weight\); lower train.lr or set train.grad_clip; "
                                         r"last good checkpoint: .*epoch-0001$"):
        engine.fit()
    runlog.close()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-0000", "epoch-0001"]  # nothing poisoned saved
    [event] = [e for e in runlog.events if e["event"] == "nonfinite.detected"]
    assert {k: event[k] for k in ("what", "at_step", "groups", "tensor", "guard")} == {
        "what": "gradient", "at_step": 9, "groups": ["encoder.layer1"], "tensor": "enc1.weight", "guard": "step"}


def test_epoch_guard_names_the_epoch_and_the_weights_a_bad_gradient_reached(tmp_path: Path) -> None:
    # the default guard: no per-step gradient norms; the bad gradient of the epoch's last step (11) leaves
    # enc1.weight non-finite after the optimizer step, and the epoch-end probe of the trained weights finds it
    runlog = RunLog(tmp_path / "events.jsonl", console="none", capture=True)
    engine = build(named("immediate"), tmp_path, epochs=4, extra=(PoisonGrad(11, "enc1.weight"),), runlog=runlog)
    assert engine.config.grad_guard == "epoch"
    with pytest.raises(MoolaError, match=r"^non-finite weights after epoch 2 in group encoder.layer1 \(first tensor: "
                                         r"enc1.weight\): a gradient or update went non-finite in steps 8..11 \(set "
                                         r"train.grad_guard = \"step\" to name the step\); lower train.lr or set "
                                         r"train.grad_clip; last good checkpoint: .*epoch-0001$"):
        engine.fit()
    runlog.close()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-0000", "epoch-0001"]  # nothing poisoned saved
    [event] = [e for e in runlog.events if e["event"] == "nonfinite.detected"]
    assert {k: event[k] for k in ("what", "at_step", "groups", "tensor", "guard", "steps")} == {
        "what": "weights", "at_step": None, "groups": ["encoder.layer1"], "tensor": "enc1.weight", "guard": "epoch",
        "steps": [8, 11]}


def test_epoch_guard_names_the_first_bad_loss_after_a_bad_gradient(tmp_path: Path) -> None:
    # a bad gradient mid-epoch (step 9) makes the next step's loss non-finite: the epoch guard names that step
    engine = build(named("immediate"), tmp_path, epochs=4, extra=(PoisonGrad(9, "enc1.weight"),))
    with pytest.raises(MoolaError, match=r"^non-finite training loss at step 10 \(epoch 2\); weights non-finite in "
                                         r"group encoder.layer0, encoder.layer1, head \(first tensor: enc0.weight\)"):
        engine.fit()


@pytest.mark.parametrize(("guard", "kind"), [("step", "gradients"), ("epoch", "weights")])
def test_nonfinite_loss_names_step_and_every_group_it_reached(guard: str, kind: str) -> None:
    engine = make_engine(named("two-phase", unfreeze_after=1), epochs=3, extra=(PoisonInput(2),),
                         train_kwargs={"grad_guard": guard})
    with pytest.raises(MoolaError, match=rf"^non-finite training loss at step 2 \(epoch 0\); {kind} non-finite "
                                         r"in group head \(first tensor: head.weight\)"):
        engine.fit()


@pytest.mark.parametrize("guard", ["step", "epoch"])
def test_gradient_guard_is_quiet_on_a_healthy_run_and_on_frozen_groups(guard: str) -> None:
    engine = make_engine(named("frozen"), epochs=2, train_kwargs={"grad_guard": guard})
    engine.fit()  # frozen groups have grad None: never flagged
    assert engine.result.epochs_run == 2


def test_plugin_exception_names_plugin_and_hook() -> None:
    class Broken:
        @hookimpl(trylast=True)
        def on_epoch_end(self, epoch: int) -> None:
            if epoch == 1:
                raise ZeroDivisionError("boom")

    runlog = RunLog(None, console="none", capture=True)
    engine = make_engine(named("immediate"), epochs=3, extra=(Broken(),), runlog=runlog)
    with pytest.raises(PluginError, match=r'^plugin "extra-0" raised in hook on_epoch_end: ZeroDivisionError: boom$'):
        engine.fit()
    [event] = [e for e in runlog.events if e["event"] == "plugin.failed"]
    assert (event["plugin"], event["hook"], event["epoch"]) == ("extra-0", "on_epoch_end", 1)


# --------------------------------------------------------------------------- run folder before training


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_runs_dir_fails_before_training(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(MoolaError, match=r"cannot create it \(Permission denied\); nothing was trained"):
            create_run_dir(ro, "run1")
    finally:
        ro.chmod(0o755)


def test_unwritable_run_folder_fails_before_training(tmp_path: Path, monkeypatch: Any) -> None:
    # works as root too: the write probe itself is refused, as on a read-only mount
    real = Path.write_text

    def write_text(self: Path, *a: Any, **kw: Any) -> int:
        if self.name == ".write-probe":
            raise OSError(errno.EROFS, "Read-only file system")
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(MoolaError, match=r"run1: not writable \(Read-only file system\); nothing was trained"):
        create_run_dir(tmp_path, "run1")


def test_runs_dir_that_is_a_file_fails_before_training(tmp_path: Path) -> None:
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(MoolaError, match=r"run.runs_dir = .*runs': cannot create the runs folder"):
        create_run_dir(tmp_path / "runs", "run1")


def test_full_disk_fails_before_training(tmp_path: Path, monkeypatch: Any) -> None:
    import moola_engine.runs.folders as run

    monkeypatch.setattr(run.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(MoolaError, match=r"only 4 KiB free, need at least 32 MiB; nothing was trained"):
        create_run_dir(tmp_path, "run1")


def test_full_disk_stops_the_cli_before_any_data_or_training(tmp_path: Path, monkeypatch: Any,
                                                             capsys: Any) -> None:
    import moola_engine.runs.folders as run
    from moola_engine.cli import main

    cfg = tmp_path / "exp.toml"
    cfg.write_text(f'[run]\nruns_dir = "{tmp_path / "runs"}"\n[train]\nepochs = 2\n[data]\npath = "missing.npz"\n')
    monkeypatch.setattr(run.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    assert main(["train", "--config", str(cfg), "--strategy", "immediate"]) == 2
    err = capsys.readouterr().err
    assert "only 0 KiB free" in err and "Traceback" not in err
    assert not list((tmp_path / "runs").glob("*/events.jsonl"))  # failed before the log and the data


# --------------------------------------------------------------------------- the event log survives kill -9

_LOGGER = r"""
import os, signal, sys
from pathlib import Path
from moola_engine.logs import Event, RunLog
log = RunLog(Path(sys.argv[1]), console="none").logger
log.info(Event.RUN_STARTED, run_dir="x")
log.info(Event.FREEZE_TRANSITION, group="encoder", from_state="frozen", to_state="trainable", lr=0.1, reason="t")
log.info(Event.EPOCH_COMPLETED, train_loss=float("nan"))
os.kill(os.getpid(), signal.SIGKILL)   # no close(), no atexit, no buffer flush
"""


def test_event_log_survives_kill_9_and_is_append_only(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"event": "run.started", "note": "an earlier process"}) + "\n")
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _LOGGER, str(path)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    events = read_events(path)
    assert [e["event"] for e in events] == ["run.started"] + ["run.started", "freeze.transition",
                                                              "epoch.completed"] * 2
    assert events[0]["note"] == "an earlier process"
    assert events[3]["train_loss"] == "nan"  # still valid JSON


def test_read_events_skips_only_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "run.started"}\n{"event": "epoch.compl')
    assert [e["event"] for e in read_events(path)] == ["run.started"]
    path.write_text('{"event": "run.sta\n{"event": "run.started"}\n')
    with pytest.raises(MoolaError, match=r"events.jsonl:1: not a JSON event line"):
        read_events(path)


def test_poison_hook_is_inert_when_disarmed() -> None:
    # the gradient test's backward hook must not itself change a run
    a = make_engine(named("immediate"), epochs=2)
    a.fit()
    b = make_engine(named("immediate"), epochs=2, extra=(PoisonGrad(-1, "enc1.weight"),))
    b.fit()
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_epoch_guard_probes_trainable_weights_the_last_step_gave_no_gradient() -> None:
    # a branch the epoch's last step skipped has grad None, yet it trained earlier in the epoch
    engine = make_engine(named("immediate"), epochs=1, train_kwargs={"grad_guard": "epoch"})
    engine.fit()
    weight = engine.model.enc1.weight
    weight.grad = None
    with torch.no_grad():
        weight[0, 0] = float("nan")
    finite = [torch.tensor(0.5)]
    with pytest.raises(MoolaError, match=r"non-finite weights after epoch 7 in group encoder.layer1 "
                                         r"\(first tensor: enc1.weight\)"):
        engine._epoch_loss(finite, [16], 16, 7, 0, [])
