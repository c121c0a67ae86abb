"""``discriminative``: every group trains from the first step, each at its own lr.

A group's lr is ``base lr x decay ^ distance_from_head``: the head at the base
lr, the encoder group right below it at ``decay`` x, the next at ``decay^2`` x,
and so on down to the input.  Discriminative fine-tuning is from ULMFiT
(Howard & Ruder 2018), who used ``decay = 1/2.6 ~ 0.38``.  ``two-phase`` and
``gradual`` take the same rule as their ``lr_decay`` option.
"""

from __future__ import annotations

from typing import Any

import attrs

from moola_engine import EngineView, hookimpl
from moola_engine.strategy_kit import Strategy, decay_factor, decayed_scale


@attrs.frozen(kw_only=True)
class DiscriminativeParams:
    decay: float = attrs.field(default=0.38, validator=decay_factor)
    """lr multiplier per group of distance from the head (0 < decay <= 1)."""


class Discriminative(Strategy[DiscriminativeParams]):
    """all groups train; lr shrinks by decay per group below the head"""

    @hookimpl
    def on_fit_start(self, engine: EngineView) -> None:
        fz = engine.freezer
        for g in fz.groups:
            fz.unfreeze(g, lr_scale=decayed_scale(fz, g, self.params.decay), reason="discriminative")


@hookimpl
def register_strategies(register: Any) -> None:
    register("discriminative", Discriminative, params=DiscriminativeParams,
             description="all groups train; lr shrinks by decay per group below the head")
