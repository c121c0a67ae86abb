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
        """Mean training loss of the epoch (over all ranks); refuses a non-finite loss or gradient.

        One host read per epoch: the weighted loss sum and one probe of the gradient norms (their float64 sum,
        finite exactly when every norm is: norms are >= 0, so nothing cancels).  Only when something is not
        finite does a second pass find the first bad step and tensor (:meth:`_first_nonfinite_steps`)."""
        if not losses:
            return math.nan
        stacked = torch.stack(losses).float()
        total = (stacked * torch.tensor(counts, dtype=stacked.dtype, device=stacked.device)).sum().double()
        probe = torch.stack(grad_amax).double().sum() if grad_amax else torch.zeros_like(total)
        rows = self.dist.gather(torch.stack([total, probe]))  # (world, 2): every rank decides alike
        values: list[list[float]] = rows.tolist()  # the epoch's host read
        if all(math.isfinite(v) for row in values for v in row):
            return sum(row[0] for row in values) / max(n, 1)
        finite = torch.isfinite(stacked)
        none_bad = torch.tensor(float(len(losses)), device=stacked.device)
        first_bad = torch.where(finite, none_bad, torch.arange(len(losses), device=stacked.device).float()).amin()
        bad = int(self.dist.gather(first_bad.reshape(1)).amin())
        grad_steps = self._first_nonfinite_steps(grad_amax, first_step)
        loss_step = first_step + bad if bad < len(losses) else -1
        if loss_step >= 0 or max(grad_steps, default=-1) >= 0:
            self._nonfinite(epoch, loss_step, grad_steps)
        # every value of this rank is finite, yet a sum is not (an overflow, or another rank's): never go on quietly
        raise MoolaError(f"epoch {epoch}: the epoch's loss or gradient-norm sums are not finite on some rank "
                         f"(per rank [loss sum, gradient-norm sum]: {values}); lower train.lr or set train.grad_clip")

    @staticmethod
    @torch.no_grad()
    def _first_nonfinite_steps(grad_amax: list[torch.Tensor], first_step: int) -> list[int]:
        """Per tensor, the first step of the epoch whose gradient held a NaN/inf (-1: none)."""
        if not grad_amax:
            return []
        bad = ~torch.isfinite(torch.stack(grad_amax))  # (steps, tensors)
        first = bad.float().argmax(dim=0)
        return torch.where(bad.any(dim=0), first + first_step, -1).tolist()

    def _nonfinite(self, epoch: int, loss_step: int, grad_steps: list[int]) -> None:
        """Stop the run, naming the first bad step and the group(s) whose gradients went non-finite there."""
        names = [(g.name, pname) for g in self.groups for pname, _ in g.params]
        step = min(s for s in [loss_step, *grad_steps] if s >= 0)
        hits = [names[i] for i, s in enumerate(grad_steps) if s == step]
        groups = list(dict.fromkeys(g for g, _ in hits))
        tensor = hits[0][1] if hits else None
        what = "training loss" if loss_step == step else "gradient"
        self._settle(failing=True)  # a checkpoint still being written counts once complete: name the newest
        self.log.error(Event.NONFINITE_DETECTED, what=what, at_step=step, groups=groups, tensor=tensor,
                       last_checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None)
        where = f"group {', '.join(groups)} (first tensor: {tensor})" if groups else ""
        msg = f"non-finite {what} at step {step} (epoch {epoch})"
        if where:
            msg += f" in {where}" if what == "gradient" else f"; gradients non-finite in {where}"
        keep = f"; last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else ""
        raise MoolaError(f"{msg}; lower train.lr or set train.grad_clip{keep}")
