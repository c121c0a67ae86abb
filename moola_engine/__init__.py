"""moola-engine: a PyTorch training engine for transfer learning on small labeled data."""

from __future__ import annotations

from moola_engine.core.context import EngineView, FitResult
from moola_engine.core.hookspecs import hookimpl, hookspec
from moola_engine.errors import CheckFailed, ConfigError, MoolaError, PluginError, ScheduleError
from moola_engine.version import __version__

__all__ = [
    "CheckFailed",
    "ConfigError",
    "EngineView",
    "FitResult",
    "MoolaError",
    "PluginError",
    "ScheduleError",
    "__version__",
    "hookimpl",
    "hookspec",
]
