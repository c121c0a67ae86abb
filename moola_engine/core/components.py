"""A run's components resolved by name or import path: the model, the task, the data.

One plugin manager answers for strategies and components alike; ``registries(pm)``
collects every kind once per manager.  Code that has no manager (a helper called
from a notebook, a test) gets the installed plugins' through ``default_registries()``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pluggy

from moola_engine.core.registry import KINDS, Registry, collect

_CACHE_ATTR = "moola_registries"


def registries(pm: pluggy.PluginManager) -> dict[str, Registry]:
    """Every component kind's registry, collected from ``pm``'s plugins (once per manager)."""
    cached: dict[str, Registry] | None = getattr(pm, _CACHE_ATTR, None)
    if cached is None:
        sources = getattr(pm, "moola_sources", {})
        cached = {kind: collect(pm, kind, sources) for kind in KINDS}
        setattr(pm, _CACHE_ATTR, cached)
    return cached


@cache
def default_plugin_manager() -> Any:
    from moola_engine.core.plugins import build_plugin_manager

    return build_plugin_manager()[0]


def default_registries() -> dict[str, Registry]:
    """The installed plugins' registries (one plugin manager per process)."""
    return registries(default_plugin_manager())
