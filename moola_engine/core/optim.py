"""Where a run trains and what steps it: the device, and one optimizer param group per model group."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moola_engine.config import TrainConfig
from moola_engine.core.freezing import ParamGroup
from moola_engine.errors import MoolaError


def select_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU.  An explicit device that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoolaError(f"train.device = {name!r} but CUDA is not available here (use \"auto\" or \"cpu\")")
    return dev


def build_optimizer(groups: Sequence[ParamGroup], cfg: TrainConfig) -> torch.optim.Optimizer:
    """One optimizer param group per model group, every parameter included from step 0."""
    param_groups = [{"params": g.tensors, "lr": cfg.lr, "group": g.name} for g in groups]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
