"""Pieces strategy plugins share (ours and third parties'): validators, lr decay, plateau detection.

* :data:`decay_factor`: an attrs validator for ``lr_decay``-style factors, 0 < x <= 1,
  raising :class:`~moola_engine.config.FieldValueError` so a bad value names its key
  (``invalid value, expected 0 < value <= 1, got 0 @ $.strategy.ulmfit.lr_decay``).
* :class:`MetricTrigger`: the parameters of a metric-driven transition
  (``unfreeze_on = "epoch" | "plateau"``, ``patience``, ``max_epoch``, ``metric``, ...);
  strategy parameter classes inherit it and declare their fixed-epoch field with :func:`epoch_field`.
* :class:`PlateauWatcher`: "the metric has not improved for ``patience`` epochs".
* :func:`decayed_scale`: ``scale x decay ^ distance_from_head`` (discriminative lrs, ULMFiT).
* :class:`Strategy`: the skeleton of a strategy class (``name``, ``params``); subclass it and add hooks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Generic, Literal, TypeVar

import attrs

from moola_engine import EngineView
from moola_engine.config import FieldValueError, non_negative, positive
from moola_engine.core.hookspecs import hookimpl
from moola_engine.errors import ScheduleError
from moola_engine.logs import Event


def _decay_factor(inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not 0.0 < value <= 1.0:
        raise FieldValueError(attr.name, f"expected 0 < value <= 1, got {value!r}")


decay_factor = _decay_factor


P = TypeVar("P")


class Strategy(Generic[P]):
    """The skeleton of a strategy: built with its parameters (``Strategy[MyParams]`` types ``self.params``);
    ``name`` is set to its ``[strategy.NAME]`` when built from strategies.toml.  Add hook implementations."""

    name: str | None = None

    def __init__(self, params: P) -> None:
        self.params = params


def decayed_scale(freezer: Any, group: str, decay: float, scale: float = 1.0) -> float:
    """``scale x decay ^ distance_from_head(group)``: 1 step of decay per group below the head."""
    distance: int = freezer.distance_from_head(group)
    return scale * decay ** distance


_EPOCH_DEFAULT = "moola_engine.epoch_default"


def epoch_field(default: int, *, validator: Any) -> Any:
    """A :class:`MetricTrigger` subclass's field of ``unfreeze_on = "epoch"`` (the fixed transition epoch):
    None when not given, so that giving it with ``"plateau"`` is refused; read through
    :meth:`MetricTrigger.epoch_value`, which answers ``default`` for None."""
    return attrs.field(default=None, validator=validator, metadata={_EPOCH_DEFAULT: default})


@attrs.frozen(kw_only=True)
class MetricTrigger:
    """When a metric-driven strategy moves on: a fixed epoch (``"epoch"``) or a plateau.

    With ``unfreeze_on = "plateau"`` the transition fires in ``on_validation_end``
    once ``metric`` has not improved by more than ``min_delta`` for ``patience``
    epochs (counted from the last transition), and at the latest so that the
    group trains from epoch ``max_epoch``.  A dry run has no metrics: it plans the
    ``max_epoch`` bound and says so.
    """

    unfreeze_on: Literal["epoch", "plateau"] = "epoch"
    """"epoch": the transition comes at a fixed epoch; "plateau": when the validation metric stalls."""
    patience: int | None = attrs.field(default=None, validator=positive)
    """Plateau only: epochs without improvement before the transition (default 3)."""
    max_epoch: int | None = attrs.field(default=None, validator=positive)
    """Plateau only (required): the transition happens at the latest so that training at epoch max_epoch uses it."""
    metric: str = "val_loss"
    """Plateau only: the metric watched."""
    mode: Literal["min", "max"] = "min"
    """Plateau only: "min" when lower is better, "max" when higher is better."""
    min_delta: float = attrs.field(default=0.0, validator=non_negative)
    """Plateau only: the smallest change that counts as an improvement."""

    def __attrs_post_init__(self) -> None:
        """The :func:`epoch_field` fields checked against the mode (a subclass may call :meth:`_check_trigger`
        itself instead)."""
        self._check_trigger({f.name: getattr(self, f.name) for f in attrs.fields(type(self))
                             if _EPOCH_DEFAULT in f.metadata})

    def epoch_value(self, key: str) -> int:
        """The :func:`epoch_field` ``key``: its value, or its default when not given."""
        value: int | None = getattr(self, key)
        default: int = attrs.fields_dict(type(self))[key].metadata[_EPOCH_DEFAULT]
        return default if value is None else value

    def _check_trigger(self, epoch_fields: Mapping[str, Any]) -> None:
        """Refuse parameters of the other mode: they would be silently ignored."""
        if self.unfreeze_on == "plateau":
            if self.max_epoch is None:
                raise FieldValueError("max_epoch", 'required with unfreeze_on = "plateau" (the hard bound on the transition)')
            for key, value in epoch_fields.items():
                if value is not None:
                    raise FieldValueError(key, f'{key} applies to unfreeze_on = "epoch"; with "plateau" '
                                               "use patience and max_epoch")
        else:
            for key in ("patience", "max_epoch"):
                if getattr(self, key) is not None:
                    raise FieldValueError(key, f'{key} applies to unfreeze_on = "plateau" only')

    @property
    def plateau_patience(self) -> int:
        return self.patience if self.patience is not None else 3

    def watcher(self) -> PlateauWatcher:
        return PlateauWatcher(metric=self.metric, mode=self.mode, patience=self.plateau_patience,
                              min_delta=self.min_delta)

    def plateau_note(self, strategy: str, what: str) -> str:
        return (f'{strategy}: unfreeze_on = "plateau": {what} when {self.metric} has not improved for '
                f"{self.plateau_patience} epochs, at the latest from epoch {self.max_epoch} (max_epoch); "
                "this plan shows that bound")


class PlateauWatcher:
    """Counts epochs without improvement of one metric; :meth:`reset` restarts the count (a new phase)."""

    def __init__(self, *, metric: str, mode: str, patience: int, min_delta: float = 0.0) -> None:
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.reset()

    def reset(self) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf
        self.bad_epochs = 0

    def state_dict(self) -> dict[str, float]:
        """What a checkpoint must keep for a resumed run to decide exactly as an uninterrupted one."""
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.best, self.bad_epochs = float(state["best"]), int(state["bad_epochs"])

    def update(self, metrics: Mapping[str, float], *, who: str) -> bool:
        """Feed one epoch's metrics; True once the metric has not improved for ``patience`` epochs."""
        value = metrics.get(self.metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            have = ", ".join(sorted(k for k in metrics if k != "epoch")) or "none"
            raise ScheduleError(f'strategy {who}: unfreeze_on = "plateau" watches metric {self.metric!r}, '
                                f"but this run's metrics are: {have} (is there validation data?)")
        improved = value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        if improved:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience


def log_plateau(engine: EngineView, who: str, watcher: PlateauWatcher, action: str) -> None:
    engine.log.info(Event.STRATEGY_PLATEAU, metric=watcher.metric, best=watcher.best, patience=watcher.patience,
                    action=action, strategy_key=who)



@attrs.frozen(kw_only=True)
class TransitionWords:
    """How a :class:`OneTransition` strategy names its transition in messages and events."""

    label: str
    """The strategy's key in messages when it has no name (``"two-phase"``)."""
    epoch_key: str
    """The parameter holding the fixed epoch (``"unfreeze_after"``)."""
    outcome: str
    """What phase 2 is (``"the encoder"``, ``"full fine-tuning"``)."""
    never: str
    """``<outcome> would never <never>`` (``"train"``, ``"start"``)."""
    note_what: str
    """Plan note: ``... <note_what> once <metric> ...`` (``"the encoder unfreezes"``)."""
    plateau_action: str
    """The ``action`` field of ``strategy.plateau`` events."""
    epoch_reason: str
    """The ``reason`` of the ``freeze.transition`` events when the fixed epoch fires."""
    max_epoch_reason: str = "max_epoch"
    """The ``reason`` when a plateau-driven transition reaches ``max_epoch``."""


class OneTransition:
    """The shape two-phase and lp-ft share: phase 1, then one transition at a fixed epoch or on a plateau.

    ``params`` is a :class:`MetricTrigger`.  A subclass sets :attr:`words` (a :class:`TransitionWords`) and
    implements :meth:`transition_epoch` (the fixed epoch), :meth:`_begin` (phase 1, at fit start) and
    :meth:`_transition` (phase 2); this class owns when the transition fires, the plateau watcher, the plan
    notes and the schedule validation.
    """

    name: str | None = None
    words: TransitionWords

    def __init__(self, params: Any) -> None:
        self.params = params
        self._done = False
        self._watch = params.watcher()  # built here so a resumed run can restore it (on_fit_start is not re-fired)

    @property
    def who(self) -> str:
        return self.name or self.words.label

    def transition_epoch(self) -> int:
        """The fixed epoch: the params' :func:`epoch_field` named by ``words.epoch_key``."""
        epoch: int = self.params.epoch_value(self.words.epoch_key)
        return epoch

    def _begin(self, engine: EngineView) -> None:
        raise NotImplementedError

    def _transition(self, engine: EngineView, reason: str) -> None:
        raise NotImplementedError

    def plateau_reason(self) -> str:
        p = self.params
        return f"plateau: {p.metric} did not improve for {p.plateau_patience} epochs"

    def _fire(self, engine: EngineView, reason: str) -> None:
        self._transition(engine, reason)
        self._done = True

    def validate_schedule(self, epochs: int, groups: list[str], head_groups: list[str]) -> list[tuple[str, str]]:
        p = self.params
        if p.unfreeze_on == "plateau":
            if p.max_epoch is not None and p.max_epoch >= epochs:
                return [("never-unfreeze", f"max_epoch = {p.max_epoch} but training runs {epochs} epochs: "
                                           f"{self.words.outcome} might never {self.words.never}")]
        elif self.transition_epoch() >= epochs:
            return [("never-unfreeze", f"{self.words.epoch_key} = {self.transition_epoch()} but training runs "
                                       f"{epochs} epochs: {self.words.outcome} would never {self.words.never}")]
        return []

    def plan_notes(self) -> list[str]:
        if self.params.unfreeze_on == "plateau":
            return [self.params.plateau_note(self.who, self.words.note_what)]
        return []

    @hookimpl
    def on_fit_start(self, engine: EngineView) -> None:
        self._done = False
        self._watch = self.params.watcher()
        self._begin(engine)

    @hookimpl
    def on_epoch_start(self, engine: EngineView, epoch: int) -> None:
        if self.params.unfreeze_on == "epoch" and not self._done and epoch == self.transition_epoch():
            self._fire(engine, self.words.epoch_reason)

    @hookimpl
    def on_validation_end(self, engine: EngineView, epoch: int, metrics: Any) -> None:
        p = self.params
        if p.unfreeze_on != "plateau" or self._done:
            return
        if not engine.dry_run and self._watch.update(metrics, who=self.who):
            log_plateau(engine, self.who, self._watch, self.words.plateau_action)
            self._fire(engine, self.plateau_reason())
        elif epoch + 1 >= (p.max_epoch or 0):
            self._fire(engine, self.words.max_epoch_reason)
