"""Ablation workers: this process and J - 1 spawned processes run cells; one that dies fails its cell by name.

Each cell is an ordinary ``train`` run; its done marker is written last.  A task is one cell (:class:`Task`) or,
with ``ablate --batched``, a group of cells trained together by :func:`~moola_engine.experiments.batched.train_batched`
(:class:`GroupTask`); either way each cell gets its own run folder and marker.  ``_execute`` feeds each spawned
worker from a thread that waits for the result or the worker's death (multiprocessing.Pool would silently
replace a killed worker and lose its task).  On CUDA each worker has one device (``devices[i]``, round-robin over
the GPUs, :mod:`moola_engine.experiments.placement`): its cells run with ``train.device = "cuda:k"``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from moola_engine.config import ExperimentConfig
from moola_engine.errors import MoolaError
from moola_engine.experiments.grid import Cell, marker_record
from moola_engine.runs.folders import write_json_atomic


@attrs.frozen(kw_only=True)
class Task:
    cfg: ExperimentConfig
    cell: Cell
    strategies_file: str
    out: str
    marker: str
    pinned: dict[str, Any] = attrs.Factory(dict)


@attrs.frozen(kw_only=True)
class GroupTask:
    """``ablate --batched``: cells trained as one stacked computation, one task for one worker."""

    tasks: list[Task]

    @property
    def cell(self) -> Cell:
        """The group's first cell (what a message about the whole group names)."""
        return self.tasks[0].cell


AnyTask = Task | GroupTask


def task_cells(task: AnyTask) -> list[Cell]:
    return [t.cell for t in task.tasks] if isinstance(task, GroupTask) else [task.cell]


def placed(cfg: ExperimentConfig, device: str | None) -> ExperimentConfig:
    """The cell's config on the worker's device (``train.device = "cuda:k"``; None: as it is)."""
    if device is None or cfg.train.device == device:
        return cfg
    return attrs.evolve(cfg, train=attrs.evolve(cfg.train, device=device))


def run_task(task: AnyTask, device: str | None = None) -> list[dict[str, Any]]:
    """Run one task on ``device`` (None: the config's); one record per cell, never raises."""
    with _on_device(device):
        return run_group(task, device) if isinstance(task, GroupTask) else [run_cell(task, device)]


@contextlib.contextmanager
def _on_device(device: str | None) -> Any:
    """This thread's current CUDA device is the worker's (for anything allocated without naming a device)."""
    if device is None or not device.startswith("cuda"):
        yield
        return
    import torch

    with torch.cuda.device(device):
        yield


def _worker_main(conn: Any, threads: int, device: str | None = None) -> None:
    """A spawned worker: run the tasks sent over ``conn``, one at a time, until it receives None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the workers
    import torch

    torch.set_num_threads(threads)
    while True:
        try:
            task = conn.recv()
            if task is None:
                return
            conn.send(run_task(task, device))
        except (EOFError, OSError):
            return  # the parent is gone
        except BaseException as exc:
            # run_cell never raises; this is the pipe (a task or record that does not (un)pickle) or the worker
            # itself.  The message goes to the parent instead of a traceback on stderr and a silent death.
            with contextlib.suppress(BaseException):
                conn.send({"worker_error": worker_error(exc)})
            if not isinstance(exc, Exception):
                raise


def worker_error(exc: BaseException) -> str:
    """``Type: message (at file:line in function)``: a worker's exception for the parent to report."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def run_cell(task: Task, device: str | None = None) -> dict[str, Any]:
    """Train one cell (on ``device``, None: its config's); write its done marker last.  Returns a record (never
    raises)."""
    import random

    import numpy as np
    import torch

    from moola_engine.runs.train import train

    t0 = time.perf_counter()
    cell = task.cell
    try:
        # The model is built before the engine seeds torch: seed here so a cell is the same run wherever it runs.
        random.seed(cell.seed)
        np.random.seed(cell.seed)
        torch.manual_seed(cell.seed)
        outcome = train(placed(task.cfg, device), strategy=cell.strategy, strategies_file=task.strategies_file,
                        pinned=task.pinned or None)
    except Exception as exc:
        return _failed(cell, exc)
    return _done(task, outcome.run_dir, time.perf_counter() - t0)


def _done(task: Task, run_dir: Path, seconds: float) -> dict[str, Any]:
    """A finished cell: its done marker (written last), and its record."""
    write_json_atomic(Path(task.marker), marker_record(task.cell, run_dir, Path(task.out), seconds))
    return {"key": task.cell.key, "ok": True, "run_dir": str(run_dir), "seconds": seconds}


def _failed(cell: Cell, exc: BaseException) -> dict[str, Any]:
    """A failed cell's record: a MoolaError's message, or a bug's type, message and traceback."""
    if isinstance(exc, MoolaError):
        return {"key": cell.key, "ok": False, "error": str(exc)}
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=8))
    return {"key": cell.key, "ok": False, "error": f"{type(exc).__name__}: {exc}\n{trace}"}


