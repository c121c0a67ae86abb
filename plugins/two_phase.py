"""``two-phase``: head only for ``unfreeze_after`` epochs, then the encoder at ``lr_scale`` x the base lr.

``unfreeze_after = 0`` means "start unfrozen".  There is no value meaning
"never": a permanently frozen encoder is the ``frozen`` strategy.
"""

from __future__ import annotations

from typing import Any

import attrs

from moola_engine import hookimpl
from moola_engine.config import non_negative, positive


@attrs.frozen(kw_only=True)
class TwoPhaseParams:
    unfreeze_after: int = attrs.field(default=10, validator=non_negative)
    """Epochs of head-only training; the encoder trains from this epoch on (0 = from the start)."""
    lr_scale: float = attrs.field(default=0.3, validator=positive)
    """Encoder lr after unfreezing, relative to the base lr."""


class TwoPhase:
    """head first, then the encoder at a lower lr"""

    name: str | None = None

    def __init__(self, params: TwoPhaseParams) -> None:
        self.params = params

    def validate_schedule(self, epochs: int, groups: list[str]) -> list[tuple[str, str]]:
        p = self.params
        if p.unfreeze_after >= epochs:
            return [("never-unfreeze",
                     f"unfreeze_after = {p.unfreeze_after} but training runs {epochs} epochs: "
                     "the encoder would never train")]
        return []

    @hookimpl
    def on_fit_start(self, engine: Any) -> None:
        fz = engine.freezer
        for g in fz.encoder_groups:
            if self.params.unfreeze_after == 0:
                fz.unfreeze(g, lr_scale=self.params.lr_scale, reason="unfreeze_after=0")
            else:
                fz.freeze(g, reason="phase 1: head only")

    @hookimpl
    def on_epoch_start(self, engine: Any, epoch: int) -> None:
        if epoch == self.params.unfreeze_after and epoch > 0:
            for g in engine.freezer.encoder_groups:
                engine.freezer.unfreeze(g, lr_scale=self.params.lr_scale, reason="unfreeze_after")


@hookimpl
def register_strategies(register: Any) -> None:
    register("two-phase", TwoPhase, params=TwoPhaseParams, description="head first, then the encoder at a lower lr")
