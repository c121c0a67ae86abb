"""``lp-ft``: linear probe first, then full fine-tuning at a lower lr (Kumar et al. 2022).

Phase 1 trains the head alone (a linear probe on the pretrained features) for
``probe_epochs`` epochs, or with ``unfreeze_on = "plateau"`` until the
validation metric has not improved for ``patience`` epochs (at the latest
``max_epoch``).  Phase 2 fine-tunes every group, head included, at ``lr_scale``
x the base lr (encoder groups additionally x ``lr_decay ^ distance_from_head``).
Starting full fine-tuning from a converged head is what keeps the pretrained
features from being distorted by a random head's large early gradients.
"""

from __future__ import annotations

from typing import Any

import attrs

from moola_engine import hookimpl
from moola_engine.config import positive
from moola_engine.strategy_kit import MetricTrigger, decay_factor, decayed_scale, log_plateau


@attrs.frozen(kw_only=True)
class LpFtParams(MetricTrigger):
    probe_epochs: int | None = attrs.field(default=None, validator=positive)
    """Epochs of linear probing (default 10)."""
    lr_scale: float = attrs.field(default=0.1, validator=positive)
    """lr of every group during full fine-tuning, relative to the base lr."""
    lr_decay: float = attrs.field(default=1.0, validator=decay_factor)
    """Encoder groups during fine-tuning: lr_scale x lr_decay ^ distance_from_head."""

    def __attrs_post_init__(self) -> None:
        self._check_trigger({"probe_epochs": self.probe_epochs})

    @property
    def probe(self) -> int:
        return self.probe_epochs if self.probe_epochs is not None else 10


class LpFt:
    """linear probe, then full fine-tuning of everything at a lower lr"""

    name: str | None = None

    def __init__(self, params: LpFtParams) -> None:
        self.params = params
        self._tuning = False
        self._watch = self.params.watcher()  # built here so a resumed run can restore it (on_fit_start is not re-fired)

    def validate_schedule(self, epochs: int, groups: list[str]) -> list[tuple[str, str]]:
        p = self.params
        if p.unfreeze_on == "plateau":
            if p.max_epoch is not None and p.max_epoch >= epochs:
                return [("never-unfreeze", f"max_epoch = {p.max_epoch} but training runs {epochs} epochs: "
                                           "full fine-tuning might never start")]
        elif p.probe >= epochs:
            return [("never-unfreeze", f"probe_epochs = {p.probe} but training runs {epochs} epochs: "
                                       "full fine-tuning would never start")]
        return []

    def plan_notes(self) -> list[str]:
        if self.params.unfreeze_on == "plateau":
            return [self.params.plateau_note(self.name or "lp-ft", "full fine-tuning starts")]
        return []

    def _fine_tune(self, engine: Any, reason: str) -> None:
        fz = engine.freezer
        p = self.params
        for g in fz.head_groups:
            fz.set_lr_scale(g, p.lr_scale, reason=reason)
        for g in fz.encoder_groups:
            fz.unfreeze(g, lr_scale=decayed_scale(fz, g, p.lr_decay, p.lr_scale), reason=reason)
        self._tuning = True

    @hookimpl
    def on_fit_start(self, engine: Any) -> None:
        self._tuning = False
        self._watch = self.params.watcher()
        for g in engine.freezer.encoder_groups:
            engine.freezer.freeze(g, reason="lp-ft: linear probe")

    @hookimpl
    def on_epoch_start(self, engine: Any, epoch: int) -> None:
        if self.params.unfreeze_on == "epoch" and not self._tuning and epoch == self.params.probe:
            self._fine_tune(engine, "lp-ft: probe_epochs done")

    @hookimpl
    def on_validation_end(self, engine: Any, epoch: int, metrics: Any) -> None:
        p = self.params
        if p.unfreeze_on != "plateau" or self._tuning:
            return
        who = self.name or "lp-ft"
        if not engine.dry_run and self._watch.update(metrics, who=who):
            log_plateau(engine, who, self._watch, "full fine-tuning")
            self._fine_tune(engine, f"lp-ft: probe plateaued ({p.metric}, patience {p.plateau_patience})")
        elif epoch + 1 >= (p.max_epoch or 0):
            self._fine_tune(engine, "lp-ft: max_epoch")


@hookimpl
def register_strategies(register: Any) -> None:
    register("lp-ft", LpFt, params=LpFtParams, description="linear probe, then full fine-tuning of everything at a lower lr")
