"""Ablation workers on CUDA without a GPU: the placement arithmetic on made-up figures, and ``run_grid`` with the
CUDA queries replaced (2 pretend GPUs), checking which device each worker's cells get and how many workers start."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moola_engine.config import load_config
from moola_engine.errors import ConfigError
from moola_engine.experiments import ablation, placement
from moola_engine.experiments.ablation import batch_groups, run_grid
from moola_engine.experiments.grid import Cell, build_grid, cell_config
from moola_engine.experiments.placement import GIB, MIB, cuda_jobs, cuda_targets, parse_devices, worker_devices
from moola_engine.experiments.workers import GroupTask, Task, placed, run_cell, task_cells

STRATEGIES = '[strategy.frozen]\nplugin = "frozen"\n[strategy.immediate]\nplugin = "immediate"\n'


def tiny_grid(tmp: Path, device: str = "cuda", seeds: int = 2, folds: int = 2) -> Any:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5, 4)).astype(np.float32)
    np.savez(tmp / "d.npz", x=x, y=(x[:, :, 0].mean(1) > 0).astype(np.int64))
    (tmp / "strategies.toml").write_text(STRATEGIES)
    (tmp / "exp.toml").write_text(f"""
[train]
epochs = 2
batch_size = 8
device = "{device}"
[model]
name = "tests.conftest:TinyNet"
params = {{ c = 4 }}
groups = [{{name = "encoder.layer0", modules = ["enc0"]}}, {{name = "encoder.layer1", modules = ["enc1"]}},
          {{name = "head", modules = ["head"], head = true}}]
