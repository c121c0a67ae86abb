"""How the engine fires hooks: one ``_fire`` for every hook, transitions flushed after it, step hooks gated per plugin."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from moola_engine.core.enginebase import EngineBase
from moola_engine.errors import MoolaError, PluginError
from moola_engine.logs import Event


class HookDispatch(EngineBase):
    """Part of :class:`~moola_engine.core.engine.Engine`: firing hooks and blaming the plugin that raised."""

    def want_step_hooks(self, plugin: Any, until_step: int | None = None) -> None:
        """Call ``plugin``'s ``before_step``/``after_step`` only for steps before ``until_step`` (None: every step,
        the default of every plugin).  A check that needs a phase's first step asks for the steps it needs and
        costs nothing on the others: e.g. ``until_step=engine.step + 1`` inside ``after_step``: no more calls,
        then ``until_step=None`` when the next phase starts.  Effective from the next step; reset at fit start."""
        if until_step is None:
            self._step_until.pop(id(plugin), None)
        else:
            self._step_until[id(plugin)] = (plugin, int(until_step))

    def _step_callers(self, step: int) -> tuple[Any, Any]:
        """(before_step caller or None, after_step caller or None) for ``step``: the plugins that want it."""
        off = tuple(sorted(id(p) for p, until in self._step_until.values() if step >= until))
        cached = self._step_cache.get(off)
        if cached is None:
            skip = [p for p, until in self._step_until.values() if id(p) in off]
            callers = []
            for name in ("before_step", "after_step"):
                impls = [i for i in getattr(self.pm.hook, name).get_hookimpls() if id(i.plugin) not in off]
                callers.append(None if not impls else
                               self.pm.subset_hook_caller(name, remove_plugins=skip) if skip else
                               getattr(self.pm.hook, name))
            cached = self._step_cache[off] = (callers[0], callers[1])
        return cached

    def _fire(self, name: str, *, skip: Sequence[Any] = (), caller: Any = None, **kwargs: Any) -> None:
        """Call hook ``name`` (except on the ``skip`` plugins; or through ``caller``, a subset caller of it);
        then fire on_freeze/on_unfreeze for transitions requested inside it."""
        if name in self._hooks_with_impls:
            hook = caller or (self.pm.subset_hook_caller(name, remove_plugins=skip) if skip
                              else getattr(self.pm.hook, name))
            try:
                hook(engine=self, **kwargs)
            except MoolaError:
                raise
            except Exception as exc:
                plugin = self._blame(name, exc)
                self.log.error(Event.PLUGIN_FAILED, plugin=plugin, hook=name, error=f"{type(exc).__name__}: {exc}")
                raise PluginError(
                    f'plugin "{plugin}" raised in hook {name}: {type(exc).__name__}: {exc}'
                ) from exc
        if self.freezer.pending and name not in ("on_freeze", "on_unfreeze"):
            self._flush_transitions()

    def _flush_transitions(self) -> None:
        while self.freezer.pending:
            for t in self.freezer.take_pending():
                self._on_transition()
                if t.to_state == "frozen":
                    self._fire("on_freeze", group=t.group, epoch=t.epoch, reason=t.reason)
                else:
                    self._fire("on_unfreeze", group=t.group, epoch=t.epoch, lr=t.lr, reason=t.reason)

    def _blame(self, hook_name: str, exc: BaseException) -> str:
        """The plugin whose implementation of ``hook_name`` raised, read off the traceback."""
        hook = getattr(self.pm.hook, hook_name)
        codes: dict[Any, str] = {}
        for impl in hook.get_hookimpls():
            fn = getattr(impl.function, "__func__", impl.function)
            code = getattr(fn, "__code__", None)
            if code is not None:
                codes[code] = impl.plugin_name
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code in codes:
                return codes[tb.tb_frame.f_code]
            tb = tb.tb_next
        return "?"

    def _settle(self, failing: bool, callbacks: list[Callable[[bool], None]] | None = None) -> None:
        """Run the ``on_exit`` callbacks (all of them; when not failing, the first error is raised after)."""
        first: BaseException | None = None
        for cb in reversed(self.on_exit if callbacks is None else callbacks):
            try:
                cb(failing)
            except BaseException as err:
                first = first or err
        if first is not None and not failing:
            raise first
