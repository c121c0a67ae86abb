"""The ablation grid: every strategy and a random-encoder control over seeds x folds, resumable.

One *arm* is a row of the final table: a named strategy with the config's
pretrained encoder, or the control (the same config with
``model.pretrained.enabled = false`` and the control strategy, default
``immediate``).  One *cell* is one run: arm x seed x fold.  Every cell is an
ordinary ``moola-engine train`` run with its own run folder and event log.

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
thread count so workers do not fight over cores.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import attrs

from moola_engine import jsonsafe
from moola_engine.config import ExperimentConfig, load_config, unstructure
from moola_engine.errors import ConfigError, MoolaError
from moola_engine.runs.folders import safe_name, write_json_atomic
from moola_engine.runs.progress import Bar
from moola_engine.safeio import sha256

CONTROL = "control"
GRID_VERSION = 1

@attrs.frozen(kw_only=True)
class Preset:
    """A named ablation a plugin registers (``register_presets``): ``ablate --preset NAME``, ``demo``."""

    name: str
    config: Path
    strategies: list[str]
    control: str = "immediate"
    seeds: int = 5
    folds: int | None = None
    """None: the config's ``data.folds``."""
    demo_seeds: int | None = None
    """Seeds ``moola-engine demo`` runs (default: :attr:`seeds`)."""
    description: str = ""


def preset_names() -> list[str]:
    """Every installed preset (plugins register them, as the OHLC package registers ``seed``)."""
    from moola_engine.core.components import default_registries

    return default_registries()["preset"].names()


def get_preset(name: str) -> Preset:
    """The preset registered as ``name``; an unknown one lists the installed presets."""
    from moola_engine.core.components import default_registries
    from moola_engine.core.registry import resolve

    comp = resolve(default_registries()["preset"], name, source="--preset", key="--preset")
    preset = comp.factory()
    if not isinstance(preset, Preset):
        raise ConfigError("--preset", f"preset {name!r} ({comp.source}) built a {type(preset).__name__}, not a Preset")
    return preset


# --------------------------------------------------------------------------- the grid


@attrs.frozen(kw_only=True)
class Arm:
    label: str
    strategy: str
    control: bool
    definition: dict[str, Any]
    """plugin + params as structured from strategies.toml (a changed definition invalidates old runs)."""
    work: int = 0
    """Encoder parameters trained, summed over the planned epochs (the plan's dry run): a run's rough relative
    cost, used only to start a seed's costly runs first (see :func:`run_order`).  A group counts whole even
    when a ``freeze_params`` mask trains only part of it."""


@attrs.frozen(kw_only=True)
class Cell:
    label: str
    strategy: str
    control: bool
    seed: int
    fold: int
    labels: int | None = None
    """The label budget of this cell (``data.labels``; ``ablate --labels``), None: the config's."""

    @property
    def key(self) -> str:
        return f"{self.label}__s{self.seed}__f{self.fold}" + (f"__n{self.labels}" if self.labels is not None else "")

    @property
    def run_name(self) -> str:
        return f"{self.label}-f{self.fold}" + (f"-n{self.labels}" if self.labels is not None else "")

    @property
    def pair(self) -> tuple[int, int, int | None]:
        """What a paired comparison matches on: the same seed, fold and label budget."""
        return (self.seed, self.fold, self.labels)


