"""Metric and event sinks: csv (metrics.csv), TensorBoard and MLflow read back with their own readers, a failing sink."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
from test_verify import project

from moola_engine import hookimpl
from moola_engine.config import ConfigError, SinkConfig, load_config
from moola_engine.logs import read_events
from moola_engine.runs.resume import run_config
from moola_engine.runs.train import train

ROOT = Path(__file__).resolve().parent.parent


def with_sinks(cfg: Any, *sinks: SinkConfig) -> Any:
    return attrs.evolve(cfg, sinks=list(sinks))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_tensorboard_event_file_has_the_scalars_and_the_transition_markers(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = with_sinks(load_config(project(tmp_path, epochs=3)), SinkConfig(name="tensorboard"),
                     SinkConfig(name="csv"))
    out = train(cfg, strategy="two_phase")
    acc = EventAccumulator(str(out.run_dir / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    history = {int(r["epoch"]): r for r in read_csv(out.run_dir / "metrics.csv")}
    loss = acc.Scalars("val_loss")
    assert [s.step for s in loss] == [0, 1, 2]
    assert [s.value for s in loss] == pytest.approx([float(history[e]["val_loss"]) for e in range(3)], rel=1e-5)
    assert [s.value for s in acc.Scalars("trainable/encoder.layer0")] == [0.0, 1.0, 1.0]
    assert [s.value for s in acc.Scalars("trainable/head")] == [1.0, 1.0, 1.0]
    # text summaries are stored as tensors under "<tag>/text_summary"
    text_tag = next(t for t in tags["tensors"] if t.startswith("freeze.transition"))
    texts = [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(text_tag)]
    assert texts == [(0, "epoch 0: encoder.layer0 trainable -> frozen, lr 0.01 (phase 1: head only)"),
                     (1, "epoch 1: encoder.layer0 frozen -> trainable, lr 0.005 (unfreeze_after)")]


def test_mlflow_run_in_a_local_file_store_has_metrics_params_and_transitions(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    cfg = with_sinks(load_config(project(tmp_path, epochs=3)),
                     SinkConfig(name="mlflow", options={"tracking_uri": uri, "experiment": "tiny"}))
    out = train(cfg, strategy="two_phase")
    assert not [e for e in read_events(out.run_dir / "events.jsonl") if e["event"] == "sink.failed"]
    assert not (out.run_dir / "metrics.csv").exists()  # the [[sinks]] list replaced the default csv
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["moola.run_id"] == out.run_id
    assert run.data.params["strategy.plugin"] == "two-phase" and run.data.params["strategy.unfreeze_after"] == "1"
    val_loss = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in sorted(val_loss, key=lambda m: m.step)] == [0, 1, 2]
    assert sorted(val_loss, key=lambda m: m.step)[-1].value == pytest.approx(out.fit.history[-1]["val_loss"])
    trainable = sorted(client.get_metric_history(run.info.run_id, "trainable.encoder.layer0"), key=lambda m: m.step)
    assert [m.value for m in trainable] == [0.0, 1.0, 1.0]
    assert run.data.tags["freeze.01"] == "epoch 1: encoder.layer0 frozen -> trainable, lr 0.005 (unfreeze_after)"
    local = client.download_artifacts(run.info.run_id, "freeze_transitions.txt", str(tmp_path))
    assert Path(local).read_text().splitlines()[0].startswith("epoch 0: encoder.layer0 trainable -> frozen")


class FlakySink:
    """A sink that raises on its second epoch."""

    def __init__(self, params: Any, run: Any) -> None:
        self.seen: list[str] = []

    def write(self, event: dict[str, Any]) -> None:
        if event.get("event") == "epoch.completed" and event["epoch"] == 1:
            raise OSError("disk on fire")
        self.seen.append(event["event"])

    def close(self) -> None:
        raise AssertionError("close() of a dropped sink must not be reported again")


class BrokenOpen:
    def __init__(self, params: Any, run: Any) -> None:
        raise ConnectionError("tracking server unreachable")


class TestSinks:
    @hookimpl
    def register_sinks(self, register: Any) -> None:
        register("flaky", FlakySink)
        register("broken", BrokenOpen)


def test_a_failing_sink_is_reported_once_disabled_and_the_log_stays_complete(tmp_path: Path) -> None:
    base = load_config(project(tmp_path, epochs=3))
    ref = train(base, strategy="two_phase")
    cfg = with_sinks(base, SinkConfig(name="flaky"), SinkConfig(name="broken"), SinkConfig(name="csv"))
    out = train(cfg, strategy="two_phase", extra_plugins=(TestSinks(),))
    events = read_events(out.run_dir / "events.jsonl")
    failed = [e for e in events if e["event"] == "sink.failed"]
    assert [(e["sink"], e["during"], e["error"]) for e in failed] == [
        ("broken", "opening", "ConnectionError: tracking server unreachable"),
        ("flaky", "writing epoch.completed", "OSError: disk on fire"),
    ]
    assert all(e["level"] == "warning" for e in failed)
    # the run finished, every epoch is in the log and in metrics.csv (the other sinks went on)
    names = [e["event"] for e in events if e["event"] != "sink.failed"]
    assert names == [e["event"] for e in read_events(ref.run_dir / "events.jsonl")]
    assert [int(r["epoch"]) for r in read_csv(out.run_dir / "metrics.csv")] == [0, 1, 2]
    assert names[-1] == "run.finished"


def test_sinks_config_errors_name_the_file_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = project(tmp_path, epochs=2)
    with open(path, "a") as fh:
        fh.write('\n[[sinks]]\nname = "tensorbord"\n\n[[sinks]]\nname = "csv"\nevery = 2\n')
    cfg = load_config(path)
    with pytest.raises(ConfigError) as err:
        train(cfg, strategy="two_phase")
    text = str(err.value)
    assert str(path) in text
    assert 'unknown sink "tensorbord" @ $.sinks[0].name' in text and 'did you mean "tensorboard"?' in text
    assert "extra fields found (every) @ $.sinks[1]" in text
    assert not (tmp_path / "runs").exists()  # refused before any run folder
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the Python package\(s\) mlflow \(pip install 'moola-engine\[mlflow\]'\)"):
        train(with_sinks(cfg, SinkConfig(name="mlflow")), strategy="two_phase")


def test_metrics_csv_of_a_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    cfg_path = project(tmp_path, epochs=3)
    ref = train(load_config(cfg_path), strategy="two_phase")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "killrun.py"), "--config", str(cfg_path),
                           "--strategy", "two_phase"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MOOLA_KILL_AT_STEP": "12"})
    assert proc.returncode == -9, proc.stderr
    killed = (tmp_path / "runs" / "latest").resolve()
    assert [int(r["epoch"]) for r in read_csv(killed / "metrics.csv")] == [0, 1]  # written per epoch: kept
    (killed / "metrics.csv").unlink()  # the resumed run's rows before its checkpoint come from the checkpoint
    train(run_config(killed), resume=killed)
    assert (killed / "metrics.csv").read_text() == (ref.run_dir / "metrics.csv").read_text()
    assert json.loads((killed / "result.json").read_text())["epochs_run"] == 3


def test_a_sink_registered_with_a_misspelled_keyword_is_refused_naming_it_and_what_register_takes() -> None:
    from moola_engine.core.plugins import new_plugin_manager
    from moola_engine.errors import PluginError
    from moola_engine.runs.sinks import collect_sinks

    class Typo:
        @hookimpl
        def register_sinks(self, register: Any) -> None:
            register("tb2", lambda params, run: None, requries=("tensorboard",))

    pm = new_plugin_manager()
    pm.register(Typo(), name="typo-plugin")
    with pytest.raises(PluginError) as err:
        collect_sinks(pm)
    assert str(err.value) == ('sink "tb2" from typo-plugin: unknown keyword argument(s) requries of register; '
                              "it takes params, description, requires, extra")


def test_a_registered_sink_keeps_what_it_needs_installed() -> None:
    from moola_engine.core.plugins import build_plugin_manager
    from moola_engine.runs.sinks import NoSinkParams, collect_sinks

    registry = collect_sinks(build_plugin_manager()[0])
    assert registry["tensorboard"].fields == {"requires": ("tensorboard",), "extra": "tensorboard"}
    assert registry["csv"].fields == {"requires": (), "extra": None}
    assert registry["csv"].params is NoSinkParams
