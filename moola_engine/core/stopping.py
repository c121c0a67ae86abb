"""Early stopping that respects the schedule, and the loud warning when ``restore_best`` returns weights from
before a transition."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from moola_engine.core.context import FitResult
from moola_engine.core.enginebase import EngineBase
from moola_engine.errors import MoolaError
from moola_engine.logs import Event


class EarlyStopping(EngineBase):
    """Part of :class:`~moola_engine.core.engine.Engine`: patience counts from the last transition, and the run
    never stops before the plan's last scheduled transition."""

    def _early_stopping(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        """Update the early-stopping state with this epoch's metrics; True to stop.

        Patience counts from the last transition, and the run never stops before
        the plan's last scheduled transition.
        """
        es, result = self.config.early_stopping, self.result
        if es is None:
            return False
        value = metrics.get(es.metric, math.nan)
        if math.isnan(value):
            raise MoolaError(f"train.early_stopping.metric = {es.metric!r} is not a metric of this run; "
                             f"metrics: {', '.join(sorted(metrics))}")
        improved = value < self.es_best - es.min_delta if es.mode == "min" else value > self.es_best + es.min_delta
        if improved:
            self.es_best, result.best_epoch, result.best_metric = value, epoch, value
            if self.config.restore_best:
                self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self._since_improved = 0
        else:
            self._since_improved += 1
        hold_until = self.plan.last_scheduled_transition()  # never stop before a promised transition
        if self._since_improved >= es.patience and (hold_until is None or epoch >= hold_until):
            result.stopped_early, result.stop_reason = True, "early_stopping"
            self.log.info(Event.EARLY_STOP, metric=es.metric, best=self.es_best, best_epoch=result.best_epoch,
                          patience=es.patience)
            return True
        return False

    def _warn_restored_before_transition(self, result: FitResult) -> None:
        """``restore_best`` can hand back weights from before an unfreeze: say so loudly (a warning event,
        ``result.json``, and a ``verify`` failure under expectations that the group moves)."""
        from moola_engine.core.plan import compute_plan

        replayed = compute_plan(self.strategy, self.freezer.groups, self.freezer.head_groups, self.epochs,
                                self.config.lr, name=self.strategy_name, model_groups=self.groups, train=self.config,
                                history=self.history)
        seen: dict[tuple[str, int, str], dict[str, Any]] = {}
        for t in [*self.plan.transitions, *replayed.transitions]:  # scheduled, and as the run's metrics made them
            if t["group"] in self.freezer.head_groups or not 0 < t["epoch"] < result.epochs_run:
                continue
            if t["epoch"] > result.best_epoch:
                seen.setdefault((t["group"], t["epoch"], t["to_state"]),
                                {"group": t["group"], "epoch": t["epoch"], "to_state": t["to_state"]})
        result.restored_before = sorted(seen.values(), key=lambda t: (t["epoch"], t["group"]))
        if result.restored_before:
            first = result.restored_before[0]
            self.log.warning(
                Event.RESTORE_BEST_BEFORE_TRANSITION, best_epoch=result.best_epoch, transitions=result.restored_before,
                message=f"restore_best returned the weights of epoch {result.best_epoch}, from before "
                        f"{len(result.restored_before)} transition(s) of encoder groups (first: {first['group']} "
                        f"{'unfreezes' if first['to_state'] == 'trainable' else 'freezes'} at epoch {first['epoch']}): "
                        "the delivered model does not have them trained as scheduled; set train.restore_best = "
                        "false to keep the last epoch's weights")

    def _on_transition(self) -> None:
        # A transition restarts the early-stopping clock: the new phase gets its full patience.
        self._since_improved = 0
        # DDP registers only parameters that required grad when built: rebuild before the next step.
        self._wrap_stale = self.dist.active
