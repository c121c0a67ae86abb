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

from moola_engine import EngineView, hookimpl
from moola_engine.config import non_negative, positive
from moola_engine.strategy_kit import MetricTrigger, OneTransition, TransitionWords, decay_factor, decayed_scale, epoch_field


@attrs.frozen(kw_only=True)
class TwoPhaseParams(MetricTrigger):
    unfreeze_after: int | None = epoch_field(10, validator=non_negative)
    """Epochs of head-only training; the encoder trains from this epoch on (0 = from the start). Default 10."""
    lr_scale: float = attrs.field(default=0.3, validator=positive)
    """Encoder lr after unfreezing, relative to the base lr."""
    lr_decay: float = attrs.field(default=1.0, validator=decay_factor)
    """Each encoder group's lr is lr_scale x lr_decay ^ distance_from_head (1 = same lr for all)."""


class TwoPhase(OneTransition):
    """head first, then the encoder at a lower lr"""

    words = TransitionWords(label="two-phase", epoch_key="unfreeze_after", outcome="the encoder", never="train",
                            note_what="the encoder unfreezes", plateau_action="unfreeze encoder",
                            epoch_reason="unfreeze_after")

    def _begin(self, engine: EngineView) -> None:
        if self.params.unfreeze_on == "epoch" and self.transition_epoch() == 0:
            self._fire(engine, "unfreeze_after=0")
            return
        for g in engine.freezer.encoder_groups:
            engine.freezer.freeze(g, reason="phase 1: head only")

    def _transition(self, engine: EngineView, reason: str) -> None:
        fz = engine.freezer
        for g in fz.encoder_groups:
            fz.unfreeze(g, lr_scale=decayed_scale(fz, g, self.params.lr_decay, self.params.lr_scale), reason=reason)


@hookimpl
def register_strategies(register: Any) -> None:
    register("two-phase", TwoPhase, params=TwoPhaseParams, description="head first, then the encoder at a lower lr")
