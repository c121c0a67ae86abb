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

from moola_engine import EngineView, hookimpl
from moola_engine.config import positive
from moola_engine.strategy_kit import MetricTrigger, OneTransition, TransitionWords, decay_factor, decayed_scale, epoch_field


class LpFt(OneTransition):
    """linear probe, then full fine-tuning of everything at a lower lr"""

    words = TransitionWords(label="lp-ft", epoch_key="probe_epochs", outcome="full fine-tuning", never="start",
                            note_what="full fine-tuning starts", plateau_action="full fine-tuning",
                            epoch_reason="lp-ft: probe_epochs done", max_epoch_reason="lp-ft: max_epoch")

    def plateau_reason(self) -> str:
        p = self.params
        return f"lp-ft: probe plateaued ({p.metric}, patience {p.plateau_patience})"

    def _begin(self, engine: EngineView) -> None:
        for g in engine.freezer.encoder_groups:
            engine.freezer.freeze(g, reason="lp-ft: linear probe")

    def _transition(self, engine: EngineView, reason: str) -> None:
        fz = engine.freezer
        p = self.params
        for g in fz.head_groups:
            fz.set_lr_scale(g, p.lr_scale, reason=reason)
        for g in fz.encoder_groups:
            fz.unfreeze(g, lr_scale=decayed_scale(fz, g, p.lr_decay, p.lr_scale), reason=reason)


@attrs.frozen(kw_only=True)
class LpFtParams(MetricTrigger):
    probe_epochs: int | None = epoch_field(10, validator=positive)
    """Epochs of linear probing (default 10)."""
    lr_scale: float = attrs.field(default=0.1, validator=positive)
    """lr of every group during full fine-tuning, relative to the base lr."""
    lr_decay: float = attrs.field(default=1.0, validator=decay_factor)
    """Encoder groups during fine-tuning: lr_scale x lr_decay ^ distance_from_head."""


@hookimpl
def register_strategies(register: Any) -> None:
    register("lp-ft", LpFt, params=LpFtParams, description="linear probe, then full fine-tuning of everything at a lower lr")
