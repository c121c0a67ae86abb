"""The hook vocabulary of moola-engine.

The engine's loop, with each hook where it fires::

    register_strategies(register)            # once, when the plugin manager is built
    register_models / register_datasets / register_tasks(register)     # components, by name or import path
    register_objectives / register_baselines / register_presets(register)  # pretrain, baseline, ablate --preset
    register_sinks(register)                 # once per run: metric/event sinks selected by [[sinks]]
    resolve groups, build ONE optimizer param group per model group (never changes)
    on_fit_start(engine)                     # strategy sets the initial freeze state here
        -> on_freeze(...) / on_unfreeze(...) # for each transition requested above
    for epoch in range(epochs):
        on_epoch_start(engine, epoch)        # epoch-count schedules (un)freeze here
            -> on_freeze / on_unfreeze       # after the hook returns, before any step
        for step, batch in batches:
            before_step(engine, epoch, step, batch)
            loss = forward + backward + optimizer.step()     # then a per-step lr scheduler (onecycle, cosine)
            after_step(engine, epoch, step, loss)      # loss is a device tensor: no host sync
        metrics = validate()                    # then train.scheduler = "plateau" reads its metric
        on_validation_end(engine, epoch, metrics)    # metric-driven schedules decide here
            -> on_freeze / on_unfreeze       # take effect from the next epoch's first step
        on_epoch_end(engine, epoch, metrics)  # observers snapshot / check weights here
        early stopping (patience counts from the last transition)
    on_fit_end(engine, result)

Transitions a plugin requests inside a hook are applied at once (``requires_grad``,
``grad = None``, lr), and their ``on_freeze``/``on_unfreeze`` hooks fire right
after the requesting hook has returned to the engine, so every observer sees
the same order whatever the plugin order.  The selected strategy is registered
last, so among plain implementations it runs first; observers (checks,
loggers) are ``trylast`` and see the state after the strategy acted.

Hooks evolve only by gaining keyword arguments; an implementation may accept
any subset of a spec's arguments.  Never rename one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import torch

    from moola_engine.core.context import EngineView, FitResult

PROJECT = "moola_engine"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- registration


@hookspec
def register_strategies(register: Callable[..., None]) -> None:
    """Register fine-tuning strategies.  Fires once, when the plugin manager is built.

    Call ``register(name, factory, params=ParamsClass, description="...")`` for each
    strategy the plugin provides: ``name`` is what ``plugin = "..."`` in
    strategies.toml refers to; ``factory(params)`` returns the object whose hook
    implementations drive the schedule; ``params`` is an attrs class cattrs
    structures the TOML table into (default: no parameters); ``description`` is the
    one line ``moola-engine strategies list`` shows (default: the factory's docstring).
    The return value is ignored.
    """


@hookspec
def register_models(register: Callable[..., None]) -> None:
    """Register model factories.  Fires once, when a run's components are resolved.

    ``register(name, factory, description="...")``: ``model.name = "NAME"`` builds
    ``factory(**model.params)``, an ``nn.Module``.  It may define ``default_groups()``
    returning ``GroupSpec``s (input -> output) used when ``[[model.groups]]`` is absent.
    """


@hookspec
def register_datasets(register: Callable[..., None]) -> None:
    """Register data kinds.  Fires once, when a run's components are resolved.

    ``register(name, loader, params=OptionsClass, description="...")``: ``data.kind = "NAME"``
    calls ``loader(request)`` with a :class:`moola_engine.core.data.DataRequest` (the ``[data]``
    table, its ``options`` structured into ``OptionsClass``, the config's folder, the seed and the
    task) and gets a :class:`moola_engine.core.data.Splits` back.
    """


@hookspec
def register_tasks(register: Callable[..., None]) -> None:
    """Register tasks (label handling, loss, metrics).  Fires once, when a run's components are resolved.

    ``register(name, factory, params=ParamsClass)``: ``[task] name = "NAME"`` builds
    ``factory(params)``, an object satisfying :class:`moola_engine.core.tasks.Task`.
    """


@hookspec
def register_objectives(register: Callable[..., None]) -> None:
    """Register pretraining objectives for ``moola-engine pretrain``.

    ``register(name, factory, params=ParamsClass)``: ``factory(params)`` returns an object
    satisfying :class:`moola_engine.pretraining.Objective`.
    """


@hookspec
def register_baselines(register: Callable[..., None]) -> None:
    """Register reference baselines (``moola-engine baseline``, the ablation report's reference row).

    ``register(name, fn, description="...")``: ``fn(splits, request)`` returns
    ``{"val": metrics, "test": metrics}`` (host floats) or None when it cannot read this data.
    """


@hookspec
def register_presets(register: Callable[..., None]) -> None:
    """Register ablation presets (``moola-engine ablate --preset NAME``, ``moola-engine demo``).

    ``register(name, factory)``: ``factory()`` returns a :class:`moola_engine.experiments.grid.Preset`.
    """


@hookspec
def register_sinks(register: Callable[..., None]) -> None:
    """Register metric and event sinks.  Fires once per run, before its first event.

    Call ``register(name, factory, params=ParamsClass, description="...", requires=("module",), extra="...")``
    for each sink the plugin provides: ``name`` is what ``[[sinks]] name = "..."`` in the experiment file
    refers to; ``factory(params, run)`` returns the sink object (``run`` is a
    :class:`moola_engine.runs.sinks.SinkRun`: ``run_dir``, ``run_id``, ``strategy``, ``resumed``); ``params``
    is an attrs class cattrs structures the table's other keys into (default: none); ``requires`` names
    modules that must be importable (checked before the run starts, with ``pip install 'moola-engine[extra]'``
    as the hint).  The sink object has ``write(event)`` (every event dict, after events.jsonl has it) and
    ``close()``; if either raises, the run goes on without that sink and logs ``sink.failed`` once.
    The return value is ignored.
    """


# --------------------------------------------------------------------------- fit lifecycle


@hookspec
def on_fit_start(engine: EngineView) -> None:
    """Fires once, before the first epoch, after the model, groups and optimizer exist.

    Strategies set the initial freeze state here through ``engine.freezer``.
    The return value is ignored.
    """


@hookspec
def on_fit_end(engine: EngineView, result: FitResult) -> None:
    """Fires once after the last epoch (or early stop), before best weights are restored.

    ``result`` holds the history and why training stopped.  The return value is ignored.
    """


# --------------------------------------------------------------------------- epoch lifecycle


@hookspec
def on_epoch_start(engine: EngineView, epoch: int) -> None:
    """Fires at the start of every epoch (``epoch`` counts from 0), before its first step.

    Epoch-count schedules request transitions here; they take effect for this
    epoch's first step.  The return value is ignored.
    """


@hookspec
def on_epoch_end(engine: EngineView, epoch: int, metrics: Mapping[str, float]) -> None:
    """Fires at the end of every epoch, after validation and ``on_validation_end``.

    ``metrics`` holds host floats (``train_loss``, ``val_loss``, ``val_accuracy``, ...).
    Observers snapshot and check weights here.  The return value is ignored.
    """


@hookspec
def on_validation_end(engine: EngineView, epoch: int, metrics: Mapping[str, float]) -> None:
    """Fires after each epoch's validation pass with its metrics (host floats).

    Metric-driven schedules (unfreeze on plateau) decide here; a transition
    requested here takes effect from the next epoch's first step.
    The return value is ignored.
    """


# --------------------------------------------------------------------------- step brackets


@hookspec
def before_step(engine: EngineView, epoch: int, step: int, batch: tuple[torch.Tensor, ...]) -> None:
    """Fires before the forward pass of every training step.

    ``step`` counts optimizer steps since the fit started.  Must not force a
    host-device sync (no ``.item()``) if the run is to stay fast on a GPU.
    The return value is ignored.
    """


@hookspec
def after_step(engine: EngineView, epoch: int, step: int, loss: torch.Tensor) -> None:
    """Fires after ``optimizer.step()`` of every training step.

    ``loss`` is the detached loss as a device tensor: reading it with ``.item()``
    forces a host sync on a GPU.  The engine's own per-phase gradient check
    runs here once per phase.  The return value is ignored.
    """


# --------------------------------------------------------------------------- facts: freezing


@hookspec
def on_freeze(engine: EngineView, group: str, epoch: int, reason: str) -> None:
    """Fires after the freezer froze ``group``: ``requires_grad`` is False and grads are None.

    ``epoch`` is the epoch from whose next step the group is frozen (a freeze at
    fit start is epoch 0).  ``reason`` is the strategy's words (``"phase 1: head
    only"``, ``"frozen"``, ...).
    The return value is ignored.
    """


@hookspec
def on_unfreeze(engine: EngineView, group: str, epoch: int, lr: float, reason: str) -> None:
    """Fires after the freezer made ``group`` trainable with learning rate ``lr``.

    ``epoch`` is the epoch from whose next step the group trains.
    The return value is ignored.
    """


def all_hook_names() -> list[str]:
    """Every hook spec name, in declaration order (docs meta-test, recorder tests)."""
    return [
        name
        for name, obj in globals().items()
        if callable(obj) and hasattr(obj, f"{PROJECT}_spec")
    ]
