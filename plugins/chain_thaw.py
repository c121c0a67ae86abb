"""``chain-thaw``: train the head alone, then one encoder group at a time alone, then everything.

From DeepMoji (Felbo et al. 2017): "first fine-tune any new layers, then
fine-tune each layer individually starting from the first layer in the
network, and finally train the entire model with all layers".  Each of the
``1 + number of encoder groups`` single-group stages lasts ``stage_epochs``
epochs; the rest of the run trains all groups.  ``direction = "bottom_up"``
(the paper's order, input group first) or ``"top_down"``; ``groups`` lists the
encoder groups' order explicitly (every encoder group exactly once).
Encoder groups train at ``lr_scale`` x the base lr, the head at the base lr.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from moola_engine import EngineView, hookimpl
from moola_engine.config import positive
from moola_engine.errors import ScheduleError


@attrs.frozen(kw_only=True)
class ChainThawParams:
    stage_epochs: int = attrs.field(default=2, validator=positive)
    """Epochs of each single-group stage (the head's first, then each encoder group's)."""
    direction: Literal["bottom_up", "top_down"] = "bottom_up"
    groups: list[str] | None = None
    """Explicit order of the encoder groups (overrides direction); each encoder group exactly once."""
    lr_scale: float = attrs.field(default=1.0, validator=positive)
    """lr of encoder groups relative to the base lr (the head trains at the base lr)."""


class ChainThaw:
    """DeepMoji chain-thaw: head alone, each encoder group alone, then all"""

    name: str | None = None

    def __init__(self, params: ChainThawParams) -> None:
        self.params = params
        self._stages: list[str] = []

    def _order(self, encoder_groups: list[str]) -> list[str]:
        if self.params.groups is not None:
            return list(self.params.groups)
        return list(encoder_groups) if self.params.direction == "bottom_up" else list(reversed(encoder_groups))

    def validate_schedule(self, epochs: int, groups: list[str], head_groups: list[str]) -> list[tuple[str, str]]:
        p = self.params
        head = set(head_groups)
        encoder = [g for g in groups if g not in head]
        problems: list[tuple[str, str]] = []
        if p.groups is not None:
            missing = [g for g in encoder if g not in p.groups]
            if missing:
                problems.append(("no-phase", f"groups = {p.groups} leaves out {', '.join(missing)}: its parameters are "
                                             "in no single-group stage"))
        stages = 1 + len(self._order(encoder))
        all_from = stages * p.stage_epochs
        if all_from >= epochs:
            problems.append(("late-transition",
                             f"the all-groups stage would start at epoch {all_from} ({stages} stages x stage_epochs = "
                             f"{p.stage_epochs}) but training runs {epochs} epochs: the groups would never train together"))
        return problems

    @hookimpl
    def on_fit_start(self, engine: EngineView) -> None:
        fz = engine.freezer
        encoder = fz.encoder_groups
        order = self._order(encoder)
        bad = [g for g in order if g not in encoder]
        dupes = sorted({g for g in order if order.count(g) > 1})
        if bad or dupes:
            what = f"unknown encoder group(s) {', '.join(bad)}" if bad else f"repeated group(s) {', '.join(dupes)}"
            raise ScheduleError(f"strategy {self.name or 'chain-thaw'}: groups = {list(order)} has {what}; "
                                f"encoder groups are: {', '.join(encoder)}")
        self._stages = list(order)
        for g in encoder:
            fz.set_lr_scale(g, self.params.lr_scale, reason="chain-thaw")
            fz.freeze(g, reason="chain-thaw: head stage")
        for g in fz.head_groups:
            fz.unfreeze(g, reason="chain-thaw: head stage")

    @hookimpl
    def on_epoch_start(self, engine: EngineView, epoch: int) -> None:
        n = self.params.stage_epochs
        if epoch == 0 or epoch % n:
            return
        fz = engine.freezer
        stage = epoch // n
        if stage <= len(self._stages):
            alone = self._stages[stage - 1]
            for g in fz.groups:
                if g != alone:
                    fz.freeze(g, reason=f"chain-thaw: {alone} alone")
            fz.unfreeze(alone, reason=f"chain-thaw: {alone} alone")
        elif stage == len(self._stages) + 1:
            for g in fz.groups:
                fz.unfreeze(g, reason="chain-thaw: all groups")


@hookimpl
def register_strategies(register: Any) -> None:
    register("chain-thaw", ChainThaw, params=ChainThawParams,
             description="DeepMoji chain-thaw: head alone, each encoder group alone, then all")
