"""End to end: train() writes the log, `moola-engine verify` re-reads it; expectations, control runs, red flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_weights import H, trained_encoder

from moola_engine.checks.redflags import (
    compare_to_control,
    constant_predictions,
    outputs_identical,
    predictions_identical,
    raise_red_flags,
)
from moola_engine.checks.verify import load_expectations
from moola_engine.cli import main
from moola_engine.config import load_config
from moola_engine.errors import ConfigError
from moola_engine.logs import RunLog
from moola_engine.runs.train import train
from moola_engine.testing import assert_run
from moola_ohlc.models import SimpleLSTM

STRATEGIES = """
[strategy.two_phase]
plugin = "two-phase"
unfreeze_after = 1
lr_scale = 0.5

[strategy.late]
plugin = "two-phase"
unfreeze_after = 5

[strategy.frozen]
plugin = "frozen"
"""


def project(tmp_path: Path, *, pretrained: str = "", epochs: int = 3) -> Path:
    """A tiny experiment folder: data.npz, strategies.toml, experiment.toml (SimpleLSTM, hidden 8, CPU)."""
    g = np.random.default_rng(0)
    x = g.normal(size=(48, 6, 4)).astype(np.float32)
    y = (x[:, :, 0].mean(axis=1) > 0).astype(np.int64)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    (tmp_path / "strategies.toml").write_text(STRATEGIES)
    cfg = tmp_path / "experiment.toml"
    cfg.write_text(f"""
[run]
strategies_file = "strategies.toml"
runs_dir = "{tmp_path / 'runs'}"
console = "none"

[train]
epochs = {epochs}
batch_size = 8
lr = 0.01
device = "cpu"
threads = 1

[model]
params = {{ hidden_size = {H} }}
{pretrained}

[data]
path = "data.npz"
""")
    return cfg


PRETRAINED = """
[model.pretrained]
path = "enc.safetensors"
lstm_layers = [0]
"""


def write_encoder(tmp_path: Path) -> None:
    save_file({f"lstm.{k}": v.detach().contiguous() for k, v in trained_encoder().state_dict().items()},
              str(tmp_path / "enc.safetensors"))


def verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["verify", *args])
    return code, capsys.readouterr().out


def test_ci_lines_pass_on_a_good_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_encoder(tmp_path)
    outcome = train(load_config(project(tmp_path, pretrained=PRETRAINED)), strategy="two_phase")
    (tmp_path / "expect.toml").write_text("""
[[expect]]
group = "encoder.layer0"
trainable_from_epoch = 1
frozen_before = 1
moves_after = 1

[[expect]]
group = "head"
moves_after = 0

[weights]
min_loaded = 8
""")
    code, out = verify(capsys, str(outcome.run_dir / "events.jsonl"), "--expect", str(tmp_path / "expect.toml"))
    assert code == 0, out
    assert out.startswith(f"ok: {outcome.run_dir / 'events.jsonl'}: checks: ")
    assert "weights: 8 tensors loaded (exact)" in out
    events = [json.loads(line) for line in (outcome.run_dir / "events.jsonl").read_text().splitlines()]
    wd = [e for e in events if e["event"] == "weight_delta.check" and e["group"] == "encoder.layer0"
          and e["scope"] == "interval"]
    assert [(e["epoch"], e["expected"], e["moved"]) for e in wd] == [(0, "zero", False), (1, "nonzero", True),
                                                                     (2, "nonzero", True)]
    assert wd[0]["from_pretrained"] == 0.0 and wd[2]["from_pretrained"] > wd[1]["from_pretrained"] > 0
    assert_run(outcome.run_dir, tmp_path / "expect.toml")  # the pytest helper agrees


def test_unmet_expectations_fail_with_one_line_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_encoder(tmp_path)
    outcome = train(load_config(project(tmp_path, pretrained=PRETRAINED)), strategy="two_phase")
    (tmp_path / "expect.toml").write_text("""
[[expect]]
group = "encoder.layer0"
trainable_from_epoch = 2
frozen_before = 2
moves_after = 4

[[expect]]
group = "encoder"

