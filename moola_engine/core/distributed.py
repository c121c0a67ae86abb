"""Distributed data parallel through ``torchrun``: N processes, one global batch, identical replicas.

Launch the ordinary ``train`` command under torchrun::

    torchrun --nproc-per-node 2 -m moola_engine.cli train --config experiment.toml --strategy two-phase

``WORLD_SIZE > 1`` in the environment (torchrun sets it) makes the engine join
the process group (``gloo`` on CPU, ``nccl`` on CUDA, one device per local
rank) and train the model under :class:`~torch.nn.parallel.DistributedDataParallel`.
What keeps N processes equal to one process on the same global batch:

* **Batches.** Every rank draws the same permutation (same seed) and takes its
  contiguous slice of each global batch of ``train.batch_size``.  Its mean loss
  is scaled by ``n_rank * world / n_global`` so DDP's gradient *average* equals
  the gradient of the global batch mean (exact for mean-reduced losses, also
  for a ragged last batch).
* **Transitions.** DDP registers only the parameters that required grad when
  the wrapper was built; unfreezing under a stale wrapper leaves the new
  parameters out of the all-reduce and the replicas drift apart silently.  The
  engine rebuilds the wrapper after every transition, before the next step.
* **Decisions.** Schedules are deterministic; validation runs on the full,
  identical validation set on every rank and rank 0's metrics are broadcast,
  so metric-driven transitions and early stopping fire at the same step on
  every rank.
* **Proof.** :class:`ConsistencyCheck` all-gathers a fingerprint of every
  parameter at every transition and epoch end (event ``ddp.consistency``); any
  difference between ranks is a :class:`~moola_engine.errors.CheckFailed`.

Only rank 0 writes the run folder; other ranks write theirs under
``runs/.rank<k>/`` and print errors only.  Dropout draws different masks per
rank than one process would, so with dropout the runs agree in distribution,
not bit for bit; BatchNorm statistics are per rank (no SyncBatchNorm).
"""

from __future__ import annotations

import gc
import os
from typing import Any

import attrs
import torch
from torch import distributed as dist
from torch import nn

from moola_engine.core.hookspecs import hookimpl
from moola_engine.errors import CheckFailed, MoolaError
from moola_engine.logs import Event


