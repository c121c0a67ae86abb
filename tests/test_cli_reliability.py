"""Reliability round 2 (CLI side): exit codes, arguments, names on disk, runs/latest, strict JSON and TOML,
false alarms after recovery, worker exceptions.  docs/reliability.md, "Faults tried, round 2", lists them."""

from __future__ import annotations

import argparse
import json
import math
import operator
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT

from moola_engine import hookimpl
from moola_engine.cli import EXIT_CODES, build_parser, main
from moola_engine.errors import ConfigError, ExitCode
from moola_engine.logs import read_events

STRATEGIES = str(ROOT / "strategies.toml")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny npz experiment (1 epoch) in tmp_path, which is the working directory."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 6, 4)).astype("float32")
    y = (x[:, :, 0].mean(axis=1) > 0).astype("int64")
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=x[:16], y_test=y[:16])
    (tmp_path / "exp.toml").write_text(
        '[run]\nruns_dir = "runs"\nconsole = "none"\n'
        "[train]\nepochs = 1\nbatch_size = 16\nthreads = 1\n"
        "[model]\nparams = {hidden_size = 4, head_hidden = 4}\n"
        '[data]\nkind = "npz"\npath = "d.npz"\n'
    )
    (tmp_path / "s.toml").write_text('[strategy.imm]\nplugin = "immediate"\n')
    (tmp_path / "ohlc.toml").write_text('[pretrain]\nobjective = "ohlc-multitask"\n[data]\nkind = "ohlc"\n'
                                        'path = "missing.csv"\n')  # refused at the data
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- 1. exit codes


def test_exit_codes_are_one_table_in_the_help_and_the_docs() -> None:
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 130]
    assert set(EXIT_CODES) == set(ExitCode)
    epilog = build_parser().epilog or ""
    docs = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    for code in ExitCode:
        assert f"  {int(code):<4} " in epilog
        assert f"| {int(code)} | `{code.name}` |" in docs, f"docs/reliability.md lacks the row of exit code {code!r}"


def test_an_unexpected_exception_is_one_line_and_a_saved_traceback(project: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import moola_engine.cli.commands.strategies as cmd

    def boom(args: argparse.Namespace) -> int:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cmd, "run", boom)
    monkeypatch.setenv("TMPDIR", str(project))
    monkeypatch.delenv("MOOLA_DEBUG", raising=False)
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    code, _out, err = run_cli(capsys, "strategies")
    assert code == ExitCode.INTERNAL
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("internal error: RuntimeError: boom second line (traceback saved to ")
    saved = next(project.glob("moola-engine-traceback-*.txt"))
    assert "Traceback (most recent call last)" in saved.read_text() and "boom" in saved.read_text()
    code, _out, err = run_cli(capsys, "strategies", "--debug")
    assert code == ExitCode.INTERNAL and "Traceback (most recent call last)" in err


# --------------------------------------------------------------------------- 2. no traceback, exit 2


@pytest.mark.parametrize("argv, needle", [
    (["train", "--config", "exp.toml", "--epochs", "0"], "--epochs: expected an integer >= 1"),
    (["train", "--config", "exp.toml", "--epochs", "-1"], "--epochs: expected an integer >= 1"),
    (["train", "--config", "exp.toml", "--seed", "-1"], "--seed: expected a seed >= 0"),
    (["plan", "--strategy", "two_phase", "--epochs", "0"], "--epochs: expected an integer >= 1"),
    (["plan", "--strategy", "two_phase", "--epochs", "-1"], "--epochs: expected an integer >= 1"),
    (["baseline", "--seeds", "0"], "--seeds: expected an integer >= 1"),
    (["pretrain", "--config", "ohlc.toml", "--out", "exp.toml/enc.safetensors"], "error: --out: cannot write to"),
    (["ablate", "--config", "exp.toml", "--strategies", "imm", "--strategies-file", "s.toml", "--out",
      "exp.toml/grid"], "error: --out: cannot write to"),
])
def test_bad_arguments_are_usage_errors_without_a_traceback(project: Path, capsys: pytest.CaptureFixture[str],
                                                            argv: list[str], needle: str) -> None:
    code, _out, err = run_cli(capsys, *argv)
    assert code == ExitCode.USAGE, err
    assert needle in err and "Traceback" not in err
    assert not (project / "runs").exists()  # nothing started


