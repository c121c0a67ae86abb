"""Schedule plans: dry-run a strategy's own hooks against a recording freezer.

No model, no data, no training: the strategy object is copied, its
``on_fit_start``/``on_epoch_start``/``on_validation_end`` hooks are called for
every epoch against a :class:`~moola_engine.freezing.Freezer` that holds only
group names, and the state after each epoch's start is recorded.  The engine
computes the same plan before training and refuses a schedule that cannot keep
its promise; ``moola-engine plan`` prints it.

Metric-driven transitions (``unfreeze_on = "plateau"``) cannot be known in
advance: in a dry run ``on_validation_end`` receives empty metrics and the
strategy plans its hard ``max_epoch`` bound instead.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .errors import ScheduleError
from .freezing import Freezer
from .hookspecs import hookimpl  # noqa: F401 - re-exported for strategy authors reading this module
from .logs import Event, get_logger
from .plugins import new_plugin_manager


@attrs.frozen(kw_only=True)
class EpochPlan:
    epoch: int
    trainable: dict[str, bool]
    lr: dict[str, float]


@attrs.frozen(kw_only=True)
class Plan:
    strategy: str
    groups: list[str]
    head_groups: list[str]
    epochs: list[EpochPlan]
    transitions: list[dict[str, Any]]
    notes: list[str] = attrs.Factory(list)

    def trains_ever(self, group: str) -> bool:
        return any(e.trainable[group] for e in self.epochs)

    def first_trainable_epoch(self, group: str) -> int | None:
        return next((e.epoch for e in self.epochs if e.trainable[group]), None)

    def last_scheduled_transition(self) -> int | None:
        """The epoch of the last transition after fit start (early stopping waits for it)."""
        later = [t["epoch"] for t in self.transitions if t["epoch"] > 0]
        return max(later) if later else None

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "groups": self.groups,
            "head_groups": self.head_groups,
            "epochs": [{"epoch": e.epoch, "trainable": e.trainable, "lr": e.lr} for e in self.epochs],
            "transitions": self.transitions,
            "notes": self.notes,
        }


class PlanEngine:
    """What a strategy sees during a dry run: the engine's attributes that need no model."""

    dry_run = True

    def __init__(self, freezer: Freezer, epochs: int, base_lr: float) -> None:
        self.freezer = freezer
        self.epochs = epochs
        self.base_lr = base_lr
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.log = freezer.log


def compute_plan(
    strategy: Any, groups: Sequence[str], head_groups: Sequence[str], epochs: int, base_lr: float,
    name: str | None = None, history: Sequence[Mapping[str, float]] = (),
) -> Plan:
    """Dry-run a copy of ``strategy`` over ``epochs`` epochs and record each epoch's state.

    ``history``: metrics of epochs already trained (a resumed run); the replay feeds
    them to ``on_validation_end`` so metric-driven decisions come out as they really were.
    """
    strat = copy.deepcopy(strategy)
    freezer = Freezer(list(groups), base_lr=base_lr, head_groups=list(head_groups), logger=get_logger())
    engine = PlanEngine(freezer, epochs, base_lr)
    pm = new_plugin_manager()
    pm.register(strat, name="strategy")
    pm.check_pending()
    hook = pm.hook
    hook.on_fit_start(engine=engine)
    rows: list[EpochPlan] = []
    for epoch in range(epochs):
        engine.epoch = freezer.epoch = epoch
        hook.on_epoch_start(engine=engine, epoch=epoch)
        rows.append(EpochPlan(
            epoch=epoch,
            trainable={g: freezer.is_trainable(g) for g in freezer.groups},
            lr={g: freezer.lr(g) for g in freezer.groups},
        ))
        metrics = dict(history[epoch]) if epoch < len(history) else {}
        if metrics:
            engine.history.append(metrics)
        hook.on_validation_end(engine=engine, epoch=epoch, metrics=metrics)
        hook.on_epoch_end(engine=engine, epoch=epoch, metrics=metrics)
    transitions = [
        {"epoch": t.epoch if t.epoch == 0 else _effective_epoch(t, rows), "group": t.group,
         "to_state": t.to_state, "lr": t.lr, "reason": t.reason}
        for t in freezer.history
    ]
    notes = list(getattr(strat, "plan_notes", lambda: [])())
    return Plan(strategy=name or getattr(strategy, "name", None) or type(strategy).__name__,
                groups=list(groups), head_groups=list(head_groups), epochs=rows,
                transitions=transitions, notes=notes)


def _effective_epoch(t: Any, rows: list[EpochPlan]) -> int:
    # A transition requested in on_validation_end of epoch e takes effect at epoch e + 1.
    for row in rows:
        if row.epoch >= t.epoch and row.trainable[t.group] == (t.to_state == "trainable"):
            return row.epoch
    return t.epoch + 1


def promised_groups(strategy: Any, groups: Sequence[str], head_groups: Sequence[str]) -> list[str]:
    """Groups the strategy promises to train at some point (default: every group)."""
    fn = getattr(strategy, "promised_groups", None)
    if fn is None:
        return list(groups)
    return list(fn(list(groups), list(head_groups)))


def validate_plan(plan: Plan, strategy: Any, strategy_name: str, *, allow: set[str] | Sequence[str] = (),
                  log: Any = None, early_stopping: Any = None) -> None:
    """Refuse a plan that cannot keep the strategy's promise, unless explicitly allowed.

    The strategy's own ``validate_schedule(epochs, groups)`` (if it has one) speaks
    first, in its own terms (``two_phase.unfreeze_after = 40 but training runs 30
    epochs``); then every promised group must be trainable in at least one epoch.
    """
    log = log or get_logger()
    allow = set(allow)
    problems: list[tuple[str, str]] = []  # (override name, message)
    own = getattr(strategy, "validate_schedule", None)
    if own is not None:
        for override, msg in own(len(plan.epochs), plan.groups):
            problems.append((override, f"strategy {strategy_name}: {msg}"))
    if not problems:
        for g in promised_groups(strategy, plan.groups, plan.head_groups):
            if not plan.trains_ever(g):
                problems.append(("never-unfreeze", (
                    f"strategy {strategy_name}: group {g} never trains in {len(plan.epochs)} epochs, "
                    "but the strategy promises to train it")))
    for override, msg in problems:
        if override in allow:
            log.warning(Event.CONFIG_OVERRIDE, allow=override, message=msg)
            continue
        raise ScheduleError(
            f"{msg}.\n       Use strategy \"frozen\" for a frozen encoder, or pass --allow {override}."
        )