@attrs.define
class DistContext:
    """Where this process stands: ``world_size`` 1 means not distributed."""

    device: torch.device
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False
    """This call to :func:`setup` created the process group; :func:`shutdown` with it destroys the group."""

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ batches
    def shard(self, idx: torch.Tensor) -> tuple[torch.Tensor, int, float]:
        """This rank's slice of a global batch: (indices, count, loss scale).

        The scale ``count * world / n`` turns DDP's average of per-rank means
        into the mean over the global batch.  A rank whose slice is empty (a
        global batch smaller than the world) computes one sample at scale 0, so
        it still joins the gradient all-reduce.
        """
        n = idx.shape[0]
        base, extra = divmod(n, self.world_size)
        count = base + (1 if self.rank < extra else 0)
        if count == 0:
            return idx[:1], 0, 0.0
        start = self.rank * base + min(self.rank, extra)
        return idx[start:start + count], count, count * self.world_size / n

    # ------------------------------------------------------------------ the wrapper
    def wrap(self, model: nn.Module, *, compile: bool = False) -> Any:
        """A fresh DDP wrapper over the parameters that require grad now (None when none does)."""
        gc.collect()  # drop a previous wrapper's reducer before building the next one
        if not any(p.requires_grad for p in model.parameters()):
            return None
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(ddp) if compile else ddp

    # ------------------------------------------------------------------ agreement
    @torch.no_grad()
    def broadcast_module(self, model: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank, before any hook or check reads them."""
        if self.active:
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)

    def agree(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (metrics that drive decisions)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def gather(self, row: torch.Tensor) -> torch.Tensor:
        """Every rank's ``row`` (1-D, same length everywhere), stacked: (world, len)."""
        if not self.active:
            return row[None]
        rows = [torch.empty_like(row) for _ in range(self.world_size)]
        dist.all_gather(rows, row.contiguous())
        return torch.stack(rows)


def launched_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        raise MoolaError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def setup(device: torch.device) -> DistContext:
    """Join the process group when launched by torchrun (``WORLD_SIZE > 1``); idempotent.

    ``device`` is the single-process choice; on CUDA each rank gets ``cuda:LOCAL_RANK``.
    """
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized and launched_world_size() <= 1:
        return DistContext(device=device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise MoolaError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not initialized:
        if not dist.is_available():
            raise MoolaError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise MoolaError(f"WORLD_SIZE={launched_world_size()} but {', '.join(missing)} not set: "
                             "launch with torchrun --nproc-per-node N ...")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(device=device, world_size=dist.get_world_size(), rank=dist.get_rank(), local_rank=local,
                       owns_group=not initialized)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group if ``ctx`` is the :func:`setup` call that created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the check


@torch.no_grad()
def fingerprint(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    """Per parameter: (sum, cosine-weighted sum) in float64, on the parameter's device."""
    names, rows = [], []
    for name, p in model.named_parameters():
        v = p.detach().double().flatten()
        w = torch.cos(torch.arange(v.numel(), device=v.device, dtype=torch.float64))
        names.append(name)
        rows.append(torch.stack([v.sum(), (v * w).sum()]))
    return names, torch.stack(rows)


class ConsistencyCheck:
    """``ddp.consistency``: every rank holds the same parameters and trainable groups.

    Runs at every transition (``on_freeze``/``on_unfreeze``) and epoch end.  A
    mismatch raises :class:`CheckFailed` on every rank whatever ``checks.strict``
    says: diverged replicas make everything after them meaningless.
    """

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx

    @hookimpl(trylast=True)
    def on_freeze(self, engine: Any, group: str) -> None:
        self.check(engine, f"freeze {group}", site=1.0)

    @hookimpl(trylast=True)
    def on_unfreeze(self, engine: Any, group: str) -> None:
        self.check(engine, f"unfreeze {group}", site=2.0)

    @hookimpl(trylast=True)
    def on_epoch_end(self, engine: Any, epoch: int) -> None:
        self.check(engine, "epoch end", site=0.0)

    def check(self, engine: Any, where: str, *, site: float) -> None:
        fz = engine.freezer
        header = [site, float(engine.epoch), float(engine.step), float(len(fz.history))]
        header += [1.0 if fz.is_trainable(g) else 0.0 for g in fz.groups]
        names, fp = fingerprint(engine.model)
        row = torch.cat([torch.tensor(header, dtype=torch.float64, device=fp.device), fp.flatten()])
        rows = self.ctx.gather(row).cpu()
        h = len(header)
        differ = [r for r in range(rows.shape[0]) if not torch.equal(rows[r], rows[0])]
        fields = dict(where=where, ranks=self.ctx.world_size, params=len(names), ok=not differ)
        if not differ:
            engine.log.info(Event.DDP_CONSISTENCY, **fields)
            return
        head_diff = sorted({k for r in differ for k, (a, b) in enumerate(zip(rows[r, :h], rows[0, :h])) if a != b})
        labels = ["call site", "epoch", "step", "transition count"] + [f"trainable {g}" for g in fz.groups]
        fp_all = rows[:, h:].reshape(rows.shape[0], len(names), 2)
        bad = [names[i] for i in range(len(names)) if not torch.equal(fp_all[:, i].amin(0), fp_all[:, i].amax(0))]
        msg = (f"ddp.consistency at {where} (epoch {engine.epoch}, step {engine.step}): ranks {differ} differ from "
               f"rank 0 in {', '.join(labels[k] for k in head_diff) or 'no schedule field'}"
               + (f"; parameters {', '.join(bad[:5])}" + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
                  if bad else ""))
        engine.log.error(Event.DDP_CONSISTENCY, **fields, ranks_differ=differ, params_differ=bad[:20],
                         schedule_differ=[labels[k] for k in head_diff])
        raise CheckFailed(msg)
