"""`ablate --backend ray`: the grid's cells as Ray tasks on a local instance; a worker killed mid-cell, then resume."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_ablation import tiny_experiment

from moola_engine.cli import main
from moola_engine.config import load_config
from moola_engine.errors import MoolaError
from moola_engine.experiments.ablation import run_grid
from moola_engine.experiments.grid import build_grid
from moola_engine.experiments.ray_backend import RayExecutor
from moola_engine.experiments.summary import collect


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_grid_survives_a_killed_worker_and_resumes(tmp_path: Path, local_ray: Any) -> None:
    cfg = load_config(tiny_experiment(tmp_path, epochs=10))
    grid = build_grid(cfg, strategies=["frozen", "two_phase"], seeds=4, out=tmp_path / "grid")
    total = len(grid.cells())
    executor = RayExecutor(num_cpus=1)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["counts"] = run_grid(grid, stream=io.StringIO(), executor=executor)
        except BaseException as exc:  # the test inspects whatever ended the grid
            outcome["error"] = exc

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline:  # a Ray worker, once it has finished a cell
        markers = [json.loads(p.read_text()) for p in (grid.out / "cells").glob("*.json")]
        pids = {m["pid"] for m in markers} - {os.getpid()}
        victim = next(iter(pids), None)
        time.sleep(0.02)
    assert victim is not None, "no Ray worker finished a cell"
    done_before = len(list((grid.out / "cells").glob("*.json")))
    os.kill(victim, signal.SIGKILL)  # what the OOM killer does, in the middle of its next cell
    assert total - done_before > 4, "too few cells left when the worker was killed: the test would prove nothing"
    runner.join(timeout=120)
    assert not runner.is_alive(), "ablate hung after its Ray worker died"
    err = outcome.get("error")
    assert isinstance(err, MoolaError), outcome
    assert "the Ray worker running cell" in str(err) and "died or was lost" in str(err)
    assert "runs are done and kept" in str(err)
    kept = len(list((grid.out / "cells").glob("*.json")))
    assert 0 < kept < total

    # the same command again resumes: only the missing cells run, on Ray, and the grid completes
    counts = run_grid(grid, stream=io.StringIO(), executor=executor)
    assert counts["total"] == total and counts["ran"] + counts["skipped"] + counts["adopted"] == total
    assert counts["ran"] <= total - kept
    records, missing = collect(grid)
    assert len(records) == total and not missing


def test_ray_flags_need_the_ray_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_experiment(tmp_path)
    base = ["ablate", "--config", str(cfg), "--strategies", "frozen", "--seeds", "1", "--out", str(tmp_path / "g")]
    assert main([*base, "--address", "auto"]) == 2
    assert "--address: only with --backend ray" in capsys.readouterr().err
    assert main([*base, "--backend", "ray", "--jobs", "2"]) == 2
    assert "with --backend ray use --cpus-per-cell" in capsys.readouterr().err
    assert not (tmp_path / "g" / "cells").exists()  # refused before any cell ran