[data]
kind = "npz"
path = "d.npz"
folds = {folds}
[run]
strategies_file = "strategies.toml"
""")
    return build_grid(load_config(tmp / "exp.toml"), strategies=["frozen"], seeds=seeds, out=tmp / "grid")


# --------------------------------------------------------------------------- pure functions


def test_parse_devices() -> None:
    assert parse_devices("0,1") == [0, 1]
    assert parse_devices(" 2 , 0") == [2, 0]
    for bad in ("", "a", "0,,1", "-1", "0,0", "1.5", "\u00b2", "9" * 5000):
        with pytest.raises(ConfigError, match="^--devices: "):
            parse_devices(bad)


def test_cuda_targets() -> None:
    assert cuda_targets("auto", gpu_count=0) == []  # the CPU: nothing changes
    assert cuda_targets("cpu", gpu_count=4) == []
    assert cuda_targets("auto", gpu_count=2) == [0, 1]
    assert cuda_targets("cuda", gpu_count=3) == [0, 1, 2]
    assert cuda_targets("cuda:1", gpu_count=3) == [1]
    assert cuda_targets("cuda:1", gpu_count=3, only=[0, 2]) == [0, 2]  # --devices wins over cuda:N
    assert cuda_targets("auto", gpu_count=3, only=[2]) == [2]
    with pytest.raises(ConfigError, match=r"^--devices: no GPU 2 here: 2 visible \(indices 0..1\)"):
        cuda_targets("cuda", gpu_count=2, only=[0, 2])
    with pytest.raises(ConfigError, match=r"^--devices: no CUDA device is visible here"):
        cuda_targets("auto", gpu_count=0, only=[0])
    with pytest.raises(ConfigError, match=r"^--devices: the cells run on train.device = 'cpu'"):
        cuda_targets("cpu", gpu_count=2, only=[0])
    with pytest.raises(ConfigError, match=r"^train.device: 'cuda' but no CUDA device is visible"):
        cuda_targets("cuda", gpu_count=0)
    with pytest.raises(ConfigError, match=r"^train.device: 'cuda:3' but only 2 GPU"):
        cuda_targets("cuda:3", gpu_count=2)


def test_worker_devices_round_robin() -> None:
    assert worker_devices([0, 1], 5) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices([3], 3) == ["cuda:3"] * 3
    assert worker_devices([2, 0], 2) == ["cuda:2", "cuda:0"]
    assert worker_devices([], 4) == []  # CPU: no placement


def test_cuda_jobs_arithmetic() -> None:
    # 3 GPUs, 7.8 GiB free each, 0.6 GiB a cell, 16 cores: memory allows floor(0.9 x 7.8 / 0.6) = 11, cores 16 // 3 = 5
    d = cuda_jobs(gpus=3, free_bytes=[int(7.8 * GIB)] * 3, task_bytes=int(0.6 * GIB), cores=16)
    assert (d.per_gpu, d.total, d.limit) == (5, 15, "cores")
    assert d.line == ("ablate: 3 GPUs, 7.8 GiB free each, about 0.6 GiB a cell -> 5 jobs per GPU "
                      "(capped by 16 host cores over 3 GPUs)")
    # memory decides: floor(0.9 x 4 / 1) = 3
    d = cuda_jobs(gpus=1, free_bytes=[4 * GIB], task_bytes=GIB, cores=16)
    assert (d.per_gpu, d.total, d.limit) == (3, 3, "memory")
    assert d.line == "ablate: 1 GPU, 4.0 GiB free, about 1.0 GiB a cell -> 3 jobs per GPU (0.9 x free memory)"
    # the cap: an H200's 139 GiB and a small cell would allow hundreds
    d = cuda_jobs(gpus=1, free_bytes=[139 * GIB], task_bytes=600 * MIB, cores=64)
    assert (d.per_gpu, d.limit) == (16, "cap")
    # the smallest GPU decides for all of them
    d = cuda_jobs(gpus=2, free_bytes=[20 * GIB, 2 * GIB], task_bytes=GIB, cores=32)
    assert (d.per_gpu, d.total) == (1, 2)
    # not even one fits: still one (the cell fails with its own out-of-memory message if it really does not fit)
    d = cuda_jobs(gpus=1, free_bytes=[GIB // 2], task_bytes=GIB, cores=8, what="batched group", measured=False)
    assert (d.per_gpu, d.limit) == (1, "memory")
    assert "0.5 GiB free, 1.0 GiB a batched group -> 1 job per GPU (0.9 x free memory: not even one fits, trying one)" in d.line
    assert "about" not in d.line  # --cell-memory: a given figure, not a measured one
    # one core per GPU: the cores cap gives one worker per GPU, never zero
    assert cuda_jobs(gpus=4, free_bytes=[40 * GIB] * 4, task_bytes=GIB, cores=2).per_gpu == 1


def _cells(seeds: int, folds: int, labels: Sequence[int | None] = (None,)) -> list[Cell]:
    return [Cell(label=a, strategy=a, control=a == "control", seed=s, fold=f, labels=n)
            for s in range(seeds) for n in labels for f in range(folds) for a in ("control", "a", "b", "c", "d")]


def test_batch_groups_by_fold_and_budget_balanced() -> None:
    cells = _cells(10, 1)  # the seed grid: 5 arms x 10 seeds
    groups = batch_groups(cells, 16)
    assert [len(g) for g in groups] == [13, 13, 12, 12]  # not 16, 16, 16, 2
    assert [c for g in groups for c in g] == cells  # every cell once, in the given order
    two = batch_groups(_cells(2, 2, labels=(10, 20)), 16)
    assert sorted(len(g) for g in two) == [2 * 5] * 4  # 2 folds x 2 budgets, each its own group of 10
    for g in two:
        assert len({(c.fold, c.labels) for c in g}) == 1  # one fold and budget per group: one data shape
    assert [len(g) for g in batch_groups(cells[:5], 1)] == [1] * 5
    with pytest.raises(ConfigError, match="^--batch-size-runs"):
        batch_groups(cells, 0)


# --------------------------------------------------------------------------- run_grid with 2 pretend GPUs


class Recorder:
    """Stands in for the local pool: records each call and reports every cell finished."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, tasks: list[Task | GroupTask], jobs: int, threads: int, finish: Any, *,
                 devices: Sequence[str] | None = None) -> None:
        self.calls.append({"tasks": list(tasks), "jobs": jobs, "threads": threads, "devices": list(devices or [])})
        for t in tasks:
            for c in task_cells(t):
                finish({"key": c.key, "ok": True})


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(placement, "gpu_count", lambda: 2)
    monkeypatch.setattr(ablation, "_execute", rec)
    monkeypatch.setattr(ablation, "default_jobs", lambda: 16)
    return rec


def test_explicit_jobs_spread_round_robin_over_two_gpus(tmp_path: Path, two_gpus: Recorder) -> None:
    grid = tiny_grid(tmp_path)  # 2 arms x 2 seeds x 2 folds = 8 cells
    out = io.StringIO()
    counts = run_grid(grid, jobs=3, stream=out)
    assert counts["ran"] == 8
    (call,) = two_gpus.calls
    assert call["jobs"] == 3 and call["devices"] == ["cuda:0", "cuda:1", "cuda:0"]
    assert call["threads"] == 1  # one torch thread per worker on CUDA, not cores // jobs
    assert all(t.cfg.train.threads == 1 for t in call["tasks"])
    assert "this process and 2 spawned worker(s) on cuda:0 x 2, cuda:1 x 1" in out.getvalue()


def test_devices_flag_restricts_the_gpus(tmp_path: Path, two_gpus: Recorder) -> None:
    grid = tiny_grid(tmp_path, device="auto")
    run_grid(grid, jobs=2, devices=[1], stream=io.StringIO())
    assert two_gpus.calls[0]["devices"] == ["cuda:1", "cuda:1"]  # several workers may share one GPU
    with pytest.raises(ConfigError, match="^--devices: no GPU 5 here"):
        run_grid(tiny_grid(tmp_path, device="auto"), jobs=2, devices=[5], stream=io.StringIO())