def test_unwritable_out_is_refused_before_any_work(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes everywhere")
    ro = project / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run_cli(capsys, "pretrain", "--config", "ohlc.toml", "--out", "ro/enc.safetensors")
        assert code == ExitCode.USAGE and "--out: cannot write to ro/enc" in err and "Permission denied" in err
    finally:
        ro.chmod(0o700)


def test_a_300_character_strategy_name_trains_into_a_safe_folder(project: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    name = "s" * 300
    (project / "long.toml").write_text(f'[strategy.{name}]\nplugin = "immediate"\n')
    code, out, err = run_cli(capsys, "train", "--config", "exp.toml", "--strategies", "long.toml", "--strategy", name)
    assert code == 0, err
    (run,) = [p for p in (project / "runs").iterdir() if not p.is_symlink()]
    assert len(run.name) < 120 and run.name.endswith("-s0") and "ssss" in run.name
    assert out.strip().splitlines()[-1] == f"run folder: {run}/  (events.jsonl, metrics.csv, result.json)"


def test_verify_names_the_file_and_line_of_invalid_utf8(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = project / "events.jsonl"
    log.write_bytes(b'{"event": "run.started"}\n{"event": "x\xff\xfe"}\n{"event": "run.finished"}\n')
    code, _, err = run_cli(capsys, "verify", str(log))
    assert code == ExitCode.USAGE and "Traceback" not in err
    assert f"{log}:2: not UTF-8" in err


# --------------------------------------------------------------------------- 3. names on disk


HOSTILE = ["../../escape", "a/b", "two\nlines", "ünïcødé-名前", "x" * 1000, "..", ".hidden", "-rf", ""]


def test_hostile_names_become_safe_distinct_readable_run_ids(tmp_path: Path) -> None:
    from moola_engine.config import ExperimentConfig
    from moola_engine.experiments.grid import Cell, Grid
    from moola_engine.runs.folders import create_run_dir, new_run_id

    runs = tmp_path / "runs"
    made = []
    for name in HOSTILE:
        for rid in (new_run_id(name, 0), new_run_id("s", 0, name=name)):
            assert "/" not in rid and "\n" not in rid and ".." not in rid and rid.isascii() and len(rid) <= 100
            path = create_run_dir(runs, rid)
            assert path.parent == runs
            made.append(path)
    assert len({p.name.split("-", 6)[-1] for p in made[::2]}) == len(HOSTILE)  # distinct names stay distinct
    assert "escape" in made[0].name and "unic" in made[6].name  # readable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing escaped
    grid = Grid(cfg=ExperimentConfig(), arms=[], seeds=[0], folds=1, out=tmp_path / "g", strategies_file=tmp_path)
    for name in HOSTILE:
        marker = grid.marker(Cell(label=name, strategy=name, control=False, seed=0, fold=0))
        assert marker.parent == grid.cells_dir and len(marker.name) < 110


def test_ablate_names_its_own_flag_for_an_unknown_strategy(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "ablate", "--config", "exp.toml", "--strategies", "nope", "--strategies-file",
                           "s.toml", "--control", "imm")
    assert code == ExitCode.USAGE and err.startswith('error: --strategies: unknown strategy "nope"')
    code, _, err = run_cli(capsys, "ablate", "--config", "exp.toml", "--strategies", "imm", "--strategies-file",
                           "s.toml", "--control", "nope")
    assert code == ExitCode.USAGE and err.startswith('error: --control: unknown strategy "nope"')


# --------------------------------------------------------------------------- 4. strict TOML numbers


def test_toml_strings_and_booleans_are_not_numbers(tmp_path: Path) -> None:
    from moola_engine.config import load_config

    f = tmp_path / "e.toml"
    f.write_text('[train]\nepochs = "3"\nseed = true\nlr = 1\n[checks]\nstrict = 1\n[data]\nval_fraction = "0.2"\n')
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert sorted(err.value.problems) == sorted([
        "invalid value, expected an integer, got str '3' @ $.train.epochs",
        "invalid value, expected an integer, got bool True @ $.train.seed",
        "invalid value, expected true or false, got int 1 @ $.checks.strict",
        "invalid value, expected a number, got str '0.2' @ $.data.val_fraction",
    ])
    f.write_text("[train]\nlr = 1\nepochs = 3\n")
    cfg = load_config(f)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.train.epochs == 3


# --------------------------------------------------------------------------- 5. pretrain --force


def test_pretrain_refuses_to_overwrite_an_encoder(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    enc = project / "enc.safetensors"
    enc.write_bytes(b"precious")
    code, _, err = run_cli(capsys, "pretrain", "--config", "ohlc.toml", "--out", str(enc))
    assert code == ExitCode.USAGE
    assert err == f"error: --out: {enc} exists: runs may have been trained from it. Pass --force to overwrite it, " \
                  "or choose another --out\n"
    assert enc.read_bytes() == b"precious"
    code, _, err = run_cli(capsys, "pretrain", "--config", "ohlc.toml", "--out", str(enc), "--force")
    assert code == ExitCode.USAGE and "missing.csv" in err and "exists" not in err  # past the guard, at the data


# --------------------------------------------------------------------------- 6, 7, 11a. latest, resume, verify


class InterruptAt:
    """Ctrl-C at the start of an epoch (after the previous epoch's checkpoint)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    @hookimpl
    def on_epoch_start(self, engine: Any, epoch: int) -> None:
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_run_dir_file_names_this_run_and_latest_is_replaced_atomically(project: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from moola_engine.runs.folders import link_latest

    code, out, _ = run_cli(capsys, "train", "--config", "exp.toml", "--strategies", "s.toml", "--strategy", "imm",
                           "--run-dir-file", "out/which.txt")
    assert code == 0
    run = Path((project / "out/which.txt").read_text().strip())
    assert run.parent == project / "runs" and (run / "result.json").is_file()
    assert out.strip().splitlines()[-1].startswith(f"run folder: {run}/")
    other = project / "runs" / "other"
    other.mkdir()
    link_latest(other)
    link_latest(project / "runs" / "latest")  # a caller passing the link itself: never latest -> latest
    assert os.readlink(project / "runs" / "latest") == "other"
    assert [p.name for p in (project / "runs").iterdir() if p.name.startswith(".latest")] == []


def test_resume_runs_latest_after_ctrl_c_then_verify_passes(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moola_engine.config import load_config
    from moola_engine.runs.train import train

    cfg = load_config("exp.toml")
    import attrs

    cfg = attrs.evolve(cfg, train=attrs.evolve(cfg.train, epochs=3))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, strategy="imm", strategies_file="s.toml", extra_plugins=(InterruptAt(2),))
    (run,) = [p for p in (project / "runs").iterdir() if not p.is_symlink()]
    code, _, _ = run_cli(capsys, "verify", "runs/latest")
    assert code == ExitCode.VERIFY_FAILED  # the interrupted run alone fails
    code, out, err = run_cli(capsys, "train", "--resume", "runs/latest")
    assert code == 0, err
    assert os.readlink(project / "runs" / "latest") == run.name
    events = read_events(run / "events.jsonl")
    resumed = [e for e in events if e["event"] == "run.resumed"]
    assert [e["run_id"] for e in resumed] == [run.name] and resumed[0]["run_dir"] == str(run)
    code, out, _ = run_cli(capsys, "verify", "runs/latest")
    assert code == 0, out
    assert f"(= {run / 'events.jsonl'})" in out and "an earlier attempt failed (KeyboardInterrupt" in out


def test_a_failure_not_followed_by_a_finished_resume_still_fails() -> None:
    from moola_engine.checks.verify import verify_events

    base = [{"event": "weight_delta.check"}, {"event": "grad_flow.check"}]
    failed = {"event": "run.failed", "error": "KeyboardInterrupt: "}
    assert verify_events([*base, failed, {"event": "run.resumed"}, {"event": "run.finished"}]).ok
    for events in ([*base, failed], [*base, failed, {"event": "run.resumed"}],
                   [*base, {"event": "run.resumed"}, failed, {"event": "run.finished"}]):
        assert verify_events(events).failures == ["run failed: KeyboardInterrupt: "]


# --------------------------------------------------------------------------- 8. strict JSON


def _strict(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_state_json_is_strict_and_non_finite_floats_round_trip(tmp_path: Path) -> None:
    from test_checkpoint import Killed, StopAt, build

    from moola_engine import jsonsafe
    from moola_engine.runs.resume import ResumeState

    class Holder:
        def __init__(self) -> None:
            self.state: dict[str, Any] = {"best": math.inf, "worst": -math.inf, "nan": math.nan, "s": "inf"}

        def state_dict(self) -> dict[str, Any]:
            return self.state

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.state = state

        @hookimpl
        def on_epoch_start(self, engine: Any) -> None:
            pass

    first = build(_immediate(), tmp_path, epochs=3, extra=(Holder(), StopAt(9)))
    with pytest.raises(Killed):
        first.fit()
    for state in tmp_path.glob("checkpoints/*/state.json"):
        _strict(state.read_text())  # no NaN / Infinity tokens anywhere
    holder = Holder()
    holder.state = {}
    second = build(_immediate(), tmp_path, epochs=3, extra=(holder,))
    second.fit(start=ResumeState.latest(tmp_path))
    assert holder.state["best"] == math.inf and holder.state["worst"] == -math.inf
    assert math.isnan(holder.state["nan"]) and holder.state["s"] == "inf"
    data = {"a": [math.inf, {"b": -math.inf}], "c": (math.nan,), "d": "nan", "e": 1.5}
    back = jsonsafe.loads(_strict_dump(data))
    assert back["a"] == [math.inf, {"b": -math.inf}] and math.isnan(back["c"][0]) and back["d"] == "nan"


def _strict_dump(obj: Any) -> str:
    from moola_engine import jsonsafe

    text = jsonsafe.dumps(obj)
    _strict(text)
    return text


def _immediate() -> Any:
    from conftest import named

    return named("immediate")


def test_run_files_are_strict_json(tmp_path: Path) -> None:
    from moola_engine.runs.folders import write_json_atomic

    write_json_atomic(tmp_path / "r.json", {"final": {"val_auc": math.nan, "best": math.inf}})
    assert _strict((tmp_path / "r.json").read_text()) == {"final": {"val_auc": {"$float": "nan"},
                                                                    "best": {"$float": "inf"}}}


# --------------------------------------------------------------------------- 9. worker exceptions


class _Bomb:
    """Unpickles into a ZeroDivisionError in the worker; in this process, slow to fail (so the worker gets work)."""

    def __reduce__(self) -> Any:
        return operator.truediv, (1, 0)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        time.sleep(1.0)
        raise AttributeError(name)


def test_a_worker_exception_is_reported_with_its_type_message_and_frame(tmp_path: Path) -> None:
    from moola_engine.experiments.grid import Cell
    from moola_engine.experiments.workers import Task, _execute

    tasks = [Task(cfg=_Bomb(), cell=Cell(label=f"a{i}", strategy="a", control=False, seed=i, fold=0),  # type: ignore[arg-type]
                  strategies_file="s.toml", out=str(tmp_path), marker=str(tmp_path / f"m{i}.json")) for i in range(3)]
    records: list[dict[str, Any]] = []
    _execute(tasks, jobs=2, threads=1, finish=records.append)
    assert sorted(r["key"] for r in records) == sorted(t.cell.key for t in tasks)
    from_worker = [r["error"] for r in records if "worker process" in r["error"]]
    assert from_worker, records
    for error in from_worker:
        assert "killed by the OS" not in error
        assert "raised ZeroDivisionError: division by zero (at " in error and " in " in error


# --------------------------------------------------------------------------- 10. epoch.completed.trainable


class UnfreezeOnValidation:
    """Frozen encoder; unfreezes it in on_validation_end of epoch 0 (so it trains from epoch 1)."""

    @hookimpl
    def on_fit_start(self, engine: Any) -> None:
        for g in engine.freezer.encoder_groups:
            engine.freezer.freeze(g, reason="wait")

    @hookimpl
    def on_validation_end(self, engine: Any, epoch: int, metrics: Any) -> None:
        if epoch == 0:
            for g in engine.freezer.encoder_groups:
                engine.freezer.unfreeze(g, reason="now")


def test_epoch_completed_lists_the_groups_that_trained_in_that_epoch() -> None:
    from conftest import make_engine

    from moola_engine.logs import RunLog

    runlog = RunLog(None, console="none", capture=True)
    make_engine(UnfreezeOnValidation(), epochs=2, runlog=runlog).fit()
    runlog.close()
    done = [e["trainable"] for e in runlog.events if e["event"] == "epoch.completed"]
    assert done == [["head"], ["encoder.layer0", "encoder.layer1", "head"]]


# --------------------------------------------------------------------------- 11b, 11c. false alarms


def test_verify_control_uses_the_test_split_when_there_is_no_validation_split(tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from moola_engine.checks.redflags import compare_runs

    run, ctrl = tmp_path / "run", tmp_path / "ctrl"
    for d in (run, ctrl):
        d.mkdir()
        np.savez(d / "predictions.npz", test_outputs=np.array([[0.1, 0.9], [0.8, 0.2]]), test_y=np.array([1, 0]))
    flags = compare_runs(run, ctrl)
    assert [f.code for f in flags] == ["outputs_identical"] and flags[0].message.startswith("test outputs")
    np.savez(ctrl / "predictions.npz", val_outputs=np.array([[0.1, 0.9]]), val_y=np.array([1]))
    with pytest.raises(Exception, match=r"no split has outputs in both \(run: test; control: val\)"):
        compare_runs(run, ctrl)


def test_one_seed_never_raises_near_majority(tmp_path: Path) -> None:
    from test_ablation import fake_grid, fake_run

    from moola_engine.experiments.summary import summarize

    grid = fake_grid(tmp_path, {"good": "two-phase"}, seeds=1)
    y = np.array([0] * 16 + [1] * 9)  # majority rate 0.64
    for cell in grid.cells():
        pred = y.copy()
        pred[:3] = 1 - pred[:3]  # 0.88 right
        fake_run(grid, cell, pred, y, [["encoder.layer0", "head"]] * 2)
    res = summarize(grid, n_boot=200)
    assert [a["within_noise_of_majority"] for a in res["arms"]] == [None, None]  # undefined with one run
    assert "near-majority" not in {f["code"] for f in res["red_flags"]}


# --------------------------------------------------------------------------- 12. help texts


def test_every_command_and_flag_has_help_and_the_top_help_has_no_rst() -> None:
    parser = build_parser()
    missing: list[str] = []

    def walk(p: argparse.ArgumentParser, where: str) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {c.dest for c in action._choices_actions if c.help}
                for name, sp in action.choices.items():
                    if name not in helped:
                        missing.append(f"{where} {name}")
                    walk(sp, f"{where} {name}")
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{where} {'/'.join(action.option_strings) or action.dest}")

    walk(parser, "moola-engine")
    assert missing == []
    text = parser.format_help()
    assert "``" not in text and ":class:" not in text and ":func:" not in text
