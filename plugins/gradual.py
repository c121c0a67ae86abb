"""``gradual``: ULMFiT-style gradual unfreezing, one encoder group at a time from the top down.

The head trains from the first step.  The encoder group right below the head
unfreezes at epoch ``start`` (default: ``every``), the next one ``every``
epochs later, and so on down to the input group; a group stays trainable once
unfrozen.  Every encoder group trains at ``lr_scale x lr_decay ^
distance_from_head`` times the base lr (``lr_decay = 0.38`` with ``every = 1``
is ULMFiT's recipe, Howard & Ruder 2018: discriminative lrs, decay 1/2.6).

``unfreeze_on = "plateau"``: the next group unfreezes once the validation
metric has not improved for ``patience`` epochs since the last unfreeze; every
group still frozen unfreezes at the latest so that it trains from epoch
``max_epoch``.
"""

from __future__ import annotations

from typing import Any

import attrs

from moola_engine import EngineView, hookimpl
from moola_engine.config import non_negative, positive
from moola_engine.strategy_kit import MetricTrigger, decay_factor, decayed_scale, log_plateau


@attrs.frozen(kw_only=True)
class GradualParams(MetricTrigger):
    every: int | None = attrs.field(default=None, validator=positive)
    """Epochs between two unfreezes (default 1)."""
    start: int | None = attrs.field(default=None, validator=non_negative)
    """Epoch from which the top encoder group trains (default: every; 0 = from the first step)."""
    lr_scale: float = attrs.field(default=1.0, validator=positive)
    """lr of each newly unfrozen encoder group relative to the base lr (before lr_decay)."""
    lr_decay: float = attrs.field(default=1.0, validator=decay_factor)
    """Discriminative lrs: encoder group lr = base lr x lr_scale x lr_decay ^ distance_from_head."""

    def __attrs_post_init__(self) -> None:
        self._check_trigger({"every": self.every, "start": self.start})

    @property
    def step(self) -> int:
        return self.every if self.every is not None else 1

    @property
    def first(self) -> int:
        return self.start if self.start is not None else self.step


class Gradual:
    """ULMFiT gradual unfreezing: top encoder group first, one more every few epochs"""

    name: str | None = None

    def __init__(self, params: GradualParams) -> None:
        self.params = params
        self._queue: list[str] = []
        self._watch = self.params.watcher()  # built here so a resumed run can restore it (on_fit_start is not re-fired)

    def _schedule(self, encoder_groups: list[str]) -> list[tuple[str, int]]:
        """(group, epoch it trains from), top group first (epoch mode)."""
        top_down = list(reversed(encoder_groups))
        return [(g, self.params.first + k * self.params.step) for k, g in enumerate(top_down)]

    def validate_schedule(self, epochs: int, groups: list[str], head_groups: list[str]) -> list[tuple[str, str]]:
        p = self.params
        if p.unfreeze_on == "plateau":
            if p.max_epoch is not None and p.max_epoch >= epochs:
                return [("never-unfreeze", f"max_epoch = {p.max_epoch} but training runs {epochs} epochs: "
                                           "encoder groups might never train")]
            return []
        head = set(head_groups)
        late = [(g, e) for g, e in self._schedule([g for g in groups if g not in head]) if e >= epochs]
        if late:
            g, e = late[0]
            return [("never-unfreeze",
                     f"group {g} would unfreeze at epoch {e} (start = {p.first}, every = {p.step}) but training runs "
                     f"{epochs} epochs: {', '.join(x for x, _ in late)} would never train")]
        return []

    def plan_notes(self) -> list[str]:
        if self.params.unfreeze_on == "plateau":
            return [self.params.plateau_note(self.name or "gradual", "the next encoder group unfreezes")]
        return []

    def _unfreeze(self, engine: EngineView, group: str, reason: str) -> None:
        fz = engine.freezer
        fz.unfreeze(group, lr_scale=decayed_scale(fz, group, self.params.lr_decay, self.params.lr_scale), reason=reason)

    @hookimpl
    def on_fit_start(self, engine: EngineView) -> None:
        fz = engine.freezer
        self._queue = list(reversed(fz.encoder_groups))
        self._watch = self.params.watcher()
        for g in fz.encoder_groups:
            fz.freeze(g, reason="gradual: waits its turn")
        if self.params.unfreeze_on == "epoch" and self.params.first == 0:
            self.on_epoch_start(engine, 0)  # start = 0: the top group trains from the first step

    @hookimpl
    def on_epoch_start(self, engine: EngineView, epoch: int) -> None:
        if self.params.unfreeze_on != "epoch":
            return
        for g, e in self._schedule(engine.freezer.encoder_groups):
            if e == epoch and g in self._queue:
                self._queue.remove(g)
                self._unfreeze(engine, g, f"gradual: epoch {e}")

    @hookimpl
    def on_validation_end(self, engine: EngineView, epoch: int, metrics: Any) -> None:
        p = self.params
        if p.unfreeze_on != "plateau" or not self._queue:
            return
        who = self.name or "gradual"
        if not engine.dry_run and self._watch.update(metrics, who=who):
            log_plateau(engine, who, self._watch, f"unfreeze {self._queue[0]}")
            self._unfreeze(engine, self._queue.pop(0), f"plateau: {p.metric} did not improve for {p.plateau_patience} epochs")
            self._watch.reset()
        elif epoch + 1 >= (p.max_epoch or 0):
            while self._queue:
                self._unfreeze(engine, self._queue.pop(0), "max_epoch")


@hookimpl
def register_strategies(register: Any) -> None:
    register("gradual", Gradual, params=GradualParams,
             description="ULMFiT gradual unfreezing: top encoder group first, one more every few epochs")