def test_memory_aware_default_measures_the_first_cell(tmp_path: Path, two_gpus: Recorder,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    probed: list[tuple[str, str]] = []
    monkeypatch.setattr(placement, "reset_peak", lambda d: probed.append(("reset", d)))
    monkeypatch.setattr(placement, "peak_reserved", lambda d: probed.append(("peak", d)) or 1500 * MIB)
    monkeypatch.setattr(placement, "release_cached", lambda d: None)
    monkeypatch.setattr(placement, "free_memory", lambda k: 8 * GIB)
    grid = tiny_grid(tmp_path, seeds=4)  # 2 arms x 4 seeds x 2 folds = 16 cells
    out = io.StringIO()
    run_grid(grid, stream=out)
    first, rest = two_gpus.calls
    assert (first["jobs"], first["devices"], len(first["tasks"])) == (1, ["cuda:0"], 1)  # in-process, measured
    assert probed == [("reset", "cuda:0"), ("peak", "cuda:0")]
    # (1500 + 500 MiB context) a cell, 8 GiB free: floor(0.9 x 8192 / 2000) = 3 per GPU, 6 in all
    assert "ablate: 2 GPUs, 8.0 GiB free each, about 2.0 GiB a cell -> 3 jobs per GPU (0.9 x free memory)" \
        in out.getvalue()
    assert rest["jobs"] == 6 and rest["devices"] == ["cuda:0", "cuda:1"] * 3 and len(rest["tasks"]) == 15
    assert rest["threads"] == 1


def test_cell_memory_flag_skips_the_measurement(tmp_path: Path, two_gpus: Recorder,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "free_memory", lambda k: 8 * GIB)
    monkeypatch.setattr(placement, "reset_peak", lambda d: pytest.fail("measured despite --cell-memory"))
    out = io.StringIO()
    run_grid(tiny_grid(tmp_path), cell_memory_mib=4000, stream=out)
    (call,) = two_gpus.calls
    assert call["jobs"] == 2 and call["devices"] == ["cuda:0", "cuda:1"]  # floor(0.9 x 8192 / 4000) = 1 per GPU
    assert "3.9 GiB a cell -> 1 job per GPU" in out.getvalue()
    with pytest.raises(ConfigError, match="^--cell-memory: sets the memory-aware default of --jobs"):
        run_grid(tiny_grid(tmp_path), cell_memory_mib=4000, jobs=2, stream=io.StringIO())


def test_on_the_cpu_nothing_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    monkeypatch.setattr(placement, "gpu_count", lambda: 0)
    monkeypatch.setattr(ablation, "_execute", rec)
    monkeypatch.setattr(ablation, "default_jobs", lambda: 4)
    run_grid(tiny_grid(tmp_path, device="auto"), stream=io.StringIO())
    (call,) = rec.calls
    assert (call["jobs"], call["threads"], call["devices"]) == (4, 1, [])  # cores workers, cores // jobs threads
    assert all(t.cfg.train.device == "auto" for t in call["tasks"])
    with pytest.raises(ConfigError, match="^--cell-memory: the cells run on train.device = 'auto', not on CUDA"):
        run_grid(tiny_grid(tmp_path, device="auto"), cell_memory_mib=500, stream=io.StringIO())
    with pytest.raises(ConfigError, match="^--devices: no CUDA device is visible here"):
        run_grid(tiny_grid(tmp_path, device="auto"), devices=[0], stream=io.StringIO())


def test_a_workers_device_is_the_one_its_run_records(tmp_path: Path) -> None:
    """The worker's device goes into the cell's config, so config.json records where the run ran."""
    grid = tiny_grid(tmp_path, device="auto", seeds=1, folds=1)
    cell = grid.cells()[0]
    cfg = cell_config(grid, cell, 1)
    assert placed(cfg, "cuda:1").train.device == "cuda:1"
    assert placed(cfg, None) is cfg
    task = Task(cfg=cfg, cell=cell, strategies_file=str(grid.strategies_file), out=str(grid.out),
                marker=str(tmp_path / "marker.json"))
    rec = run_cell(task, device="cpu")  # a real run on the device a worker was given
    assert rec["ok"], rec
    recorded = json.loads((Path(rec["run_dir"]) / "config.json").read_text())["config"]["train"]["device"]
    assert recorded == "cpu" and cfg.train.device == "auto"


def test_grid_flags_that_need_the_local_pool(tmp_path: Path) -> None:
    grid = tiny_grid(tmp_path, device="auto")

    def executor(*args: Any) -> None:
        pytest.fail("ran despite a refused flag")

    for kw, flag in (({"batched": True}, "--batched"), ({"devices": [0]}, "--devices"),
                     ({"cell_memory_mib": 100.0}, "--cell-memory")):
        with pytest.raises(ConfigError, match=f"^{flag}: only with the local pool"):
            run_grid(grid, stream=io.StringIO(), executor=executor, **kw)
    assert not (grid.out / "cells").exists()

