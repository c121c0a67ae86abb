"""moola-engine: a PyTorch training engine for transfer learning on small labeled data."""

from __future__ import annotations

from moola_engine.core.hookspecs import hookimpl, hookspec
from moola_engine.errors import CheckFailed, ConfigError, MoolaError, PluginError, ScheduleError

__version__ = "0.1.0"

__all__ = [
    "CheckFailed",
    "ConfigError",
    "MoolaError",
    "PluginError",
    "ScheduleError",
    "__version__",
    "hookimpl",
    "hookspec",
]
