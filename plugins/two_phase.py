"""``two-phase``: head only for ``unfreeze_after`` epochs, then the encoder at ``lr_scale`` x the base lr.

``unfreeze_after = 0`` means "start unfrozen".  There is no value meaning
"never": a permanently frozen encoder is the ``frozen`` strategy.

``unfreeze_on = "plateau"`` unfreezes the encoder once the validation metric
has not improved for ``patience`` epochs of head-only training, and at the
latest so that it trains from epoch ``max_epoch``.  ``lr_decay`` gives every
encoder group ``lr_scale x lr_decay ^ distance_from_head`` (discriminative lrs).
"""

from __future__ import annotations

from typing import Any

import attrs

from moola_engine import hookimpl
from moola_engine.config import non_negative, positive
from moola_engine.strategy_kit import MetricTrigger, decay_factor, decayed_scale, log_plateau


@attrs.frozen(kw_only=True)
class TwoPhaseParams(MetricTrigger):
    unfreeze_after: int | None = attrs.field(default=None, validator=non_negative)
    """Epochs of head-only training; the encoder trains from this epoch on (0 = from the start). Default 10."""
    lr_scale: float = attrs.field(default=0.3, validator=positive)
    """Encoder lr after unfreezing, relative to the base lr."""
    lr_decay: float = attrs.field(default=1.0, validator=decay_factor)
    """Each encoder group's lr is lr_scale x lr_decay ^ distance_from_head (1 = same lr for all)."""

    def __attrs_post_init__(self) -> None:
        self._check_trigger({"unfreeze_after": self.unfreeze_after})

    @property
    def after(self) -> int:
        return 10 if self.unfreeze_after is None else self.unfreeze_after


class TwoPhase:
    """head first, then the encoder at a lower lr"""

    name: str | None = None

    def __init__(self, params: TwoPhaseParams) -> None:
        self.params = params
        self._unfrozen = False
        self._watch = self.params.watcher()  # built here so a resumed run can restore it (on_fit_start is not re-fired)

    def validate_schedule(self, epochs: int, groups: list[str]) -> list[tuple[str, str]]:
        p = self.params
        if p.unfreeze_on == "plateau":
            if p.max_epoch is not None and p.max_epoch >= epochs:
                return [("never-unfreeze", f"max_epoch = {p.max_epoch} but training runs {epochs} epochs: "
                                           "the encoder might never train")]
        elif p.after >= epochs:
            return [("never-unfreeze",
                     f"unfreeze_after = {p.after} but training runs {epochs} epochs: the encoder would never train")]
        return []

    def plan_notes(self) -> list[str]:
        p = self.params
        if p.unfreeze_on == "plateau":
            return [p.plateau_note(self.name or "two-phase", "the encoder unfreezes")]
        return []

    def _unfreeze(self, engine: Any, reason: str) -> None:
        fz = engine.freezer
        for g in fz.encoder_groups:
            fz.unfreeze(g, lr_scale=decayed_scale(fz, g, self.params.lr_decay, self.params.lr_scale), reason=reason)
        self._unfrozen = True

    @hookimpl
    def on_fit_start(self, engine: Any) -> None:
        self._unfrozen = False
        self._watch = self.params.watcher()
        if self.params.unfreeze_on == "epoch" and self.params.after == 0:
            self._unfreeze(engine, "unfreeze_after=0")
            return
        for g in engine.freezer.encoder_groups:
            engine.freezer.freeze(g, reason="phase 1: head only")

    @hookimpl
    def on_epoch_start(self, engine: Any, epoch: int) -> None:
        if self.params.unfreeze_on == "epoch" and not self._unfrozen and epoch == self.params.after:
            self._unfreeze(engine, "unfreeze_after")

    @hookimpl
    def on_validation_end(self, engine: Any, epoch: int, metrics: Any) -> None:
        p = self.params
        if p.unfreeze_on != "plateau" or self._unfrozen:
            return
        if not engine.dry_run and self._watch.update(metrics, who=self.name or "two-phase"):
            log_plateau(engine, self.name or "two-phase", self._watch, "unfreeze encoder")
            self._unfreeze(engine, f"plateau: {p.metric} did not improve for {p.plateau_patience} epochs")
        elif epoch + 1 >= (p.max_epoch or 0):
            self._unfreeze(engine, "max_epoch")


@hookimpl
def register_strategies(register: Any) -> None:
    register("two-phase", TwoPhase, params=TwoPhaseParams, description="head first, then the encoder at a lower lr")
