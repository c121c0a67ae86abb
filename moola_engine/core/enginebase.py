"""What the engine's parts share: its attributes and the methods one part calls on another (for the type checker).

:class:`~moola_engine.core.engine.Engine` is the loop; its other jobs live in their own modules as parts it
inherits: hook dispatch (:mod:`.dispatch`), the resumable state and the load proof (:mod:`.state`), early
stopping (:mod:`.stopping`) and the non-finite guard (:mod:`.guards`).  Each part derives from
:class:`EngineBase`, which declares the engine's attributes once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pluggy
    import torch
    from torch import nn

    from moola_engine.config import ChecksConfig, TrainConfig
    from moola_engine.core.context import FitResult
    from moola_engine.core.data import Data
    from moola_engine.core.freezing import Freezer, ParamGroup
    from moola_engine.core.schedulers import LrSchedule


class EngineBase:
    """The engine's attributes, declared once for all its parts."""

    config: TrainConfig
    checks: ChecksConfig
    log: Any
    pm: pluggy.PluginManager
    strategy: Any
    strategy_name: str
    run_dir: Path | None
    allow: set[str]
    epochs: int
    dry_run: bool
    dist: Any
    device: torch.device
    history: list[dict[str, float]]
    pretrained: Mapping[str, torch.Tensor] | None
    model: nn.Module
    groups: list[ParamGroup]
    optimizer: torch.optim.Optimizer
    freezer: Freezer
    lr_schedule: LrSchedule
    train_data: Data
    val_data: Data | None
    step: int
    epoch: int
    plan: Any
    result: FitResult
    es_best: float
    best_state: dict[str, torch.Tensor] | None
    last_checkpoint: Path | None
    on_exit: list[Callable[[bool], None]]
    """Called with ``failing`` (True when ``fit`` is raising) when ``fit`` returns or raises, and before the
    engine names the last good checkpoint in an error; last registered first.  Plugins with work in flight
    (the checkpointer's background write) finish it there; when failing they must not raise.  Registered in
    on_fit_start; may be called more than once."""
    _gen: torch.Generator
    _since_improved: int
    _hooks_with_impls: set[str]
    _step_until: dict[int, tuple[Any, int]]
    _step_cache: dict[tuple[int, ...], tuple[Any, Any]]
    _proof_pending: bool
    _wrap_stale: bool

    if TYPE_CHECKING:  # one part calls another's
        def _fire(self, name: str, *, skip: Any = (), caller: Any = None, **kwargs: Any) -> None: ...
        def _settle(self, failing: bool, callbacks: list[Callable[[bool], None]] | None = None) -> None: ...
        def _on_transition(self) -> None: ...
        def _early_stopping(self, epoch: int, metrics: Mapping[str, float]) -> bool: ...
