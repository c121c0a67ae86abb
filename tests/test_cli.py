"""The CLI end to end on a tiny .npz dataset: train, plan, strategies list, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from moola_engine.cli import main
from moola_engine.logs import Event, read_events

STRATEGIES = str(ROOT / "strategies.toml")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6, 4)).astype("float32")
    y = (x[:, :, 0].mean(axis=1) > 0).astype("int64")
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=x[:20], y_test=y[:20])
    (tmp_path / "exp.toml").write_text(
        '[run]\nruns_dir = "runs"\nconsole = "none"\n'
        "[train]\nepochs = 4\nbatch_size = 16\nthreads = 1\n"
        "[model]\nparams = {hidden_size = 8, head_hidden = 4}\n"
        '[data]\nkind = "npz"\npath = "d.npz"\n'
    )
    return tmp_path


def test_train_writes_run_folder_with_declared_events(project: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(project)
    (project / "s.toml").write_text('[strategy.tp]\nplugin = "two-phase"\nunfreeze_after = 2\n')
    assert main(["train", "--config", "exp.toml", "--strategies", "s.toml", "--strategy", "tp"]) == 0
    run = next((project / "runs").glob("*-tp-s0"))
    assert {p.name for p in run.iterdir()} >= {"events.jsonl", "config.json", "metrics.csv", "result.json",
                                               "predictions.npz"}
    events = read_events(run / "events.jsonl")
    names = [e["event"] for e in events]
    assert set(names) <= {e.value for e in Event}
    assert names[0] == "run.started" and names[-1] == "run.finished"
    transitions = [(e["group"], e["to_state"], e["epoch"]) for e in events if e["event"] == "freeze.transition"]
    assert transitions == [("encoder.layer0", "frozen", 0), ("encoder.layer0", "trainable", 2)]
    assert all(e["run_id"] == run.name and e["strategy"] == "tp" for e in events)
    result = json.loads((run / "result.json").read_text())
    assert result["epochs_run"] == 4 and 0.0 <= result["test"]["test_accuracy"] <= 1.0
    assert "run folder:" in capsys.readouterr().out


def test_schedule_that_never_unfreezes_is_refused_before_any_data(project: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(project)
    (project / "d.npz").unlink()  # would fail loudly if data were loaded
    code = main(["train", "--config", "exp.toml", "--strategies", STRATEGIES, "--strategy", "two_phase"])
    assert code == 2
    assert capsys.readouterr().err == (
        "error: strategy two_phase: unfreeze_after = 10 but training runs 4 epochs: the encoder would never train.\n"
        '       Use strategy "frozen" for a frozen encoder, or pass --allow never-unfreeze.\n'
    )
    assert not (project / "runs").exists()


def test_allow_override_is_recorded(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    args = ["train", "--config", "exp.toml", "--strategies", STRATEGIES, "--strategy", "two_phase",
            "--allow", "never-unfreeze"]
    assert main(args) == 0
    events = read_events(project / "runs" / "latest" / "events.jsonl")
    overrides = [e for e in events if e["event"] == "config.override"]
    assert len(overrides) == 1 and overrides[0]["allow"] == "never-unfreeze"
    assert "unfreeze_after = 10 but training runs 4 epochs" in overrides[0]["message"]


def test_config_error_is_one_clear_line(project: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(project)
    (project / "bad.toml").write_text('[train]\nepochs = "many"\n')
    assert main(["train", "--config", "bad.toml", "--strategy", "immediate"]) == 2
    assert capsys.readouterr().err == "error: bad.toml: invalid value, expected an integer, got str 'many' @ $.train.epochs\n"


def test_plan_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--strategies", STRATEGIES, "--strategy", "two_phase", "--epochs", "30"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "strategy two_phase: 30 epochs, base lr 0.001"
    assert out[1].split() == ["epochs", "encoder.layer0", "head"]
    assert out[2].split() == ["0-9", "frozen", "train", "0.001"]
    assert out[3].split() == ["10-29", "train", "0.0003", "train", "0.001"]


def test_strategies_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["strategies", "--strategies", STRATEGIES, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in data["strategies"]}
    assert rows["two_phase"]["plugin"] == "two-phase"
    assert rows["two_phase"]["source"].startswith("moola-engine")


def test_misspelled_allow_is_an_error_not_ignored(project: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(project)
    args = ["train", "--config", "exp.toml", "--strategies", STRATEGIES, "--strategy", "two_phase",
            "--allow", "never-unfreze"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --allow: unknown override 'never-unfreze'; known: late-transition, never-unfreeze, no-phase")
    assert not (project / "runs").exists()
