"""Progress (moola_engine.runs.progress): plain lines without a terminal, a rich bar on one."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from test_verify import project

from moola_engine.cli import main
from moola_engine.runs.progress import Bar
from moola_ohlc.plugin import _Progress

LINE = re.compile(r"^train (\d)/3 epochs  phase (.+)  loss \d\.\d{4} \(val \d\.\d{4}\)  elapsed \d+s(  eta \d+s)?$")


def test_train_progress_without_a_terminal_is_plain_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = project(tmp_path, epochs=3)
    cfg.write_text(cfg.read_text().replace('console = "none"', 'console = "pretty"'))
    assert main(["train", "--config", str(cfg), "--strategy", "two_phase"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err  # no carriage return, no ANSI: a log keeps it as is
    progress = [LINE.match(line) for line in err.splitlines() if line.startswith("train ")]
    assert all(progress), err
    assert [(m.group(1), m.group(2)) for m in progress] == [  # type: ignore[union-attr]
        ("1", "head"), ("2", "encoder.layer0, head"), ("3", "encoder.layer0, head")]
    # each progress line comes before its epoch's event line
    lines = err.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("train 1/3"))
    assert "epoch.completed" in lines[first + 1]


def test_no_progress_when_the_console_is_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = project(tmp_path, epochs=2)
    cfg.write_text(cfg.read_text().replace('console = "none"', 'console = "json"'))
    assert main(["train", "--config", str(cfg), "--strategy", "two_phase"]) == 0
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("train ")]


def test_pretrain_progress_prints_one_plain_line_per_epoch_with_its_losses() -> None:
    buf = io.StringIO()
    p = _Progress(2)
    p.bar.stream, p.bar.tty = buf, False
    for step in (1, 2, 3):
        p(1, 2, step, 3)  # per batch: nothing without a terminal
    p.epoch_done(1, 2, {"epoch": 1, "batch_masked_loss": 0.5, "batch_direction_loss": 0.25, "holdout_masked_loss": 1.0})
    assert buf.getvalue().splitlines() == [buf.getvalue().splitlines()[0]]
    line = buf.getvalue().splitlines()[0]
    assert line.startswith("pretrain 1/2 epochs  phase self-supervised, every layer  loss masked 0.5000  direction 0.2500")
    assert "eta" in line


def test_on_a_terminal_the_bar_is_rich() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    buf = Tty()
    with Bar(3, unit="runs", label="ablate", stream=buf) as bar:
        assert bar.tty
        bar.advance("cell one")
        bar.advance("cell two")
    out = buf.getvalue()
    assert "ablate" in out and "2/3" in out and "cell two" in out
    assert "\x1b[" in out  # drawn in place with escape sequences, not plain lines
