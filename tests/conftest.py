"""Shared test helpers: tiny models and data, fresh plugin managers, an engine factory.

Torch tests run on CPU with one thread, tiny models and fixed seeds, and
assert exact weights and flags.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from moola_engine import hookimpl
from moola_engine.config import ChecksConfig, GroupSpec, TrainConfig
from moola_engine.core.data import TensorData
from moola_engine.core.engine import Engine
from moola_engine.core.plugins import build_plugin_manager, register_checked
from moola_engine.logs import RunLog, clear_contextvars

torch.set_num_threads(1)

# CI replays the same examples every run (a red CI must be reproducible); locally hypothesis explores anew.
if os.environ.get("CI"):
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", derandomize=True)
    _hyp_settings.load_profile("ci")

ROOT = Path(__file__).resolve().parent.parent


class TinyNet(nn.Module):
    """Two 'encoder' layers and a head: enough groups for every strategy."""

    def __init__(self, c: int = 3, h: int = 8, classes: int = 2) -> None:
        super().__init__()
        self.enc0 = nn.Linear(c, h)
        self.enc1 = nn.Linear(h, h)
        self.head = nn.Linear(h, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.mean(dim=1)  # (N, T, C) -> (N, C)
        return self.head(torch.relu(self.enc1(torch.relu(self.enc0(z)))))


TINY_GROUPS = [
    GroupSpec(name="encoder.layer0", modules=["enc0"]),
    GroupSpec(name="encoder.layer1", modules=["enc1"]),
    GroupSpec(name="head", modules=["head"], head=True),
]


def tiny_data(n: int = 64, t: int = 5, c: int = 3, seed: int = 0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, c, generator=g)
    y = (x[:, :, 0].mean(dim=1) > 0).long()
    return TensorData(x=x, y=y)


@pytest.fixture(autouse=True)
def _clean_context() -> Iterator[None]:
    clear_contextvars()
    yield
    clear_contextvars()


def make_engine(
    strategy: Any,
    *,
    epochs: int = 3,
    extra: tuple[Any, ...] = (),
    model: nn.Module | None = None,
    groups: list[GroupSpec] | None = None,
    train_kwargs: dict[str, Any] | None = None,
    checks: ChecksConfig | None = None,
    runlog: RunLog | None = None,
    seed: int = 0,
) -> Engine:
    """An Engine on CPU with TinyNet, the given strategy object registered last (as train() does)."""
    torch.manual_seed(seed)
    pm, _ = build_plugin_manager()
    for i, plugin in enumerate(extra):
        register_checked(pm, plugin, name=f"extra-{i}")
    register_checked(pm, strategy, name="strategy")
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=1e-2, seed=seed, device="cpu", **(train_kwargs or {}))
    return Engine(
        model if model is not None else TinyNet(),
        train=cfg,
        groups=groups if groups is not None else TINY_GROUPS,
        pm=pm,
        strategy=strategy,
        train_data=tiny_data(seed=seed),
        val_data=tiny_data(n=32, seed=seed + 100),
        checks=checks,
        logger=runlog.logger if runlog is not None else None,
    )


def named(name: str, **params: Any) -> Any:
    """A built-in strategy object by plugin name with the given params (structured like TOML)."""
    from moola_engine.config import structure

    _, registry = build_plugin_manager()
    info = registry[name]
    obj = info.factory(structure(params, info.params, source="test"))
    obj.name = name
    return obj


class NudgeAt:
    """A planted bug: moves ``enc0.weight`` (TinyNet's) by 1e-3 after one optimizer step."""

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def after_step(self, engine: Any, step: int) -> None:
        if step == self.step:
            with torch.no_grad():
                engine.model.enc0.weight.add_(1e-3)
