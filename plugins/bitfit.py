"""``bitfit``: only the bias terms of the encoder train, plus the whole head (Ben Zaken et al. 2022).

Every encoder group stays trainable as a group, but
``Freezer.freeze_params`` holds each of its non-bias parameters frozen
(``requires_grad`` False, grad None): a parameter is a bias when the last part
of its name contains ``bias`` (``lstm.bias_ih_l0``, ``enc0.bias``).  An encoder
group without any bias never trains, and the plan refuses it.
"""

from __future__ import annotations

from typing import Any

import attrs

from moola_engine import EngineView, hookimpl
from moola_engine.config import positive
from moola_engine.strategy_kit import Strategy


def is_bias(name: str) -> bool:
    return "bias" in name.rsplit(".", 1)[-1]


@attrs.frozen(kw_only=True)
class BitFitParams:
    lr_scale: float = attrs.field(default=1.0, validator=positive)
    """lr of the encoder biases relative to the base lr (BitFit often uses a larger lr than full fine-tuning)."""


class BitFit(Strategy[BitFitParams]):
    """encoder biases and the head train, nothing else"""

    def promised_params(self, group: str, names: list[str], head_groups: list[str]) -> list[str]:
        return list(names) if group in head_groups else [n for n in names if is_bias(n)]

    @hookimpl
    def on_fit_start(self, engine: EngineView) -> None:
        fz = engine.freezer
        for g in fz.encoder_groups:
            fz.freeze_params(g, lambda n: not is_bias(n), reason="bitfit: biases only", label="biases")
            fz.unfreeze(g, lr_scale=self.params.lr_scale, reason="bitfit")
        for g in fz.head_groups:
            fz.unfreeze(g, reason="bitfit")


@hookimpl
def register_strategies(register: Any) -> None:
    register("bitfit", BitFit, params=BitFitParams, description="encoder biases and the head train, nothing else")
