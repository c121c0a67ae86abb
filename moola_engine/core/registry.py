"""Components a user brings by name or by import path: models, datasets, tasks, pretraining objectives, ...

Every kind is registered the way strategies are: a plugin of the ``moola_engine``
entry-point group implements ``register_<kind>s(register)`` and calls
``register(name, factory, params=ParamsClass, description="...")``.  Our own
components (the core's tasks and data kinds, the OHLC package's model, data and
objective) register exactly like a third party's.

In TOML a component is named by its registered name or by an import path
``"package.module:callable"`` (no plugin needed).  An unknown name lists what is
installed and says how to add one.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import pluggy

from moola_engine.config import closest
from moola_engine.errors import ConfigError, PluginError

KINDS: dict[str, str] = {
    "model": "register_models",
    "dataset": "register_datasets",
    "task": "register_tasks",
    "objective": "register_objectives",
    "baseline": "register_baselines",
    "preset": "register_presets",
}
"""Component kind -> the registration hook that collects it."""


@attrs.frozen
class NoParams:
    """Parameters of a component that takes none."""


@attrs.frozen(kw_only=True)
class Component:
    """One registered (or imported) component."""

    kind: str
    name: str
    factory: Callable[..., Any]
    params: type | None
    """attrs class its TOML table is structured into (None: the factory takes keyword arguments as given)."""
    description: str
    source: str
    """Distribution and version that registered it, ``import path`` for an import path."""
    fields: Mapping[str, Any] = attrs.field(factory=dict, hash=False)
    """The kind's own keyword fields of ``register`` (a sink's ``requires`` and ``extra``), defaults filled in."""


class Registry:
    """Registered components of one kind, by name; ``label`` names the kind in the registered-twice error."""

    def __init__(self, kind: str, label: str | None = None) -> None:
        self.kind = kind
        self.label = label or kind
        self._items: dict[str, Component] = {}

    def add(self, item: Component) -> None:
        if item.name in self._items:
            other = self._items[item.name]
            raise PluginError(f'{self.label} "{item.name}" is registered twice: by {other.source} and by {item.source}')
        self._items[item.name] = item

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __getitem__(self, name: str) -> Component:
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[Component]:
        return [self._items[n] for n in self.names()]


def describe(factory: Callable[..., Any], description: str | None) -> str:
    if description is not None:
        return description
    lines = (factory.__doc__ or "").strip().splitlines()
    return lines[0] if lines else ""


def collect(pm: pluggy.PluginManager, kind: str, sources: Mapping[str, str] | None = None, *,
            hook: str | None = None, label: str | None = None, default_params: type | None = None,
            check: Callable[[str, Callable[..., Any], str], None] | None = None,
            fields: Mapping[str, Any] | None = None) -> Registry:
    """Call the kind's registration hook on every plugin and gather what they register.

    Components, strategies and sinks are all collected here.  ``hook`` defaults to ``KINDS[kind]``;
    ``label`` names the kind in the registered-twice error; ``default_params`` stands in for a registration
    without ``params``; ``check(name, factory, source)`` validates a registration further (a strategy's
    protocol); ``fields`` are the kind's own keyword arguments of ``register`` with their defaults (a sink's
    ``requires`` and ``extra``), kept in :attr:`Component.fields`.
    """
    registry = Registry(kind, label)
    hook_name = hook or KINDS[kind]
    sources = sources or {}
    defaults = dict(fields or {})
    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
        pname = pm.get_name(impl.plugin) or "?"
        source = sources.get(pname, pname)

        def register(name: str, factory: Callable[..., Any], *, params: type | None = None,
                     description: str | None = None, _source: str = source, **kw: Any) -> None:
            if not isinstance(name, str) or not name:
                raise PluginError(f"{kind} registered by {_source}: the name must be a non-empty string, got {name!r}")
            if not callable(factory):
                raise PluginError(f'{kind} "{name}" from {_source}: the factory must be callable, got {factory!r}')
            if params is not None and not attrs.has(params):
                raise PluginError(f'{kind} "{name}" from {_source}: params must be an attrs class, got {params!r}')
            unknown = sorted(set(kw) - set(defaults))
            if unknown:
                accepted = ", ".join(["params", "description", *defaults])
                raise PluginError(f'{kind} "{name}" from {_source}: unknown keyword argument(s) {", ".join(unknown)} '
                                  f"of register; it takes {accepted}")
            if check is not None:
                check(name, factory, _source)
            registry.add(Component(kind=kind, name=name, factory=factory, params=params or default_params,
                                   description=describe(factory, description), source=_source,
                                   fields={**defaults, **kw}))

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f'plugin "{pname}" failed in hook {hook_name}: {type(exc).__name__}: {exc}') from exc
    return registry


def is_import_path(name: str) -> bool:
    return ":" in name


def import_object(spec: str, *, source: str, key: str, base_dir: Path | None = None) -> Any:
    """``package.module:attr`` -> the object; the config file's folder is searched too (a module beside it)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(source, f'invalid import path {spec!r}, expected "package.module:callable" @ {key}')
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if base_dir is None or exc.name != module_name.split(".")[0] or str(base_dir) in sys.path:
            raise ConfigError(source, f"cannot import {module_name!r} for {spec!r}: {exc} @ {key}") from exc
        sys.path.insert(0, str(base_dir))  # a module beside the config file
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc2:
            raise ConfigError(source, f"cannot import {module_name!r} for {spec!r}: {exc2} @ {key}") from exc2
    except Exception as exc:
        raise ConfigError(source, f"importing {module_name!r} for {spec!r} failed: "
                                  f"{type(exc).__name__}: {exc} @ {key}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(source, f"module {module_name!r} has no attribute {attr!r} @ {key}") from None
    return obj


def resolve(registry: Registry, name: str, *, source: str, key: str, base_dir: Path | None = None) -> Component:
    """A registered component by name, or one imported from ``package.module:callable``."""
    if is_import_path(name):
        obj = import_object(name, source=source, key=key, base_dir=base_dir)
        if not callable(obj):
            raise ConfigError(source, f"{name!r} is not callable @ {key}")
        params = getattr(obj, "params_class", None)
        return Component(kind=registry.kind, name=name, factory=obj,
                         params=params if params is not None and attrs.has(params) else None,
                         description=describe(obj, None), source="import path")
    if name in registry:
        return registry[name]
    hint = closest(name, registry.names())
    installed = ", ".join(registry.names()) or "none"
    msg = (f"unknown {registry.kind} {name!r} @ {key}; installed: {installed}"
           + (f'; did you mean "{hint}"?' if hint else "")
           + f'. Add one with an import path ("package.module:callable") or a plugin implementing '
             f"{KINDS[registry.kind]}(register) (docs/writing-plugins.md)")
    raise ConfigError(source, msg)
