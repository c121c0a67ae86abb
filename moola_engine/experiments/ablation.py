"""Running an ablation grid, resumably: the manifest, the done markers, the run order, ``run_grid``.

The grid itself (arms, cells, presets, the fingerprint) is :mod:`moola_engine.experiments.grid`; the worker
processes are :mod:`moola_engine.experiments.workers`.  Every cell is an ordinary ``moola-engine train`` run
with its own run folder and event log.

The output folder::

    <out>/grid.json            manifest: what experiment this grid is (checked on resume)
    <out>/cells/<key>.json     done marker of one finished run (written atomically, last)
    <out>/runs/<run-id>/       the run folders
    <out>/interrupted/         run folders of runs killed mid-way (kept for inspection, never reused)
    <out>/results.json, report.md, report.html

A killed ablation continues where it stopped: a cell with a done marker is
never run again; a run folder that finished but lost its marker (killed
between the two writes) is adopted; an unfinished one is moved aside and
its cell runs again.  With J jobs, this process runs cells too, next to J - 1
spawned worker processes (torch and ``fork`` do not mix); each sets its own
thread count so workers do not fight over cores.  On CUDA each worker takes one GPU,
round-robin, and without ``--jobs`` the first cell's memory sets how many fit
(:mod:`moola_engine.experiments.placement`); ``--batched`` hands workers groups of
cells trained as one stacked computation (:func:`batch_groups`).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import attrs

from moola_engine import jsonsafe
from moola_engine.errors import ConfigError, MoolaError
from moola_engine.experiments import placement
from moola_engine.experiments.grid import (
    GRID_VERSION,
    Cell,
    Grid,
    _diff,
    cell_config,
    fingerprint,
    marker_record,
)
from moola_engine.experiments.workers import AnyTask, GroupTask, Task, _execute, default_jobs, describe
from moola_engine.runs.folders import write_json_atomic
from moola_engine.runs.progress import Bar


def prepare(grid: Grid) -> None:
    """Create the output folder and its manifest, or check that an existing one is the same experiment."""
    grid.cells_dir.mkdir(parents=True, exist_ok=True)
    grid.runs_dir.mkdir(parents=True, exist_ok=True)
    manifest = grid.out / "grid.json"
    fp = fingerprint(grid)
    if manifest.is_file():
        try:
            old = jsonsafe.loads(manifest.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise MoolaError(f"{manifest}: not a grid manifest ({exc.msg}); pass --out NEW_DIR") from exc
        changed = _diff(old.get("fingerprint", {}), jsonsafe.loads(jsonsafe.dumps(fp, default=str)))
        if changed:
            raise MoolaError(
                f"{grid.out} holds an ablation of a different experiment (changed: {', '.join(changed)}); "
                "its finished runs cannot be reused. Pass --out NEW_DIR, or delete that folder to start over.")
    write_json_atomic(manifest, {
        "version": GRID_VERSION, "fingerprint": fp, "config_file": grid.cfg.source,
        "strategies_file": str(grid.strategies_file), "seeds": grid.seeds, "folds": grid.folds,
        "labels": grid.labels,
        "arms": [attrs.asdict(a) for a in grid.arms], "cells": [c.key for c in grid.cells()],
    })


def run_order(grid: Grid, cells: Sequence[Cell]) -> list[Cell]:
    """Seed by seed in the grid's seed order, but within a seed the costliest arms first; runs of equal cost
    keep the order they are given in (:meth:`Grid.cells` order, from :func:`pending`).

    With several workers the grid's wall time ends with whichever run finishes last; starting each seed's
    long runs (encoder trained for many epochs) first and its short ones (frozen encoder) last leaves a short
    run for the end.  Seeds stay in order, so an interrupted grid still has whole seeds done.
    """
    seed_rank = {s: i for i, s in enumerate(grid.seeds)}
    work = {a.label: a.work for a in grid.arms}
    return sorted(cells, key=lambda c: (seed_rank[c.seed], -work[c.label]))  # stable: ties keep their order


def read_marker(grid: Grid, cell: Cell) -> dict[str, Any] | None:
    path = grid.marker(cell)
    if not path.is_file():
        return None
    try:
        marker: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))  # written by this module: a dict
    except json.JSONDecodeError:
        return None  # cannot happen with atomic writes; treat as not done
    return marker


def _write_marker(grid: Grid, cell: Cell, run_dir: Path, seconds: float, adopted: bool = False) -> None:
    write_json_atomic(grid.marker(cell), marker_record(cell, run_dir, grid.out, seconds, adopted=adopted))


def _finished(run_dir: Path) -> bool:
    from moola_engine.logs import Event, read_events

    if not (run_dir / "result.json").is_file():
        return False
    try:
        return any(e.get("event") == Event.RUN_FINISHED for e in read_events(run_dir / "events.jsonl"))
    except MoolaError:
        return False


def _run_folders_of(grid: Grid) -> dict[str, list[Path]]:
    """Run folders under <out>/runs by cell key (from each folder's config.json)."""
    found: dict[str, list[Path]] = {}
    if not grid.runs_dir.is_dir():
        return found
    for d in sorted(grid.runs_dir.iterdir()):
        if d.is_symlink() or not d.is_dir():  # runs/latest
            continue
        try:
            cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))["config"]
            name, seed, fold = cfg["run"]["name"], cfg["train"]["seed"], cfg["data"]["fold"]
            labels = cfg["data"].get("labels") if grid.budgets else None
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            continue
        if labels is not None:
            name = name.removesuffix(f"-n{labels}")
        label = name.rsplit("-f", 1)[0]
        found.setdefault(Cell(label=label, strategy="", control=False, seed=seed, fold=fold, labels=labels).key,
                         []).append(d)
    return found


