"""kill -9, resume, compare: a run SIGKILLed at a step and resumed ends bitwise equal to one never interrupted.

Every strategy plugin in the registry is covered (built-ins and any added later),
with kill points right before, at and right after its first scheduled
transition plus a random step.  Each subprocess trains a 2-layer BiLSTM of
width 8 on 48 series for a few epochs, on CPU with one thread.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from moola_engine.checks.verify import verify_file
from moola_engine.config import structure, unstructure
from moola_engine.core.plan import compute_plan, validate_plan
from moola_engine.core.plugins import build_plugin_manager, load_strategies
from moola_engine.errors import MoolaError
from moola_engine.logs import read_events

pytestmark = pytest.mark.slow

KILLRUN = ROOT / "tests" / "killrun.py"
GROUPS = ["encoder.layer0", "encoder.layer1", "head"]
# parameters that put a built-in's transition inside a short run; other plugins use strategies.toml's
TEST_PARAMS: dict[str, dict[str, Any]] = {"two-phase": {"unfreeze_after": 2, "lr_scale": 0.5}}

CONFIG = """
[run]
console = "none"
[train]
epochs = {epochs}
batch_size = 8
lr = 0.01
seed = 3
scheduler = "{scheduler}"
plateau_patience = 0
device = "cpu"
threads = 1
early_stopping = {{metric = "val_loss", patience = 2}}
restore_best = true
[model.params]
hidden_size = 8
head_hidden = 8
num_layers = 2
[data]
path = "tiny.npz"
[checkpoint]
keep = 2
"""


def cases() -> list[tuple[str, dict[str, Any]]]:
    _, registry = build_plugin_manager()
    table = load_strategies(ROOT / "strategies.toml", registry)
    out = []
    for plugin in registry.names():
        from_toml = next((unstructure(n.params) for n in table.values() if n.plugin == plugin), {})
        out.append((plugin, TEST_PARAMS.get(plugin, from_toml)))
    return out


def schedule(plugin: str, params: dict[str, Any]) -> tuple[int, list[int]]:
    """Epochs for a run that keeps the strategy's promise, and its transition epochs after the start."""
    _, registry = build_plugin_manager()
    info = registry[plugin]
    for epochs in (5, 6, 8, 12):
        strat = info.factory(structure(params, info.params, source="test"))
        plan = compute_plan(strat, GROUPS, ["head"], epochs, 0.01, name=plugin)
        try:
            validate_plan(plan, strat, plugin)
        except MoolaError:
            continue
        return epochs, sorted({t["epoch"] for t in plan.transitions if t["epoch"] > 0})
    pytest.skip(f"{plugin}: no schedule within 12 epochs keeps its promise with params {params}")


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(KILLRUN), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONHASHSEED": "0", **env})


def workspace(tmp: Path, plugin: str, params: dict[str, Any], epochs: int, scheduler: str = "none") -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 8, 4)).astype("float32")
    np.savez(tmp / "tiny.npz", x=x, y=(x[:, :, 0].mean(1) > 0).astype("int64"))
    (tmp / "exp.toml").write_text(CONFIG.format(epochs=epochs, scheduler=scheduler))
    lines = [f'[strategy.s]\nplugin = "{plugin}"'] + [f"{k} = {json.dumps(v)}" for k, v in params.items() if v is not None]
    (tmp / "strategies.toml").write_text("\n".join(lines) + "\n")
    return tmp


