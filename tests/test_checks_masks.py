"""Parameter masks (BitFit) under the weight-delta and gradient-flow checks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_engine, named

from moola_engine import hookimpl
from moola_engine.checks.delta import build_checks
from moola_engine.config import ChecksConfig
from moola_engine.errors import CheckFailed
from moola_engine.logs import RunLog


def _checks() -> tuple[Any, ...]:
    return tuple(obj for _, obj in build_checks(ChecksConfig()))


def test_bitfit_runs_clean_and_masked_weights_stay_bitwise_frozen() -> None:
    runlog = RunLog(None, console="none", capture=True)
    engine = make_engine(named("bitfit"), epochs=2, extra=_checks(), runlog=runlog)
    w0 = engine.model.enc0.weight.detach().clone()
    b0 = engine.model.enc0.bias.detach().clone()
    engine.fit()
    assert torch.equal(w0, engine.model.enc0.weight)
    assert not torch.equal(b0, engine.model.enc0.bias)
    masked = [e for e in runlog.events if e["event"] == "weight_delta.check" and "masked" in e]
    assert masked and all(e["ok"] and not e["moved"] and e["masked"] == "biases" for e in masked), masked


class NudgeMaskedWeight:
    """A bug planted in a plugin: moves a weight BitFit holds frozen."""

    @hookimpl
    def after_step(self, engine: Any, step: int) -> None:
        if step == 2:
            with torch.no_grad():
                engine.model.enc0.weight.add_(1e-3)


def test_a_moved_masked_weight_is_a_violation() -> None:
    engine = make_engine(named("bitfit"), epochs=2, extra=(*_checks(), NudgeMaskedWeight()))
    with pytest.raises(CheckFailed, match="parameters of group encoder.layer0 held frozen by the .* mask changed"):
        engine.fit()