def pending(grid: Grid) -> tuple[list[Cell], list[Path]]:
    """Cells still to run; adopts finished runs that lost their marker, moves unfinished ones aside."""
    todo: list[Cell] = []
    moved: list[Path] = []
    folders = _run_folders_of(grid)
    for cell in grid.cells():
        if read_marker(grid, cell) is not None:
            continue
        adopted = False
        for d in folders.get(cell.key, []):
            if not adopted and _finished(d):
                _write_marker(grid, cell, d, 0.0, adopted=True)
                adopted = True
            elif d.exists():
                dest = grid.out / "interrupted" / d.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(d), dest)
                moved.append(dest)
        if not adopted:
            todo.append(cell)
    return todo, moved


# --------------------------------------------------------------------------- the runner


def batch_groups(cells: Sequence[Cell], size: int) -> list[list[Cell]]:
    """``ablate --batched``: the cells of each fold and label budget (arms and seeds together: every arm has the same
    model shape and data size there), in the order given, cut into the fewest groups of at most ``size``, as equal as
    possible (50 cells by 16: 13, 13, 12, 12; a tail group of 2 would batch little)."""
    if size < 1:
        raise ConfigError("--batch-size-runs", f"expected a value >= 1, got {size}")
    by_shape: dict[tuple[int, int | None], list[Cell]] = {}
    for c in cells:
        by_shape.setdefault((c.fold, c.labels), []).append(c)
    groups: list[list[Cell]] = []
    for members in by_shape.values():
        n = -(-len(members) // size)  # ceil
        base, extra = divmod(len(members), n)
        start = 0
        for g in range(n):
            end = start + base + (1 if g < extra else 0)
            groups.append(members[start:end])
            start = end
    return groups


def _check_local_flags(executor: Any, *, devices: Sequence[int] | None, cell_memory_mib: float | None,
                       batched: bool) -> None:
    given = [f for f, v in (("--devices", devices is not None), ("--cell-memory", cell_memory_mib is not None),
                            ("--batched", batched)) if v]
    if executor is not None and given:
        raise ConfigError(", ".join(given), "only with the local pool (not with --backend ray yet)")


def run_grid(grid: Grid, *, jobs: int | None = None, threads: int | None = None, stream: IO[str] | None = None,
             on_done: Callable[[Cell], None] | None = None, executor: Callable[..., None] | None = None,
             devices: Sequence[int] | None = None, cell_memory_mib: float | None = None, batched: bool = False,
             batch_size_runs: int = 16) -> dict[str, int]:
    """Run every pending cell in ``jobs`` worker processes; returns counts (total, skipped, ran, adopted).

    ``executor(tasks, jobs, threads, finish)`` replaces the local pool (e.g. :class:`.ray_backend.RayExecutor`).

    On CUDA (``train.device`` ``"auto"`` with a GPU, ``"cuda"``, ``"cuda:N"``) each local worker gets one GPU,
    round-robin over the visible ones or ``devices`` (``--devices``), and 1 torch thread unless ``threads``; without
    ``jobs`` the first task runs here first and its peak memory (or ``cell_memory_mib``) sets the jobs per GPU
    (:func:`.placement.cuda_jobs`).  ``batched``: the cells go in groups of at most ``batch_size_runs``
    (:func:`batch_groups`) through :func:`.batched.train_batched`, one group per task.
    """
    stream = stream if stream is not None else sys.stderr
    cores = default_jobs()
    if jobs is not None and jobs < 1:
        raise ConfigError("--jobs", f"expected a value >= 1, got {jobs}")
    _check_local_flags(executor, devices=devices, cell_memory_mib=cell_memory_mib, batched=batched)
    if batch_size_runs < 1:
        raise ConfigError("--batch-size-runs", f"expected a value >= 1, got {batch_size_runs}")
    targets = [] if executor is not None else placement.cuda_targets(
        grid.cfg.train.device, gpu_count=placement.gpu_count(), only=devices)
    if cell_memory_mib is not None:
        if not targets:
            raise ConfigError("--cell-memory", f"the cells run on train.device = {grid.cfg.train.device!r}, not on "
                                               "CUDA: --cell-memory sizes the GPU default of --jobs")
        if jobs is not None:
            raise ConfigError("--cell-memory", "sets the memory-aware default of --jobs; with --jobs given it is "
                                               "not used (drop one of them)")
        if not cell_memory_mib > 0:
            raise ConfigError("--cell-memory", f"expected MiB > 0, got {cell_memory_mib}")
    if targets:
        threads = threads or 1  # a GPU cell's host side is one thread's work; more threads only contend
    else:
        jobs = jobs or cores
        threads = threads or max(1, cores // jobs)
    prepare(grid)
    cells = grid.cells()
    before = sum(read_marker(grid, c) is not None for c in cells)
    todo, moved = pending(grid)
    todo = run_order(grid, todo)
    adopted = len(cells) - len(todo) - before
    for d in moved:
        print(f"ablate: moved the unfinished run folder {d.name} of an interrupted ablation to {d.parent}/",
              file=stream)
    done = len(cells) - len(todo)
    if done:
        print(f"ablate: resuming {grid.out}: {done} of {len(cells)} runs already done, {len(todo)} to go",
              file=stream)
    if not todo:
        progress = Bar(len(cells), done=done, unit="runs", label="ablate", stream=stream)
        progress.show("nothing to run")
        progress.close()
        return {"total": len(cells), "skipped": before, "ran": 0, "adopted": adopted}

    def task(c: Cell) -> Task:
        return Task(cfg=cell_config(grid, c, threads), cell=c, strategies_file=str(grid.strategies_file),
                    out=str(grid.out), marker=str(grid.marker(c)), pinned=grid.pinned)

    tasks: list[AnyTask] = ([GroupTask(tasks=[task(c) for c in g]) for g in batch_groups(todo, batch_size_runs)]
                            if batched else [task(c) for c in todo])
    by_key = {c.key: c for c in todo}
    modes: dict[str, list[str]] = {"batched": [], "fallback": []}
    bar: list[Bar] = []

    def start_progress() -> None:
        """The bar, once: after this function's own lines (a terminal's bar redraws over what is printed after)."""
        if not bar:
            bar.append(Bar(len(cells), done=done, unit="runs", label="ablate", stream=stream))
            bar[0].show(f"starting {describe(todo[0])}")

    def finish(rec: dict[str, Any]) -> None:
        start_progress()
        progress = bar[0]
        cell = by_key[rec["key"]]
        if not rec["ok"]:
            progress.close()
            raise MoolaError(
                f"run {describe(cell)} ({cell.strategy}) failed: {rec['error']}\n"
                f"       {progress.done} of {len(cells)} runs are done and kept; fix the cause and rerun the same "
                "command to continue")
        if "mode" in rec:
            modes[rec["mode"]].append(rec.get("reason", ""))
        progress.advance(describe(cell))
        if on_done is not None:
            on_done(cell)

    what = (f"{len(todo)} runs in {len(tasks)} batched group(s) of up to {batch_size_runs}" if batched
            else f"{len(todo)} runs")
    try:
        if executor is not None:
            jobs = min(jobs or cores, len(tasks))
            print(f"ablate: {what}, {getattr(executor, 'description', executor)}; run folders in {grid.runs_dir}",
                  file=stream)
            start_progress()
            executor(tasks, jobs, threads, finish)
        elif not targets:
            jobs = min(jobs or cores, len(tasks))
            workers = "this process" if jobs == 1 else f"this process and {jobs - 1} spawned worker(s)"
            print(f"ablate: {what}, {workers}, {threads} thread(s) each; run folders in {grid.runs_dir}", file=stream)
            start_progress()
            _execute(tasks, jobs, threads, finish)
        else:
            _run_on_cuda(grid, tasks, targets, jobs=jobs, threads=threads, cores=cores, cell_memory_mib=cell_memory_mib,
                         what=what, batched=batched, stream=stream, finish=finish, start_progress=start_progress)
    except KeyboardInterrupt:
        for b in bar:
            b.close()
        print(f"ablate: interrupted; {bar[0].done if bar else done:g} of {len(cells)} runs are done and kept. Rerun "
              "the same command to continue.", file=stream)
        raise
    for b in bar:
        b.close()
    if batched:
        print(batched_summary(modes["batched"], modes["fallback"]), file=stream)
    return {"total": len(cells), "skipped": before, "ran": len(todo), "adopted": adopted}


def batched_summary(batched: Sequence[str], fallback: Sequence[str]) -> str:
    """``ablate --batched``'s one line: how many runs trained stacked, how many separately and why."""
    line = f"ablate: --batched: {len(batched)} run(s) trained in stacked groups, {len(fallback)} separately"
    if fallback:
        counts: dict[str, int] = {}
        for reason in fallback:
            counts[reason] = counts.get(reason, 0) + 1
        line += " (" + "; ".join(f"{n} x {reason}" for reason, n in counts.items()) + ")"
    return line + " (each run's batched.started / batched.fallback event says which)"


def _run_on_cuda(grid: Grid, tasks: list[AnyTask], targets: list[int], *, jobs: int | None, threads: int, cores: int,
                 cell_memory_mib: float | None, what: str, batched: bool, stream: IO[str],
                 finish: Callable[[dict[str, Any]], None], start_progress: Callable[[], None]) -> None:
    """The local pool on CUDA: one GPU per worker, round-robin; without ``jobs``, the memory-aware default."""
    first = f"cuda:{targets[0]}"
    unit = "batched group" if batched else "cell"
    rest = list(tasks)
    if jobs is None and cell_memory_mib is None and len(tasks) > 1:
        print(f"ablate: {what}; running the first {unit} in this process on {first} to measure its GPU memory "
              "(pass --jobs N or --cell-memory MiB to skip)", file=stream)
        start_progress()
        placement.reset_peak(first)
        _execute([rest.pop(0)], 1, threads, finish, devices=[first])
        peak = placement.peak_reserved(first)
        import gc

        gc.collect()  # the measured cell's tensors in reference cycles: freed before the free-memory query
        placement.release_cached(first)
        task_bytes = peak + placement.CONTEXT_MIB * placement.MIB
        decision = placement.cuda_jobs(gpus=len(targets), free_bytes=[placement.free_memory(k) for k in targets],
                                       task_bytes=task_bytes, cores=cores, what=unit)
        print(decision.line, file=stream)
        jobs = decision.total
    elif jobs is None and cell_memory_mib is not None:
        decision = placement.cuda_jobs(gpus=len(targets), free_bytes=[placement.free_memory(k) for k in targets],
                                       task_bytes=int(cell_memory_mib * placement.MIB), cores=cores, what=unit,
                                       measured=False)
        print(decision.line, file=stream)
        jobs = decision.total
    jobs = max(1, min(jobs or 1, len(rest)))
    devices = placement.worker_devices(targets, jobs)
    workers = "this process" if jobs == 1 else f"this process and {jobs - 1} spawned worker(s)"
    on = ", ".join(f"{d} x {devices.count(d)}" for d in dict.fromkeys(devices))
    print(f"ablate: {what if len(rest) == len(tasks) else f'{len(rest)} task(s) left'}, {workers} on {on}, "
          f"{threads} thread(s) each; run folders in {grid.runs_dir}", file=stream)
    start_progress()
    _execute(rest, jobs, threads, finish, devices=devices)
