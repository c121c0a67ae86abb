"""The ablation grid: resumable runner, progress, red flags and the report."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moola_engine.config import ExperimentConfig, ModelConfig, PretrainedConfig, load_config
from moola_engine.errors import ConfigError, MoolaError
from moola_engine.experiments.ablation import _write_marker, prepare, run_grid, run_order
from moola_engine.experiments.grid import Arm, Cell, Grid, build_grid
from moola_engine.experiments.report import console_summary, write_report
from moola_engine.experiments.summary import collect, summarize
from moola_engine.runs.progress import Bar

ROOT = Path(__file__).resolve().parent.parent

STRATEGIES = """
[strategy.frozen]
plugin = "frozen"
[strategy.immediate]
plugin = "immediate"
[strategy.two_phase]
plugin = "two-phase"
unfreeze_after = 1
lr_scale = 0.5
"""


def tiny_experiment(tmp: Path, epochs: int = 3) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 6, 4)).astype(np.float32)
    y = (x[:, :, 0].mean(1) > 0).astype(np.int64)
    np.savez(tmp / "tiny.npz", x=x, y=y)
    (tmp / "strategies.toml").write_text(STRATEGIES)
    cfg = tmp / "tiny.toml"
    cfg.write_text(f"""
[train]
epochs = {epochs}
batch_size = 16
lr = 0.01
device = "cpu"
[model]
name = "simple_lstm"
params = {{ hidden_size = 4, head_hidden = 4 }}
[data]
kind = "npz"
path = "tiny.npz"
folds = 2
[run]
strategies_file = "strategies.toml"
""")
    return cfg


def per_run(results: dict) -> dict[str, tuple]:
    return {r["key"]: (r["accuracy"], r["balanced_accuracy"], r["auc"]) for r in results["runs"]}


@pytest.mark.slow
def test_killed_ablation_resumes_without_rerunning_finished_runs(tmp_path: Path) -> None:
    cfg_path = tiny_experiment(tmp_path)
    out = tmp_path / "grid"
    cmd = [sys.executable, "-m", "moola_engine.cli", "ablate", "--config", str(cfg_path),
           "--strategies", "frozen,two_phase", "--seeds", "2", "--threads", "1", "--out", str(out), "--no-figures"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([*cmd, "--jobs", "2"], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = 3 * 2 * 2
    deadline = time.monotonic() + 120
    done: list[Path] = []
    while time.monotonic() < deadline:
        done = sorted((out / "cells").glob("*.json")) if (out / "cells").is_dir() else []
        if len(done) >= 3 or proc.poll() is not None:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: the runner and its workers
    proc.wait()
    done = sorted((out / "cells").glob("*.json"))
    assert 3 <= len(done) < total, f"kill landed at {len(done)}/{total} finished runs"
    before = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in done}

    resumed = subprocess.run([*cmd, "--jobs", "1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(before)} of {total} runs already done" in resumed.stderr or "already done" in resumed.stderr
    for name, (mtime, text) in before.items():  # finished runs were not touched, let alone rerun
        p = out / "cells" / name
        assert (p.stat().st_mtime_ns, p.read_text()) == (mtime, text)
    markers = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    assert len(markers) == total
    run_dirs = {m["run_dir"] for m in markers}
    assert len(run_dirs) == total  # one run folder per cell
    finished_folders = [d for d in (out / "runs").iterdir() if not d.is_symlink() and (d / "result.json").is_file()]
    assert len(finished_folders) == total  # no cell trained twice to completion
    interrupted = list((out / "interrupted").iterdir()) if (out / "interrupted").is_dir() else []
    assert len(interrupted) <= 2  # at most one run per killed worker, moved aside

    # the same grid, uninterrupted, in-process
    cfg = load_config(cfg_path)
    ref = build_grid(cfg, strategies=["frozen", "two_phase"], seeds=2, out=tmp_path / "ref")
    counts = run_grid(ref, jobs=1, threads=1, stream=io.StringIO())
    assert counts == {"total": total, "skipped": 0, "ran": total, "adopted": 0}
    again = run_grid(ref, jobs=1, threads=1, stream=io.StringIO())
    assert again["ran"] == 0 and again["skipped"] == total

    resumed_results = json.loads((out / "results.json").read_text())
    ref_results = summarize(ref)
    assert per_run(resumed_results) == per_run(ref_results)
    assert resumed_results["arms"] == json.loads(json.dumps(ref_results["arms"]))


@pytest.mark.slow
def test_two_jobs_run_cells_here_and_in_a_spawned_worker_with_the_same_results(tmp_path: Path) -> None:
    cfg = load_config(tiny_experiment(tmp_path))
    two = build_grid(cfg, strategies=["frozen", "two_phase"], seeds=2, out=tmp_path / "two")
    counts = run_grid(two, jobs=2, threads=1, stream=io.StringIO())
    total = 3 * 2 * 2
    assert counts == {"total": total, "skipped": 0, "ran": total, "adopted": 0}
    pids = [json.loads(p.read_text())["pid"] for p in (two.out / "cells").glob("*.json")]
    assert len(pids) == total
    assert os.getpid() in pids  # this process ran cells itself ...
    assert len(set(pids)) == 2  # ... and so did exactly one spawned worker
    for marker in (two.out / "cells").glob("*.json"):  # cells checkpoint around transitions and the last epoch only
        m = json.loads(marker.read_text())
        if m["strategy"] == "frozen" and not m["control"]:  # frozen: the first phase's first epoch and the last
            kept = sorted(d.name for d in (two.out / m["run_dir"] / "checkpoints").iterdir())
            assert kept == ["epoch-0000", "epoch-0002"], kept
    one = build_grid(cfg, strategies=["frozen", "two_phase"], seeds=2, out=tmp_path / "one")
    run_grid(one, jobs=1, threads=1, stream=io.StringIO())
    assert per_run(summarize(two)) == per_run(summarize(one))  # bitwise: where a cell runs does not matter


def test_each_seed_starts_its_costliest_runs_first(tmp_path: Path) -> None:
    cfg = load_config(tiny_experiment(tmp_path, epochs=4))
    grid = build_grid(cfg, strategies=["frozen", "two_phase"], seeds=2, out=tmp_path / "g")
    encoder = 4 * 4 * (4 + 4 + 2) * 2  # biLSTM hidden 4 on 4 features: weights and both biases, two directions
    work = {a.label: a.work for a in grid.arms}
    assert work == {"control": 4 * encoder, "frozen": 0, "two_phase": 3 * encoder}  # from each arm's plan
    order = [c.key for c in run_order(grid, grid.cells())]
    assert order == [f"{arm}__s{s}__f{f}" for s in (0, 1) for arm in ("control", "two_phase", "frozen")
                     for f in (0, 1)]
    rest = [c for c in grid.cells() if c.seed == 1 or c.label == "frozen"]  # what a resumed grid has left
    assert [c.key for c in run_order(grid, rest)] == ["frozen__s0__f0", "frozen__s0__f1", *order[6:]]


@pytest.mark.slow
def test_a_worker_killed_mid_grid_fails_its_cell_instead_of_hanging(tmp_path: Path) -> None:
    import multiprocessing
    import threading

    # enough work (48 cells) that cells are still waiting when the worker, started ~2 s late, finishes its first
    cfg = load_config(tiny_experiment(tmp_path, epochs=10))
    grid = build_grid(cfg, strategies=["frozen", "two_phase"], seeds=8, out=tmp_path / "grid")
    outcome: dict[str, BaseException | dict] = {}

    def run() -> None:
        try:
            outcome["counts"] = run_grid(grid, jobs=2, threads=1, stream=io.StringIO())
        except BaseException as exc:  # the test inspects whatever ended the grid
            outcome["error"] = exc

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    deadline = time.monotonic() + 60
    victim = None
    while victim is None and time.monotonic() < deadline:  # the spawned worker, once it has finished a cell
        for child in multiprocessing.active_children():
            markers = [json.loads(p.read_text()) for p in (grid.out / "cells").glob("*.json")]
            if any(m.get("pid") == child.pid for m in markers):
                victim = child
        time.sleep(0.02)
    assert victim is not None, "the spawned worker never finished a cell"
    left = 48 - len(list((grid.out / "cells").glob("*.json")))
    os.kill(victim.pid, signal.SIGKILL)  # what the OOM killer does
    assert left > 4, f"only {left} cells left when the worker was killed: the test would prove nothing"
    runner.join(timeout=60)
    assert not runner.is_alive(), "ablate hung after its worker died"
    err = outcome.get("error")
    assert isinstance(err, MoolaError), outcome
    assert f"worker process {victim.pid} died while running this cell" in str(err)
    assert "runs are done and kept" in str(err)


@pytest.mark.slow
def test_ctrl_c_stops_a_two_job_ablation_at_once_and_leaves_no_worker_behind(tmp_path: Path) -> None:
    cfg_path = tiny_experiment(tmp_path, epochs=10)
    out = tmp_path / "grid"
    cmd = [sys.executable, "-m", "moola_engine.cli", "ablate", "--config", str(cfg_path), "--strategies",
           "frozen,two_phase", "--seeds", "8", "--threads", "1", "--jobs", "2", "--out", str(out), "--no-figures"]
    # its own process group, as a shell gives a foreground job: Ctrl-C sends SIGINT to every process in it
    # (a shell that starts pytest in the background ignores SIGINT for it, and children inherit that: restore the
    # default, so Python turns Ctrl-C into KeyboardInterrupt as it does in a terminal)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        pids: set[int] = set()
        while time.monotonic() < deadline and proc.poll() is None and len(pids) < 2:
            if (out / "cells").is_dir():
                pids = {json.loads(p.read_text())["pid"] for p in (out / "cells").glob("*.json")}
            time.sleep(0.02)
        assert proc.poll() is None, "the grid ended before the test could interrupt it"
        assert len(pids) == 2, f"cells finished in {len(pids)} process(es), not in both"
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert time.monotonic() - t0 < 10, "Ctrl-C took more than 10 s to stop the grid"
        assert "interrupted;" in err and "runs are done and kept. Rerun the same command to continue." in err
        gone = time.monotonic() + 10
        while time.monotonic() < gone:  # the spawned worker too: nothing of the process group is left
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("a process of the interrupted ablation was still alive 10 s after it exited")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever happened above, no grid keeps training
        proc.wait()


def test_a_grid_folder_refuses_a_different_experiment(tmp_path: Path) -> None:
    cfg_path = tiny_experiment(tmp_path)
    cfg = load_config(cfg_path)
    grid = build_grid(cfg, strategies=["frozen"], seeds=1, out=tmp_path / "g")
    prepare(grid)
    import attrs

    changed = attrs.evolve(cfg, train=attrs.evolve(cfg.train, epochs=4))
    with pytest.raises(MoolaError, match=r"different experiment \(changed: experiment.train.epochs\)"):
        prepare(build_grid(changed, strategies=["frozen"], seeds=1, out=tmp_path / "g"))
    more_seeds = build_grid(cfg, strategies=["frozen", "two_phase"], seeds=3, out=tmp_path / "g")
    prepare(more_seeds)  # more seeds or arms extend the same experiment


def test_bad_grid_requests_fail_before_any_run(tmp_path: Path) -> None:
    cfg = load_config(tiny_experiment(tmp_path))
    with pytest.raises(MoolaError, match=r"unknown strategy \"gradul\"; defined in .*: frozen, immediate, two_phase"):
        build_grid(cfg, strategies=["gradul"], seeds=1, out=tmp_path / "g")
    with pytest.raises(ConfigError, match="random-encoder control"):
        build_grid(cfg, strategies=["control"], seeds=1, out=tmp_path / "g")
    grid = build_grid(cfg, strategies=["frozen"], seeds=1, out=tmp_path / "g")
    assert any("no [model.pretrained]" in w for w in grid.warnings)  # said loudly
    assert not (tmp_path / "g").exists()


def test_progress_counts_runs_in_plain_lines_without_a_terminal() -> None:
    buf = io.StringIO()  # not a terminal
    p = Bar(4, done=1, unit="runs", label="ablate", stream=buf)
    p.advance("frozen seed 0 fold 1")
    p.advance("two_phase seed 0 fold 1")
    p.close()
    text = buf.getvalue()
    lines = text.splitlines()
    assert lines[0].startswith("ablate 2/4 runs  frozen seed 0 fold 1  elapsed ")
    assert "eta" in lines[0]
    assert lines[1].startswith("ablate 3/4 runs  two_phase seed 0 fold 1")
    assert "\r" not in text and "\x1b" not in text


# --------------------------------------------------------------------------- red flags on constructed runs


def fake_grid(tmp: Path, labels: dict[str, str], seeds: int = 8) -> Grid:
    cfg = ExperimentConfig(model=ModelConfig(pretrained=PretrainedConfig(path="enc.safetensors")),
                           source=str(tmp / "x.toml"))
    arms = [Arm(label="control", strategy="immediate", control=True, definition={"plugin": "immediate", "params": {}})]
    arms += [Arm(label=k, strategy=k, control=False, definition={"plugin": v, "params": {}}) for k, v in labels.items()]
    grid = Grid(cfg=cfg, arms=arms, seeds=list(range(seeds)), folds=1, out=tmp / "grid",
                strategies_file=tmp / "s.toml")
    prepare(grid)
    return grid


def fake_run(grid: Grid, cell: Cell, pred: np.ndarray, y: np.ndarray, trainable: list[list[str]]) -> None:
    d = grid.runs_dir / cell.key
    d.mkdir(parents=True)
    outputs = np.stack([1.0 - pred, pred.astype(np.float64)], axis=1).astype(np.float32)
    np.savez(d / "predictions.npz", test_outputs=outputs, test_y=y)
    events = [{"event": "groups.resolved", "groups": [{"name": "encoder.layer0", "head": False},
                                                      {"name": "head", "head": True}]}]
    events += [{"event": "epoch.completed", "epoch": i, "trainable": t} for i, t in enumerate(trainable)]
    events += [{"event": "run.finished"}]
    (d / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (d / "metrics.csv").write_text("epoch,val_accuracy\n" + "".join(f"{i},0.5\n" for i in range(len(trainable))))
    (d / "result.json").write_text("{}")
    _write_marker(grid, cell, d, 1.0)


def test_red_flags_on_constructed_runs(tmp_path: Path) -> None:
    grid = fake_grid(tmp_path, {"stuck": "two-phase", "copy": "immediate", "probe": "frozen"})
    rng = np.random.default_rng(0)
    both, head = [["encoder.layer0", "head"]] * 3, [["head"]] * 3
    for cell in grid.cells():
        y = np.array([0] * 14 + [1] * 6)
        noise = np.random.default_rng(cell.seed).integers(0, 2, 20)  # chance-level predictions, paired by seed
        pred = noise if cell.label in ("control", "copy") else rng.integers(0, 2, 20)
        fake_run(grid, cell, pred, y, both if cell.label in ("control", "copy") else head)
    res = summarize(grid, n_boot=500)
    flags = {(f["code"], f["arm"]) for f in res["red_flags"]}
    assert ("encoder-never-trained", "stuck") in flags  # a two-phase run whose encoder never trained
    assert ("encoder-never-trained", "probe") not in flags  # frozen by design: a note, not a flag
    assert any("never trains, by design" in n for n in res["notes"])
    assert ("predictions-identical", "copy") in flags
    assert ("near-majority", None) in flags  # nobody beats always predicting class 0 (70%)
    assert ("interval-too-wide", "stuck") in flags
    copy = next(a for a in res["arms"] if a["label"] == "copy")
    assert copy["vs_control"]["accuracy"]["mean"] == 0.0 and copy["vs_control"]["accuracy"]["p"] == 1.0
    assert res["majority_rate"]["mean"] == pytest.approx(0.7)
    text = console_summary(res)
    assert "RED FLAG [predictions-identical] copy" in text
    records, _ = collect(grid)
    paths = write_report(grid, res, records, command="moola-engine ablate ...", with_figures=False)
    md = paths["markdown"].read_text()
    assert "**encoder-never-trained** (stuck)" in md and "stuck: encoder.layer0: 0-2 frozen" in md
    assert json.loads(paths["results"].read_text())["red_flags"] == res["red_flags"]
    assert "<table>" in paths["html"].read_text()


def test_a_real_effect_raises_no_flag(tmp_path: Path) -> None:
    grid = fake_grid(tmp_path, {"good": "two-phase"}, seeds=10)
    both = [["encoder.layer0", "head"]] * 2
    for cell in grid.cells():
        y = np.array([0, 1] * 10)
        rng = np.random.default_rng(cell.seed)
        flip = rng.random(20) < (0.45 if cell.control else 0.1)  # control near chance, "good" ~90% right
        fake_run(grid, cell, np.where(flip, 1 - y, y), y, both)
    res = summarize(grid, n_boot=500)
    assert res["red_flags"] == []
    good = next(a for a in res["arms"] if a["label"] == "good")
    assert good["vs_control"]["accuracy"]["lo"] > 0 and good["vs_control"]["accuracy"]["p"] < 0.01
    assert not good["within_noise_of_majority"]


def test_report_has_figures_with_matplotlib(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    grid = fake_grid(tmp_path, {"probe": "frozen"}, seeds=2)
    for cell in grid.cells():
        y = np.array([0, 1] * 5)
        fake_run(grid, cell, y, y, [["head"], ["encoder.layer0", "head"]])
    records, _ = collect(grid)
    paths = write_report(grid, summarize(grid, n_boot=200), records, command="x")
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 2  # learning curves + freeze timeline
    assert "distance from the pretrained weights unavailable" in page


def test_preset_without_its_config_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import attrs

    import moola_ohlc.plugin
    from moola_engine.cli import main
    from moola_engine.experiments import grid as ablation

    missing = tmp_path / "nope.toml"
    original = moola_ohlc.plugin.seed_preset()
    monkeypatch.setattr(ablation, "get_preset", lambda name: attrs.evolve(original, config=missing))
    assert main(["ablate", "--preset", "seed"]) == 2
    err = capsys.readouterr().err
    assert f"--preset seed: its config {missing} does not exist" in err
