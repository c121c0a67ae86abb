"""Batches for the loop: by index from in-memory tensors (no host sync), or from a DataLoader over a Dataset.

:func:`train_batches` yields ``(inputs, targets, rows, scale)`` for one epoch: ``rows`` is how many rows of the
global batch this process trains on (the epoch loss is weighted by it) and ``scale`` the DDP loss scale.  Inputs
are a tensor, a tuple of tensors (``model(*inputs)``) or a dict of tensors (``model(**inputs)``): :func:`forward`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from moola_engine.config import TrainConfig
from moola_engine.core.data import Data, LoaderData, TensorData
from moola_engine.core.schedulers import PER_STEP
from moola_engine.errors import ConfigError


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors (also inside tuples, lists and dicts) moved to ``device`` without blocking."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def forward(fn: Callable[..., torch.Tensor], inputs: Any) -> torch.Tensor:
    """``fn(inputs)`` for a tensor, ``fn(*inputs)`` for a tuple or list, ``fn(**inputs)`` for a dict."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, dict):
        return fn(**inputs)
    return fn(*inputs)


def _rows(targets: Any) -> int:
    return int(targets.shape[0]) if isinstance(targets, torch.Tensor) else len(targets)


def loader_generator(seed: int, epoch: int) -> torch.Generator:
    """The DataLoader's shuffling generator of one epoch: a function of (seed, epoch) only, so a resumed run
    draws the same batches with no state to checkpoint."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def steps_per_epoch(data: Data, train: TrainConfig, distributed: bool) -> int:
    """Optimizer steps in one epoch (0: an IterableDataset of unknown length); refuses what a Dataset cannot do."""
    steps = math.ceil(len(data) / train.batch_size)
    if isinstance(data, LoaderData) and (distributed or (not steps and train.scheduler in PER_STEP)):
        raise ConfigError("[data]", "a Dataset-backed data kind cannot run under DDP" if distributed else
                          f"train.scheduler = {train.scheduler!r} needs the steps per epoch; this dataset has "
                          "no length (an IterableDataset): give it __len__ or use another scheduler")
    return steps


def train_batches(data: Data, *, batch_size: int, generator: torch.Generator, device: torch.device,
                  shard: Callable[[torch.Tensor], tuple[torch.Tensor, int, float]] | None,
                  seed: int, epoch: int) -> Iterator[tuple[Any, Any, int, float]]:
    """One epoch of shuffled training batches on ``device``."""
    if isinstance(data, TensorData):
        perm = torch.randperm(len(data), generator=generator, device=device)
        for idx in perm.split(batch_size):  # type: ignore[no-untyped-call]  # torch leaves Tensor.split unannotated
            rows, scale = idx.shape[0], 1.0
            if shard is not None:  # DDP: this rank's slice of the global batch
                idx, rows, scale = shard(idx)
            yield data.x[idx], data.y[idx], rows, scale
        return
    loader = data.loader(batch_size, shuffle=True, generator=loader_generator(seed, epoch), device=device)
    for inputs, targets in loader:
        yield to_device(inputs, device), to_device(targets, device), _rows(targets), 1.0


def eval_batches(data: Data, batch_size: int, device: torch.device) -> Iterator[tuple[Any, Any]]:
    """``data`` in order, in batches, on ``device`` (inputs, targets)."""
    if isinstance(data, TensorData):
        data = data.to(device)  # no copy when it is there already (train/val); held-out splits are not
        for i in range(0, len(data), batch_size):
            yield data.x[i:i + batch_size], data.y[i:i + batch_size]
        return
    assert isinstance(data, LoaderData)
    for inputs, targets in data.loader(batch_size, shuffle=False, generator=None, device=device):
        yield to_device(inputs, device), to_device(targets, device)
