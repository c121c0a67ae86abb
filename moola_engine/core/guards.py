"""The non-finite guard: one host read per epoch, and the first bad step and tensor named when something is not finite."""

from __future__ import annotations

import math

import torch

from moola_engine.core.enginebase import EngineBase
from moola_engine.errors import MoolaError
from moola_engine.logs import Event


class LossGuard(EngineBase):
    """Part of :class:`~moola_engine.core.engine.Engine`: the epoch's loss, and a refused non-finite loss or gradient."""

    def _epoch_loss(self, losses: list[torch.Tensor], counts: list[int], n: int, epoch: int, first_step: int,
                    grad_amax: list[torch.Tensor]) -> float:
        """Mean training loss of the epoch (over all ranks); refuses a non-finite loss, gradient or weight.

        One host read per epoch: the weighted loss sum and one probe, finite exactly when everything it sums is
        (norms are >= 0, so nothing cancels): with ``train.grad_guard = "step"`` the per-step gradient norms
        (``grad_amax``), otherwise the norms of the weights trained in the epoch (a NaN/inf gradient or update
        leaves them non-finite).  Only when something is not finite does a second pass name the first bad step
        and tensor (:meth:`_first_nonfinite_steps`, :meth:`_nonfinite`)."""
        if not losses:
            return math.nan
        stacked = torch.stack(losses).float()
        total = (stacked * torch.tensor(counts, dtype=stacked.dtype, device=stacked.device)).sum().double()
        weights = [] if grad_amax else self._trained_weights()
        if grad_amax:
            probe = torch.stack(grad_amax).double().sum()
        elif weights:
            probe = torch.stack(torch._foreach_norm(weights, 2)).double().sum()
        else:
            probe = torch.zeros_like(total)
        rows = self.dist.gather(torch.stack([total, probe]))  # (world, 2): every rank decides alike
        values: list[list[float]] = rows.tolist()  # the epoch's host read
        if all(math.isfinite(v) for row in values for v in row):
            return sum(row[0] for row in values) / max(n, 1)
        finite = torch.isfinite(stacked)
        none_bad = torch.tensor(float(len(losses)), device=stacked.device)
        first_bad = torch.where(finite, none_bad, torch.arange(len(losses), device=stacked.device).float()).amin()
        bad = int(self.dist.gather(first_bad.reshape(1)).amin())
        loss_step = first_step + bad if bad < len(losses) else -1
        if grad_amax:
            grad_steps = self._first_nonfinite_steps(grad_amax, first_step)
            if loss_step >= 0 or max(grad_steps, default=-1) >= 0:
                self._nonfinite(epoch, loss_step, grad_steps)
        else:
            bad_weights = [self._probed(g.name, p) and not bool(torch.isfinite(p.detach()).all())
                           for g in self.groups for _, p in g.params]
            if loss_step >= 0 or any(bad_weights):
                self._nonfinite(epoch, loss_step, [], bad_weights=bad_weights, steps=(first_step, self.step - 1))
        # every value of this rank is finite, yet a sum is not (an overflow, or another rank's): never go on quietly
        what = "gradient-norm" if grad_amax else "weight-norm"
        raise MoolaError(f"epoch {epoch}: the epoch's loss or {what} sums are not finite on some rank "
                         f"(per rank [loss sum, {what} sum]: {values}); lower train.lr or set train.grad_clip")

    def _trained_weights(self) -> list[torch.Tensor]:
        """The parameters the epoch may have trained: every ``requires_grad`` parameter of a group trainable now,
        and any other holding a gradient (a step that skipped a branch leaves it without one, yet it trained)."""
        return [p.detach() for g in self.groups for _, p in g.params if self._probed(g.name, p)]

    def _probed(self, group: str, p: torch.Tensor) -> bool:
        return p.grad is not None or (p.requires_grad and self.freezer.is_trainable(group))

    @staticmethod
    @torch.no_grad()
    def _first_nonfinite_steps(grad_amax: list[torch.Tensor], first_step: int) -> list[int]:
        """Per tensor, the first step of the epoch whose gradient held a NaN/inf (-1: none)."""
        if not grad_amax:
            return []
        bad = ~torch.isfinite(torch.stack(grad_amax))  # (steps, tensors)
        first = bad.float().argmax(dim=0)
        return torch.where(bad.any(dim=0), first + first_step, -1).tolist()

    def _nonfinite(self, epoch: int, loss_step: int, grad_steps: list[int], *, bad_weights: list[bool] | None = None,
                   steps: tuple[int, int] | None = None) -> None:
        """Stop the run, naming the first bad step and the group(s) whose gradients (``grad_guard = "step"``) or
        weights (``"epoch"``: ``bad_weights``, one flag per parameter, the epoch's ``steps``) went non-finite."""
        names = [(g.name, pname) for g in self.groups for pname, _ in g.params]
        if bad_weights is not None:
            hits = [names[i] for i, b in enumerate(bad_weights) if b]
            step = loss_step if loss_step >= 0 else None
            what = "training loss" if loss_step >= 0 else "weights"
        else:
            step = min(s for s in [loss_step, *grad_steps] if s >= 0)
            hits = [names[i] for i, s in enumerate(grad_steps) if s == step]
            what = "training loss" if loss_step == step else "gradient"
        groups = list(dict.fromkeys(g for g, _ in hits))
        tensor = hits[0][1] if hits else None
        self._settle(failing=True)  # a checkpoint still being written counts once complete: name the newest
        extra = {"steps": list(steps)} if bad_weights is not None and steps is not None else {}
        self.log.error(Event.NONFINITE_DETECTED, what=what, at_step=step, groups=groups, tensor=tensor,
                       guard="epoch" if bad_weights is not None else "step", **extra,
                       last_checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None)
        where = f"group {', '.join(groups)} (first tensor: {tensor})" if groups else ""
        if bad_weights is not None and step is None:
            lo, hi = steps or (0, 0)
            msg = (f"non-finite weights after epoch {epoch} in {where}: a gradient or update went non-finite in "
                   f"steps {lo}..{hi} (set train.grad_guard = \"step\" to name the step)")
        else:
            msg = f"non-finite {what} at step {step} (epoch {epoch})"
            if where:
                kind = "weights" if bad_weights is not None else "gradients"
                msg += f" in {where}" if what == "gradient" else f"; {kind} non-finite in {where}"
        keep = f"; last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else ""
        raise MoolaError(f"{msg}; lower train.lr or set train.grad_clip{keep}")
