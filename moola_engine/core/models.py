"""Models by name or import path: ``model.name`` -> ``factory(**model.params)`` -> ``nn.Module``.

A model plugin registers its factory with ``register_models(register)``; a model
may define ``default_groups()`` returning its parameter groups (input -> output),
used when the config declares no ``[[model.groups]]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from moola_engine.config import GroupSpec, ModelConfig
from moola_engine.core.registry import Registry, resolve
from moola_engine.errors import ConfigError


def build_model(cfg: ModelConfig, source: str = "config", *, models: Registry | None = None,
                base_dir: Path | None = None) -> nn.Module:
    """The model ``[model]`` names, built with its ``params``."""
    if models is None:
        from moola_engine.core.components import default_registries

        models = default_registries()["model"]
    comp = resolve(models, cfg.name, source=source, key="$.model.name", base_dir=base_dir)
    try:
        model = comp.factory(**cfg.params)
    except (TypeError, ValueError, RuntimeError) as exc:  # unknown keyword, or a value torch refuses
        raise ConfigError(source, f"invalid model parameters for {cfg.name}: {exc} @ $.model.params") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(source, f"model {cfg.name!r} built a {type(model).__name__}, not a torch nn.Module "
                                  "@ $.model.name")
    return model


def group_specs(model: nn.Module, cfg: ModelConfig) -> list[GroupSpec]:
    """The groups the config declares, else the model's own defaults."""
    if cfg.groups:
        return list(cfg.groups)
    default: Any = getattr(model, "default_groups", None)
    return list(default()) if default is not None else []