@attrs.frozen(kw_only=True)
class Grid:
    cfg: ExperimentConfig
    arms: list[Arm]
    seeds: list[int]
    folds: int
    out: Path
    strategies_file: Path
    warnings: list[str] = attrs.Factory(list)
    labels: list[int | None] = attrs.Factory(lambda: [None])
    """The label-budget axis (``ablate --labels 10,25,50``): every arm x seed x fold runs at each budget."""
    pinned: dict[str, Any] = attrs.Factory(dict)
    """``[train]`` values from the command line (``ablate --epochs``): they win over an arm's own values."""

    def cells(self) -> list[Cell]:
        """Seed-major order (the order of the manifest and the report); :func:`run_order` is the order runs
        start in.  Either way a partly finished grid has whole seeds done, so its results already pair."""
        return [Cell(label=a.label, strategy=a.strategy, control=a.control, seed=s, fold=f, labels=n)
                for s in self.seeds for n in self.labels for f in range(self.folds) for a in self.arms]

    @property
    def budgets(self) -> bool:
        """Whether this grid has a label-budget axis."""
        return self.labels != [None]

    @property
    def cells_dir(self) -> Path:
        return self.out / "cells"

    @property
    def runs_dir(self) -> Path:
        return self.out / "runs"

    def marker(self, cell: Cell) -> Path:
        return self.cells_dir / f"{safe_name(cell.key, max_len=96)}.json"  # a strategy name is not a safe file name

    def arm(self, label: str) -> Arm:
        return next(a for a in self.arms if a.label == label)


def default_out(cfg: ExperimentConfig, name: str) -> Path:
    """``<run.runs_dir>/ablate-<name>``: stable, so rerunning the same command resumes."""
    return cfg.resolve(cfg.run.runs_dir) / f"ablate-{name}"


def control_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The same experiment with a random encoder: ``model.pretrained.enabled = false``."""
    if cfg.model.pretrained is None:
        return cfg
    return attrs.evolve(cfg, model=attrs.evolve(cfg.model, pretrained=attrs.evolve(cfg.model.pretrained, enabled=False)))


def cell_config(grid: Grid, cell: Cell, threads: int | None) -> ExperimentConfig:
    """One cell's run config.  Checkpoints only at transitions and the last epoch (``every = epochs``): the grid
    reruns an interrupted cell from its start, so per-epoch checkpoints would be written and never read (on the
    fine-tuning-size task they cost about 15% of a run); the last one keeps each cell's final weights."""
    cfg = control_config(grid.cfg) if cell.control else grid.cfg
    epochs = int(grid.pinned.get("epochs") or max(cfg.train.epochs,
                                                  grid.arm(cell.label).definition.get("train", {}).get("epochs") or 0))
    return attrs.evolve(
        cfg,
        checkpoint=attrs.evolve(cfg.checkpoint, every=max(cfg.checkpoint.every, epochs)),
        run=attrs.evolve(cfg.run, runs_dir=str(grid.runs_dir), name=cell.run_name, console="none", strategy=None),
        train=attrs.evolve(cfg.train, seed=cell.seed, threads=threads if threads is not None else cfg.train.threads),
        data=attrs.evolve(cfg.data, folds=grid.folds, fold=cell.fold,
                          labels=cell.labels if cell.labels is not None else cfg.data.labels),
    )


