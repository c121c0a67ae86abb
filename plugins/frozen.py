"""``frozen``: the encoder never trains (a linear probe on the pretrained features).

Stating this strategy is the only way to get a permanently frozen encoder:
no other strategy has a sentinel value meaning "never".
"""

from __future__ import annotations

from typing import Any

from moola_engine import EngineView, hookimpl
from moola_engine.strategy_kit import Strategy


class Frozen(Strategy[Any]):
    """encoder never trains (linear probe)"""

    @hookimpl
    def on_fit_start(self, engine: EngineView) -> None:
        for g in engine.freezer.encoder_groups:
            engine.freezer.freeze(g, reason="frozen")

    def promised_groups(self, groups: list[str], head_groups: list[str]) -> list[str]:
        return list(head_groups)


@hookimpl
def register_strategies(register: Any) -> None:
    register("frozen", Frozen, description="encoder never trains (linear probe)")
