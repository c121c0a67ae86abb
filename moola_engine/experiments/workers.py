"""Ablation workers: this process and J - 1 spawned processes run cells; one that dies fails its cell by name.

Each cell is an ordinary ``train`` run; its done marker is written last.  ``_execute`` feeds each spawned
worker from a thread that waits for the result or the worker's death (multiprocessing.Pool would silently
replace a killed worker and lose its task).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections.abc import Callable
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


def _worker_main(conn: Any, threads: int) -> None:
    """A spawned worker: run the cells sent over ``conn``, one at a time, until it receives None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the workers
    import torch

    torch.set_num_threads(threads)
    while True:
        try:
            task = conn.recv()
            if task is None:
                return
            conn.send(run_cell(task))
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


def run_cell(task: Task) -> dict[str, Any]:
    """Train one cell; write its done marker last.  Returns a record (never raises)."""
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
        outcome = train(task.cfg, strategy=cell.strategy, strategies_file=task.strategies_file,
                        pinned=task.pinned or None)
    except MoolaError as exc:
        return {"key": cell.key, "ok": False, "error": str(exc)}
    except Exception as exc:  # a bug: keep the traceback for the user's report
        return {"key": cell.key, "ok": False,
                "error": f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_exc(limit=8))}"}
    seconds = time.perf_counter() - t0
    write_json_atomic(Path(task.marker), marker_record(cell, outcome.run_dir, Path(task.out), seconds))
    return {"key": cell.key, "ok": True, "run_dir": str(outcome.run_dir), "seconds": seconds}


# --------------------------------------------------------------------------- progress


# One overall bar over the grid's runs: moola_engine.runs.progress.Bar (rich on a terminal, plain lines otherwise).


def describe(cell: Cell) -> str:
    return f"{cell.label} seed {cell.seed} fold {cell.fold}" + (f" {cell.labels} labels" if cell.labels else "")


def default_jobs() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _execute(tasks: list[Task], jobs: int, threads: int, finish: Callable[[dict[str, Any]], None]) -> None:
    """Run ``tasks`` in this process plus ``jobs - 1`` spawned workers, handing out one task at a time.

    This process is a worker too: it already has torch imported, so it starts at once while the spawned
    workers import theirs (about 1.5 s of one core each), and a grid of J jobs costs J - 1 spawns.  One
    thread per spawned worker sends it a task, waits for the result *or the worker's death*, and sends the
    next, so a worker never idles while this process is busy with its own run.  A worker that dies (killed
    by the OS, out of memory, a crash in native code) fails its cell with a message naming it, instead of
    leaving the grid waiting for a result that will never come.  ``finish`` runs in this thread only.
    """
    import queue
    import threading
    from collections import deque
    from multiprocessing.connection import wait

    import torch

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    todo = deque(tasks)
    if jobs == 1:  # in-process only: no spawn cost, same results (each cell seeds itself)
        try:
            while todo:
                finish(run_cell(todo.popleft()))
        finally:
            torch.set_num_threads(old_threads)
        return
    done: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    lock = threading.Lock()  # todo is shared by this thread and the feeders
    stop = threading.Event()
    ctx = mp.get_context("spawn")
    procs = []
    feeders = []

    def next_task() -> Task | None:
        with lock:
            return todo.popleft() if todo and not stop.is_set() else None

    def feed(proc: Any, conn: Any) -> None:
        while (task := next_task()) is not None:
            try:
                conn.send(task)
                if conn not in wait([conn, proc.sentinel]):
                    raise EOFError
                rec = conn.recv()
                if "worker_error" in rec:  # the worker raised outside a run (its pipe): fail the cell with it
                    rec = {"key": task.cell.key, "ok": False,
                           "error": f"worker process {proc.pid} raised {rec['worker_error']}"}
            except (EOFError, OSError):
                proc.join(timeout=5)
                if not stop.is_set():
                    done.put({"key": task.cell.key, "ok": False, "error": (
                        f"worker process {proc.pid} died while running this cell (exit code {proc.exitcode}): "
                        "killed by the OS (out of memory?) or crashed in native code")})
                return
            done.put(rec)
        with contextlib.suppress(OSError):
            conn.send(None)  # no more work: the worker exits

    try:
        for _ in range(jobs - 1):
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, threads), daemon=True)
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
                finish(run_cell(task))
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


