"""Reading run folders back for ``moola-engine runs``: list, show, compare.

Everything comes from the run folder (``events.jsonl`` first, ``result.json``
when present), never from a process's memory, so a finished, failed, killed
or still-running run reads the same way.

Status of a run (its last ``run.started``/``run.resumed`` decides):

* ``finished``: a ``run.finished`` event follows it;
* ``failed``: a ``run.failed`` event follows it (any error but Ctrl-C);
* ``interrupted``: ``run.failed`` with ``error_type = KeyboardInterrupt``, or no
  terminal event and the process that wrote the log (``pid`` and ``host`` of
  ``run.started``) is gone from this host;
* ``running``: no terminal event and the process is alive, or it ran on
  another host (or wrote no pid), so its end cannot be proved from here.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

from moola_engine.config import closest
from moola_engine.errors import MoolaError
from moola_engine.logs import Event, read_events

STATUSES = ("finished", "failed", "interrupted", "running")
_CHECK_EVENTS = {Event.WEIGHT_DELTA_CHECK.value, Event.WEIGHT_DELTA_VIOLATION.value, Event.GRAD_FLOW_CHECK.value,
                 Event.BN_STATS_CHECK.value, Event.DDP_CONSISTENCY.value, Event.PRETRAIN_CUT_CHECK.value,
                 Event.RESUME_CHECK.value}
_NOT_METRICS = {"epoch", "step"}


@attrs.define(kw_only=True)
class RunInfo:
    """One run folder as read back from its event log."""

    id: str
    path: Path
    strategy: str | None = None
    status: str = "running"
    error: str | None = None
    started: str | None = None
    epochs_run: int = 0
    epochs_planned: int | None = None
    best_metric: str | None = None
    best_value: float | None = None
    best_epoch: int | None = None
    checks_passed: int = 0
    checks_failed: int = 0
    check_failures: list[str] = attrs.Factory(list)
    checks_by_event: dict[str, dict[str, int]] = attrs.Factory(dict)
    groups: list[str] = attrs.Factory(list)
    planned: list[dict[str, bool]] = attrs.Factory(list)
    """Per planned epoch: group -> trainable (from ``plan.computed``)."""
    observed: dict[int, list[str]] = attrs.Factory(dict)
    """Per epoch run: the groups that trained (from ``epoch.completed``)."""
    planned_transitions: list[dict[str, Any]] = attrs.Factory(list)
    transitions: list[dict[str, Any]] = attrs.Factory(list)
    history: dict[int, dict[str, float]] = attrs.Factory(dict)
    final: dict[str, float] = attrs.Factory(dict)
    resumed: int = 0

    def timeline(self, group: str, observed: bool = True) -> str:
        """One character per epoch: ``#`` the group trained, ``-`` it was frozen, ``.`` not run (planned only)."""
        if observed:
            last = max(self.observed, default=-1)
            return "".join(("#" if group in self.observed[e] else "-") if e in self.observed else "."
                           for e in range(last + 1))
        return "".join("#" if row.get(group) else "-" for row in self.planned)

    def to_json(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["path"] = str(self.path)
        out["observed"] = {str(k): v for k, v in self.observed.items()}
        out["history"] = {str(k): v for k, v in self.history.items()}
        out["timelines"] = {g: {"planned": self.timeline(g, observed=False), "observed": self.timeline(g)}
                            for g in self.groups}
        return _json_safe_dict(out)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _json_safe_dict(obj: dict[str, Any]) -> dict[str, Any]:
    """:func:`_json_safe` of a dict, typed as one."""
    return {k: _json_safe(v) for k, v in obj.items()}


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if value in ("nan", "inf", "-inf"):  # the event log writes non-finite floats as strings
        return float(value)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process holds that pid: alive
        return True
    except OSError:
        return False
    return True


def _best(info: RunInfo, config: dict[str, Any]) -> None:
    """The early-stopping metric when the run has one, else val_accuracy (max), else val_loss, else train_loss."""
    es = (config.get("train") or {}).get("early_stopping") if isinstance(config, dict) else None
    keys = {k for row in info.history.values() for k in row}
    choice: tuple[str, str] | None = None
    if isinstance(es, dict) and es.get("metric") in keys:
        choice = (es["metric"], es.get("mode", "min"))
    else:
        for key, mode in (("val_accuracy", "max"), ("val_loss", "min"), ("train_loss", "min")):
            if key in keys:
                choice = (key, mode)
                break
    if choice is None:
        return
    key, mode = choice
    values = [(e, row[key]) for e, row in sorted(info.history.items()) if key in row and math.isfinite(row[key])]
    info.best_metric = key
    if values:
        pick = max if mode == "max" else min
        info.best_epoch, info.best_value = pick(values, key=lambda ev: ev[1])


def read_run(path: str | Path) -> RunInfo:
    """Read one run folder (``runs/<id>/``) back; a folder without events.jsonl is an error naming it."""
    path = Path(path)
    events = read_events(path / "events.jsonl")
    info = RunInfo(id=path.name, path=path)
    config: dict[str, Any] = {}
    terminal: dict[str, Any] | None = None
    opener: dict[str, Any] | None = None
    for e in events:
        name = e.get("event")
        if name in (Event.RUN_STARTED, Event.RUN_RESUMED):
            opener, terminal = e, None
            info.started = info.started or e.get("timestamp")
            info.strategy = e.get("strategy", info.strategy)
            if name == Event.RUN_RESUMED:
                info.resumed += 1
        elif name in (Event.RUN_FINISHED, Event.RUN_FAILED):
            terminal = e
        elif name == Event.CONFIG_LOADED and isinstance(e.get("config"), dict):
            config = e["config"]
        elif name == Event.GROUPS_RESOLVED:
            info.groups = [str(g.get("name")) for g in e.get("groups", []) if isinstance(g, dict)]
        elif name == Event.PLAN_COMPUTED and isinstance(e.get("plan"), dict):
            plan = e["plan"]
            info.planned = [dict(row.get("trainable", {})) for row in plan.get("epochs", [])]
            info.planned_transitions = [dict(t) for t in plan.get("transitions", [])]
            info.groups = info.groups or list(plan.get("groups", []))
        elif name == Event.EPOCH_COMPLETED and isinstance(e.get("epoch"), int):
            epoch = e["epoch"]
            info.observed[epoch] = list(e.get("trainable", []))
            metrics = {k: v for k, v in ((k, _number(v)) for k, v in e.items() if k not in _NOT_METRICS)
                       if v is not None}
            info.history[epoch] = metrics
            # a resumed run replays from its checkpoint: later epochs of the lost attempt are gone
            for later in [k for k in info.observed if k > epoch]:
                info.observed.pop(later)
                info.history.pop(later, None)
        elif name == Event.FREEZE_TRANSITION:
            info.transitions.append({k: e.get(k) for k in ("epoch", "group", "from_state", "to_state", "lr", "reason")})
        if name in _CHECK_EVENTS or name == Event.CHECK_FAILED:
            ok = e.get("ok")
            counts = info.checks_by_event.setdefault(str(name), {"passed": 0, "failed": 0})
            if ok is True:
                info.checks_passed += 1
                counts["passed"] += 1
            elif ok is False:
                info.checks_failed += 1
                counts["failed"] += 1
            if name in (Event.CHECK_FAILED, Event.WEIGHT_DELTA_VIOLATION) and e.get("message"):
                info.check_failures.append(str(e["message"]))
            if not counts["passed"] and not counts["failed"]:
                info.checks_by_event.pop(str(name))
    if not info.checks_failed and info.check_failures:  # failures reported only as messages
        info.checks_failed = len(info.check_failures)
    info.epochs_run = len(info.observed)
    train_cfg: dict[str, Any] = config["train"] if isinstance(config.get("train"), dict) else {}
    info.epochs_planned = len(info.planned) or train_cfg.get("epochs")
    if info.strategy is None:
        info.strategy = _config_json(path).get("strategy")
    _best(info, config)
    _status(info, opener, terminal)
    info.final = _final(path, info)
    return info


def _config_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _status(info: RunInfo, opener: dict[str, Any] | None, terminal: dict[str, Any] | None) -> None:
    if terminal is not None:
        if terminal.get("event") == Event.RUN_FINISHED:
            info.status = "finished"
        elif terminal.get("error_type") == "KeyboardInterrupt":
            info.status, info.error = "interrupted", "KeyboardInterrupt (Ctrl-C)"
        else:
            info.status, info.error = "failed", str(terminal.get("error"))
        return
    pid, host = (opener or {}).get("pid"), (opener or {}).get("host")
    if isinstance(pid, int) and host == socket.gethostname() and not _pid_alive(pid):
        info.status, info.error = "interrupted", f"process {pid} ended without a run.finished or run.failed event"
    else:
        info.status = "running"


def _final(path: Path, info: RunInfo) -> dict[str, float]:
    """The last epoch's metrics and the test metrics (result.json when the run finished)."""
    final = dict(info.history[max(info.history)]) if info.history else {}
    try:
        result = json.loads((path / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        result = {}
    if isinstance(result, dict):
        for k, v in (result.get("test") or {}).items():
            num = _number(v)
            if num is not None:
                final[k] = num
    return final


# --------------------------------------------------------------------------- finding runs


def run_folders(runs_dir: str | Path) -> list[Path]:
    """Run folders under ``runs_dir`` (those holding events.jsonl), oldest first; ``latest`` and dot folders skipped."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise MoolaError(f"--runs-dir {root}: no such folder (train writes run folders under run.runs_dir, default runs)")
    found = [p for p in root.iterdir()
             if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and (p / "events.jsonl").is_file()]
    return sorted(found, key=lambda p: ((p / "events.jsonl").stat().st_mtime, p.name))


def resolve_run(ref: str, runs_dir: str | Path) -> Path:
    """A run named by id (folder name under ``runs_dir``, or a unique prefix of one), folder path, ``latest``, or
    ``latest~N`` (the N-th run before the newest, oldest-first order of :func:`run_folders`)."""
    try:
        return _resolve_run(ref, runs_dir)
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte, a folder that cannot be read
        raise MoolaError(f"run {ref[:80]!r} in {str(runs_dir)[:80]!r}: {getattr(exc, 'strerror', None) or exc}") from exc


def _resolve_run(ref: str, runs_dir: str | Path) -> Path:
    root = Path(runs_dir)
    back = re.fullmatch(r"latest~(\d+)", ref)
    if back:
        folders = run_folders(root) if root.is_dir() else []
        n = int(back.group(1))
        if n >= len(folders):
            raise MoolaError(f"run {ref!r}: {root} holds {len(folders)} run(s), so there is no run {n} before the newest")
        return folders[-1 - n]
    as_path = Path(ref)
    if as_path.is_dir() and (as_path / "events.jsonl").is_file():
        return as_path
    if as_path.name == "events.jsonl" and as_path.is_file():
        return as_path.parent
    if ref == "latest":
        link = root / "latest"
        if link.is_dir() and (link / "events.jsonl").is_file():
            return link.resolve()
        folders = run_folders(root)
        if not folders:
            raise MoolaError(f"run 'latest': no run folders in {root}")
        return folders[-1]
    if (root / ref / "events.jsonl").is_file():
        return root / ref
    folders = run_folders(root) if root.is_dir() else []
    names = [p.name for p in folders]
    matches = [p for p in folders if p.name.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise MoolaError(f"run {ref!r} is ambiguous in {root}: {', '.join(p.name for p in matches)}")
    hint = closest(ref, names)
    msg = f"run {ref!r}: not a run folder (no events.jsonl) and no run of that id in {root}"
    if hint:
        msg += f'; did you mean "{hint}"?'
    elif names:
        msg += f" (runs there: {len(names)}; see moola-engine runs list --runs-dir {root})"
    raise MoolaError(msg)


def read_runs(refs: Iterable[str], runs_dir: str | Path) -> list[RunInfo]:
    return [read_run(resolve_run(ref, runs_dir)) for ref in refs]


# --------------------------------------------------------------------------- rendering


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (no colour, no box drawing): it pastes into logs and issues as is."""
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)


def list_rows(infos: Sequence[RunInfo]) -> list[list[Any]]:
    rows = []
    for r in infos:
        best = f"{r.best_metric}={_fmt(r.best_value)} @{r.best_epoch}" if r.best_value is not None else "-"
        planned = r.epochs_planned if r.epochs_planned is not None else "?"
        rows.append([r.id, r.strategy, r.status, f"{r.epochs_run}/{planned}", best,
                     f"{r.checks_passed}/{r.checks_failed}"])
    return rows


LIST_HEADER = ("id", "strategy", "status", "epochs", "best", "checks ok/failed")


def render_show(r: RunInfo) -> str:
    out = [f"run {r.id}  ({r.path})",
           f"strategy {r.strategy}  status {r.status}  epochs {r.epochs_run}/{_fmt(r.epochs_planned)}"
           + (f"  resumed {r.resumed}x" if r.resumed else "")]
    if r.error:
        out.append(f"error: {r.error}")
    out.append("")
    out.append("plan against what happened (groups that train; * = differs from the plan):")
    epochs = max(len(r.planned), max(r.observed, default=-1) + 1)
    rows = []
    for e in range(epochs):
        planned = sorted(g for g, t in (r.planned[e] if e < len(r.planned) else {}).items() if t)
        observed = sorted(r.observed[e]) if e in r.observed else None
        mark = "*" if observed is not None and e < len(r.planned) and observed != planned else ""
        rows.append([e, ", ".join(planned) or "(none)", "not run" if observed is None else ", ".join(observed) or "(none)",
                     mark])
    out.append(table(("epoch", "planned", "observed", ""), rows))
    out.append("")
    out.append("transitions (planned | observed):")
    trows = [[t.get("epoch"), t.get("group"), t.get("to_state"), t.get("reason"), "planned"] for t in r.planned_transitions]
    trows += [[t.get("epoch"), t.get("group"), t.get("to_state"), t.get("reason"), "observed"] for t in r.transitions]
    trows.sort(key=lambda row: (row[0] if isinstance(row[0], int) else -1, str(row[1]), row[4] != "planned"))
    out.append(table(("epoch", "group", "to", "reason", "source"), trows) if trows else "  (none)")
    out.append("")
    out.append(f"checks: {r.checks_passed} passed, {r.checks_failed} failed")
    for name, c in sorted(r.checks_by_event.items()):
        out.append(f"  {name}: {c['passed']} passed, {c['failed']} failed")
    out.extend(f"  FAIL {msg}" for msg in r.check_failures)
    out.append("")
    out.append("final metrics:" if r.final else "final metrics: (no epoch completed)")
    out.extend(f"  {k} = {_fmt(v)}" for k, v in sorted(r.final.items()))
    return "\n".join(out)


def compare_json(infos: Sequence[RunInfo]) -> dict[str, Any]:
    keys = sorted({k for r in infos for k in r.final})
    groups = list(dict.fromkeys(g for r in infos for g in r.groups))
    return _json_safe_dict({
        "runs": [r.id for r in infos],
        "status": {r.id: r.status for r in infos},
        "best": {r.id: {"metric": r.best_metric, "value": r.best_value, "epoch": r.best_epoch} for r in infos},
        "metrics": {k: {r.id: r.final.get(k) for r in infos} for k in keys},
        "timelines": {r.id: {g: r.timeline(g) for g in groups if g in r.groups} for r in infos},
        "transitions": {r.id: r.transitions for r in infos},
    })


def render_compare(infos: Sequence[RunInfo]) -> str:
    data = compare_json(infos)
    ids = data["runs"]
    labels = [f"[{i + 1}]" for i in range(len(ids))]
    out = [f"{label} {rid} ({infos[i].strategy}, {infos[i].status})" for i, (label, rid) in enumerate(zip(labels, ids))]
    out.append("")
    rows = [[k, *[data["metrics"][k][rid] for rid in ids]] for k in data["metrics"]]
    rows.append(["best", *[f"{r.best_metric}={_fmt(r.best_value)} @{r.best_epoch}" if r.best_value is not None else "-"
                           for r in infos]])
    out.append(table(("metric", *labels), rows))
    out.append("")
    out.append("freeze timelines (one character per epoch: # trains, - frozen):")
    groups = list(dict.fromkeys(g for r in infos for g in r.groups))
    trows = [[label, g, r.timeline(g)] for label, r in zip(labels, infos) for g in groups if g in r.groups]
    out.append(table(("run", "group", "epochs"), trows))
    return "\n".join(out)
