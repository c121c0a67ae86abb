"""The contract between the engine and its plugins: what a hook's ``engine`` argument offers, and what a fit returns.

Every hook receives ``engine``: an :class:`EngineView`.  The training
:class:`~moola_engine.core.engine.Engine` provides it, and so does the dry-run
planner (:class:`~moola_engine.core.plan.PlanEngine`, ``dry_run = True``), so a
strategy runs the same code in ``moola-engine plan`` as in training.

**What a plugin may read:** every attribute below.

**What a plugin may change:** the freeze state and the per-group lr scales, only
through :attr:`EngineView.freezer` (``freeze``, ``unfreeze``, ``set_lr_scale``,
``freeze_params``, ``clear_param_mask``); the engine applies them, fires
``on_freeze``/``on_unfreeze`` and the checks compare the live optimizer with the
plan (writing ``optimizer.param_groups[i]["lr"]`` behind the engine's back fails
the ``lr_mask`` check).  A plugin that needs step hooks only for some steps says so
with ``want_step_hooks`` where the engine offers it.  Anything else (the model's
weights, the optimizer, the data) is read-only to a plugin: a change made there is
invisible to the plan, the checks and the checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:
    import torch
    from torch import nn

    from moola_engine.config import TrainConfig
    from moola_engine.core.freezing import Freezer, ParamGroup


@runtime_checkable
class EngineView(Protocol):
    """What every hook's ``engine`` argument offers (the Engine in training, the planner in a dry run)."""

    dry_run: bool
    """True inside ``moola-engine plan`` and the pre-flight's dry run: no model is trained, metrics are absent."""
    freezer: Freezer
    """The one way to change what trains and at which lr."""
    epochs: int
    """Planned epochs of this fit."""
    epoch: int
    """The current epoch (from 0)."""
    history: Sequence[Mapping[str, float]]
    """Metrics of the epochs completed so far (host floats)."""
    log: Any
    """The run's structlog logger: ``engine.log.info(Event..., **fields)`` lands in events.jsonl."""
    groups: Sequence[ParamGroup]
    """The model's parameter groups, input -> output (empty in a dry run without a model)."""
    model: nn.Module | None
    """The model (None in a dry run without a model).  Read-only to plugins."""
    step: int
    """Optimizer steps taken since the fit started (0 in a dry run)."""
    config: TrainConfig
    """The ``[train]`` table of this run."""
    device: torch.device
    """Where the model trains (``cpu`` in a dry run)."""
    run_dir: Path | None
    """The run folder (None in a dry run or a bare engine)."""


@runtime_checkable
class Resumable(Protocol):
    """A checkpoint to continue a fit from (:class:`moola_engine.runs.resume.ResumeState`)."""

    def restore(self, engine: Any) -> int:
        """Put the weights and the engine's state back; return the epoch to continue at."""
        ...

    def restore_plugins(self, engine: Any) -> None:
        """Put stateful plugins' state back (after their ``on_fit_start``)."""
        ...

    def check(self, engine: Any, epoch: int) -> None:
        """Prove the restored freeze state is what the strategy says for ``epoch``."""
        ...


@attrs.define
class FitResult:
    """What :meth:`Engine.fit` returns and ``on_fit_end`` receives."""

    epochs_run: int = 0
    best_epoch: int = -1
    best_metric: float = math.nan
    stopped_early: bool = False
    stop_reason: str = "epochs"
    history: list[dict[str, float]] = attrs.Factory(list)
    seconds: float = 0.0
    restored_before: list[dict[str, Any]] = attrs.Factory(list)
    """``restore_best`` returned weights from before these transitions of non-head groups
    (``{"group", "epoch", "to_state"}``): the delivered model never had them trained as scheduled."""
