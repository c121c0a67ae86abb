"""Schedule plans: dry-run a strategy's own hooks against a recording freezer.

No model, no data, no training: the strategy object is copied, its
``on_fit_start``/``on_epoch_start``/``on_validation_end`` hooks are called for
every epoch against a :class:`~moola_engine.core.freezing.Freezer` that holds only
group names, and the state after each epoch's start is recorded.  The engine
computes the same plan before training and refuses a schedule that cannot keep
its promise; ``moola-engine plan`` prints it.

Metric-driven transitions (``unfreeze_on = "plateau"``) cannot be known in
advance: in a dry run ``on_validation_end`` receives empty metrics and the
strategy plans its hard ``max_epoch`` bound instead.

Given the model's groups (``model_groups``), the recording freezer also knows
parameter names (so ``freeze_params`` masks are planned exactly) and which
groups hold BatchNorm (so the plan shows each group's BN mode).

What :func:`validate_plan` refuses, each with a message naming the strategy
key and an override name for ``--allow`` (an override lifts exactly the check
it names, and nothing else):

* the strategy's own complaints (``validate_schedule``), e.g. a transition at or
  after the last epoch in its own terms (``never-unfreeze``, ``late-transition``, ``no-phase``);
* any transition that takes effect at or after the last epoch (``late-transition``);
* a group the strategy promises to train that never trains (``never-unfreeze``);
* a parameter the strategy promises to train that is in no phase (``no-phase``).

An lr scale of 0 is refused outright (no override).  Early stopping cannot end a
run before a scheduled transition: the engine holds it until the plan's last
transition, and the plan says so in its notes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from moola_engine.config import TrainConfig
from moola_engine.core.freezing import _BN_TYPES, Freezer, ParamGroup, Transition
from moola_engine.core.hookspecs import hookimpl  # noqa: F401 - re-exported for strategy authors reading this module
from moola_engine.core.plugins import new_plugin_manager
from moola_engine.errors import ConfigError, ScheduleError
from moola_engine.logs import Event, get_logger

OVERRIDES = ("never-unfreeze", "late-transition", "no-phase")
"""The names ``--allow`` accepts for schedule validation."""


@attrs.frozen(kw_only=True)
class EpochPlan:
    epoch: int
    trainable: dict[str, bool]
    lr: dict[str, float]
    bn: dict[str, str] = attrs.Factory(dict)
    """BatchNorm mode per group during this epoch: ``train``, ``eval``, or ``-`` (no BatchNorm in the group)."""
    params: dict[str, str] = attrs.Factory(dict)
    """What of a trainable group trains: ``all`` or the ``freeze_params`` label (``biases``); ``-`` when frozen."""
    frozen_params: dict[str, list[str]] = attrs.Factory(dict)
    """Parameters held frozen inside groups (``freeze_params``), by group; empty lists omitted."""


@attrs.frozen(kw_only=True)
class Plan:
    strategy: str
    groups: list[str]
    head_groups: list[str]
    epochs: list[EpochPlan]
    transitions: list[dict[str, Any]]
    notes: list[str] = attrs.Factory(list)
    base_lr: float = 0.0
    param_names: dict[str, list[str]] | None = None
    """Parameter names per group when the plan was computed with the model's groups."""

    def trains_ever(self, group: str) -> bool:
        return any(e.trainable[group] for e in self.epochs)

    def trains_param_ever(self, group: str, name: str) -> bool:
        return any(e.trainable[group] and name not in e.frozen_params.get(group, ()) for e in self.epochs)

    def first_trainable_epoch(self, group: str) -> int | None:
        return next((e.epoch for e in self.epochs if e.trainable[group]), None)

    def last_scheduled_transition(self) -> int | None:
        """The epoch of the last transition after fit start (early stopping waits for it)."""
        later = [t["epoch"] for t in self.transitions if t["epoch"] > 0]
        return max(later) if later else None

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "base_lr": self.base_lr,
            "groups": self.groups,
            "head_groups": self.head_groups,
            "epochs": [{"epoch": e.epoch, "trainable": e.trainable, "lr": e.lr, "bn": e.bn, "params": e.params,
                        "frozen_params": e.frozen_params} for e in self.epochs],
            "transitions": self.transitions,
            "notes": self.notes,
        }


