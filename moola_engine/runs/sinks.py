"""Metric and event sinks: where a run's events go besides events.jsonl (metrics.csv, TensorBoard, MLflow).

A sink is registered by a plugin of the entry-point group ``moola_engine``
through ``register_sinks(register)`` (see :mod:`moola_engine.hookspecs`) and
selected in the experiment file::

    [[sinks]]
    name = "csv"              # metrics.csv in the run folder (the default when no [[sinks]] is given)

    [[sinks]]
    name = "tensorboard"      # pip install 'moola-engine[tensorboard]'
    log_dir = "tb"            # optional: <log_dir>/<run-id>/ instead of <run folder>/tensorboard/

A sink object receives every event of the run through ``write(event)``, right
after the event is written to events.jsonl, and ``close()`` once at the end.
Metrics arrive as ``epoch.completed`` events (the epoch's metrics plus the
``trainable`` groups) and freeze transitions as ``freeze.transition`` events.

A sink that raises does not stop the run: :class:`SinkFanout` logs one
``sink.failed`` warning, drops that sink for the rest of the run, and the
event log (written before any sink sees the event) stays complete.

This module is itself a plugin (entry point ``sinks``): it registers the
built-in ``csv``, ``tensorboard`` and ``mlflow`` sinks exactly as a third
party would.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pluggy

from moola_engine.config import ExperimentConfig, closest, structure
from moola_engine.core.hookspecs import hookimpl
from moola_engine.core.registry import Component, NoParams, Registry, collect
from moola_engine.errors import ConfigError
from moola_engine.logs import Event

# Fields of epoch.completed that are not metrics (the run context structlog binds, and the event's own keys).
_NOT_METRICS = {"epoch", "step", "event", "level", "timestamp", "run_id", "strategy", "trainable"}


# --------------------------------------------------------------------------- the registry


@attrs.frozen(kw_only=True)
class SinkRun:
    """What a sink factory is told about the run it writes for."""

    run_dir: Path
    run_id: str
    strategy: str
    resumed: bool = False
    history: list[dict[str, Any]] = attrs.Factory(list)
    """A resumed run: the per-epoch metrics restored from its checkpoint (the epochs it does not run again)."""


SinkInfo = Component
"""A registered sink (kind ``"sink"``); ``fields["requires"]`` and ``fields["extra"]`` are what it needs installed."""

NoSinkParams = NoParams
"""Options of a sink that takes none."""


def collect_sinks(pm: pluggy.PluginManager) -> Registry:
    """Call ``register_sinks`` on every plugin and gather what they register."""
    return collect(pm, "sink", hook="register_sinks", default_params=NoSinkParams,
                   fields={"requires": (), "extra": None})


def check_sinks(cfg: ExperimentConfig, pm: pluggy.PluginManager) -> list[tuple[SinkInfo, Any]]:
    """Validate ``[[sinks]]`` (names, options, installed packages) before anything runs: (sink, params) pairs."""
    registry = collect_sinks(pm)
    problems: list[str] = []
    out: list[tuple[SinkInfo, Any]] = []
    seen: set[str] = set()
    for i, spec in enumerate(cfg.sinks):
        where = f"$.sinks[{i}]"
        if spec.name not in registry:
            hint = closest(spec.name, registry.names())
            problems.append(f'unknown sink "{spec.name}" @ {where}.name; installed sinks: {", ".join(registry.names())}'
                            + (f'; did you mean "{hint}"?' if hint else ""))
            continue
        if spec.name in seen:
            problems.append(f'sink "{spec.name}" is listed twice @ {where}.name')
            continue
        seen.add(spec.name)
        info = registry[spec.name]
        missing = [m for m in info.fields["requires"] if importlib.util.find_spec(m) is None]
        if missing:
            extra = info.fields["extra"]
            how = f"pip install 'moola-engine[{extra}]'" if extra else f"pip install {' '.join(missing)}"
            problems.append(f'sink "{spec.name}" needs the Python package(s) {", ".join(missing)} ({how}) @ {where}')
            continue
        try:
            params: Any = structure(dict(spec.options), info.params or NoSinkParams, source=cfg.source, path=where)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        out.append((info, params))
    if problems:
        raise ConfigError(cfg.source, problems)
    return out


def open_sinks(checked: Sequence[tuple[SinkInfo, Any]], run: SinkRun) -> SinkFanout:
    """The fan-out processor for one run.  Factories are called when the first event arrives, inside
    :class:`SinkFanout`, so a sink that cannot open is reported and dropped, not fatal."""
    def opener(info: SinkInfo, params: Any) -> Callable[[], Any]:
        return lambda: info.factory(params, run)

    return SinkFanout([(info.name, opener(info, params)) for info, params in checked])


# --------------------------------------------------------------------------- the fan-out processor


class SinkFanout:
    """structlog processor placed after the JSON-lines sink: passes each event to every live sink.

    A sink that raises (opening, writing or closing) is reported once as ``sink.failed`` and dropped.
    """

    def __init__(self, openers: Sequence[tuple[str, Callable[[], Any]]]) -> None:
        self._pending = list(openers)
        self._live: list[tuple[str, Any]] = []
        self.failed: list[str] = []
        self.logger: Any = None  # set by RunLog: the bound logger sink.failed goes to
        self._busy = False

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        if self._busy:  # an event logged by a sink itself, or our own sink.failed: sinks do not see it twice
            return event_dict
        self._busy = True
        failures: list[tuple[str, BaseException, str]] = []
        try:
            while self._pending:
                name, opener = self._pending.pop(0)
                try:
                    self._live.append((name, opener()))
                except Exception as exc:
                    failures.append((name, exc, "opening"))
            for name, sink in list(self._live):
                try:
                    sink.write(event_dict)
                except Exception as exc:
                    self._drop(name, sink)
                    failures.append((name, exc, f"writing {event_dict.get('event')}"))
        finally:
            self._busy = False
        for name, error, doing in failures:
            self._report(name, error, doing)
        return event_dict

    def _drop(self, name: str, sink: Any) -> None:
        self._live = [(n, s) for n, s in self._live if s is not sink]
        with contextlib.suppress(Exception):  # already failed: its first error is the one reported
            sink.close()

    def _report(self, name: str, exc: BaseException, doing: str) -> None:
        self.failed.append(name)
        if self.logger is not None:
            self.logger.warning(Event.SINK_FAILED, sink=name, error=f"{type(exc).__name__}: {exc}", during=doing,
                                message=f'sink "{name}" failed while {doing}; it is disabled for the rest of this run '
                                        "(events.jsonl is complete)")

    def close(self) -> None:
        """Close every live sink (a failure is reported like any other)."""
        live, self._live = self._live, []
        for name, sink in live:
            try:
                sink.close()
            except Exception as exc:
                self._report(name, exc, "closing")


def epoch_metrics(event: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of an ``epoch.completed`` event (numbers only; non-finite ones included)."""
    return {k: float(v) for k, v in event.items()
            if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def transition_text(event: Mapping[str, Any]) -> str:
    lr = event.get("lr")
    lr_text = f", lr {lr:.4g}" if isinstance(lr, (int, float)) else ""
    return (f"epoch {event.get('epoch')}: {event.get('group')} {event.get('from_state')} -> {event.get('to_state')}"
            f"{lr_text} ({event.get('reason')})")


# --------------------------------------------------------------------------- csv


class CsvSink:
    """metrics.csv in the run folder: one row per epoch, rewritten after each epoch (a killed run keeps its rows;
    a resumed one starts from the history in its checkpoint)."""

    def __init__(self, params: NoSinkParams, run: SinkRun) -> None:
        self.path = run.run_dir / "metrics.csv"
        # a resumed run starts from its checkpoint's history (the epochs before it), exactly as fit.history does
        self.rows: dict[int, dict[str, float]] = {
            int(row["epoch"]): {k: v for k, v in row.items() if k != "epoch"} for row in run.history}

    def write(self, event: Mapping[str, Any]) -> None:
        if event.get("event") != Event.EPOCH_COMPLETED:
            return
        epoch = int(event["epoch"])
        for later in [e for e in self.rows if e >= epoch]:
            del self.rows[later]
        self.rows[epoch] = epoch_metrics(event)
        from moola_engine.runs.folders import write_metrics_csv

        write_metrics_csv(self.path, [{"epoch": e, **m} for e, m in sorted(self.rows.items())])

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- tensorboard


@attrs.frozen(kw_only=True)
class TensorBoardParams:
    log_dir: str | None = None
    """Write to ``<log_dir>/<run-id>/`` (relative to the working directory); default ``<run folder>/tensorboard``."""


class TensorBoardSink:
    """TensorBoard event files: every epoch metric as a scalar, ``trainable/<group>`` (1 or 0) per epoch, and each
    freeze transition as text (tag ``freeze.transition``) at its epoch."""

    def __init__(self, params: TensorBoardParams, run: SinkRun) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(params.log_dir) / run.run_id if params.log_dir else run.run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.groups: list[str] = []

    def write(self, event: Mapping[str, Any]) -> None:
        name = event.get("event")
        if name == Event.GROUPS_RESOLVED:
            self.groups = [g["name"] for g in event.get("groups", [])]
        elif name == Event.EPOCH_COMPLETED:
            epoch = int(event["epoch"])
            for key, value in epoch_metrics(event).items():
                self.writer.add_scalar(key, value, epoch)
            trainable = set(event.get("trainable", []))
            for group in self.groups or sorted(trainable):
                self.writer.add_scalar(f"trainable/{group}", 1.0 if group in trainable else 0.0, epoch)
            self.writer.flush()
        elif name == Event.FREEZE_TRANSITION:
            self.writer.add_text("freeze.transition", transition_text(event), int(event.get("epoch") or 0))
        elif name in (Event.RUN_FINISHED, Event.RUN_FAILED):
            self.writer.add_text("run", f"{name}: {event.get('error') or event.get('stop_reason') or ''}".rstrip(": "),
                                 int(event.get("epoch") or 0))

    def close(self) -> None:
        self.writer.close()


# --------------------------------------------------------------------------- mlflow


@attrs.frozen(kw_only=True)
class MlflowParams:
    tracking_uri: str | None = None
    """Where MLflow stores runs, e.g. ``file:/path/mlruns`` or ``http://host:5000`` (default: MLflow's own,
    ``MLFLOW_TRACKING_URI``)."""
    experiment: str = "moola-engine"


class MlflowSink:
    """An MLflow run per training run: epoch metrics (step = epoch), ``trainable.<group>`` metrics, the strategy's
    params, one tag ``freeze.<n>`` per transition and the list of transitions as ``freeze_transitions.txt``."""

    def __init__(self, params: MlflowParams, run: SinkRun) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=params.tracking_uri)
        exp = self.client.get_experiment_by_name(params.experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(params.experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run.run_id, tags={
            "moola.run_id": run.run_id, "moola.strategy": run.strategy, "moola.run_dir": str(run.run_dir),
            "moola.resumed": str(run.resumed).lower()}).info.run_id
        self.groups: list[str] = []
        self.transitions: list[str] = []
        self.status = "RUNNING"

    def write(self, event: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric, Param

        name = event.get("event")
        if name == Event.STRATEGY_SELECTED:
            params = [Param("strategy.plugin", str(event.get("plugin")))]
            params += [Param(f"strategy.{k}", str(v)) for k, v in (event.get("params") or {}).items()]
            self.client.log_batch(self.run_id, params=params)
        elif name == Event.GROUPS_RESOLVED:
            self.groups = [g["name"] for g in event.get("groups", [])]
        elif name == Event.EPOCH_COMPLETED:
            epoch, now = int(event["epoch"]), int(time.time() * 1000)
            metrics = [Metric(k, v, now, epoch) for k, v in epoch_metrics(event).items() if math.isfinite(v)]
            trainable = set(event.get("trainable", []))
            metrics += [Metric(f"trainable.{g}", 1.0 if g in trainable else 0.0, now, epoch)
                        for g in self.groups or sorted(trainable)]
            self.client.log_batch(self.run_id, metrics=metrics)
        elif name == Event.FREEZE_TRANSITION:
            text = transition_text(event)
            self.client.set_tag(self.run_id, f"freeze.{len(self.transitions):02d}", text)
            self.transitions.append(text)
        elif name == Event.RUN_FINISHED:
            self.status = "FINISHED"
        elif name == Event.RUN_FAILED:
            self.status = "KILLED" if event.get("error_type") == "KeyboardInterrupt" else "FAILED"

    def close(self) -> None:
        if self.transitions:
            self.client.log_text(self.run_id, "\n".join(self.transitions) + "\n", "freeze_transitions.txt")
        self.client.set_terminated(self.run_id, status="FAILED" if self.status == "RUNNING" else self.status)


# --------------------------------------------------------------------------- registration (this module is a plugin)


@hookimpl
def register_sinks(register: Callable[..., None]) -> None:
    register("csv", CsvSink, description="metrics.csv in the run folder, one row per epoch")
    register("tensorboard", TensorBoardSink, params=TensorBoardParams, requires=("tensorboard",), extra="tensorboard",
             description="TensorBoard scalars per epoch, trainable/<group> and freeze transitions as text")
    register("mlflow", MlflowSink, params=MlflowParams, requires=("mlflow",), extra="mlflow",
             description="an MLflow run: metrics, strategy params, a tag per freeze transition")
