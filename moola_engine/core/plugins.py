"""The plugin manager: entry-point discovery, validation, and the strategy registry.

Our built-in strategies are listed in our own pyproject under the entry-point
group ``moola_engine``, exactly as a third party lists theirs; there is no
hard-coded list of defaults.  Loading goes through :func:`build_plugin_manager`:

* every entry point of the group is imported; one that fails is reported as
  ``failed to load plugin "dist[entry]": <why>``;
* ``check_pending()`` runs at once, so a misspelled hook (``on_epoch_strat``)
  is an error naming the plugin, not a silently ignored method;
* ``register_strategies(register)`` collects each plugin's strategies into a
  :class:`~moola_engine.core.registry.Registry` (kind ``strategy``); two plugins registering one name is an error.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as md
import inspect
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import pluggy

from moola_engine.config import closest, read_toml, structure
from moola_engine.core import hookspecs
from moola_engine.core.protocol import check_strategy
from moola_engine.core.registry import Component, Registry, collect
from moola_engine.core.registry import NoParams as NoParams  # re-exported: strategies without params
from moola_engine.errors import ConfigError, PluginError

ENTRY_POINT_GROUP = "moola_engine"


StrategyInfo = Component
"""A strategy plugin as registered (kind ``"strategy"``): ``name`` is the plugin name strategies.toml refers to."""

StrategyRegistry = Registry
"""Every strategy plugin the installed plugins registered, by plugin name."""


@attrs.frozen(kw_only=True)
class NamedStrategy:
    """One ``[strategy.NAME]`` table of strategies.toml, params structured."""

    name: str
    plugin: str
    params: Any
    description: str
    info: StrategyInfo
    source: str
    train: dict[str, Any] = attrs.Factory(dict)
    """``[strategy.NAME.train]``: this strategy's own ``[train]`` values (lr, epochs, optimizer, ...), applied over
    the experiment's by :meth:`configure` wherever the strategy runs (train, plan, every ablation cell)."""

    def configure(self, cfg: Any) -> Any:
        """``cfg`` with this strategy's ``[strategy.NAME.train]`` values over its ``[train]`` table."""
        if not self.train:
            return cfg
        return attrs.evolve(cfg, train=attrs.evolve(cfg.train, **self.train))

    def build(self) -> Any:
        """A fresh strategy object (hook implementations) for one run."""
        obj = self.info.factory(self.params)
        check_strategy(obj, self.plugin, self.info.source)
        if getattr(obj, "name", None) is None:
            with contextlib.suppress(AttributeError):
                obj.name = self.name
        return obj


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _dist_label(ep: md.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?"
    return f"{dist.metadata['Name']} {dist.version}"


def _dist_name(ep: md.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "?"


def discover(pm: pluggy.PluginManager, group: str = ENTRY_POINT_GROUP) -> dict[str, str]:
    """Load and register every entry point of ``group``; return plugin name -> source label."""
    sources: dict[str, str] = {}
    seen: set[str] = set()
    for ep in sorted(md.entry_points(group=group), key=lambda e: (_dist_name(e), e.name)):
        label = f"{_dist_name(ep)}[{ep.name}]"
        if label in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add(label)
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(f'failed to load plugin "{label}": {type(exc).__name__}: {exc}') from exc
        if pm.is_registered(plugin):
            continue
        try:
            pm.register(plugin, name=label)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(f'failed to load plugin "{label}": {_one_line(exc)}') from exc
        sources[label] = _dist_label(ep)
    if os.environ.get("MOOLA_BUILTIN_PLUGINS") == "1":  # source tree on PYTHONPATH, not installed
        for label, plugin in source_tree_plugins():
            if label not in seen and not pm.is_registered(plugin):
                pm.register(plugin, name=label)
                sources[label] = "moola-engine (source tree)"
    return sources


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def source_tree_plugins() -> list[tuple[str, Any]]:
    """Our own entry points, read from the source tree's pyproject.toml and imported from ``plugins/``.

    For a checkout used through ``PYTHONPATH`` without ``pip install`` (no
    installed metadata, so no entry points): set ``MOOLA_BUILTIN_PLUGINS=1``.
    The list is the pyproject's, so it cannot drift from what an install registers.
    """
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        raise PluginError(f"MOOLA_BUILTIN_PLUGINS=1 but there is no source tree here ({pyproject} is missing)")
    eps = read_toml(pyproject).get("project", {}).get("entry-points", {}).get(ENTRY_POINT_GROUP, {})
    found = []
    for name, target in sorted(eps.items()):
        module = target.split(":")[0].replace("moola_plugins.", "plugins.", 1)
        try:
            found.append((f"moola-engine[{name}]", importlib.import_module(module)))
        except Exception as exc:
            raise PluginError(f'failed to load plugin "moola-engine[{name}]" from the source tree: '
                              f"{type(exc).__name__}: {exc}") from exc
    return found


def check(pm: pluggy.PluginManager) -> None:
    """Every hook implementation must match a spec: a typo is an error naming the plugin."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) if exc.plugin is not None else "?"
        raise PluginError(f'plugin "{name}": {_one_line(exc)}') from exc


def register_checked(pm: pluggy.PluginManager, plugin: Any, name: str | None = None) -> None:
    """Register a plugin object and validate its hooks at once."""
    label = name or repr(plugin)
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f'plugin "{label}": {_one_line(exc)}') from exc
    check(pm)


def _check_strategy_class(name: str, factory: Callable[..., Any], source: str) -> None:
    if inspect.isclass(factory):  # a factory function's object is checked when built
        check_strategy(factory, name, source)


def collect_strategies(pm: pluggy.PluginManager, sources: dict[str, str] | None = None) -> StrategyRegistry:
    """Call ``register_strategies`` on every plugin and gather what they register."""
    return collect(pm, "strategy", sources, hook="register_strategies", label="strategy plugin",
                   default_params=NoParams, check=_check_strategy_class)


def build_plugin_manager(
    extra: Iterable[Any] = (), *, entry_points: bool = True
) -> tuple[pluggy.PluginManager, StrategyRegistry]:
    """A fresh plugin manager with the entry-point plugins (and ``extra``), validated."""
    pm = new_plugin_manager()
    sources = discover(pm) if entry_points else {}
    for i, plugin in enumerate(extra):
        name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{i}"
        pm.register(plugin, name=name)
        sources.setdefault(name, name)
    check(pm)
    pm.moola_sources = sources  # type: ignore[attr-defined]  # plugin name -> "dist version", for every registry
    return pm, collect_strategies(pm, sources)


# --------------------------------------------------------------------------- strategies.toml


def default_strategies_file(config_dir: str | Path | None = None) -> Path | None:
    """``strategies.toml`` beside the experiment file (``config_dir``), else ``./strategies.toml``, else the one
    beside the project (source checkouts and editable installs)."""
    candidates = [Path(config_dir) / "strategies.toml"] if config_dir is not None else []
    candidates += [Path.cwd() / "strategies.toml", Path(__file__).resolve().parents[2] / "strategies.toml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


TRAIN_OVERRIDES = ("epochs", "lr", "optimizer", "weight_decay", "momentum", "batch_size", "grad_clip", "scheduler",
                   "early_stopping", "restore_best")
"""The ``[train]`` keys a strategy may set for itself in ``[strategy.NAME.train]``."""


def check_train_overrides(table: Any, source: str, where: str) -> dict[str, Any]:
    """A ``[strategy.NAME.train]`` table checked key by key (and typed) as ``[train]`` would be."""
    from moola_engine.config import TrainConfig

    if not isinstance(table, dict):
        raise ConfigError(source, f"invalid value, expected a table @ {where}")
    bad = sorted(set(table) - set(TRAIN_OVERRIDES))
    if bad:
        raise ConfigError(source, f"extra fields found ({', '.join(bad)}) @ {where}; a strategy may set "
                                  f"{', '.join(TRAIN_OVERRIDES)}")
    checked = structure(dict(table), TrainConfig, source=source, path=where)
    return {k: getattr(checked, k) for k in table}


def load_strategies(path: str | Path, registry: StrategyRegistry) -> dict[str, NamedStrategy]:
    """Read strategies.toml: ``[strategy.NAME] plugin = "..."`` plus that plugin's parameters."""
    source = str(path)
    data = read_toml(path)
    problems: list[str] = []
    extra = sorted(set(data) - {"strategy"})
    if extra:
        problems.append(f"extra fields found ({', '.join(extra)}) @ $")
    tables = data.get("strategy", {})
    if not isinstance(tables, dict):
        raise ConfigError(source, "invalid value, expected a table @ $.strategy")
    named: dict[str, NamedStrategy] = {}
    for name, table in tables.items():
        where = f"$.strategy.{name}"
        if not isinstance(table, dict):
            problems.append(f"invalid value, expected a table @ {where}")
            continue
        table = dict(table)
        plugin = table.pop("plugin", None)
        description = table.pop("description", None)
        train_over = table.pop("train", {})
        try:
            train_over = check_train_overrides(train_over, source, f"{where}.train")
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        if plugin is None:
            problems.append(f"required field missing @ {where}.plugin")
            continue
        if not isinstance(plugin, str):
            problems.append(f"invalid value for type, expected str @ {where}.plugin")
            continue
        if plugin not in registry:
            hint = closest(plugin, registry.names())
            msg = f'unknown plugin "{plugin}" @ {where}.plugin; installed plugins: {", ".join(registry.names())}'
            problems.append(msg + (f'; did you mean "{hint}"?' if hint else ""))
            continue
        info = registry[plugin]
        try:
            params: Any = structure(table, info.params or NoParams, source=source, path=where)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        named[name] = NamedStrategy(
            name=name,
            plugin=plugin,
            params=params,
            description=description if isinstance(description, str) else info.description,
            info=info,
            source=source,
            train=train_over,
        )
    if problems:
        raise ConfigError(source, problems)
    return named


def select_strategy(name: str, named: dict[str, NamedStrategy], source: str) -> NamedStrategy:
    """The strategy called ``name``; unknown names list the defined ones and the closest match."""
    if name in named:
        return named[name]
    hint = closest(name, list(named))
    msg = f'unknown strategy "{name}"; defined in {source}: {", ".join(sorted(named))}'
    if hint:
        msg += f'; did you mean "{hint}"?'
    raise ConfigError("--strategy", msg)