class PlanEngine:
    """The dry-run side of :class:`~moola_engine.core.context.EngineView`: what a strategy sees in a plan.

    The same attributes as in training (the real groups when the model is known), ``dry_run = True``,
    no steps and no metrics."""

    dry_run = True

    def __init__(self, freezer: Freezer, epochs: int, base_lr: float, *, groups: Sequence[ParamGroup] = (),
                 config: TrainConfig | None = None) -> None:
        self.freezer = freezer
        self.epochs = epochs
        self.base_lr = base_lr
        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.log = freezer.log
        self.groups: list[ParamGroup] = list(groups)
        self.model: nn.Module | None = None
        self.config = config if config is not None else TrainConfig(epochs=max(epochs, 1), lr=base_lr)
        self.device = torch.device("cpu")
        self.run_dir: Path | None = None


def _has_bn(group: ParamGroup) -> bool:
    return any(isinstance(sub, _BN_TYPES) for _, m in group.modules for sub in m.modules())


def compute_plan(
    strategy: Any, groups: Sequence[str], head_groups: Sequence[str], epochs: int, base_lr: float,
    name: str | None = None, *, model_groups: Sequence[ParamGroup] | None = None, train: Any = None,
    history: Sequence[Mapping[str, float]] = (),
) -> Plan:
    """Dry-run a copy of ``strategy`` over ``epochs`` epochs and record each epoch's state.

    ``model_groups`` (the resolved groups of the real model) adds parameter names
    and BatchNorm modes; ``train`` (a :class:`~moola_engine.config.TrainConfig`) adds
    ``train_bn`` and the notes on early stopping and the lr scheduler.
    ``history``: metrics of epochs already trained (a resumed run); the replay feeds
    them to ``on_validation_end`` so metric-driven decisions come out as they really were.
    """
    label = name or getattr(strategy, "name", None) or type(strategy).__name__
    strat = copy.deepcopy(strategy)
    param_names = {g.name: [n for n, _ in g.params] for g in model_groups} if model_groups else None
    has_bn = {g.name: _has_bn(g) for g in model_groups} if model_groups else {}
    train_bn = bool(getattr(train, "train_bn", False))
    freezer = Freezer(list(groups), base_lr=base_lr, head_groups=list(head_groups), logger=get_logger(),
                      param_names=param_names)
    engine = PlanEngine(freezer, epochs, base_lr, groups=model_groups or (),
                         config=train if isinstance(train, TrainConfig) else None)
    pm = new_plugin_manager()
    pm.register(strat, name="strategy")
    pm.check_pending()
    hook = pm.hook
    rows: list[EpochPlan] = []
    try:
        hook.on_fit_start(engine=engine)
        for epoch in range(epochs):
            engine.epoch = freezer.epoch = epoch
            hook.on_epoch_start(engine=engine, epoch=epoch)
            trainable = {g: freezer.is_trainable(g) for g in freezer.groups}
            rows.append(EpochPlan(
                epoch=epoch,
                trainable=trainable,
                lr={g: freezer.lr(g) for g in freezer.groups},
                bn={g: ("train" if trainable[g] or train_bn else "eval") if has_bn.get(g) else "-"
                    for g in freezer.groups},
                params={g: (freezer.mask_label(g) or "all") if trainable[g] else "-" for g in freezer.groups},
                frozen_params={g: fp for g in freezer.groups if (fp := freezer.frozen_params(g))},
            ))
            metrics = dict(history[epoch]) if epoch < len(history) else {}
            if metrics:
                engine.history.append(metrics)
            hook.on_validation_end(engine=engine, epoch=epoch, metrics=metrics)
            hook.on_epoch_end(engine=engine, epoch=epoch, metrics=metrics)
    except ScheduleError as exc:
        msg = str(exc)
        raise ScheduleError(msg if msg.startswith("strategy ") else f"strategy {label}: {msg}") from exc
    transitions = [
        {"epoch": t.epoch if t.epoch == 0 else _effective_epoch(t, rows), "group": t.group,
         "to_state": t.to_state, "lr": t.lr, "reason": t.reason}
        for t in freezer.history
    ]
    plan = Plan(strategy=label, groups=list(groups), head_groups=list(head_groups), epochs=rows,
                transitions=transitions, notes=list(getattr(strat, "plan_notes", lambda: [])()),
                base_lr=base_lr, param_names=param_names)
    plan.notes.extend(_train_notes(plan, train))
    return plan


def _train_notes(plan: Plan, train: Any) -> list[str]:
    if train is None:
        return []
    notes: list[str] = []
    es = getattr(train, "early_stopping", None)
    last = plan.last_scheduled_transition()
    if es is not None and last is not None:
        note = (f"early stopping ({es.metric}, patience {es.patience}) is held until epoch {last}, the last scheduled "
                "transition, and patience counts from the last transition: it cannot end the run before a transition")
        if getattr(train, "restore_best", False):
            note += f"; restore_best may still return weights from before epoch {last}"
        notes.append(note)
    sched = getattr(train, "scheduler", "none")
    if sched != "none":
        notes.append(f"lrs shown are base lr x group scale; the {sched} scheduler multiplies every group's lr by the "
                     "same factor on top")
    return notes


