"""Structured events: one vocabulary, one processor chain, two outputs.

Every decision the engine takes is an event with a stable ``noun.verb`` name
from :class:`Event`.  A run writes them as JSON lines to
``runs/<run-id>/events.jsonl`` (for machines: ``moola-engine verify`` and the
ablation report read them back) and renders them for people on the console.
Both outputs come from the same processor chain: the JSON sink is a processor
that writes the finished event dict and passes it on to the console renderer.

``run_id``, ``strategy``, ``epoch`` and ``step`` are bound through structlog's
contextvars, never repeated at call sites.  Adding a field to an event is
fine; renaming an event breaks users' CI and needs a changelog entry.
"""

from __future__ import annotations

import enum
import json
import math
import os
import sys
from pathlib import Path
from typing import IO, Any, TextIO, cast

import structlog
from structlog.contextvars import bind_contextvars, clear_contextvars, merge_contextvars

__all__ = [
    "Event",
    "RunLog",
    "bind",
    "clear_contextvars",
    "get_logger",
    "read_events",
]


class Event(enum.StrEnum):
    """The declared event vocabulary.  Each has a heading in docs/events.md."""

    RUN_STARTED = "run.started"
    RUN_FINISHED = "run.finished"
    RUN_FAILED = "run.failed"
    CONFIG_LOADED = "config.loaded"
    CONFIG_OVERRIDE = "config.override"
    STRATEGY_SELECTED = "strategy.selected"
    PLAN_COMPUTED = "plan.computed"
    GROUPS_RESOLVED = "groups.resolved"
    DEVICE_SELECTED = "device.selected"
    EPOCH_COMPLETED = "epoch.completed"
    FREEZE_TRANSITION = "freeze.transition"
    LR_CHANGED = "lr.changed"
    EARLY_STOP = "early_stop.triggered"
    WEIGHTS_LOADED = "weights.loaded"
    WEIGHT_DELTA_CHECK = "weight_delta.check"
    WEIGHT_DELTA_VIOLATION = "weight_delta.violation"
    GRAD_FLOW_CHECK = "grad_flow.check"
    BN_STATS_CHECK = "bn_stats.check"
    CHECK_FAILED = "check.failed"
    RED_FLAG = "red_flag.raised"
    CHECKPOINT_SAVED = "checkpoint.saved"
    CHECKPOINT_FAILED = "checkpoint.failed"
    RESUME_CHECK = "resume.check"
    NONFINITE_DETECTED = "nonfinite.detected"
    PLUGIN_FAILED = "plugin.failed"
    DDP_CONSISTENCY = "ddp.consistency"
    BATCHED_STARTED = "batched.started"
    BATCHED_FALLBACK = "batched.fallback"
    DATA_LOADED = "data.loaded"
    PRETRAIN_STARTED = "pretrain.started"
    PRETRAIN_EPOCH = "pretrain.epoch"
    PRETRAIN_CUT_CHECK = "pretrain.cut_check"
    PRETRAIN_SAVED = "pretrain.saved"
    EVALUATION_COMPLETED = "evaluation.completed"
    # strategies and schedules (plugins/, freezing.py, plan.py)
    FREEZE_PARAMS = "freeze.params"
    STRATEGY_PLATEAU = "strategy.plateau"

    # verification (weights.py, checks.py, redflags.py, verify.py); weights.loaded, weight_delta.*,
    # grad_flow.check, bn_stats.check, check.failed and red_flag.raised are declared above
    WEIGHTS_CONTROL = "weights.control"
    LR_MASK_CHECK = "lr_mask.check"
    WEIGHTS_REVERIFIED = "weights.reverified"
    RESTORE_BEST_BEFORE_TRANSITION = "restore_best.before_transition"

    # reliability: checkpoints, resume, guards (docs/events.md "# reliability")
    CHECKPOINT_LOADED = "checkpoint.loaded"
    RUN_RESUMED = "run.resumed"

    # metric and event sinks (sinks.py)
    SINK_FAILED = "sink.failed"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if hasattr(obj, "tolist") and getattr(obj, "ndim", 0) > 0:  # numpy / torch arrays
        return _finite(obj.tolist())
    if hasattr(obj, "item"):  # numpy / torch scalars (a NaN one becomes "nan", as a float would)
        return _finite(obj.item())
    if isinstance(obj, (set, frozenset)):
        return _finite(list(obj))
    return repr(obj)


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so every line stays parseable (keys too)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {_finite(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_finite(v) for v in obj]
    return obj


class JsonlSink:
    """Processor: append the event dict as one JSON line, flushed, then pass it on.

    Flushing every line costs little (events are per epoch and per transition,
    never per step) and means the log survives a ``kill -9``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] | None = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        if self._fh is not None:
            try:  # the common case: no NaN/inf anywhere, no pass over the dict before encoding it
                line = json.dumps(event_dict, default=_json_default, allow_nan=False)
            except ValueError as exc:  # a NaN/inf somewhere: JSON has none, so write those as strings
                if "Out of range float" not in str(exc):
                    raise
                line = json.dumps(_finite(event_dict), default=_json_default, allow_nan=False)
            self._fh.write(line + "\n")
            self._fh.flush()
            if event_dict.get("event") in _FSYNC_EVENTS:
                os.fsync(self._fh.fileno())
        return event_dict

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


_FSYNC_EVENTS = {Event.FREEZE_TRANSITION.value, Event.RUN_FAILED.value, Event.RUN_FINISHED.value,
                 Event.CHECKPOINT_SAVED.value, Event.RUN_RESUMED.value, Event.NONFINITE_DETECTED.value}

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


# Routine events a person does not need on the console when they pass (the JSON log keeps every one):
# one line per epoch (epoch.completed) and every transition, warning and failure is what stays visible.
_CONSOLE_ROUTINE = {"weight_delta.check", "grad_flow.check", "bn_stats.check", "checkpoint.saved",
                    "ddp.consistency"}


class _ConsoleFilter:
    """Drop, from the console only (the sink saw them), events below the console level and passing routine
    checks (unless the console level is ``debug``)."""

    def __init__(self, level: str) -> None:
        self.level = _LEVELS[level]

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        level = _LEVELS.get(event_dict.get("level", "info"), 20)
        if level < self.level:
            raise structlog.DropEvent
        if (self.level > 10 and level < 30 and event_dict.get("event") in _CONSOLE_ROUTINE
                and event_dict.get("ok", True) is not False):
            raise structlog.DropEvent
        return event_dict


class _Capture:
    """Processor keeping every finished event dict in a list (tests, ablation)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        self.events.append(dict(event_dict))
        return event_dict


class RunLog:
    """The processor chain of one run: contextvars -> level -> time -> JSON sink -> console.

    ``console`` is ``"pretty"`` (structlog's ConsoleRenderer), ``"json"`` or
    ``"none"``.  ``capture=True`` also keeps the event dicts in :attr:`events`.
    """

    def __init__(
        self,
        events_path: Path | None,
        *,
        console: str = "pretty",
        console_level: str = "info",
        stream: IO[str] | None = None,
        capture: bool = False,
        sinks: Any = None,
    ) -> None:
        self.sink = JsonlSink(events_path) if events_path is not None else None
        self.sinks = sinks  # a moola_engine.runs.sinks.SinkFanout: metrics.csv, TensorBoard, MLflow, ...
        self.capture = _Capture() if capture else None
        processors: list[Any] = [
            merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ]
        if self.capture is not None:
            processors.append(self.capture)
        if self.sink is not None:
            processors.append(self.sink)
        if sinks is not None:  # after the JSON lines: a sink that fails cannot cost the log an event
            processors.append(sinks)
        out = stream if stream is not None else sys.stderr
        if console == "none":
            processors.append(_drop_all)
        else:
            processors.append(_ConsoleFilter(console_level))
            if console == "json":
                processors.append(structlog.processors.JSONRenderer(default=_json_default))
            else:
                processors.append(_compact_console)
                processors.append(
                    structlog.dev.ConsoleRenderer(colors=_colors(out), sort_keys=False, pad_event_to=22)
                )
        self.logger = structlog.wrap_logger(
            # structlog types the file as TextIO; PrintLogger only writes and flushes, which any IO[str] does
            structlog.PrintLogger(cast(TextIO, out)),
            processors=processors,
            wrapper_class=structlog.make_filtering_bound_logger(10),
            cache_logger_on_first_use=False,
        )
        if sinks is not None:
            sinks.logger = self.logger

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.capture.events if self.capture is not None else []

    def close(self) -> None:
        if self.sinks is not None:
            self.sinks.close()  # may still log sink.failed into events.jsonl
        if self.sink is not None:
            self.sink.close()


def _drop_all(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    raise structlog.DropEvent


def _compact_console(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """People do not need the run id and timestamp on every console line (the JSON has them), nor 17 digits."""
    for key in ("run_id", "timestamp"):
        event_dict.pop(key, None)
    return {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in event_dict.items()}


def _colors(stream: IO[str]) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


_NULL = RunLog(None, console="none")


def get_logger(runlog: RunLog | None = None) -> Any:
    """The bound logger of ``runlog``, or one that drops everything."""
    return (runlog or _NULL).logger


def bind(**values: Any) -> None:
    """Bind context (``run_id``, ``strategy``, ``epoch``, ``step``) for every following event."""
    bind_contextvars(**values)


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Read an events.jsonl back; a torn last line (killed mid-write) is skipped, others are errors."""
    from moola_engine.errors import MoolaError

    path = Path(path)
    if not path.is_file():
        raise MoolaError(f"{path}: no such event log")
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise MoolaError(f"{path}: cannot read the event log ({exc.strerror or exc})") from None
    events: list[dict[str, Any]] = []
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            event = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            if i == len(lines):  # torn inside a multi-byte character
                break
            raise MoolaError(f"{path}:{i}: not UTF-8 (byte {exc.start + 1} of the line: {raw[exc.start:exc.start + 1]!r}); "
                             "an event log is written as UTF-8 JSON lines") from None
        except json.JSONDecodeError as exc:
            if i == len(lines):
                break
            raise MoolaError(f"{path}:{i}: not a JSON event line ({exc.msg})") from exc
        if not isinstance(event, dict):
            raise MoolaError(f"{path}:{i}: not an event (a JSON object), got {type(event).__name__}")
        events.append(event)
    return events