def build_grid(
    cfg: ExperimentConfig,
    *,
    strategies: Sequence[str],
    control: str = "immediate",
    seeds: int | Sequence[int] = 5,
    folds: int | None = None,
    out: Path,
    strategies_file: str | None = None,
    labels: Sequence[int] | None = None,
    pinned: dict[str, Any] | None = None,
) -> Grid:
    """Resolve every strategy and dry-run its plan now, so a typo fails in a second, not after an hour."""
    from moola_engine.core.preflight import preflight
    from moola_engine.runs.train import resolve_strategy, strategies_path

    if not strategies:
        raise ConfigError("--strategies", "no strategy selected")
    if len(set(strategies)) != len(strategies):
        raise ConfigError("--strategies", f"a strategy is listed twice: {', '.join(strategies)}")
    if CONTROL in strategies:
        raise ConfigError("--strategies", f"{CONTROL!r} is the random-encoder control, added to every grid; "
                                          "do not list it")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ConfigError("--seeds", "expected at least one seed")
    budgets: list[int | None] = [None]
    if labels:
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in labels):
            raise ConfigError("--labels", f"expected positive whole numbers, got {list(labels)}")
        if len(set(labels)) != len(labels):
            raise ConfigError("--labels", f"a budget is listed twice: {list(labels)}")
        budgets = [*sorted(labels)]
    n_folds = folds if folds is not None else cfg.data.folds
    if n_folds < 1:
        raise ConfigError("--folds", f"expected a value >= 1, got {n_folds}")
    warnings: list[str] = []
    if cfg.model.pretrained is None:
        warnings.append(
            f"{cfg.source} has no [model.pretrained] table: every arm starts from a random encoder, so the "
            "'control' arm is not a random-encoder control of anything and this grid cannot show transfer. "
            "Add [model.pretrained] path = ... to compare against pretrained weights.")
    elif not cfg.model.pretrained.enabled:
        warnings.append(
            f"{cfg.source}: model.pretrained.enabled = false: every arm uses a random encoder, so this grid "
            "compares strategies only; it cannot show transfer.")
    if n_folds == 1 and len(seed_list) < 6:
        warnings.append(f"{len(seed_list)} seed(s) x 1 fold = {len(seed_list)} pairs per comparison: the Wilcoxon "
                        "test cannot reach p < 0.05 with fewer than 6 pairs")

    sfile = strategies_path(cfg, strategies_file).resolve()
    model = None  # built once by the first arm's pre-flight, reused by the others
    arms: list[Arm] = []
    for label, name, is_control in [(CONTROL, control, True), *[(s, s, False) for s in strategies]]:
        try:
            pm, named = resolve_strategy(cfg, name, str(sfile))
        except ConfigError as exc:  # name the flag of this command, not train's --strategy
            if exc.source != "--strategy":
                raise
            raise ConfigError("--control" if is_control else "--strategies", exc.problems) from None
        arm_cfg = named.configure(cfg)  # [strategy.NAME.train]: its own values, then the flags
        arm_cfg = attrs.evolve(arm_cfg, train=attrs.evolve(arm_cfg.train, **(pinned or {})))
        pre = preflight(arm_cfg, pm=pm, named=named, model=model)  # the same pre-flight as train and plan
        model, plan = pre.model, pre.plan
        head = {g.name for g in pre.groups if g.head}
        numel = {g.name: g.numel() for g in pre.groups}
        work = sum(numel[g] for e in plan.epochs for g, on in e.trainable.items() if on and g not in head)
        arms.append(Arm(label=label, strategy=named.name, control=is_control,
                        definition={"plugin": named.plugin, "params": unstructure(named.params),
                                    **({"train": unstructure(named.train)} if named.train else {})}, work=work))
    return Grid(cfg=cfg, arms=arms, seeds=seed_list, folds=n_folds, out=out.resolve(), strategies_file=sfile,
                warnings=warnings, labels=budgets, pinned=dict(pinned or {}))


# --------------------------------------------------------------------------- manifest and markers


def fingerprint(grid: Grid) -> dict[str, Any]:
    """What makes two runs of a cell interchangeable: the experiment, not where or how it ran."""
    cfg = unstructure(grid.cfg)
    cfg.pop("run", None)
    cfg.pop("source", None)
    cfg["data"].pop("fold", None)
    cfg["data"]["folds"] = grid.folds
    cfg["train"].pop("threads", None)
    if grid.budgets:  # each cell sets its own data.labels; budgets may be added later, like seeds
        cfg["data"].pop("labels", None)
    pretrained = None
    if grid.cfg.model.pretrained is not None:
        p = Path(grid.cfg.model.pretrained.path)
        if not p.is_absolute():
            p = Path(grid.cfg.source).parent / p
        pretrained = sha256(p) if p.is_file() else None
    return {"experiment": cfg, "pretrained_sha256": pretrained,
            "arms": {a.label: {"strategy": a.strategy, **a.definition} for a in grid.arms},
            **({"pinned": grid.pinned} if grid.pinned else {})}


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            if k in old and k in new:
                out += _diff(old[k], new[k], f"{path}.{k}" if path else str(k))
            elif path == "arms":
                continue  # arms may be added or dropped between invocations (a changed arm may not)
            else:
                out.append(f"{path}.{k}" if path else str(k))
        return out
    return [] if old == new else [path]


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
    write_json_atomic(grid.marker(cell), {
        "key": cell.key, "label": cell.label, "strategy": cell.strategy, "control": cell.control,
        "seed": cell.seed, "fold": cell.fold, "labels": cell.labels, "run_dir": os.path.relpath(run_dir, grid.out),
        "seconds": round(seconds, 3), "adopted": adopted,
    })


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


