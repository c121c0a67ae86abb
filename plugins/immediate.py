"""``immediate``: every group trains from the first step at the base lr (plain full fine-tuning)."""

from __future__ import annotations

from typing import Any

from moola_engine import EngineView, hookimpl
from moola_engine.strategy_kit import Strategy


class Immediate(Strategy[Any]):
    """everything trains from the first step"""

    @hookimpl
    def on_fit_start(self, engine: EngineView) -> None:
        for g in engine.freezer.groups:
            engine.freezer.unfreeze(g, reason="immediate")


@hookimpl
def register_strategies(register: Any) -> None:
    register("immediate", Immediate, description="everything trains from the first step")
