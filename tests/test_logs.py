"""The event log through the real processor chain."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import make_engine, named

from moola_engine.errors import MoolaError
from moola_engine.logs import Event, RunLog, bind, read_events


def test_freeze_transition_event_dict_exact(tmp_path: Path) -> None:
    runlog = RunLog(tmp_path / "events.jsonl", console="none", capture=True)
    bind(run_id="r1", strategy="tp")
    engine = make_engine(named("two-phase", unfreeze_after=1, lr_scale=0.5), epochs=2, runlog=runlog)
    engine.fit()
    runlog.close()
    written = read_events(tmp_path / "events.jsonl")
    assert [e["event"] for e in written] == [e["event"] for e in runlog.events]
    transitions = [e for e in written if e["event"] == Event.FREEZE_TRANSITION]
    for e in transitions:
        assert e.pop("timestamp").endswith("Z")
    assert transitions[2] == {
        "event": "freeze.transition", "level": "info", "run_id": "r1", "strategy": "tp", "epoch": 1, "step": 4,
        "group": "encoder.layer0", "from_state": "frozen", "to_state": "trainable", "lr": 0.005,
        "reason": "unfreeze_after",
    }


def test_console_is_pretty_and_filtered_json_is_complete(tmp_path: Path) -> None:
    out = io.StringIO()
    runlog = RunLog(tmp_path / "e.jsonl", console="pretty", stream=out)
    runlog.logger.debug(Event.CONFIG_LOADED, config={"a": 1})
    runlog.logger.info(Event.EPOCH_COMPLETED, val_loss=float("nan"))
    runlog.close()
    text = out.getvalue()
    assert "config.loaded" not in text and "epoch.completed" in text
    lines = (tmp_path / "e.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["config.loaded", "epoch.completed"]
    assert json.loads(lines[1])["val_loss"] == "nan"  # JSON has no NaN: written as a string, line stays valid


def test_non_finite_values_anywhere_in_an_event_become_strings(tmp_path: Path) -> None:
    import numpy as np
    import torch

    runlog = RunLog(tmp_path / "e.jsonl", console="none")
    runlog.logger.info(Event.WEIGHT_DELTA_CHECK, ok=True, groups={"a": [1.0, float("inf")]}, fine=0.5)
    runlog.logger.info(Event.EPOCH_COMPLETED, t=torch.tensor(float("nan")), n=np.float32("-inf"), k=np.int64(3))
    runlog.logger.info(Event.EPOCH_COMPLETED, pair=(1.0, float("nan")), seen={float("inf")},
                       by={float("nan"): 1}, arr=np.array([0.5, np.nan]), ten=torch.tensor([float("-inf"), 2.0]))
    runlog.close()
    first, second, third = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert first["groups"] == {"a": [1.0, "inf"]} and first["fine"] == 0.5
    assert (second["t"], second["n"], second["k"]) == ("nan", "-inf", 3)  # scalars of torch and numpy too
    assert third["pair"] == [1.0, "nan"] and third["seen"] == ["inf"] and third["by"] == {"nan": 1}
    assert third["arr"] == [0.5, "nan"] and third["ten"] == ["-inf", 2.0]  # arrays of numpy and torch


def test_torn_last_line_is_skipped_but_a_torn_middle_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "run.started"}\n{"event": "epoch.comp')
    assert [e["event"] for e in read_events(path)] == ["run.started"]
    path.write_text('{"event": "run.started"}\n{"event": "epoch.comp\n{"event": "run.finished"}\n')
    with pytest.raises(MoolaError, match="events.jsonl:2: not a JSON event line"):
        read_events(path)
