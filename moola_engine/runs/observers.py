"""Observer plugins a run registers besides its strategy (checks, checkpoints, ...).

Observers are ordinary plugins whose hook implementations are ``trylast=True``,
so they see the state after the strategy acted.  :func:`build_observers` is the
one place a run's observers are chosen from its config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moola_engine.config import ExperimentConfig


def build_observers(cfg: ExperimentConfig, run_dir: Path | None) -> list[tuple[str, Any]]:
    """(name, plugin object) pairs to register for one run, in registration order."""
    from moola_engine.checks.delta import build_checks

    observers: list[tuple[str, Any]] = build_checks(cfg.checks)  # weight delta, gradient flow, BN statistics
    if run_dir is not None and cfg.checkpoint.enabled:
        from moola_engine.runs.checkpoint import Checkpointer

        # last: among trylast implementations pluggy calls the first registered first, so the checkpointer
        # runs after every check has passed (a checkpoint is only written for an epoch the checks accepted)
        observers.append(("checkpointer", Checkpointer(run_dir, cfg.checkpoint)))
    return observers
