"""Every CLI command, in process, with fuzzed arguments: never a traceback, never an undocumented exit code.

Each example is one ``moola_engine.cli.main([...])`` call on tiny data in a temporary folder.  A command that
would train gets a base argument list that keeps it to one epoch of a tiny config, and its count flags draw only
from invalid values and 1 (a fuzzed ``--epochs 5000`` would train for an hour, which proves nothing).  Nothing
in the engine is stubbed.  An exit code of 4 (``INTERNAL``) is a bug found, so it fails the test too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moola_engine.cli import build_parser, main
from moola_engine.errors import ExitCode

DOCUMENTED = {int(c) for c in ExitCode}
COUNT_FLAGS = {"--epochs", "--seeds", "--folds", "--jobs", "--threads", "--samples-per-epoch", "--batch-size",
               "--stride", "--hidden-size"}

ints = st.integers(min_value=-(10**30), max_value=10**30).map(str)
junk = st.sampled_from(["0", "-1", "1", "2", "nan", "inf", "-inf", "1e3", "0x10", "", " ", "3.5", "--", "-"])
texts = st.text(max_size=24)
huge = st.sampled_from(["x" * 300, "é" * 200, "../" * 50, "a\nb", "名前" * 60])
paths = st.sampled_from(["missing.toml", "exp.toml/under", "exp.toml", "d.npz", "s.toml", "runs/latest",
                         "runs", ".", "/", "nowhere/deep/file.toml", "exp.toml/under/deeper"])
any_value = st.one_of(ints, junk, texts, huge, paths)
bad_count = st.one_of(st.integers(max_value=0).map(str), st.integers(min_value=10**6 + 1).map(str),
                      st.just("1"), junk.filter(lambda v: v not in ("2", "1e3", "0x10", "3.5")), texts, huge)
bad_path = st.sampled_from(["exp.toml/under", "exp.toml/under/deeper", "x" * 300])


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 5, 4)).astype("float32")
    y = (x[:, :, 0].mean(axis=1) > 0).astype("int64")
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=x[:8], y_test=y[:8])
    (tmp_path / "exp.toml").write_text(
        '[run]\nruns_dir = "runs"\nconsole = "none"\n'
        "[train]\nepochs = 1\nbatch_size = 16\nthreads = 1\n"
        "[model]\nparams = {hidden_size = 4, head_hidden = 4}\n"
        '[data]\nkind = "npz"\npath = "d.npz"\n[checkpoint]\nenabled = false\n'
    )
    (tmp_path / "ohlc.toml").write_text('[data]\nkind = "ohlc"\npath = "missing.csv"\n')  # refused at the data
    (tmp_path / "s.toml").write_text('[strategy.imm]\nplugin = "immediate"\n[strategy.probe]\nplugin = "frozen"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MOOLA_DEBUG", raising=False)
    return tmp_path


def flags_of(command: str) -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(o for a in sub.choices[command]._actions for o in a.option_strings
                  if o.startswith("--") and o not in ("--help", "--debug"))


def value_for(command: str, flag: str) -> st.SearchStrategy[str]:
    if flag in COUNT_FLAGS and command in ("train", "ablate", "demo"):
        return bad_count
    if command == "demo" and flag == "--out":
        return bad_path
    return any_value


@st.composite
def argv_for(draw: st.DrawFn, command: str, base: tuple[str, ...]) -> list[str]:
    argv = [command, *base]
    flags = flags_of(command)  # `runs` has its flags on its own subcommands: none at this level
    for flag in draw(st.lists(st.sampled_from(flags), max_size=4)) if flags else []:
        argv.append(flag)
        if flag not in ("--json", "--force", "--report-only", "--no-figures"):
            argv.append(draw(value_for(command, flag)))
    if command == "demo":  # demo pretrains on the bundled data and runs a grid: only ever let it refuse
        argv += ["--out", draw(bad_path)]
    if draw(st.integers(0, 4)) == 0:
        argv.insert(draw(st.integers(0, len(argv))), draw(any_value))  # a stray positional anywhere
    return argv


def check(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code = main(argv)
    _, err = capsys.readouterr()
    assert "Traceback" not in err, f"{argv!r}:\n{err}"
    assert code in DOCUMENTED, f"{argv!r} exited {code}, which docs/reliability.md does not list:\n{err}"
    assert code != ExitCode.INTERNAL, f"{argv!r}: an internal error (a bug):\n{err}"


CHEAP = {
    "strategies": (),
    "plan": ("--strategies", str(ROOT / "strategies.toml"), "--strategy", "two_phase"),
    "verify": ("runs/latest",),
    "pretrain": ("--config", "ohlc.toml", "--out", "enc/encoder.safetensors"),
    "baseline": ("--config", "exp.toml", "--seeds", "1"),
    "demo": (),
    "components": (),
    "runs": ("list",),
    "export": ("latest", "--out", "out/encoder.safetensors"),
}
TRAINING = {
    "train": ("--config", "exp.toml", "--strategies", "s.toml", "--strategy", "imm"),
    "ablate": ("--config", "exp.toml", "--strategies", "imm", "--strategies-file", "s.toml", "--control", "probe",
               "--seeds", "1", "--jobs", "1", "--no-figures", "--out", "grid"),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_cheap_commands_never_show_a_traceback(project: Path, capsys: pytest.CaptureFixture[str],
                                               data: st.DataObject) -> None:
    command = data.draw(st.sampled_from(sorted(CHEAP)))
    check(capsys, data.draw(argv_for(command, CHEAP[command])))


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_training_commands_never_show_a_traceback(project: Path, capsys: pytest.CaptureFixture[str],
                                                  data: st.DataObject) -> None:
    command = data.draw(st.sampled_from(sorted(TRAINING)))
    check(capsys, data.draw(argv_for(command, TRAINING[command])))


def test_every_command_is_fuzzed() -> None:
    """A new command joins CHEAP or TRAINING, or this test fails."""
    from moola_engine.cli import COMMANDS

    assert set(COMMANDS) == set(CHEAP) | set(TRAINING)


def test_top_level_arguments(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["--version"], ["--help"], ["nope"], ["--debug"], ["-x"], ["train", "--help"]):
        check(capsys, argv)
