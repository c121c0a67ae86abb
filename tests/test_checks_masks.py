"""Parameter masks (BitFit) under the weight-delta and gradient-flow checks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import NudgeAt, make_engine, named

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


class BiasesFirst:
    """Biases first, then the whole layer: masks the encoders' weights at fit start, releases them at ``release``."""

    name = "biases-first"

    def __init__(self, release: int = 1, where: str = "on_epoch_start") -> None:
        self.release = release
        self.where = where

    @hookimpl
    def on_fit_start(self, engine: Any) -> None:
        for g in engine.freezer.encoder_groups:
            engine.freezer.freeze_params(g, lambda n: not n.endswith("bias"), reason="biases first", label="biases")

    def _release(self, engine: Any) -> None:
        for g in engine.freezer.encoder_groups:
            engine.freezer.clear_param_mask(g, reason="whole layer")

    @hookimpl
    def on_epoch_start(self, engine: Any, epoch: int) -> None:
        if self.where == "on_epoch_start" and epoch == self.release:
            self._release(engine)

    @hookimpl
    def on_epoch_end(self, engine: Any, epoch: int) -> None:
        if self.where == "on_epoch_end" and epoch == self.release:
            self._release(engine)  # before the checks' own on_epoch_end (they are trylast)


@pytest.mark.parametrize(("release", "where"), [(1, "on_epoch_start"), (0, "on_epoch_end")])
def test_a_mask_that_is_released_runs_and_the_released_weights_train(release: int, where: str) -> None:
    runlog = RunLog(None, console="none", capture=True)
    engine = make_engine(BiasesFirst(release, where), epochs=3, extra=_checks(), runlog=runlog)
    w0 = engine.model.enc0.weight.detach().clone()
    engine.fit()  # was: check:weight_delta raised KeyError: 'enc0.weight'
    assert not torch.equal(w0, engine.model.enc0.weight)
    checks = [e for e in runlog.events if e["event"] == "weight_delta.check"]
    assert checks and all(e["ok"] for e in checks)
    masked = [e for e in checks if "masked" in e and e["group"] == "encoder.layer0"]
    assert masked and not any(e["moved"] for e in masked)  # while masked, the weights held still


class MovesMaskedThenReleases(BiasesFirst):
    """Moves a masked weight in epoch 0 (a bug), releases the mask in epoch 1: the bug must still be caught."""

    @hookimpl
    def after_step(self, engine: Any, step: int) -> None:
        if step == 1:
            with torch.no_grad():
                engine.model.enc0.weight.add_(1e-3)


def test_a_masked_weight_moved_before_the_release_is_still_a_violation() -> None:
    engine = make_engine(MovesMaskedThenReleases(1), epochs=3, extra=_checks())
    with pytest.raises(CheckFailed, match="held frozen by the biases mask changed"):
        engine.fit()


@pytest.mark.parametrize("snapshots", ["exact", "fingerprint"])
def test_a_masked_weight_moved_in_an_epoch_no_check_covered_is_caught_when_the_mask_is_released(
        snapshots: str) -> None:
    # checks.every = 2: epoch 2's end is not checked; the mask is released at epoch 3's start. The release ends
    # an interval, which must compare the weights as they are now (not what epoch 1's check measured).
    checks = ChecksConfig(every=2, grad_flow=False, lr_mask=False, snapshots=snapshots)
    observers = tuple(obj for _, obj in build_checks(checks))
    steps_per_epoch = 4  # conftest's tiny data: 64 rows, batch 16
    engine = make_engine(BiasesFirst(release=3), epochs=4, checks=checks,
                         extra=(*observers, NudgeAt(2 * steps_per_epoch + 1)))
    with pytest.raises(CheckFailed, match="parameters of group encoder.layer0 held frozen by the biases mask changed"):
        engine.fit()
