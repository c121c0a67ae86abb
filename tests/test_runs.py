"""`moola-engine runs list/show/compare` on real run folders: finished, failed, interrupted (Ctrl-C and kill -9)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_verify import project

from moola_engine import hookimpl
from moola_engine.cli import main
from moola_engine.config import load_config
from moola_engine.errors import MoolaError, PluginError
from moola_engine.runs.index import read_run, resolve_run
from moola_engine.runs.train import train

ROOT = Path(__file__).resolve().parent.parent


class Boom:
    """Raises in on_epoch_end of epoch 1: a failed run."""

    @hookimpl
    def on_epoch_end(self, engine: Any, epoch: int) -> None:
        if epoch == 1:
            raise RuntimeError("boom at epoch 1")


class CtrlC:
    """Raises KeyboardInterrupt before the first step of epoch 1, as Ctrl-C would."""

    @hookimpl
    def on_epoch_start(self, engine: Any, epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One finished two-phase run, one frozen run, a failed run and a Ctrl-C'd run in one runs folder."""
    tmp = tmp_path_factory.mktemp("runs")
    cfg = load_config(project(tmp, epochs=3))
    out: dict[str, Any] = {"root": tmp, "runs_dir": tmp / "runs"}
    out["two_phase"] = train(cfg, strategy="two_phase").run_dir
    out["frozen"] = train(cfg, strategy="frozen").run_dir
    with pytest.raises(PluginError, match="boom at epoch 1"):
        train(cfg, strategy="two_phase", extra_plugins=(Boom(),))
    out["failed"] = max((p for p in out["runs_dir"].iterdir() if p.is_dir() and not p.is_symlink()),
                        key=lambda p: p.stat().st_mtime_ns)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, strategy="two_phase", extra_plugins=(CtrlC(),))
    out["ctrl_c"] = (out["runs_dir"] / "latest").resolve()
    return out


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_shows_each_run_with_status_epochs_best_and_checks(runs: dict[str, Any],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "runs", "list", "--runs-dir", str(runs["runs_dir"]), "--json")
    assert code == 0
    rows = {r["id"]: r for r in json.loads(out)}
    assert set(rows) == {runs[k].name for k in ("two_phase", "frozen", "failed", "ctrl_c")}
    ok = rows[runs["two_phase"].name]
    assert (ok["status"], ok["strategy"], ok["epochs_run"], ok["epochs_planned"]) == ("finished", "two_phase", 3, 3)
    assert ok["best"]["metric"] == "val_accuracy" and 0 <= ok["best"]["value"] <= 1
    assert ok["checks"]["passed"] > 0 and ok["checks"]["failed"] == 0
    failed = rows[runs["failed"].name]
    assert (failed["status"], failed["epochs_run"], failed["epochs_planned"]) == ("failed", 1, 3)
    stopped = rows[runs["ctrl_c"].name]
    assert (stopped["status"], stopped["epochs_run"]) == ("interrupted", 1)
    # the table a person reads has the same facts
    code, table, _ = cli(capsys, "runs", "list", "--runs-dir", str(runs["runs_dir"]))
    line = next(row for row in table.splitlines() if row.startswith(runs["failed"].name))
    assert line.split()[1:4] == ["two_phase", "failed", "1/3"]
    assert "\x1b" not in table


