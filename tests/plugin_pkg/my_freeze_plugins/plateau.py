"""``plateau-thaw``: unfreezes one more encoder group (top down) each time the validation loss stops improving."""

from __future__ import annotations

from typing import Any

import attrs

from moola_engine import EngineView, hookimpl


@attrs.frozen(kw_only=True)
class PlateauThawParams:
    patience: int = 2


class PlateauThaw:
    """unfreezes one group each time validation loss plateaus"""

    def __init__(self, params: PlateauThawParams) -> None:
        self.params = params
        self.best = float("inf")
        self.bad = 0

    @hookimpl
    def on_fit_start(self, engine: EngineView) -> None:
        for g in engine.freezer.encoder_groups:
            engine.freezer.freeze(g, reason="plateau-thaw: start with the head")

    @hookimpl
    def on_validation_end(self, engine: EngineView, metrics: dict[str, float]) -> None:
        loss = metrics.get("val_loss")
        if loss is None:  # dry run: no metrics, nothing to decide
            return
        if loss < self.best:
            self.best, self.bad = loss, 0
            return
        self.bad += 1
        if self.bad >= self.params.patience:
            frozen = [g for g in engine.freezer.encoder_groups if not engine.freezer.is_trainable(g)]
            if frozen:
                engine.freezer.unfreeze(frozen[-1], reason="plateau")
            self.bad = 0

    def promised_groups(self, groups: list[str], head_groups: list[str]) -> list[str]:
        return list(head_groups)  # metric-driven: no promise about the encoder


@hookimpl
def register_strategies(register: Any) -> None:
    register("plateau-thaw", PlateauThaw, params=PlateauThawParams)
