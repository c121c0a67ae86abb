"""``immediate``: every group trains from the first step at the base lr (plain full fine-tuning)."""

from __future__ import annotations

from typing import Any

from moola_engine import EngineView, hookimpl


class Immediate:
    """everything trains from the first step"""

    name: str | None = None

    def __init__(self, params: Any = None) -> None:
        self.params = params

    @hookimpl
    def on_fit_start(self, engine: EngineView) -> None:
        for g in engine.freezer.groups:
            engine.freezer.unfreeze(g, reason="immediate")


@hookimpl
def register_strategies(register: Any) -> None:
    register("immediate", Immediate, description="everything trains from the first step")