def run_group(group: GroupTask, device: str | None = None) -> list[dict[str, Any]]:
    """Train a group's cells with ``train_batched``; each cell's marker is written after its run finished.

    Records come back successes first, each with ``mode`` (``"batched"``, or ``"fallback"`` with the ``reason``
    its ``batched.fallback`` event gives) and ``seconds``, the group's wall time shared equally among its runs.
    """
    from moola_engine.experiments.batched import train_batched

    first = group.tasks[0]
    t0 = time.perf_counter()
    try:
        outcomes = train_batched([placed(t.cfg, device) for t in group.tasks],
                                 strategy=[t.cell.strategy for t in group.tasks], strategies_file=first.strategies_file,
                                 pinned=first.pinned or None)
    except Exception as exc:  # the group as a whole (each run's own failure comes back as its outcome)
        return [_failed(t.cell, exc) for t in group.tasks]
    share = (time.perf_counter() - t0) / len(group.tasks)
    ok: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for t, outcome in zip(group.tasks, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            failed.append(_failed(t.cell, outcome))
            continue
        ok.append({**_done(t, outcome.run_dir, share), **_batched_mode(Path(outcome.run_dir))})
    return ok + failed


def _batched_mode(run_dir: Path) -> dict[str, str]:
    """How ``train_batched`` trained a run, from its event log."""
    from moola_engine.logs import Event, read_events

    try:
        events = read_events(run_dir / "events.jsonl")
    except MoolaError as exc:  # the summary line only: the run itself finished and is marked done
        return {"mode": "fallback", "reason": f"unknown (its event log: {exc})"}
    for e in events:
        if e.get("event") == Event.BATCHED_FALLBACK:
            return {"mode": "fallback", "reason": str(e.get("reason", ""))}
        if e.get("event") == Event.BATCHED_STARTED:
            return {"mode": "batched"}
    return {"mode": "fallback", "reason": "unknown (no batched.* event)"}


# --------------------------------------------------------------------------- progress


# One overall bar over the grid's runs: moola_engine.runs.progress.Bar (rich on a terminal, plain lines otherwise).


def describe(cell: Cell) -> str:
    return f"{cell.label} seed {cell.seed} fold {cell.fold}" + (f" {cell.labels} labels" if cell.labels else "")


def default_jobs() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _execute(tasks: Sequence[AnyTask], jobs: int, threads: int, finish: Callable[[dict[str, Any]], None], *,
             devices: Sequence[str] | None = None) -> None:
    """Run ``tasks`` in this process plus ``jobs - 1`` spawned workers, handing out one task at a time.

    This process is a worker too: it already has torch imported, so it starts at once while the spawned
    workers import theirs (about 1.5 s of one core each), and a grid of J jobs costs J - 1 spawns.  One
    thread per spawned worker sends it a task, waits for the result *or the worker's death*, and sends the
    next, so a worker never idles while this process is busy with its own run.  A worker that dies (killed
    by the OS, out of memory, a crash in native code) fails its cell with a message naming it, instead of
    leaving the grid waiting for a result that will never come.  ``finish`` runs in this thread only, once per
    cell (a batched group's cells one after another).  ``devices``: worker i's device (``devices[0]`` is this
    process's), or None: the cells' configs decide.
    """
    import queue
    import threading
    from collections import deque
    from multiprocessing.connection import wait

    import torch

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    todo = deque(tasks)
    device: list[str | None] = list(devices) if devices else [None] * jobs
    if len(device) < jobs:
        raise ValueError(f"_execute: {jobs} workers but {len(device)} devices")
    if jobs == 1:  # in-process only: no spawn cost, same results (each cell seeds itself)
        try:
            while todo:
                for rec in run_task(todo.popleft(), device[0]):
                    finish(rec)
        finally:
            torch.set_num_threads(old_threads)
        return
    done: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    lock = threading.Lock()  # todo is shared by this thread and the feeders
    stop = threading.Event()
    ctx = mp.get_context("spawn")
    procs = []
    feeders = []

    def next_task() -> AnyTask | None:
        with lock:
            return todo.popleft() if todo and not stop.is_set() else None

    def feed(proc: Any, conn: Any) -> None:
        while (task := next_task()) is not None:
            try:
                conn.send(task)
                if conn not in wait([conn, proc.sentinel]):
                    raise EOFError
                recs = conn.recv()
                if isinstance(recs, dict) and "worker_error" in recs:  # it raised outside a run (its pipe)
                    recs = [{"key": c.key, "ok": False, "error": f"worker process {proc.pid} raised "
                                                                 f"{recs['worker_error']}"} for c in task_cells(task)]
            except (EOFError, OSError):
                proc.join(timeout=5)
                if not stop.is_set():
                    what = ("this cell" if isinstance(task, Task) else
                            f"the batched group of {len(task.tasks)} runs this run was in")
                    for c in task_cells(task):
                        done.put({"key": c.key, "ok": False, "error": (
                            f"worker process {proc.pid} died while running {what} (exit code {proc.exitcode}): "
                            "killed by the OS (out of memory?) or crashed in native code")})
                return
            for rec in recs:
                done.put(rec)
        with contextlib.suppress(OSError):
            conn.send(None)  # no more work: the worker exits

    try:
        for i in range(1, jobs):
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, threads, device[i]), daemon=True)
            proc.start()
            child.close()
            procs.append(proc)
            feeders.append(threading.Thread(target=feed, args=(proc, conn), daemon=True))
            feeders[-1].start()
        while True:
            while True:  # what the spawned workers finished meanwhile
                try:
                    finish(done.get_nowait())
                except queue.Empty:
                    break
            task = next_task()
            if task is not None:
                for rec in run_task(task, device[0]):
                    finish(rec)
            elif any(f.is_alive() for f in feeders):  # nothing left to start: wait for the workers' last runs
                with contextlib.suppress(queue.Empty):
                    finish(done.get(timeout=0.5))  # a timeout keeps Ctrl-C responsive
            elif done.empty():
                break
        for proc in procs:
            proc.join(timeout=30)
    except BaseException:
        stop.set()
        for proc in procs:
            proc.terminate()  # a cell cut short here is moved aside and rerun by the next ablate
        raise
    finally:
        for f in feeders:
            f.join(timeout=5)
        torch.set_num_threads(old_threads)


