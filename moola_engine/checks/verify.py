"""``moola-engine verify``: re-read a run's event log and say, one line per failure, what went wrong.

A run fails verification when

* any check failed (``weight_delta.violation``, ``check.failed``, or a
  ``*.check`` event with ``ok = false``), or the run itself failed (a
  ``run.failed`` that a later ``run.resumed`` ... ``run.finished`` superseded,
  e.g. Ctrl-C or a NaN stop then ``train --resume``, is a note, not a failure);
* the run did not finish (no ``run.finished``: killed, or the log is cut);
* a required check never ran (default: ``weight_delta`` and ``grad_flow``:
  a run with the checks switched off proves nothing);
* an expectation of ``expect.toml`` is not met::

    [[expect]]
    group = "encoder.layer0"
    trainable_from_epoch = 10   # frozen in epochs 0-9, trainable from epoch 10
    frozen_before = 10          # bitwise unchanged in every epoch before 10
    moves_after = 10            # moved in every epoch from 10 on

    [weights]
    min_loaded = 8              # at least 8 tensors loaded from the pretrained file, each proven equal

A group with ``trainable_from_epoch`` or ``moves_after`` also fails when
``restore_best`` delivered weights from before its transition
(``restore_best.before_transition``).

Red flags (``red_flag.raised``) are listed as warnings; ``fail_on_red_flags =
true`` makes them failures.  Epochs count from 0, as in the event log.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from moola_engine.config import non_negative, positive, read_toml, structure
from moola_engine.logs import Event, read_events

CheckName = Literal["weight_delta", "grad_flow", "bn_stats"]


@attrs.frozen(kw_only=True)
class GroupExpectation:
    group: str
    trainable_from_epoch: int | None = attrs.field(default=None, validator=non_negative)
    """Frozen in every epoch before this one, trainable in this one."""
    frozen_before: int | None = attrs.field(default=None, validator=non_negative)
    """Bitwise unchanged in every epoch before this one."""
    moves_after: int | None = attrs.field(default=None, validator=non_negative)
    """Moved in every epoch from this one on (the run must reach it)."""
    never_trains: bool = False
    """Never trainable and never moved (a linear probe's encoder)."""


@attrs.frozen(kw_only=True)
class WeightsExpectation:
    min_loaded: int = attrs.field(default=1, validator=positive)
    exact: bool = True


@attrs.frozen(kw_only=True)
class Expectations:
    expect: list[GroupExpectation] = attrs.Factory(list)
    weights: WeightsExpectation | None = None
    require_checks: list[CheckName] = attrs.Factory(lambda: ["weight_delta", "grad_flow"])
    require_finished: bool = True
    fail_on_red_flags: bool = False


@attrs.define
class VerifyResult:
    failures: list[str] = attrs.Factory(list)
    warnings: list[str] = attrs.Factory(list)
    counts: dict[str, int] = attrs.Factory(dict)
    notes: list[str] = attrs.Factory(list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        checks = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))
        return "; ".join([f"checks: {checks or 'none'}", *self.notes])


def load_expectations(path: str | Path) -> Expectations:
    """Read and structure expect.toml (unknown keys and bad values are a ConfigError naming the key)."""
    return structure(read_toml(path), Expectations, source=str(path))


def events_path(path: str | Path) -> Path:
    """A run folder or its events.jsonl."""
    p = Path(path)
    return p / "events.jsonl" if p.is_dir() else p


def verify_events(events: Iterable[Mapping[str, Any]], expect: Expectations | None = None) -> VerifyResult:
    """Every failure of a run's log against the built-in rules and ``expect``."""
    expect = expect or Expectations()
    events = list(events)
    res = VerifyResult()
    by_name: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for e in events:
        by_name[str(e.get("event"))].append(e)

    # --- the run itself: a failed attempt that a later resume carried to run.finished is history, not a failure
    for i, e in enumerate(events):
        if e.get("event") != Event.RUN_FAILED:
            continue
        if _superseded(events, i):
            res.notes.append(f"an earlier attempt failed ({e.get('error', '?')}); a resume finished the run")
        else:
            res.failures.append(f"run failed: {e.get('error', '?')}")
    if expect.require_finished and not by_name[Event.RUN_FINISHED] and not by_name[Event.RUN_FAILED]:
        res.failures.append("run did not finish: no run.finished event (killed, or the log is cut)")

    # --- failed checks
    messages = [e for e in events if e.get("event") in (Event.WEIGHT_DELTA_VIOLATION, Event.CHECK_FAILED)]
    seen: set[str] = set()
    for e in messages:
        msg = str(e.get("message", "?"))
        if msg not in seen:
            seen.add(msg)
            res.failures.append(f"{_where(e)}{msg}")
    for name in ("weight_delta", "grad_flow", "bn_stats"):
        evs = by_name[f"{name}.check"]
        res.counts[name] = len(evs)
        bad = [e for e in evs if e.get("ok") is False]
        if bad and not messages:
            for e in bad:
                res.failures.append(f"{_where(e)}{name}.check failed for group {e.get('group')}")
    for name in expect.require_checks:
        if not by_name[f"{name}.check"]:
            res.failures.append(f"no {name}.check events: the {name} check did not run (checks.{name} = false?)")

    # --- pretrained weights
    loaded = by_name[Event.WEIGHTS_LOADED]
    if loaded:
        e = loaded[-1]
        res.notes.append(f"weights: {e.get('loaded')} tensors loaded{' (exact)' if e.get('exact') else ''}")
    if by_name[Event.WEIGHTS_CONTROL]:
        res.notes.append("random-encoder control run")
    if expect.weights is not None:
        if not loaded:
            why = " (this is the random-encoder control run)" if by_name[Event.WEIGHTS_CONTROL] else ""
            res.failures.append(f"no weights.loaded event: pretrained weights were not loaded{why}")
        else:
            e = loaded[-1]
            n = int(e.get("loaded", 0))
            if n < expect.weights.min_loaded:
                res.failures.append(f"weights: {n} tensor(s) loaded, expected at least {expect.weights.min_loaded}")
            if expect.weights.exact and not e.get("exact"):
                res.failures.append("weights: the loaded tensors are not proven equal to the file (exact = false)")

    # --- per-group expectations
    groups = _groups(events)
    epochs = _epochs(by_name[Event.WEIGHT_DELTA_CHECK])
    for x in expect.expect:
        if groups and x.group not in groups:
            res.failures.append(f"expect: group {x.group!r} is not a group of this run (groups: {', '.join(groups)})")
            continue
        res.failures += _group_failures(x, epochs.get(x.group, {}), _last_epoch(events))
        res.failures += _restored_before(x, by_name[Event.RESTORE_BEST_BEFORE_TRANSITION])

    # --- red flags
    for e in by_name[Event.RED_FLAG]:
        line = f"red flag: {e.get('message', e.get('code', '?'))}"
        (res.failures if expect.fail_on_red_flags else res.warnings).append(line)
    return res


