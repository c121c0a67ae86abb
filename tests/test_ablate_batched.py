"""``ablate --batched``: the grid's cells trained in stacked groups, each still an ordinary cell of the grid (its own
run folder, events, done marker), resumable and reported exactly as an unbatched grid, with the same per-run results
within the tolerance of docs/performance.md ("Batched multi-run training": 1e-5)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_ablation

from moola_engine.cli import main
from moola_engine.logs import read_events

ATOL = RTOL = 1e-5
STRATEGIES = test_ablation.STRATEGIES + """
[strategy.stuck]
plugin = "immediate"
[strategy.stuck.train]
lr = 1e-30
"""


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    """A small MLP grid (conftest's TinyNet by import path): 40 samples, 2 folds, 3 epochs."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=(x[:, :, 0].mean(1) > 0).astype(np.int64))
    (tmp_path / "strategies.toml").write_text(STRATEGIES)
    (tmp_path / "exp.toml").write_text("""
[train]
epochs = 3
batch_size = 8
lr = 0.02
device = "cpu"
[model]
name = "tests.conftest:TinyNet"
params = { c = 4 }
groups = [{name = "encoder.layer0", modules = ["enc0"]}, {name = "encoder.layer1", modules = ["enc1"]},
          {name = "head", modules = ["head"], head = true}]
[data]
kind = "npz"
path = "d.npz"
folds = 2
[run]
strategies_file = "strategies.toml"
""")
    return tmp_path


def ablate(capsys: pytest.CaptureFixture[str], exp: Path, out: str, *extra: str,
           strategies: str = "frozen,two_phase") -> tuple[int, str]:
    code = main(["ablate", "--config", str(exp / "exp.toml"), "--strategies", strategies, "--seeds", "2",
                 "--no-figures", "--out", str(exp / out), *extra])
    return code, capsys.readouterr().err


def markers(grid: Path) -> dict[str, dict[str, Any]]:
    return {m["key"]: m for m in (json.loads(p.read_text()) for p in (grid / "cells").glob("*.json"))}


def test_batched_grid_has_every_cell_resumes_and_reports(experiment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = ablate(capsys, experiment, "g", "--batched", "--jobs", "1")
    assert code == 0, err
    grid = experiment / "g"
    found = markers(grid)
    assert len(found) == 3 * 2 * 2  # control, frozen, two_phase x 2 seeds x 2 folds
    for m in found.values():  # each cell its own run folder, trained in a stacked group
        events = read_events(grid / m["run_dir"] / "events.jsonl")
        started = [e for e in events if e["event"] == "batched.started"]
        assert len(started) == 1 and started[0]["runs"] == 6, started  # one fold's 6 cells per group
        assert events[-1]["event"] == "run.finished"
        config = json.loads((grid / m["run_dir"] / "config.json").read_text())["config"]
        assert (config["train"]["seed"], config["data"]["fold"]) == (m["seed"], m["fold"])
    assert "2 batched group(s) of up to 16" in err
    assert "ablate: --batched: 12 run(s) trained in stacked groups, 0 separately" in err
    results = json.loads((grid / "results.json").read_text())
    assert results["runs_finished"] == 12 and (grid / "report.html").is_file()
    assert "--batched --batch-size-runs 16" in (grid / "report.md").read_text()  # the command that reproduces it

    code, err = ablate(capsys, experiment, "g", "--batched", "--jobs", "1")
    assert code == 0, err
    assert "12 of 12 runs already done, 0 to go" in err and "nothing to run" in err
    assert markers(grid) == found  # nothing ran again

    code, err = ablate(capsys, experiment, "g", "--report-only")
    assert code == 0, err


def test_a_killed_batched_grid_resumes_like_an_unbatched_one(experiment: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, err = ablate(capsys, experiment, "g", "--batched", "--jobs", "1")
    assert code == 0, err
    grid = experiment / "g"
    before = markers(grid)
    keys = sorted(before)
    # as a kill leaves it: one run finished but lost its marker (killed between the two writes), one run cut
    # short (no result yet, no marker)
    lost, cut = keys[0], keys[1]
    (grid / "cells" / f"{lost}.json").unlink()
    (grid / "cells" / f"{cut}.json").unlink()
    (grid / before[cut]["run_dir"] / "result.json").unlink()
    code, err = ablate(capsys, experiment, "g", "--batched", "--jobs", "1")
    assert code == 0, err
    assert f"moved the unfinished run folder {Path(before[cut]['run_dir']).name}" in err
    after = markers(grid)
    assert after[lost]["adopted"] is True and after[lost]["run_dir"] == before[lost]["run_dir"]
    assert (grid / after[cut]["run_dir"] / "result.json").is_file()  # rerun (the old folder was moved aside)
    assert {k: v for k, v in after.items() if k not in (lost, cut)} == \
        {k: v for k, v in before.items() if k not in (lost, cut)}
    # a group of one has nothing to batch with: it trains as a separate run, and the summary says so
    assert ("ablate: --batched: 0 run(s) trained in stacked groups, 1 separately "
            "(1 x no other run of the same shape to batch with)") in err
    assert (grid / "interrupted" / Path(before[cut]["run_dir"]).name).is_dir()


def test_a_failing_run_fails_the_batched_grid_and_keeps_the_others(experiment: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``stuck`` trains at lr 1e-30: its weights never move and its weight-delta check fails, as unbatched."""
    code, err = ablate(capsys, experiment, "g", "--batched", "--jobs", "1", strategies="frozen,stuck")
    assert code == 2, err  # the grid's exit code, as for an unbatched grid whose run failed
    assert "run stuck seed 0 fold 0 (stuck) failed: weight_delta check failed: trainable group" in err
    assert "runs are done and kept; fix the cause and rerun the same command to continue" in err
    done = markers(experiment / "g")
    assert done and all(m["label"] != "stuck" for m in done.values())
    assert {m["label"] for m in done.values()} == {"control", "frozen"}  # the group's other runs finished


def test_batched_and_unbatched_grids_agree(experiment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Per-run test outputs within 1e-5; the batched grid on two workers (a group per task) and groups of 4."""
    code, err = ablate(capsys, experiment, "sep", "--jobs", "1")
    assert code == 0, err
    code, err = ablate(capsys, experiment, "bat", "--batched", "--batch-size-runs", "4", "--jobs", "2")
    assert code == 0, err
    assert "12 runs in 4 batched group(s) of up to 4, this process and 1 spawned worker(s)" in err
    sep, bat = markers(experiment / "sep"), markers(experiment / "bat")
    assert sorted(sep) == sorted(bat)
    assert len({m["pid"] for m in bat.values()}) == 2  # groups ran here and in the spawned worker
    for key in sep:
        with np.load(experiment / "sep" / sep[key]["run_dir"] / "predictions.npz") as a, \
                np.load(experiment / "bat" / bat[key]["run_dir"] / "predictions.npz") as b:
            assert sorted(a.files) == sorted(b.files)
            for name in a.files:
                np.testing.assert_allclose(b[name], a[name], atol=ATOL, rtol=RTOL, err_msg=f"{key} {name}")
    runs = {r["key"]: r for r in json.loads((experiment / "sep" / "results.json").read_text())["runs"]}
    for r in json.loads((experiment / "bat" / "results.json").read_text())["runs"]:
        assert r["accuracy"] == pytest.approx(runs[r["key"]]["accuracy"], abs=1e-9)


def test_batched_flags_are_checked_before_any_run(experiment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = ablate(capsys, experiment, "g", "--batch-size-runs", "4")
    assert code == 2 and "--batch-size-runs: only with --batched" in err
    code, err = ablate(capsys, experiment, "g", "--batched", "--backend", "ray")
    assert code == 2 and "--batched: only with the local pool (not with --backend ray yet)" in err
    code, err = ablate(capsys, experiment, "g", "--devices", "0,x")
    assert code == 2 and "--devices: expected comma-separated GPU indices" in err
    code, err = ablate(capsys, experiment, "g", "--devices", "0")
    assert code == 2 and "--devices: " in err
    assert not (experiment / "g" / "cells").exists()
    shutil.rmtree(experiment / "g", ignore_errors=True)
