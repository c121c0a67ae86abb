"""``l2-sp``: every group trains; a penalty pulls the encoder toward its starting point (Li et al. 2018).

The regularised objective is the paper's::

    loss + alpha/2 * ||w_enc - w_enc0||^2 + beta/2 * ||w_head||^2

with ``w_enc0`` the encoder's values at fit start (the pretrained weights once
they are loaded) and ``beta`` plain L2 on the head.  The paper's halves are
kept so its ``alpha``/``beta`` values transfer (it used alpha = 0.1, beta = 0.01).

How the penalty reaches the weights: a gradient hook on each parameter
(``Parameter.register_hook``) adds ``alpha * (w - w0)`` (``beta * w`` for the
head) to the gradient autograd computes for that parameter during
``loss.backward()``, before it is accumulated in ``.grad``.  That is exactly
the gradient of the penalised loss, it is in place before gradient clipping
and ``optimizer.step()``, and it needs no change to the engine's loop.  The
alternatives were worse: ``before_step`` runs before the backward pass (any
gradient written there is cleared by ``zero_grad`` or summed twice), and a new
"extra loss terms" hook would add a hook call to every step of every run for
one strategy.  Frozen parameters get no gradient, so no penalty either; the
reported ``train_loss`` is the data loss alone.  The hooks are removed at fit end.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from moola_engine import EngineView, hookimpl
from moola_engine.config import non_negative, positive


@attrs.frozen(kw_only=True)
class L2SPParams:
    alpha: float = attrs.field(default=0.1, validator=positive)
    """Strength of the pull toward the starting encoder weights (the paper's alpha)."""
    beta: float = attrs.field(default=0.0, validator=non_negative)
    """Plain L2 on the head's weights (the paper's beta; 0 = none)."""


def _pull(param: torch.Tensor, ref: torch.Tensor | None, coef: float) -> Any:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        target = param.detach() if ref is None else param.detach() - ref
        return grad + coef * target.to(grad.dtype)
    return hook


class L2SP:
    """all groups train; the encoder is pulled toward its pretrained values (L2-SP)"""

    name: str | None = None

    def __init__(self, params: L2SPParams) -> None:
        self.params = params
        self._handles: list[Any] = []
        self.reference: dict[str, torch.Tensor] = {}

    def plan_notes(self) -> list[str]:
        p = self.params
        return [f"{self.name or 'l2-sp'}: every step adds the gradient of alpha/2 * ||w - w0||^2 (alpha = {p.alpha}) "
                f"to the encoder groups, w0 = their values at fit start"
                + (f", and beta/2 * ||w||^2 (beta = {p.beta}) to the head" if p.beta else "")]

    @hookimpl
    def on_fit_start(self, engine: EngineView) -> None:
        fz = engine.freezer
        for g in fz.groups:
            fz.unfreeze(g, reason="l2-sp")
        self._remove()
        if engine.dry_run:
            return
        heads = set(fz.head_groups)
        self.reference = {pname: param.detach().clone() for group in engine.groups if group.name not in heads
                          for pname, param in group.params}
        self._install(engine)

    @hookimpl
    def on_epoch_start(self, engine: EngineView) -> None:
        # A resumed run restores ``reference`` through load_state_dict and does not re-fire on_fit_start:
        # the hooks are installed here, before the first step, so the penalty never silently disappears.
        if not engine.dry_run and not self._handles:
            self._install(engine)

    def _install(self, engine: EngineView) -> None:
        heads = set(engine.freezer.head_groups)
        for group in engine.groups:
            for pname, param in group.params:
                if group.name in heads:
                    if self.params.beta:
                        self._handles.append(param.register_hook(_pull(param, None, self.params.beta)))
                    continue
                ref = self.reference[pname].to(param.device)
                self._handles.append(param.register_hook(_pull(param, ref, self.params.alpha)))

    def state_dict(self) -> dict[str, Any]:
        """The starting weights w0: a resumed run must pull toward the same point, bit for bit."""
        return {"reference": dict(self.reference)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._remove()
        self.reference = dict(state["reference"])

    @hookimpl
    def on_fit_end(self, engine: EngineView, result: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __deepcopy__(self, memo: dict[int, Any]) -> L2SP:
        twin = L2SP(self.params)  # the plan's dry-run copy: no hooks, no tensors
        twin.name = self.name
        return twin


@hookimpl
def register_strategies(register: Any) -> None:
    register("l2-sp", L2SP, params=L2SPParams,
             description="all groups train; the encoder is pulled toward its pretrained values (L2-SP)")