def verify_file(path: str | Path, expect: Expectations | str | Path | None = None) -> VerifyResult:
    if isinstance(expect, (str, Path)):
        expect = load_expectations(expect)
    return verify_events(read_events(events_path(path)), expect)


# --------------------------------------------------------------------------- helpers


def _superseded(events: list[Mapping[str, Any]], i: int) -> bool:
    """Event ``i`` (a run.failed) is followed by a run.resumed and, after that, a run.finished."""
    resumed = next((j for j in range(i + 1, len(events)) if events[j].get("event") == Event.RUN_RESUMED), None)
    return resumed is not None and any(e.get("event") == Event.RUN_FINISHED for e in events[resumed + 1:])


def _where(e: Mapping[str, Any]) -> str:
    return f"epoch {e['epoch']}: " if isinstance(e.get("epoch"), int) else ""


def _groups(events: list[Mapping[str, Any]]) -> list[str]:
    for e in events:
        if e.get("event") == Event.GROUPS_RESOLVED:
            return [g["name"] for g in e.get("groups", [])]
    return []


def _last_epoch(events: list[Mapping[str, Any]]) -> int | None:
    epochs = [e.get("epoch") for e in events if e.get("event") == Event.EPOCH_COMPLETED]
    done = [d for d in epochs if isinstance(d, int)]
    return max(done) if done else None


def _epochs(checks: list[Mapping[str, Any]]) -> dict[str, dict[int, dict[str, bool]]]:
    """group -> epoch -> {trainable: any interval trainable, moved: any interval moved}, from interval checks."""
    out: dict[str, dict[int, dict[str, bool]]] = defaultdict(dict)
    for e in checks:
        if e.get("scope") != "interval" or not e.get("steps"):
            continue
        row = out[e["group"]].setdefault(int(e["epoch"]), {"trainable": False, "moved": False})
        row["trainable"] |= bool(e.get("trainable"))
        row["moved"] |= bool(e.get("moved"))
    return out


def _list(epochs: list[int]) -> str:
    return ", ".join(map(str, epochs[:6])) + (", ..." if len(epochs) > 6 else "")


def _restored_before(x: GroupExpectation, events: list[Mapping[str, Any]]) -> list[str]:
    """A group expected to train, whose delivered weights ``restore_best`` took from before its transition."""
    if x.moves_after is None and x.trainable_from_epoch is None:
        return []
    out = []
    for e in events:
        hits = [t for t in e.get("transitions", []) if t.get("group") == x.group]
        if hits:
            out.append(f"{x.group}: restore_best delivered the weights of epoch {e.get('best_epoch')}, from before its "
                       f"transition at epoch {hits[0].get('epoch')}: the delivered model never had it fine-tuned "
                       "(set train.restore_best = false)")
    return out


def _group_failures(x: GroupExpectation, rows: dict[int, dict[str, bool]], last: int | None) -> list[str]:
    g = x.group
    if not rows:
        return [f"{g}: no weight_delta.check events for this group (checks.weight_delta = false, or no epoch ran)"]
    out: list[str] = []
    ran = sorted(rows)
    end = last if last is not None else ran[-1]
    trained = [e for e in ran if rows[e]["trainable"]]
    moved = [e for e in ran if rows[e]["moved"]]
    if x.trainable_from_epoch is not None:
        n = x.trainable_from_epoch
        if not trained:
            out.append(f"{g}: expected trainable from epoch {n}, but it never trained (epochs 0-{end})")
        elif trained[0] != n:
            out.append(f"{g}: expected trainable from epoch {n}, but it first trained in epoch {trained[0]}")
    if x.frozen_before is not None:
        n = x.frozen_before
        early = [e for e in moved if e < n]
        if early:
            out.append(f"{g}: expected frozen before epoch {n}, but its weights moved in epoch(s) {_list(early)}")
    if x.moves_after is not None:
        n = x.moves_after
        if end < n:
            out.append(f"{g}: expected to move from epoch {n} on, but the run ended after epoch {end}")
        else:
            still = [e for e in ran if e >= n and not rows[e]["moved"]]
            if still:
                out.append(f"{g}: expected to move in every epoch from {n} on, but it did not move in epoch(s) {_list(still)}")
    if x.never_trains:
        if trained:
            out.append(f"{g}: expected never to train, but it was trainable in epoch(s) {_list(trained)}")
        if moved:
            out.append(f"{g}: expected never to move, but it moved in epoch(s) {_list(moved)}")
    return out
