"""``moola-engine ablate --backend ray``: the grid's cells as Ray tasks, on one machine or a cluster.

Everything but the executor is the local pool's (:func:`moola_engine.ablation.run_grid`): the same grid
folder, manifest, done markers, resume and report.  Each cell is one Ray task running
:func:`moola_engine.experiments.workers.run_cell` with ``num_cpus`` / ``num_gpus`` resources; Ray packs as many
cells on a node (or a GPU: ``num_gpus = 0.25`` puts four on one) as those requests allow.

The grid folder, the experiment file and its data must be at the same paths on every node (a shared
filesystem), since cells write their run folders and markers there.

A worker that dies mid-cell (killed, out of memory, a node lost) is not retried by default
(``retries = 0``): its cell fails with a message naming it, the grid stops, cells already done keep
their markers, and rerunning the same command resumes, as with the local pool.  ``retries = N`` lets
Ray rerun the cell up to N times first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import attrs

from moola_engine.errors import ConfigError
from moola_engine.experiments.workers import Task, describe, run_cell


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--backend ray", "needs Ray: pip install 'moola-engine[ray]'") from exc
    return ray


def _cell_on_ray(task: Task, threads: int) -> dict[str, Any]:
    """A Ray task: one cell, with ``threads`` torch threads (its CPU request)."""
    import torch

    torch.set_num_threads(threads)
    return run_cell(task)


@attrs.define(kw_only=True)
class RayExecutor:
    """Runs a grid's tasks on Ray; same signature as the local pool's ``_execute(tasks, jobs, threads, finish)``.

    ``address``: a running cluster (``ray://host:10001``, ``auto``) or None for a Ray instance started here
    (or the one ``ray.init`` already started in this process).
    """

    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    retries: int = 0
    poll_s: float = 0.5

    @property
    def description(self) -> str:
        where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
        gpus = f", {self.num_gpus:g} GPU" if self.num_gpus else ""
        return f"Ray tasks on {where} ({self.num_cpus:g} CPU{gpus} each)"

    def __call__(self, tasks: list[Task], jobs: int, threads: int, finish: Callable[[dict[str, Any]], None]) -> None:
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        remote = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=self.retries)(_cell_on_ray)
        cell_threads = max(1, int(self.num_cpus))
        pending = {remote.remote(task, cell_threads): task for task in tasks}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.poll_s)  # a timeout keeps Ctrl-C quick
                for ref in ready:
                    task = pending.pop(ref)
                    try:
                        rec = ray.get(ref)
                    except ray.exceptions.RayError as exc:  # worker or node died, task cancelled, ...
                        rec = {"key": task.cell.key, "ok": False, "error": (
                            f"the Ray worker running cell {describe(task.cell)} died or was lost "
                            f"({type(exc).__name__}; retries = {self.retries}): killed, out of memory, or its node "
                            f"went away. {str(exc).splitlines()[0] if str(exc) else ''}".rstrip())}
                    finish(rec)
        finally:
            for ref in pending:  # stopped early (a failed cell, Ctrl-C): cells cut short are moved aside on resume
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
