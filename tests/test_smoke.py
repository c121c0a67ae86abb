from __future__ import annotations

import torch
from conftest import make_engine, named


def test_two_phase_freezes_then_trains_encoder() -> None:
    strat = named("two-phase", unfreeze_after=1, lr_scale=0.5)
    engine = make_engine(strat, epochs=3)
    w0 = engine.model.enc0.weight.detach().clone()
    engine.fit()
    assert engine.freezer.is_trainable("encoder.layer0")
    assert engine.optimizer.param_groups[0]["lr"] == 0.5 * 1e-2
    assert not torch.equal(w0, engine.model.enc0.weight)