# --------------------------------------------------------------------------- workers


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
    write_json_atomic(Path(task.marker), {
        "key": cell.key, "label": cell.label, "strategy": cell.strategy, "control": cell.control,
        "seed": cell.seed, "fold": cell.fold, "labels": cell.labels,
        "run_dir": os.path.relpath(outcome.run_dir, task.out),
        "seconds": round(seconds, 3), "adopted": False, "pid": os.getpid(),
    })
    return {"key": cell.key, "ok": True, "run_dir": str(outcome.run_dir), "seconds": seconds}


# --------------------------------------------------------------------------- progress


# One overall bar over the grid's runs: moola_engine.runs.progress.Bar (rich on a terminal, plain lines otherwise).


def describe(cell: Cell) -> str:
    return f"{cell.label} seed {cell.seed} fold {cell.fold}" + (f" {cell.labels} labels" if cell.labels else "")


# --------------------------------------------------------------------------- the runner


def default_jobs() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def run_grid(grid: Grid, *, jobs: int | None = None, threads: int | None = None, stream: IO[str] | None = None,
             on_done: Callable[[Cell], None] | None = None, executor: Callable[..., None] | None = None) -> dict[str, int]:
    """Run every pending cell in ``jobs`` worker processes; returns counts (total, skipped, ran, adopted).

    ``executor(tasks, jobs, threads, finish)`` replaces the local pool (e.g. :class:`.ray_backend.RayExecutor`)."""
    stream = stream if stream is not None else sys.stderr
    cores = default_jobs()
    jobs = jobs or cores
    if jobs < 1:
        raise ConfigError("--jobs", f"expected a value >= 1, got {jobs}")
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
    jobs = min(jobs, len(todo))
    workers = "this process" if jobs == 1 else f"this process and {jobs - 1} spawned worker(s)"
    if executor is not None:
        print(f"ablate: {len(todo)} runs, {getattr(executor, 'description', executor)}; run folders in {grid.runs_dir}",
              file=stream)
    else:
        print(f"ablate: {len(todo)} runs, {workers}, {threads} thread(s) each; "
              f"run folders in {grid.runs_dir}", file=stream)
    tasks = [Task(cfg=cell_config(grid, c, threads), cell=c, strategies_file=str(grid.strategies_file),
                  out=str(grid.out), marker=str(grid.marker(c)), pinned=grid.pinned) for c in todo]
    by_key = {c.key: c for c in todo}
    progress = Bar(len(cells), done=done, unit="runs", label="ablate", stream=stream)  # after our own prints
    progress.show(f"starting {describe(todo[0])}")

    def finish(rec: dict[str, Any]) -> None:
        cell = by_key[rec["key"]]
        if not rec["ok"]:
            progress.close()
            raise MoolaError(
                f"run {describe(cell)} ({cell.strategy}) failed: {rec['error']}\n"
                f"       {progress.done} of {len(cells)} runs are done and kept; fix the cause and rerun the same "
                "command to continue")
        progress.advance(describe(cell))
        if on_done is not None:
            on_done(cell)

    try:
        (executor or _execute)(tasks, jobs, threads, finish)
    except KeyboardInterrupt:
        progress.close()
        print(f"ablate: interrupted; {progress.done} of {len(cells)} runs are done and kept. Rerun the same command "
              "to continue.", file=stream)
        raise
    progress.close()
    return {"total": len(cells), "skipped": before, "ran": len(todo), "adopted": adopted}


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


def load_grid_config(config: str | None, preset: Preset | None) -> ExperimentConfig:
    path = config or (str(preset.config) if preset else None)
    if path is None:
        raise ConfigError("--config", "pass --config FILE or --preset NAME")
    if preset is not None and config is None and not Path(path).is_file():
        raise ConfigError(f"--preset {preset.name}", f"its config {path} does not exist (pass --config FILE)")
    return load_config(path)