def _effective_epoch(t: Transition, rows: list[EpochPlan]) -> int:
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


def promised_params(strategy: Any, group: str, names: Sequence[str], head_groups: Sequence[str]) -> list[str]:
    """Parameters of a promised group the strategy promises to train (default: all of them)."""
    fn = getattr(strategy, "promised_params", None)
    if fn is None:
        return list(names)
    return list(fn(group, list(names), list(head_groups)))


def _own_problems(strategy: Any, plan: Plan) -> list[tuple[str, str]]:
    own = getattr(strategy, "validate_schedule", None)
    if own is None:
        return []
    return list(own(len(plan.epochs), list(plan.groups), list(plan.head_groups)))


def schedule_problems(plan: Plan, strategy: Any, strategy_name: str) -> list[tuple[str, str]]:
    """Every reason the plan cannot keep the strategy's promise, as (override name, message)."""
    problems = [(o, f"strategy {strategy_name}: {m}") for o, m in _own_problems(strategy, plan)]
    generic = _generic_problems(plan, strategy, strategy_name)
    # The strategy's own words come first; a generic problem it already named (same override) would repeat it.
    # Every other generic problem stays: an allow lifts exactly the one check it names (--allow late-transition
    # must not let a group the strategy promises to train go untrained).
    said = {o for o, _ in problems}
    return problems + [(o, m) for o, m in generic if o not in said]


def _generic_problems(plan: Plan, strategy: Any, strategy_name: str) -> list[tuple[str, str]]:
    n = len(plan.epochs)
    problems: list[tuple[str, str]] = []
    for t in plan.transitions:
        if t["epoch"] >= n:
            verb = "start training" if t["to_state"] == "trainable" else "freeze"
            problems.append(("late-transition", (
                f"strategy {strategy_name}: group {t['group']} would {verb} at epoch {t['epoch']} "
                f"({t['reason']}) but training runs {n} epochs (0-{n - 1})")))
    promised = promised_groups(strategy, plan.groups, plan.head_groups)
    for g in promised:
        if not plan.trains_ever(g):
            problems.append(("never-unfreeze", (
                f"strategy {strategy_name}: group {g} never trains in {n} epochs, "
                "but the strategy promises to train it")))
    if plan.param_names is not None:
        for g in promised:
            if not plan.trains_ever(g):
                continue
            idle = [p for p in promised_params(strategy, g, plan.param_names[g], plan.head_groups)
                    if not plan.trains_param_ever(g, p)]
            if idle:
                problems.append(("no-phase", (
                    f"strategy {strategy_name}: parameter{'s' if len(idle) > 1 else ''} {', '.join(idle)} of group {g} "
                    f"{'are' if len(idle) > 1 else 'is'} in no phase: never trainable in {n} epochs")))
    return problems


def validate_plan(plan: Plan, strategy: Any, strategy_name: str, *, allow: set[str] | Sequence[str] = (),
                  log: Any = None) -> None:
    """Refuse a plan that cannot keep the strategy's promise, unless explicitly allowed.

    The strategy's own ``validate_schedule(epochs, groups, head_groups)`` (if it
    has one) speaks first, in its own terms (``two_phase: unfreeze_after = 40 but
    training runs 30 epochs``); otherwise the generic checks listed in the module
    docstring run.  Each allowed problem is logged as ``config.override``.
    Early stopping is never a problem here: the engine holds it until the last
    scheduled transition.
    """
    log = log or get_logger()
    allow = set(allow)
    known = set(OVERRIDES) | set(getattr(strategy, "overrides", ()))
    unknown = sorted(allow - known)
    if unknown:  # a misspelled override would otherwise be silently ignored and the run refused (or worse)
        raise ConfigError("--allow", f"unknown override {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}"
                          " (a strategy may declare more in its `overrides` attribute)")
    for override, msg in schedule_problems(plan, strategy, strategy_name):
        if override in allow:
            log.warning(Event.CONFIG_OVERRIDE, allow=override, message=msg)
            continue
        hint = (f'Use strategy "frozen" for a frozen encoder, or pass --allow {override}.' if override == "never-unfreeze"
                else f"Pass --allow {override} to run it anyway (the run log records it).")
        raise ScheduleError(f"{msg}.\n       {hint}")
