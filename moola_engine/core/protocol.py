"""The strategy protocol beside the hooks: promises, schedule validation, plan notes, state; checked at registration.

A strategy object drives the schedule through its hook implementations (pluggy
checks those).  Besides hooks it may define these methods, each optional, each with
exactly this signature (the names are what the engine calls them with)::

    validate_schedule(self, epochs, groups, head_groups) -> list[(override, message)]
    plan_notes(self) -> list[str]
    promised_groups(self, groups, head_groups) -> list[str]
    promised_params(self, group, names, head_groups) -> list[str]
    state_dict(self) -> dict           load_state_dict(self, state) -> None

and the attribute ``overrides`` (names ``--allow`` may lift for it).
:func:`check_strategy` runs when the strategy is registered (on its class) and when
it is built (on the object): a method whose name is a near-miss of one of these or of
a hook (``promised_group``, ``validate_schedul``), or whose parameters differ, is
refused with the plugin's name, instead of being silently ignored.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from moola_engine.core import hookspecs
from moola_engine.errors import PluginError

METHODS: dict[str, tuple[str, ...]] = {
    "validate_schedule": ("epochs", "groups", "head_groups"),
    "plan_notes": (),
    "promised_groups": ("groups", "head_groups"),
    "promised_params": ("group", "names", "head_groups"),
    "state_dict": (),
    "load_state_dict": ("state",),
}
"""Optional strategy methods -> their parameters (after ``self``), in order."""


@runtime_checkable
class Strategy(Protocol):
    """What the engine may call on a strategy object besides its hooks (every member optional; documented here)."""

    name: str | None

    def validate_schedule(self, epochs: int, groups: list[str], head_groups: list[str]) -> list[tuple[str, str]]:
        """Problems that keep the schedule from its promise over ``epochs`` epochs, as (override, message)."""
        ...

    def plan_notes(self) -> list[str]:
        """Lines ``moola-engine plan`` prints under the schedule (e.g. a plateau-driven transition's bound)."""
        ...

    def promised_groups(self, groups: list[str], head_groups: list[str]) -> list[str]:
        """Groups the strategy promises to train at some point (default: every group)."""
        ...

    def promised_params(self, group: str, names: list[str], head_groups: list[str]) -> list[str]:
        """Parameters of a promised group it promises to train (default: all of them)."""
        ...


def _hook_names() -> list[str]:
    return hookspecs.all_hook_names()


def _public_callables(obj: Any) -> list[tuple[str, Any]]:
    out = []
    for name in dir(obj):
        if name.startswith("_"):
            continue
        try:
            attr = inspect.getattr_static(obj, name)
        except AttributeError:
            continue
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        if inspect.isfunction(attr):
            out.append((name, attr))
    return out


def _params(fn: Any) -> list[str]:
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def check_strategy(obj: Any, plugin: str, source: str) -> None:
    """Refuse a strategy class or object with a misspelled or misshaped protocol method (see module docstring)."""
    known = list(METHODS) + _hook_names()
    problems: list[str] = []
    for name, fn in _public_callables(obj if inspect.isclass(obj) else type(obj)):
        if name in METHODS:
            got = _params(fn)
            if tuple(got) != METHODS[name]:
                want = ", ".join(("self", *METHODS[name]))
                problems.append(f"{name}({', '.join(('self', *got))}) must take ({want})")
        elif name not in known and not hasattr(fn, f"{hookspecs.PROJECT}_impl"):
            near = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
            if near:
                problems.append(f'method {name!r} is not part of the strategy protocol; did you mean "{near[0]}"?')
    overrides = getattr(obj, "overrides", ())
    if isinstance(overrides, str) or not isinstance(overrides, Sequence | set | frozenset) or not all(
            isinstance(o, str) for o in overrides):
        problems.append(f"overrides must be a list of names, got {overrides!r}")
    if problems:
        raise PluginError(f'strategy "{plugin}" from {source}: ' + "; ".join(problems)
                          + " (the strategy protocol: docs/writing-plugins.md#promises-and-validation)")
