"""Learning-rate schedulers that compose with per-group lr scales.

The optimizer has one param group per model group from step 0 (see
:mod:`moola_engine.core.freezing`).  A group's lr at any step is::

    lr = train.lr  x  group lr_scale (set by the strategy)  x  scheduler factor (common to all groups)

torch schedulers keep their own per-group reference lrs (``base_lrs`` and
``initial_lr`` for LambdaLR, ``initial_lr``/``max_lr``/``min_lr`` for
OneCycleLR, the current ``lr`` and ``min_lrs`` for ReduceLROnPlateau).  When a
strategy changes a group's scale from ``s`` to ``s'`` at any point of the run,
:meth:`LrSchedule.rescale` multiplies every one of those references of that
group (and its current lr) by ``s'/s``.  The scheduler then keeps computing
``reference x factor(t)`` as before, so the product above holds at every step
across every transition, and no param group is ever added or removed.

``[train] scheduler``:

* ``none``: the lr is ``train.lr x scale``, written exactly.
* ``onecycle``: :class:`torch.optim.lr_scheduler.OneCycleLR` stepped after every
  optimizer step, ``max_lr = train.lr`` (x scale), over ``epochs x steps per epoch``.
* ``cosine``: cosine decay to 0 over all steps (a :class:`LambdaLR`, stepped per step).
* ``plateau``: :class:`torch.optim.lr_scheduler.ReduceLROnPlateau` on
  ``train.scheduler_metric`` after every validation pass.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from moola_engine.config import TrainConfig
from moola_engine.errors import MoolaError

_GROUP_KEYS = ("initial_lr", "max_lr", "min_lr")


PER_STEP = ("onecycle", "cosine")
"""Schedulers stepped after every optimizer step (they need the steps per epoch)."""

class LrSchedule:
    """The run's scheduler behind three calls the engine makes: after each step, after validation, rescale."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, scheduler: Any = None, metric: str = "val_loss") -> None:
        self.optimizer = optimizer
        self.kind = kind
        self.scheduler = scheduler
        self.metric = metric
        self._reduced = [1.0] * len(optimizer.param_groups)  # plateau: product of the reductions it made, per group

    @property
    def per_step(self) -> bool:
        return self.kind in PER_STEP

    def after_step(self) -> None:
        """After ``optimizer.step()``: advance per-step schedulers."""
        if self.per_step:
            self.scheduler.step()

    def after_validation(self, metrics: Mapping[str, float]) -> None:
        """After the validation pass: ReduceLROnPlateau reads its metric."""
        if self.kind != "plateau":
            return
        value = metrics.get(self.metric)
        if value is None or math.isnan(value):
            raise MoolaError(f"train.scheduler = \"plateau\" needs metric {self.metric!r} (train.scheduler_metric), "
                             f"but this run's metrics are: {', '.join(sorted(k for k in metrics if k != 'epoch'))}")
        before = [pg["lr"] for pg in self.optimizer.param_groups]
        self.scheduler.step(value)
        for i, pg in enumerate(self.optimizer.param_groups):
            if pg["lr"] != before[i] and before[i] > 0:
                self._reduced[i] *= pg["lr"] / before[i]

    def factors(self) -> list[float]:
        """Per optimizer param group, the factor this schedule applies now on top of ``train.lr x scale``.

        The schedule declares it from its own state, never from the optimizer's live lr: ``none`` 1.0;
        ``cosine`` its lambda at the current step; ``onecycle`` its closed-form lr at the current step over
        the group's ``max_lr``; ``plateau`` the product of the reductions it made.  ``check:lr_mask``
        compares ``plan lr x factor`` with the live lr, so an lr rewritten behind the engine's back shows.
        """
        n = len(self.optimizer.param_groups)
        s = self.scheduler
        if s is None:
            return [1.0] * n
        if self.kind == "cosine":
            return [float(s.lr_lambdas[0](s.last_epoch))] * n
        if self.kind == "onecycle":
            with warnings.catch_warnings():  # get_lr() outside step() warns; here it is a pure read
                warnings.simplefilter("ignore")
                lrs = s.get_lr()
            return [lr / pg["max_lr"] for lr, pg in zip(lrs, self.optimizer.param_groups, strict=True)]
        return list(self._reduced)

    def rescale(self, index: int, ratio: float) -> None:
        """Multiply param group ``index``'s lr and every scheduler reference lr of it by ``ratio``."""
        pg = self.optimizer.param_groups[index]
        pg["lr"] = pg["lr"] * ratio
        for key in _GROUP_KEYS:
            if key in pg:
                pg[key] = pg[key] * ratio
        s = self.scheduler
        if s is None:
            return
        for attr in ("base_lrs", "min_lrs", "_last_lr"):
            values = getattr(s, attr, None)
            if isinstance(values, list) and len(values) == len(self.optimizer.param_groups):
                values[index] = values[index] * ratio

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"kind": self.kind,
                                 "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}
        if self.kind == "plateau":
            state["reduced"] = list(self._reduced)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise MoolaError(f"checkpoint scheduler is {state.get('kind')!r} but train.scheduler = {self.kind!r}")
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if "reduced" in state:
            self._reduced = [float(x) for x in state["reduced"]]


def build_lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LrSchedule:
    """The scheduler ``cfg.scheduler`` names, attached to ``optimizer`` (all groups at scale 1 here)."""
    kind = cfg.scheduler
    total = max(1, cfg.epochs * max(1, steps_per_epoch))
    sched: Any = None
    if kind == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    elif kind == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total)))
    elif kind == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=cfg.scheduler_mode, factor=cfg.plateau_factor,
                                                           patience=cfg.plateau_patience)
    return LrSchedule(optimizer, kind, sched, metric=cfg.scheduler_metric)