def test_show_puts_the_plan_against_what_happened(runs: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "runs", "show", str(runs["two_phase"]), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["timelines"]["encoder.layer0"] == {"planned": "-##", "observed": "-##"}
    assert info["timelines"]["head"] == {"planned": "###", "observed": "###"}
    assert [(t["epoch"], t["to_state"]) for t in info["transitions"]] == [(0, "frozen"), (1, "trainable")]
    assert [(t["epoch"], t["to_state"]) for t in info["planned_transitions"]] == [(0, "frozen"), (1, "trainable")]
    assert set(info["final"]) >= {"train_loss", "val_loss", "val_accuracy"}
    code, text, _ = cli(capsys, "runs", "show", "latest", "--runs-dir", str(runs["runs_dir"]))
    assert f"run {runs['ctrl_c'].name}" in text and "status interrupted" in text
    assert "KeyboardInterrupt" in text
    assert "1      encoder.layer0, head  not run" in text  # planned, never reached


def test_show_failed_run_names_the_error(runs: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    code, text, _ = cli(capsys, "runs", "show", runs["failed"].name, "--runs-dir", str(runs["runs_dir"]))
    assert code == 0
    assert "status failed" in text and "boom at epoch 1" in text


def test_compare_gives_metrics_side_by_side_and_freeze_timelines(runs: dict[str, Any],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    a, b = runs["two_phase"].name, runs["frozen"].name
    code, out, _ = cli(capsys, "runs", "compare", a, b, "--runs-dir", str(runs["runs_dir"]), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["runs"] == [a, b]
    assert data["timelines"][a]["encoder.layer0"] == "-##"
    assert data["timelines"][b]["encoder.layer0"] == "---"  # strategy frozen
    a_metrics = read_run(runs["two_phase"]).final
    assert data["metrics"]["val_loss"][a] == pytest.approx(a_metrics["val_loss"])
    assert data["metrics"]["val_loss"][b] != data["metrics"]["val_loss"][a]
    code, text, _ = cli(capsys, "runs", "compare", a, b, "--runs-dir", str(runs["runs_dir"]))
    assert "[1]  encoder.layer0  -##" in text and "[2]  encoder.layer0  ---" in text


def test_unknown_run_is_an_error_naming_the_runs_folder(runs: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "runs", "show", "nope", "--runs-dir", str(runs["runs_dir"]))
    assert code == 2 and "run 'nope'" in err and str(runs["runs_dir"]) in err
    with pytest.raises(MoolaError, match="no such folder"):
        resolve_run("latest", runs["root"] / "missing")
    code, _, err = cli(capsys, "runs", "compare", runs["two_phase"].name, "--runs-dir", str(runs["runs_dir"]))
    assert code == 2 and "at least two runs" in err


def test_killed_process_reads_as_interrupted_and_a_live_one_as_running(tmp_path: Path) -> None:
    cfg = project(tmp_path, epochs=3)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "killrun.py"), "--config", str(cfg),
                           "--strategy", "two_phase"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MOOLA_KILL_AT_STEP": "7"})
    assert proc.returncode == -9, proc.stderr
    run_dir = (tmp_path / "runs" / "latest").resolve()
    info = read_run(run_dir)
    assert info.status == "interrupted" and info.epochs_run == 1
    assert "without a run.finished" in (info.error or "")
    # the same log, as if its process were still alive (this test's own pid): running
    events = (run_dir / "events.jsonl").read_text().splitlines()
    first = json.loads(events[0])
    assert first["event"] == "run.started"
    first["pid"] = os.getpid()
    (run_dir / "events.jsonl").write_text("\n".join([json.dumps(first), *events[1:]]) + "\n")
    assert read_run(run_dir).status == "running"


def test_a_broken_event_log_lists_as_unreadable_and_hides_no_other_run(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "runs" / "a-good-run"
    good.mkdir(parents=True)
    (good / "events.jsonl").write_text(json.dumps({"event": "run.started", "strategy": "frozen"}) + "\n"
                                       + json.dumps({"event": "run.finished"}) + "\n")
    bad = tmp_path / "runs" / "b-bad-run"
    bad.mkdir()
    (bad / "events.jsonl").write_text("not json\n{}\n")
    code, out, _ = cli(capsys, "runs", "list", "--runs-dir", str(tmp_path / "runs"), "--json")
    assert code == 0
    rows = {r["id"]: r for r in json.loads(out)}
    assert rows["a-good-run"]["status"] == "finished"
    assert rows["b-bad-run"]["status"] == "unreadable" and "not a JSON event line" in rows["b-bad-run"]["error"]


def test_latest_tilde_n_names_the_runs_before_the_newest(runs: dict[str, Any]) -> None:
    from moola_engine.runs.index import run_folders

    folders = run_folders(runs["runs_dir"])
    assert resolve_run("latest~0", runs["runs_dir"]) == folders[-1]
    assert resolve_run("latest~1", runs["runs_dir"]) == folders[-2]
    with pytest.raises(MoolaError, match=rf"holds {len(folders)} run\(s\), so there is no run {len(folders)} before"):
        resolve_run(f"latest~{len(folders)}", runs["runs_dir"])


def test_an_unusable_runs_folder_name_is_an_error_not_a_traceback(runs: dict[str, Any]) -> None:
    with pytest.raises(MoolaError, match="File name too long"):
        resolve_run("latest", "x" * 300)