def start(ws: Path, runs: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run(["--config", "exp.toml", "--strategy", "s", "--strategies", "strategies.toml", "--runs-dir", runs],
               ws, **env)


def only_run(ws: Path, runs: str) -> Path:
    [d] = [p for p in (ws / runs).iterdir() if p.is_dir() and not p.is_symlink()]
    return d


def final_state(run_dir: Path) -> dict[str, Any]:
    """What must be bitwise equal: last checkpoint's tensors and state, predictions, result."""
    last = sorted((run_dir / "checkpoints").glob("epoch-*"))[-1]
    meta = json.loads((last / "state.json").read_text())
    meta.pop("saved_at")
    preds = np.load(run_dir / "predictions.npz")
    result = json.loads((run_dir / "result.json").read_text())
    return {
        "checkpoint": last.name,
        "model": load_file(str(last / "model.safetensors")),
        "state": load_file(str(last / "state.safetensors")),
        "meta": meta,
        "predictions": {k: preds[k] for k in preds.files},
        "result": {k: v for k, v in result.items() if k not in ("seconds", "run_id")},
    }


def assert_bitwise_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["checkpoint"] == b["checkpoint"]
    for part in ("model", "state"):
        assert a[part].keys() == b[part].keys()
        diff = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert diff == [], f"{part}: tensors differ: {diff[:8]}"
    assert a["meta"] == b["meta"]
    assert a["predictions"].keys() == b["predictions"].keys()
    assert all(np.array_equal(a["predictions"][k], b["predictions"][k]) for k in a["predictions"])
    assert a["result"] == b["result"]


_REFS: dict[str, tuple[Path, dict[str, Any], int]] = {}


def reference(plugin: str, params: dict[str, Any], epochs: int, tmp_factory: Any) -> tuple[Path, dict[str, Any], int]:
    """The uninterrupted run (once per strategy): workspace, final state, steps per epoch."""
    if plugin not in _REFS:
        ws = workspace(tmp_factory.mktemp(f"ref-{plugin}"), plugin, params, epochs)
        proc = start(ws, "runs")
        if proc.returncode != 0 and "pretrained" in proc.stderr:
            pytest.skip(f"{plugin} needs pretrained weights: {proc.stderr.strip().splitlines()[-1]}")
        assert proc.returncode == 0, proc.stderr
        run_dir = only_run(ws, "runs")
        first = json.loads(next((run_dir / "checkpoints").glob("epoch-*/state.json")).read_text())
        per_epoch = first["step"] // first["next_epoch"]
        _REFS[plugin] = (ws, final_state(run_dir), per_epoch)
    return _REFS[plugin]


def kill_points(plugin: str, transitions: list[int], per_epoch: int, epochs: int) -> list[int]:
    rnd = random.Random(f"kill-{plugin}")
    if transitions:
        t = transitions[0] * per_epoch  # the first step after the transition
        points = [t - 1, t, t + 1]
    else:
        points = [(epochs - 1) * per_epoch]  # first step of the last epoch
    points.append(rnd.randrange(1, epochs * per_epoch))
    return sorted(set(points))


@pytest.mark.parametrize(("plugin", "params"), cases(), ids=[c[0] for c in cases()])
def test_kill_9_then_resume_is_bitwise_equal(plugin: str, params: dict[str, Any], tmp_path_factory: Any) -> None:
    epochs, transitions = schedule(plugin, params)
    ws, ref, per_epoch = reference(plugin, params, epochs, tmp_path_factory)
    points = kill_points(plugin, transitions, per_epoch, epochs)
    for step in points:
        runs = f"runs-kill-{step}"
        killed = start(ws, runs, MOOLA_KILL_AT_STEP=str(step))
        assert killed.returncode == -signal.SIGKILL, f"kill at step {step}: rc {killed.returncode}\n{killed.stderr}"
        run_dir = only_run(ws, runs)
        assert not (run_dir / "result.json").exists()
        resumed = run(["--resume", str(run_dir)], ws)
        assert resumed.returncode == 0, f"resume after kill at step {step}:\n{resumed.stderr}"
        assert_bitwise_equal(ref, final_state(run_dir))
        events = read_events(run_dir / "events.jsonl")
        names = [e["event"] for e in events]
        assert names.count("run.started") == 1 and names.count("run.resumed") == 1
        [resumed_event] = [e for e in events if e["event"] == "run.resumed"]
        checks = [e for e in events if e["event"] == "resume.check"]
        # Checkpoints are written in the background: the one of epoch e is complete by the end of epoch e + 1 at
        # the latest, so a kill during epoch 1 may find none yet (and start over, bitwise equal all the same).
        if step < per_epoch:  # killed before the first checkpoint: started over from step 0
            assert resumed_event["checkpoint"] is None and checks == []
        elif step < 2 * per_epoch and resumed_event["checkpoint"] is None:
            assert checks == []  # killed while epoch 0's checkpoint was being written: it never counted
        else:
            assert checks[0]["status"] == "ok" and checks[0]["actual"] == checks[0]["expected"]
        assert names[-1] == "run.finished"


def test_kill_while_publishing_a_checkpoint(tmp_path: Path) -> None:
    """SIGKILL between writing a checkpoint's files and the rename: the half-written one is never used."""
    params = TEST_PARAMS["two-phase"]
    epochs, _ = schedule("two-phase", params)
    ws = workspace(tmp_path, "two-phase", params, epochs)
    assert start(ws, "ref").returncode == 0
    killed = start(ws, "runs", MOOLA_KILL_IN_SAVE="2")
    assert killed.returncode == -signal.SIGKILL
    run_dir = only_run(ws, "runs")
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]  # the torn save
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("epoch-*")) == ["epoch-0000", "epoch-0001"]
    # resume through the real CLI this time
    cli = subprocess.run([sys.executable, "-m", "moola_engine.cli", "train", "--resume", str(run_dir)], cwd=ws,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert_bitwise_equal(final_state(only_run(ws, "ref")), final_state(run_dir))
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    again = subprocess.run([sys.executable, "-m", "moola_engine.cli", "train", "--resume", str(run_dir)], cwd=ws,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "this run finished (result.json exists); nothing to resume" in again.stderr
    mixed = subprocess.run([sys.executable, "-m", "moola_engine.cli", "train", "--resume", str(run_dir),
                            "--epochs", "9"], cwd=ws, capture_output=True, text=True, timeout=300)
    assert mixed.returncode == 2 and "--epochs: cannot be combined with --resume" in mixed.stderr


# --------------------------------------------------------------------------- every lr scheduler, kill -9 and Ctrl-C


@pytest.mark.parametrize("how", ["kill-9", "sigint"])
@pytest.mark.parametrize("scheduler", ["onecycle", "cosine", "plateau"])
def test_interrupted_then_resumed_with_a_scheduler_is_bitwise_equal(scheduler: str, how: str,
                                                                    tmp_path_factory: Any) -> None:
    """The lr schedule is part of the checkpoint: it goes on where it stopped, across the unfreeze."""
    plugin, params = "two-phase", TEST_PARAMS["two-phase"]
    epochs, transitions = schedule(plugin, params)
    key = f"{plugin}-{scheduler}"
    if key not in _REFS:
        ws = workspace(tmp_path_factory.mktemp(f"ref-{key}"), plugin, params, epochs, scheduler)
        proc = start(ws, "runs")
        assert proc.returncode == 0, proc.stderr
        run_dir = only_run(ws, "runs")
        first = json.loads(next((run_dir / "checkpoints").glob("epoch-*/state.json")).read_text())
        assert first["scheduler"]["kind"] == scheduler and first["scheduler"]["scheduler"] is not None
        _REFS[key] = (ws, final_state(run_dir), first["step"] // first["next_epoch"])
    ws, ref, per_epoch = _REFS[key]
    # kill -9 at the first step after the unfreeze, Ctrl-C one step later (each after a checkpoint)
    step = transitions[0] * per_epoch + (0 if how == "kill-9" else 1)
    runs = f"runs-{how}-{step}"
    env = {"MOOLA_KILL_AT_STEP" if how == "kill-9" else "MOOLA_SIGINT_AT_STEP": str(step)}
    stopped = start(ws, runs, **env)
    if how == "kill-9":
        assert stopped.returncode == -signal.SIGKILL, stopped.stderr
    else:
        assert stopped.returncode != 0 and "KeyboardInterrupt" in stopped.stderr, stopped.stderr
    run_dir = only_run(ws, runs)
    assert not (run_dir / "result.json").exists()
    resumed = run(["--resume", str(run_dir)], ws)
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(ref, final_state(run_dir))
    checks = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "resume.check"]
    assert checks and checks[0]["status"] == "ok"
    assert verify_file(run_dir).failures == []  # the interrupted attempt's run.failed was superseded: no false alarm