[weights]
min_loaded = 9
""")
    code, out = verify(capsys, str(outcome.run_dir), "--expect", str(tmp_path / "expect.toml"))
    assert code == 1
    assert out.splitlines() == [
        "FAIL weights: 8 tensor(s) loaded, expected at least 9",
        "FAIL encoder.layer0: expected trainable from epoch 2, but it first trained in epoch 1",
        "FAIL encoder.layer0: expected frozen before epoch 2, but its weights moved in epoch(s) 1",
        "FAIL encoder.layer0: expected to move from epoch 4 on, but the run ended after epoch 2",
        "FAIL expect: group 'encoder' is not a group of this run (groups: encoder.layer0, head)",
        f"verify: 5 failure(s) in {outcome.run_dir / 'events.jsonl'}",
    ]


def test_seed_bug_run_with_override_fails_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # silent failure 1 in CI: the schedule override let the run through; the expectation catches it
    cfg = load_config(project(tmp_path))
    import attrs

    cfg = attrs.evolve(cfg, run=attrs.evolve(cfg.run, allow=["never-unfreeze"]))
    outcome = train(cfg, strategy="late")
    (tmp_path / "expect.toml").write_text('[[expect]]\ngroup = "encoder.layer0"\ntrainable_from_epoch = 1\n')
    code, out = verify(capsys, str(outcome.run_dir), "--expect", str(tmp_path / "expect.toml"))
    assert code == 1
    assert "FAIL encoder.layer0: expected trainable from epoch 1, but it never trained (epochs 0-2)" in out


def test_control_run_is_one_switch_and_verify_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outcome = train(load_config(project(tmp_path, pretrained=PRETRAINED + "enabled = false\n")), strategy="frozen")
    events = [json.loads(line) for line in (outcome.run_dir / "events.jsonl").read_text().splitlines()]
    [control] = [e for e in events if e["event"] == "weights.control"]
    assert control["level"] == "warning" and "NOT loaded" in control["message"]
    (tmp_path / "expect.toml").write_text("[weights]\nmin_loaded = 8\n")
    code, out = verify(capsys, str(outcome.run_dir), "--expect", str(tmp_path / "expect.toml"))
    assert code == 1
    assert ("FAIL no weights.loaded event: pretrained weights were not loaded (this is the random-encoder control run)"
            in out)


def test_predictions_identical_to_control_raise_a_red_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # silent failure 8: the "pretrained" file is the encoder's own fresh init, so the run equals the control
    torch.manual_seed(0)
    fresh = SimpleLSTM(hidden_size=H)
    save_file({k: v.contiguous() for k, v in fresh.state_dict().items() if k.startswith("lstm.")},
              str(tmp_path / "enc.safetensors"))
    cfg = project(tmp_path, pretrained=PRETRAINED + "allow_fresh_init = true\n")
    run = train(load_config(cfg), strategy="frozen")
    control = train(load_config(project(tmp_path, pretrained=PRETRAINED + "enabled = false\n")), strategy="frozen")
    code, out = verify(capsys, str(run.run_dir), "--control", str(control.run_dir))
    assert code == 0  # a red flag, not a crash
    assert out.startswith("warning: red flag: val outputs are bit-for-bit identical to the random-encoder control's")
    (tmp_path / "expect.toml").write_text("fail_on_red_flags = true\n")
    code, out = verify(capsys, str(run.run_dir), "--control", str(control.run_dir), "--expect",
                       str(tmp_path / "expect.toml"))
    assert code == 1 and "FAIL red flag: val outputs are bit-for-bit identical" in out


def test_red_flag_helpers() -> None:
    a = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    b = a + 0.01  # different outputs, same decisions
    assert outputs_identical(a, a.copy()) and not outputs_identical(a, b)
    assert predictions_identical(a, b) and predictions_identical([1, 0, 1], a)
    assert not predictions_identical(a, a[[1, 0, 2]]) and not predictions_identical(a, a[:2])
    assert constant_predictions([[0, 1], [0, 2]]) and not constant_predictions(a) and not constant_predictions([[0, 1]])
    flags = compare_to_control(b, a)
    assert [f.code for f in flags] == ["predictions_identical"]
    assert flags[0].message == ("val predictions are identical to the random-encoder control's on all 3 samples: "
                                "no measurable benefit from pretraining on this split")
    assert compare_to_control(a, a[[1, 0, 2]]) == []
    log = RunLog(None, console="none", capture=True)
    raise_red_flags(flags, log.logger, strategy="two_phase")
    [event] = log.events
    assert event["event"] == "red_flag.raised" and event["level"] == "warning"
    assert event["code"] == "predictions_identical" and event["strategy"] == "two_phase"


def test_a_run_that_failed_a_check_fails_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = tmp_path / "events.jsonl"
    lines = [
        {"event": "groups.resolved", "groups": [{"name": "encoder.layer0"}, {"name": "head"}]},
        {"event": "grad_flow.check", "group": "head", "ok": True},
        {"event": "weight_delta.check", "group": "encoder.layer0", "scope": "interval", "epoch": 0, "steps": 4,
         "trainable": False, "moved": True, "expected": "zero", "ok": False},
        {"event": "weight_delta.violation", "epoch": 0, "message": "frozen group encoder.layer0 changed in epoch 0"},
        {"event": "run.failed", "error": "weight_delta check failed: ..."},
    ]
    events.write_text("".join(json.dumps(e) + "\n" for e in lines))
    code, out = verify(capsys, str(events))
    assert code == 1
    assert out.splitlines()[:2] == ["FAIL run failed: weight_delta check failed: ...",
                                    "FAIL epoch 0: frozen group encoder.layer0 changed in epoch 0"]
    # no checks at all, and not finished: both are failures, not a silent pass
    events.write_text(json.dumps({"event": "run.started"}) + "\n")
    code, out = verify(capsys, str(events))
    assert code == 1 and out.splitlines()[:3] == [
        "FAIL run did not finish: no run.finished event (killed, or the log is cut)",
        "FAIL no weight_delta.check events: the weight_delta check did not run (checks.weight_delta = false?)",
        "FAIL no grad_flow.check events: the grad_flow check did not run (checks.grad_flow = false?)",
    ]


def test_bad_expect_file_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "expect.toml"
    path.write_text('[[expect]]\ngroup = "head"\nmoves_afterr = 3\n\n[weights]\nmin_loaded = 0\n')
    with pytest.raises(ConfigError) as err:
        load_expectations(path)
    assert err.value.problems == ["extra fields found (moves_afterr) @ $.expect[0]",
                                  "invalid value, expected a value > 0, got 0 @ $.weights.min_loaded"]
    (tmp_path / "events.jsonl").write_text("")
    code = main(["verify", str(tmp_path / "events.jsonl"), "--expect", str(path)])
    assert code == 2 and "expect.toml: 2 problems" in capsys.readouterr().err


def test_verification_events_are_declared_and_documented() -> None:
    from moola_engine.logs import Event

    ours = ["weights.loaded", "weights.control", "weight_delta.check", "weight_delta.violation", "grad_flow.check",
            "bn_stats.check", "check.failed", "red_flag.raised"]
    docs = (Path(__file__).resolve().parent.parent / "docs" / "events.md").read_text()
    declared = {e.value for e in Event}
    for name in ours:
        assert name in declared, name
        assert f"\n## {name}\n" in docs, name
