"""Verification observers: what should train trained, what should stay frozen stayed bitwise frozen.

Four observer plugins, registered by :func:`moola_engine.runs.observers.build_observers`
from ``[checks]``; their hook implementations are ``trylast`` so they see the
state after the strategy acted.  They work with every strategy: they read the
freezer's state, never a strategy's parameters.

:class:`WeightDeltaCheck` (``checks.weight_delta``)
    Snapshots every group at fit start, at every freeze transition and at every
    epoch end (every N-th with ``checks.every``, always when a checkpoint is
    written, and at fit end).  At each of these points, for the steps since the last one: a
    frozen group must be bitwise unchanged, a trainable group must have moved.
    One ``weight_delta.check`` event per group (``scope = "interval"``); at a
    group's transition and at fit end, one more for the whole phase it leaves
    (``scope = "phase"``); at fit end, one per group the strategy promised to
    train (``scope = "fit"``).  A failure is ``weight_delta.violation``.

:class:`GradFlowCheck` (``checks.grad_flow``)
    After the first optimizer step of every phase (fit start and after each
    transition): each trainable parameter has a finite, non-zero gradient and
    sits, by identity, in an optimizer param group with lr > 0; each frozen
    parameter has ``requires_grad = False`` and grad None (a zeroed grad still
    feeds AdamW's weight decay and momentum).  One ``grad_flow.check`` per group.

:class:`BnStatsCheck` (``checks.bn_stats``)
    BatchNorm running statistics of frozen groups must not change (unless
    ``train.train_bn = true`` asks them to).  One ``bn_stats.check`` per group
    that has BatchNorm, at the same points as the weight-delta check.

:class:`LrMaskCheck` (``checks.lr_mask``)
    At each epoch's validation end, before the strategy acts on it: every
    group's live optimizer lr against the plan's lr x the lr schedule's
    declared factor, and every parameter's ``requires_grad`` against the plan's
    trainable mask.  One ``lr_mask.check`` event per group per epoch.

Failures are logged at error level (``weight_delta.violation`` or
``check.failed``, with a one-line ``message``); with ``checks.strict`` (the
default) the run then stops with :class:`~moola_engine.errors.CheckFailed`
(exit code 3).  Checks never run per step except the one gradient check per
phase (the engine calls its ``after_step`` on those steps only:
``engine.want_step_hooks``), and read results back from the device in one sync
per check.  The snapshots (:mod:`.snapshots`) are flat buffers refreshed in
place by each interval's comparison; fingerprints are taken once per group per
hook call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from moola_engine.checks.snapshots import SMALL, ExactStore, Store, make_store, same_bits
from moola_engine.config import ChecksConfig
from moola_engine.core.freezing import _BN_TYPES, ParamGroup
from moola_engine.core.hookspecs import hookimpl
from moola_engine.errors import CheckFailed
from moola_engine.logs import Event


def _num(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


class _Observer:
    check = "?"

    def __init__(self, checks: ChecksConfig | None = None) -> None:
        self.cfg = checks or ChecksConfig()

    def _fail(self, engine: Any, messages: list[str]) -> None:
        if messages and self.cfg.strict:
            raise CheckFailed(f"{self.check} check failed: " + "; ".join(messages))


# --------------------------------------------------------------------------- snapshot-based checks


class _DeltaObserver(_Observer):
    """Shared driver: snapshot at fit start / transitions / epoch ends and check each interval."""

    store: Store

    def _named(self, engine: Any, group: ParamGroup) -> list[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def _expected(self, engine: Any, group: str, trainable: bool, steps: int) -> str:
        """``zero`` | ``nonzero`` | ``any``."""
        raise NotImplementedError

    def _groups(self, engine: Any) -> list[ParamGroup]:
        return [g for g in engine.groups if self._named(engine, g)]

    def _compared(self, engine: Any, group: ParamGroup, snap: Any) -> list[tuple[str, torch.Tensor]]:
        """The group's tensors to compare with ``snap``: the ones it was taken of.

        The set :meth:`_named` gives can change between two snapshots (``freeze_params`` or
        ``clear_param_mask`` mid-run): the interval is judged by what was checked when it began."""
        names = list(snap.names) if hasattr(snap, "names") else list(snap)
        pool = {**dict(group.params), **dict(self._named(engine, group))}
        return [(n, pool[n]) for n in names if n in pool]

    def _start(self, engine: Any) -> None:
        self.store = make_store(self.cfg.snapshots)
        self._begin()
        self._before_refs(engine)
        self._take_refs(engine)
        self.moved = dict.fromkeys(self.ref, False)

        def mask_changed(group: str, when: str) -> None:
            # a mask set or released mid-run ends an interval, like a transition: judge the steps before it
            # by the old mask, start the next interval with the new one
            if when == "before":
                self._begin()  # what the last check measured no longer stands for the weights now
                self._checkpoint(engine, reason=f"mask {group}")
            else:
                self._take_refs(engine)

        listeners = engine.freezer.mask_listeners
        listeners[:] = [fn for fn in listeners if getattr(fn, "observer", None) is not self]
        mask_changed.observer = self  # type: ignore[attr-defined]
        listeners.append(mask_changed)

    def _before_refs(self, engine: Any) -> None:
        """At fit start, before the first snapshots are taken."""

    def _snapshot(self, group: str, named: list[tuple[str, torch.Tensor]]) -> Any:
        """A snapshot of ``named`` (the group's checked tensors) as they are now."""
        return self.store.take(named)

    def _take_refs(self, engine: Any) -> None:
        groups = self._groups(engine)
        self.ref = {g.name: self._snapshot(g.name, self._named(engine, g)) for g in groups}
        self.ref_state = {g.name: engine.freezer.is_trainable(g.name) for g in groups}
        self.ref_lr = {g.name: self._opt_lr(engine, g.name) for g in groups}
        self.ref_step = engine.step

    @staticmethod
    def _opt_lr(engine: Any, group: str) -> float:
        return float(engine.optimizer.param_groups[engine.freezer.groups.index(group)]["lr"])

    def _measure(self, engine: Any, snaps: dict[str, Any], names: Iterable[str],
                 taken: dict[str, Any] | None = None) -> dict[str, list[float]]:
        """[changed, max |dw|, ||dw||, ||dw|| / ||w0||] per group since ``snaps``, read back in one host sync.

        ``taken``, when given, receives each group's snapshot as it is now (the copy the comparison made).
        """
        by_name = {g.name: g for g in engine.groups}
        deltas = {}
        compare = getattr(self.store, "compare", None)  # fingerprints: compare two snapshots without a pass
        for n in names:
            named = self._compared(engine, by_name[n], snaps[n])
            if not named:
                continue  # nothing of the group is still checked here (a mask released: MaskedParamsCheck)
            if compare is not None:
                if n not in self._fresh or list(self._fresh[n]) != [name for name, _ in named]:
                    self._fresh[n] = (self._known_fingerprint(n, named)
                                      or self.store.take(named, light=self._light(engine, n)))  # type: ignore[call-arg]  # fingerprint stores only
                deltas[n] = compare(snaps[n], self._fresh[n], engine.device)
                if taken is not None:
                    taken[n] = self._fresh[n]
                continue
            unchanged = self._unchanged_now.get(n)
            if unchanged is not None and unchanged[0] is snaps[n]:
                # compared with this very snapshot earlier in this hook call and found unchanged (a transition:
                # the phase snapshot is still the interval snapshot): it stands for now, no second pass
                deltas[n] = unchanged[1]
                if taken is not None:
                    taken[n] = snaps[n]
                self._measured(n, snaps[n], deltas[n])
                continue
            if taken is None:
                deltas[n] = self.store.delta(snaps[n], named, engine.device)
                if deltas[n].host_values is not None and not deltas[n].host_values[0]:
                    self._unchanged_now[n] = (snaps[n], deltas[n])
                self._measured(n, snaps[n], deltas[n])
                continue
            # the old snapshot is given up: the exact store refreshes its buffers in place (no allocation),
            # unless another snapshot (a phase start) still holds the same object
            reuse = not self._held(n, snaps[n])
            against = self._against(n, named)
            deltas[n], taken[n] = self.store.delta_and_take(snaps[n], named, engine.device, reuse=reuse,
                                                            against=None if against is snaps[n] else against)
            self._measured(n, snaps[n], deltas[n])
        if not deltas:
            return {}
        if all(d.host_values is not None for d in deltas.values()):  # the CPU path: floats already
            return {n: d.as_list() for n, d in deltas.items()}
        values = torch.stack([d.as_tensor() for d in deltas.values()]).tolist()  # the one host sync of this check
        return dict(zip(deltas, values, strict=True))

    _fresh: dict[str, Any]
    """Fingerprint mode: each group's fingerprint as it is now, taken once per hook call (cleared at each hook)."""

    def _begin(self) -> None:
        """At each hook call: what was measured in the previous one no longer stands for the weights now."""
        self._fresh = {}
        self._unchanged_now: dict[str, tuple[Any, Any]] = {}  # exact: group -> (snapshot, Delta) found equal

    def _unchanged(self, groups: list[str]) -> None:
        """Groups an interval check has just found bitwise unchanged (exact; fingerprint: no checksum changed)."""

    def _held(self, group: str, snap: Any) -> bool:
        """True when ``snap`` is kept elsewhere too (so it must not be refreshed in place)."""
        return False

    def _against(self, group: str, named: list[tuple[str, torch.Tensor]]) -> Any:
        """A second snapshot the interval comparison should also measure the distance to (None: none)."""
        return None

    def _known_fingerprint(self, group: str, named: list[tuple[str, torch.Tensor]]) -> Any:
        """Fingerprint mode: the fingerprints of ``named`` as they are now without a pass over them, when
        they are known (None: take them)."""
        return None

    def _light(self, engine: Any, group: str) -> bool:
        """Fingerprint mode: True when the fingerprints taken of ``group`` now may be light (no checksums,
        :meth:`FingerprintStore.compare`): only where every comparison they take part in expects a change."""
        return False

    def _measured(self, group: str, snap: Any, delta: Any) -> None:
        """An interval comparison of ``group`` against ``snap`` gave ``delta`` (with ``delta.against_sq`` when
        :meth:`_against` asked for it and the group moved)."""

    def _checkpoint(self, engine: Any, reason: str) -> None:
        if not self.ref:  # nothing of any group is checked here (no BatchNorm, no mask): nothing to compare
            self.ref_step = engine.step  # a mask set later retakes the snapshots (mask_changed)
            return
        steps = engine.step - self.ref_step
        taken: dict[str, Any] = {}
        measured = self._measure(engine, self.ref, self.ref, taken)
        self._unchanged([n for n, row in measured.items() if not row[0]])
        failures: list[str] = []
        for name, (changed, max_abs, _norm, rel) in measured.items():
            trainable = self.ref_state[name]
            expected = self._expected(engine, name, trainable, steps)
            moved = bool(changed)
            self.moved[name] = self.moved.get(name, False) or moved
            ok = expected == "any" or (expected == "zero") != moved
            if steps == 0 and ok:
                continue  # nothing ran since the last snapshot and nothing changed: no event
            fields = self._fields(engine, name, expected=expected, trainable=trainable, moved=moved,
                                  max_abs=max_abs, rel=rel, steps=steps)
            self._log(engine, ok, scope="interval", reason=reason, from_step=self.ref_step, to_step=engine.step,
                      **fields)
            if not ok:
                failures.append(self._message(engine, name, expected, trainable, max_abs, steps, "interval"))
        groups = self._groups(engine)
        self.ref = {}
        for g in groups:  # reuse the comparison's copy unless the set of checked tensors changed meanwhile
            named = self._named(engine, g)
            same = g.name in taken and [n for n, _ in self._compared(engine, g, taken[g.name])] == [n for n, _ in named]
            self.ref[g.name] = taken[g.name] if same else self.store.take(named)
        self.ref_state = {g.name: engine.freezer.is_trainable(g.name) for g in groups}
        self.ref_lr = {g.name: self._opt_lr(engine, g.name) for g in groups}
        self.ref_step = engine.step
        self._report(engine, failures)

    def _fields(self, engine: Any, name: str, **kw: Any) -> dict[str, Any]:
        return {"group": name, "expected": kw["expected"], "trainable": kw["trainable"], "moved": kw["moved"],
                "max_abs_delta": _num(kw["max_abs"]), "rel_delta": kw["rel"], "steps": kw["steps"],
                "lr": self.ref_lr[name], "mode": self.store.mode, "estimate": self.store.estimate,
                "epoch": engine.epoch}

    ok_event: Event
    fail_event: Event

    def _log(self, engine: Any, ok: bool, **fields: Any) -> None:
        if ok:
            engine.log.info(self.ok_event, ok=True, **fields)
        else:
            engine.log.error(self.fail_event, ok=False, **fields)

    def _message(self, engine: Any, group: str, expected: str, trainable: bool, max_abs: float, steps: int,
                 scope: str) -> str:
        raise NotImplementedError

    def _report(self, engine: Any, failures: list[str]) -> None:
        for msg in failures:
            engine.log.error(Event.CHECK_FAILED, check=self.check, message=msg)
        self._fail(engine, failures)

    # ------------------------------------------------------------------ hooks
    @hookimpl(trylast=True)
    def on_fit_start(self, engine: Any) -> None:
        self._start(engine)

    @hookimpl(trylast=True)
    def on_freeze(self, engine: Any, group: str) -> None:
        self._begin()
        self._checkpoint(engine, reason=f"freeze {group}")

    @hookimpl(trylast=True)
    def on_unfreeze(self, engine: Any, group: str) -> None:
        self._begin()
        self._checkpoint(engine, reason=f"unfreeze {group}")

    @hookimpl(trylast=True)
    def on_epoch_end(self, engine: Any, epoch: int) -> None:
        if (epoch + 1) % self.cfg.every and epoch + 1 < engine.config.epochs and not _saving(engine, epoch):
            return  # checks.every: not this epoch (the next check, or the fit's end, covers its steps)
        self._begin()
        self._checkpoint(engine, reason="epoch end")

    @hookimpl(trylast=True)
    def on_fit_end(self, engine: Any) -> None:
        self._check_the_rest(engine)

    def _check_the_rest(self, engine: Any) -> None:
        """At fit end: the steps no epoch-end check covered (``checks.every``, an early stop), if any."""
        if engine.step != self.ref_step:
            self._begin()
            self._checkpoint(engine, reason="fit end")


def _saving(engine: Any, epoch: int) -> bool:
    """True when a checkpoint is written at the end of ``epoch``: its weights are checked first, whatever
    ``checks.every`` says (a resumed run starts its checks from them, and no checkpoint holds unchecked steps)."""
    pm = getattr(engine, "pm", None)
    saver = pm.get_plugin("checkpointer") if pm is not None else None
    return bool(saver is not None and hasattr(saver, "reasons") and saver.reasons(engine, epoch))


class WeightDeltaCheck(_DeltaObserver):
    """Frozen groups bitwise unchanged, trainable groups moved; per interval, per phase and per fit."""

    check = "weight_delta"
    ok_event = fail_event = Event.WEIGHT_DELTA_CHECK

    def _named(self, engine: Any, group: ParamGroup) -> list[tuple[str, torch.Tensor]]:
        # Parameters held frozen by a mask (Freezer.freeze_params, e.g. BitFit's weights) are MaskedParamsCheck's.
        masked = set(engine.freezer.frozen_params(group.name))
        return [(n, p) for n, p in group.params if n not in masked]

    def _expected(self, engine: Any, group: str, trainable: bool, steps: int) -> str:
        if not trainable:
            return "zero"
        return "nonzero" if steps > 0 else "any"

    def _before_refs(self, engine: Any) -> None:
        # The pretrained weights as loaded: the loaded tensors are never written to, so the exact store refers
        # to them instead of copying, except a small group's (under SMALL elements), packed into one buffer so
        # that the interval comparison measures its distance whole-buffer (a few MB at most).  Fingerprint
        # mode keeps references to them (no copy) and takes their fingerprints with the first snapshots.
        self.pretrained: dict[str, Any] = {}
        self._pre_sq: dict[str, float] = {}  # ||w_pretrained||² per group (host path), measured once
        self._pre_tensors: dict[str, dict[str, torch.Tensor]] = {}
        pre = getattr(engine, "pretrained", None) or {}
        exact = isinstance(self.store, ExactStore)
        for g in engine.groups:
            named = [(n, pre[n].to(engine.device)) for n, _ in g.params if n in pre]
            if not named:
                continue
            self._pre_tensors[g.name] = dict(named)  # references to the loaded tensors, no copy
            if exact:
                small = sum(t.numel() for _, t in named) < SMALL
                refer = self.store.take if small else getattr(self.store, "refer", self.store.take)
                self.pretrained[g.name] = (refer(named), [n for n, _ in named])

    def _still_pretrained(self, group: str, named: list[tuple[str, torch.Tensor]]) -> bool:
        """True when ``named`` is bitwise the group's loaded tensors, name for name (a memcmp per tensor on the
        CPU, which stops at the first difference)."""
        loaded = self._pre_tensors.get(group)
        return (loaded is not None and list(loaded) == [n for n, _ in named]
                and all(same_bits(t.detach(), loaded[n]) for n, t in named))

    def _snapshot(self, group: str, named: list[tuple[str, torch.Tensor]]) -> Any:
        # exact: a group that is still its pretrained weights (as train() starts it) has them as its snapshot:
        # no copy until it moves (a group frozen for the whole run is never copied)
        entry = self.pretrained.get(group)
        if entry is not None and isinstance(self.store, ExactStore) and self._still_pretrained(group, named):
            return entry[0]
        return self.store.take(named)

    def _start(self, engine: Any) -> None:
        super()._start(engine)
        self.phase = dict(self.ref)
        self.phase_state = dict(self.ref_state)
        self.phase_step = dict.fromkeys(self.ref, engine.step)
        self.phase_epoch = dict.fromkeys(self.ref, engine.epoch)
        if isinstance(self.store, ExactStore):
            return
        by_name = {g.name: g for g in engine.groups}
        for group, loaded in self._pre_tensors.items():
            names = list(loaded)
            ref = self.ref.get(group)
            live = dict(by_name[group].params)
            if isinstance(ref, dict) and all(n in ref for n in names) and self._still_pretrained(
                    group, [(n, live[n]) for n in names]):
                # the loaded tensors are the weights the run starts from (as train() loads them), so the
                # reference fingerprints taken a moment ago are theirs too: no second pass
                self.pretrained[group] = ({n: ref[n] for n in names}, names)
            else:
                self.pretrained[group] = (self.store.take(list(loaded.items())), names)

    def _begin(self) -> None:
        super()._begin()
        self._dist_before: dict[str, float] = getattr(self, "_dist", {})
        self._dist: dict[str, float] = {}

    def _unchanged(self, groups: list[str]) -> None:
        # the distance from the pretrained weights of a group that did not change is the one measured last time
        for n in groups:
            if n in self._dist_before and n not in self._dist:
                self._dist[n] = self._dist_before[n]

    def _held(self, group: str, snap: Any) -> bool:
        # at fit start the phase snapshot is the interval snapshot; the pretrained snapshot is never refreshed
        entry = self.pretrained.get(group)
        return self.phase.get(group) is snap or (entry is not None and entry[0] is snap)

    def _measured(self, group: str, snap: Any, delta: Any) -> None:
        # the distance from the pretrained weights, when the interval's pass measured it: against them in the
        # same pass (against_sq), or an interval that started from the pretrained weights themselves
        entry = self.pretrained.get(group)
        if entry is None:
            return
        if delta.against_sq is not None:
            if group not in self._pre_sq:
                self._pre_sq[group] = sum(float(torch.linalg.vector_norm(t)) ** 2 for t in entry[0].views().values()
                                          if t.is_floating_point() and t.numel())
            self._dist[group] = math.sqrt(delta.against_sq) / max(math.sqrt(self._pre_sq[group]), 1e-30)
        elif entry[0] is snap and delta.host_values is not None:
            self._dist[group] = delta.host_values[3]

    def _known_fingerprint(self, group: str, named: list[tuple[str, torch.Tensor]]) -> Any:
        # A group still bitwise equal to its pretrained weights (frozen since the fit started) has their
        # fingerprints: one memcmp per tensor instead of a fingerprint pass, about 4x cheaper on the CPU, and
        # 1 us per tensor once the group has moved (memcmp stops at the first difference).
        entry = self.pretrained.get(group)
        if entry is None:
            return None
        if not all(t.device.type == "cpu" for _, t in named):
            return None  # on an accelerator each comparison would be a host sync: take the fingerprints
        return entry[0] if self._still_pretrained(group, named) else None

    def _light(self, engine: Any, group: str) -> bool:
        # Light fingerprints only for a group that trains now, trained at the start of the interval being
        # judged and of its phase: both comparisons they enter (this interval and phase, the next interval)
        # expect a change.  A frozen side anywhere (the interval a freeze or an unfreeze ends) gets the checksums.
        return bool(engine.freezer.is_trainable(group) and self.ref_state.get(group, False)
                    and getattr(self, "phase_state", {}).get(group, False))

    def _against(self, group: str, named: list[tuple[str, torch.Tensor]]) -> Any:
        # the exact store on the host path: the distance from the pretrained weights in the interval's pass
        entry = self.pretrained.get(group)
        if entry is None or not isinstance(self.store, ExactStore) or self.store.host_reads is False:
            return None
        snap, names = entry
        have = {n for n, t in named if t.device.type == "cpu"}
        return snap if all(n in have for n in names) else None


    def _fields(self, engine: Any, name: str, **kw: Any) -> dict[str, Any]:
        fields = super()._fields(engine, name, **kw)
        fields["from_pretrained"] = self._from_pretrained(engine, name)
        return fields

    def _from_pretrained(self, engine: Any, group: str) -> float | None:
        """||w - w_pretrained|| / ||w_pretrained|| over the group's loaded tensors (None: nothing loaded)."""
        if group not in self.pretrained:
            return None
        if group not in self._dist:  # measured once per hook call, or carried over while the group is unchanged
            self._dist[group] = self._distance(engine, group)
        return self._dist[group]

    def _distance(self, engine: Any, group: str) -> float:
        snap, names = self.pretrained[group]
        now = self._fresh.get(group)  # fingerprints of now, taken in this hook call
        if now is not None and all(n in now for n in names):
            compared: float = self.store.compare(snap, {n: now[n] for n in names}, engine.device).as_list()[3]  # type: ignore[attr-defined]  # fingerprint stores only
            return compared
        params = dict(next(g for g in engine.groups if g.name == group).params)
        distance: float = self.store.delta(snap, [(n, params[n]) for n in names], engine.device).as_list()[3]
        return distance

    def _message(self, engine: Any, group: str, expected: str, trainable: bool, max_abs: float, steps: int,
                 scope: str) -> str:
        where = f"epoch {engine.epoch}" if scope == "interval" else f"phase ending at epoch {engine.epoch}"
        if expected == "zero":
            size = "" if math.isnan(max_abs) else f" (max |dw| = {max_abs:.3g})"
            return (f"frozen group {group} changed in {where}{size}: a frozen weight moved "
                    "(grad zeroed instead of cleared to None? weight decay or momentum still acting?)")
        return (f"trainable group {group} did not move in {where} over {steps} step(s) "
                f"(lr {self.ref_lr.get(group, float('nan')):.3g}): is it in the optimizer with lr > 0, "
                "and does the loss reach it?")

    def _report(self, engine: Any, failures: list[str]) -> None:
        for msg in failures:
            engine.log.error(Event.WEIGHT_DELTA_VIOLATION, message=msg)
        self._fail(engine, failures)

    def _close_phase(self, engine: Any, group: str) -> list[str]:
        steps = engine.step - self.phase_step[group]
        trainable = self.phase_state[group]
        expected = self._expected(engine, group, trainable, steps)
        if expected == "any":
            return []
        measured = self._measure(engine, {group: self.phase[group]}, [group])
        if group not in measured:
            return []
        changed, max_abs, _norm, rel = measured[group]
        moved = bool(changed)
        ok = (expected == "zero") != moved
        if steps == 0 and ok:
            return []  # the phase ran no step and nothing changed: no event
        lr = self.ref_lr.get(group, math.nan)
        fields = {"group": group, "expected": expected, "trainable": trainable, "moved": moved,
                  "max_abs_delta": _num(max_abs), "rel_delta": rel, "steps": steps, "lr": lr,
                  "mode": self.store.mode, "estimate": self.store.estimate, "epoch": engine.epoch,
                  "from_epoch": self.phase_epoch[group], "to_epoch": engine.epoch,
                  "from_pretrained": self._from_pretrained(engine, group)}
        self._log(engine, ok, scope="phase", **fields)
        return [] if ok else [self._message(engine, group, expected, trainable, max_abs, steps, "phase")]

    def _transition(self, engine: Any, group: str, reason: str) -> None:
        failures = self._close_phase(engine, group) if group in self.phase else []
        fingerprint = hasattr(self.store, "compare")
        share = group in self.phase and not fingerprint
        if group in self.phase:
            g = next(x for x in engine.groups if x.name == group)
            if fingerprint:  # the fingerprint taken for this hook call (immutable, so it may be shared)
                if group not in self._fresh:
                    self._fresh[group] = self.store.take(  # type: ignore[call-arg]  # fingerprint stores only
                        self._named(engine, g), light=self._light(engine, group))
                self.phase[group] = self._fresh[group]
            else:  # exact: the interval snapshot the check below takes (one copy fewer); the old one is free
                del self.phase[group]
            self.phase_state[group] = engine.freezer.is_trainable(group)
            self.phase_step[group] = engine.step
            self.phase_epoch[group] = engine.epoch
        if failures:
            self._report(engine, failures)
        self._checkpoint(engine, reason=reason)
        if share:
            self.phase[group] = self.ref[group]  # a snapshot of the weights at the transition, shared

    @hookimpl(trylast=True)
    def on_freeze(self, engine: Any, group: str) -> None:
        self._begin()
        self._transition(engine, group, reason=f"freeze {group}")

    @hookimpl(trylast=True)
    def on_unfreeze(self, engine: Any, group: str) -> None:
        self._begin()
        self._transition(engine, group, reason=f"unfreeze {group}")

    @hookimpl(trylast=True)
    def on_fit_end(self, engine: Any) -> None:
        from moola_engine.core.plan import promised_groups

        self._check_the_rest(engine)
        # No step ran since the last interval check: its fingerprints and its distances from the pretrained
        # weights stand for the weights now, so the phase checks need no pass of their own.
        self._fresh = dict(self.ref) if hasattr(self.store, "compare") else {}
        failures: list[str] = []
        for group in self.phase:
            failures += self._close_phase(engine, group)
        promised = promised_groups(engine.strategy, engine.freezer.groups, engine.freezer.head_groups)
        allowed = "never-unfreeze" in getattr(engine, "allow", set())
        for group in promised:
            if group not in self.moved:
                continue
            ok = self.moved[group] or allowed
            fields = {"group": group, "expected": "nonzero", "moved": self.moved[group], "promised": True,
                      "allowed": allowed and not self.moved[group], "epochs": engine.epoch + 1, "scope": "fit",
                      "mode": self.store.mode}
            self._log(engine, ok, **fields)
            if not ok:
                failures.append(
                    f"group {group} never trained in {engine.epoch + 1} epoch(s), but strategy "
                    f"{engine.strategy_name} promises to train it (unfreeze never happened)")
        if failures:
            self._report(engine, failures)


class BnStatsCheck(_DeltaObserver):
    """BatchNorm running statistics of frozen groups must stay unchanged (unless ``train.train_bn``)."""

    check = "bn_stats"
    ok_event = fail_event = Event.BN_STATS_CHECK

    def _start(self, engine: Any) -> None:
        self._bn: dict[str, list[tuple[str, torch.Tensor]]] = {}  # the groups' modules do not change in a fit
        super()._start(engine)

    def _named(self, engine: Any, group: ParamGroup) -> list[tuple[str, torch.Tensor]]:
        cache: dict[str, list[tuple[str, torch.Tensor]]] | None = getattr(self, "_bn", None)
        if cache is None:
            return self._find_bn(group)
        if group.name not in cache:
            cache[group.name] = self._find_bn(group)
        return cache[group.name]

    @staticmethod
    def _find_bn(group: ParamGroup) -> list[tuple[str, torch.Tensor]]:
        seen: set[int] = set()
        out: list[tuple[str, torch.Tensor]] = []
        for mname, module in group.modules:
            for sname, sub in module.named_modules():
                if isinstance(sub, _BN_TYPES) and id(sub) not in seen:
                    seen.add(id(sub))
                    prefix = f"{mname}.{sname}" if sname else mname
                    out += [(f"{prefix}.{b}", t) for b, t in sub.named_buffers(recurse=False) if t is not None]
        return out

    def _expected(self, engine: Any, group: str, trainable: bool, steps: int) -> str:
        return "zero" if not trainable and not engine.config.train_bn else "any"

    def _message(self, engine: Any, group: str, expected: str, trainable: bool, max_abs: float, steps: int,
                 scope: str) -> str:
        size = "" if math.isnan(max_abs) else f" (max |delta| = {max_abs:.3g})"
        return (f"BatchNorm running statistics of frozen group {group} drifted in epoch {engine.epoch}{size}: "
                "its BatchNorm ran in train mode (model.train() called after the engine set frozen BN to eval?)")

class MaskedParamsCheck(_DeltaObserver):
    """Parameters held frozen by a mask inside a group that trains (BitFit's weights) must stay bitwise unchanged."""

    check = "weight_delta"
    ok_event, fail_event = Event.WEIGHT_DELTA_CHECK, Event.WEIGHT_DELTA_VIOLATION

    def _named(self, engine: Any, group: ParamGroup) -> list[tuple[str, torch.Tensor]]:
        masked = set(engine.freezer.frozen_params(group.name))
        return [(n, p) for n, p in group.params if n in masked]

    def _compared(self, engine: Any, group: ParamGroup, snap: Any) -> list[tuple[str, torch.Tensor]]:
        # a parameter released by clear_param_mask since the snapshot trains now: only what is still masked
        masked = set(engine.freezer.frozen_params(group.name))
        return [(n, p) for n, p in super()._compared(engine, group, snap) if n in masked]

    def _expected(self, engine: Any, group: str, trainable: bool, steps: int) -> str:
        return "zero"

    def _fields(self, engine: Any, name: str, **kw: Any) -> dict[str, Any]:
        return {**super()._fields(engine, name, **kw), "masked": engine.freezer.mask_label(name) or "masked"}

    def _message(self, engine: Any, group: str, expected: str, trainable: bool, max_abs: float, steps: int,
                 scope: str) -> str:
        size = "" if math.isnan(max_abs) else f" (max |delta| = {max_abs:.3g})"
        label = engine.freezer.mask_label(group) or "masked"
        return (f"parameters of group {group} held frozen by the {label} mask changed over {steps} step(s){size}: "
                "a frozen parameter must stay bitwise unchanged")

# --------------------------------------------------------------------------- gradient flow


def optimizer_membership(optimizer: torch.optim.Optimizer) -> dict[int, tuple[int, float]]:
    """``id(param)`` -> (param group index, lr).  By identity: equal-valued tensors stay distinct."""
    return {id(p): (i, float(pg["lr"])) for i, pg in enumerate(optimizer.param_groups) for p in pg["params"]}


class GradFlowCheck(_Observer):
    """After the first step of every phase: trainable params get finite non-zero grads and an lr > 0; frozen get None."""

    check = "grad_flow"

    def __init__(self, checks: ChecksConfig | None = None) -> None:
        super().__init__(checks)
        self.pending = False
        self.phase = 0
        self.waiting: list[tuple[Any, ...]] = []  # phases checked but not yet read back (device tensors)

    @hookimpl(trylast=True)
    def on_fit_start(self, engine: Any) -> None:
        """A phase starts (the fit, a freeze, an unfreeze): check after its first step (after_step is called
        again: want_step_hooks)."""
        self.pending = True
        want = getattr(engine, "want_step_hooks", None)
        if want is not None:
            want(self, until_step=None)

    on_freeze = on_unfreeze = on_fit_start  # the same hook implementation under each phase-start hook

    @hookimpl(trylast=True)
    def after_step(self, engine: Any, step: int) -> None:
        # A transition requested in this very hook is applied but not yet announced: wait for the next step.
        if not self.pending or engine.freezer.pending:
            return
        self.pending = False
        want = getattr(engine, "want_step_hooks", None)
        if want is not None:  # nothing to do until the next phase: no call on the other steps of this one
            want(self, until_step=step + 1)
        self.phase += 1
        self.run(engine, step)

    def run(self, engine: Any, step: int) -> None:
        member = optimizer_membership(engine.optimizer)
        problems: dict[str, list[str]] = {}
        stats: list[torch.Tensor] = []  # per param: [min, max, norm] of its gradient (_grad_stats)
        where: list[tuple[str, str]] = []
        for g in engine.groups:
            group_trainable = engine.freezer.is_trainable(g.name)
            masked = set(engine.freezer.frozen_params(g.name))
            problems[g.name] = []
            for name, p in g.params:
                if group_trainable and name not in masked:
                    if not p.requires_grad:
                        problems[g.name].append(f"{name} has requires_grad = False although group {g.name} is trainable")
                    if id(p) not in member:
                        problems[g.name].append(f"{name} is trainable but in no optimizer param group: it can never change")
                    elif member[id(p)][1] <= 0:
                        i, lr = member[id(p)]
                        problems[g.name].append(f"{name} is trainable but its optimizer param group {i} has lr {lr:g}")
                    if p.grad is None:
                        if p.requires_grad:
                            problems[g.name].append(
                                f"{name} is trainable but got no gradient (grad None): the loss does not reach it "
                                "(detached branch or unused module?)")
                    else:
                        stats.append(_grad_stats(p.grad.detach(), engine.device))
                        where.append((g.name, name))
                else:
                    where_frozen = f"frozen group {g.name}" if not group_trainable else f"the frozen mask of {g.name}"
                    if p.requires_grad:
                        problems[g.name].append(f"{name} is in {where_frozen} but has requires_grad = True")
                    if p.grad is not None:
                        problems[g.name].append(
                            f"{name} is frozen but its grad is not None: a zeroed grad still lets AdamW weight decay "
                            "and momentum move it (clear grads to None: Freezer.freeze)")
        # Keep the statistics on the device; read them at the epoch end (no host sync inside the step loop).
        # Structural problems (no grad, no optimizer group, lr 0, requires_grad) need no read: report them now.
        lrs = {g.name: self._lr(engine, g) for g in engine.groups}
        trainable_now = {g.name: engine.freezer.is_trainable(g.name) for g in engine.groups}
        self.waiting.append((step, self.phase, problems, torch.stack(stats) if stats else None, where, lrs,
                             trainable_now))
        if any(problems.values()):
            self.flush(engine)

    @hookimpl(trylast=True)
    def on_epoch_end(self, engine: Any) -> None:
        self.flush(engine)

    on_fit_end = on_epoch_end

    def flush(self, engine: Any) -> None:
        """Read the statistics gathered after each phase's first step and log/raise the results."""
        waiting, self.waiting = self.waiting, []
        for step, phase, problems, stacked, where, lrs, trainable_now in waiting:
            self._report_phase(engine, step, phase, problems, stacked, where, lrs, trainable_now)

    def _report_phase(self, engine: Any, step: int, phase: int, problems: dict[str, list[str]],
                      stacked: torch.Tensor | None, where: list[tuple[str, str]], lrs: dict[str, float],
                      trainable_now: dict[str, bool]) -> None:
        values = stacked.tolist() if stacked is not None else []  # the one host read of this check
        norms: dict[str, float] = {}
        for (gname, pname), (lo, hi, norm) in zip(where, values, strict=True):
            finite = math.isfinite(lo) and math.isfinite(hi)  # aminmax propagates NaN
            nonzero = lo != 0.0 or hi != 0.0
            sq = norm * norm
            norms[gname] = norms.get(gname, 0.0) + (sq if math.isfinite(sq) else math.inf)
            if not finite:
                problems[gname].append(f"{pname} has a non-finite gradient")
            elif not nonzero:
                problems[gname].append(f"{pname} is trainable but its gradient is all zeros (detached branch, "
                                       "a multiply by zero, or a dead path?)")
        failures: list[str] = []
        for g in engine.groups:
            ok = not problems[g.name]
            fields = {"group": g.name, "trainable": trainable_now[g.name], "params": len(g.params), "phase": phase,
                      "first_step": step, "grad_norm": math.sqrt(norms[g.name]) if g.name in norms else None,
                      "lr": lrs[g.name], "ok": ok, "problems": problems[g.name]}
            if ok:
                engine.log.info(Event.GRAD_FLOW_CHECK, **fields)
            else:
                engine.log.error(Event.GRAD_FLOW_CHECK, **fields)
                for msg in problems[g.name]:
                    engine.log.error(Event.CHECK_FAILED, check=self.check, group=g.name, message=msg)
                failures += problems[g.name]
        self._fail(engine, failures)

    @staticmethod
    def _lr(engine: Any, g: ParamGroup) -> float:
        return float(engine.optimizer.param_groups[engine.freezer.groups.index(g.name)]["lr"])


# --------------------------------------------------------------------------- the live optimizer against the plan


class LrMaskCheck(_Observer):
    """Each epoch: every group's live optimizer lr and every parameter's ``requires_grad`` are what the schedule says.

    Runs in ``on_validation_end`` *before* the strategy's own implementation (``tryfirst``): the state the epoch
    trained with, before any transition the strategy requests for the next epoch.  "The schedule" is the
    freezer's record: every change to it went through the engine (a ``freeze.transition`` event, a
    ``freeze_params`` mask), which is how the plan is carried out, metric-driven transitions included (a dry
    run cannot replay a plateau decision: it sees no metrics).  Expected lr of a trainable group = the
    freezer's lr for it x the lr schedule's factor (:meth:`~moola_engine.core.schedulers.LrSchedule.factors`):
    a plugin that rewrites group lrs behind the engine's back fails the run, and so does a parameter of a
    trainable group whose ``requires_grad`` was turned off (or one of a frozen group or mask turned on),
    whatever its neighbours did.  One ``lr_mask.check`` event per group per epoch; no dry run, no host sync.
    """

    check = "lr_mask"
    rel_tol = 1e-6

    @hookimpl(tryfirst=True)
    def on_validation_end(self, engine: Any, epoch: int) -> None:
        fz = engine.freezer
        factors = engine.lr_schedule.factors()
        failures: list[str] = []
        for i, g in enumerate(engine.groups):
            pg = engine.optimizer.param_groups[i]
            trainable = fz.is_trainable(g.name)
            frozen = set(fz.frozen_params(g.name))
            planned = fz.lr(g.name)
            expected_lr = planned * factors[i]
            lr = float(pg["lr"])
            problems: list[str] = []
            if trainable and not math.isclose(lr, expected_lr, rel_tol=self.rel_tol, abs_tol=0.0):
                problems.append(
                    f"group {g.name} trained at lr {lr:.6g} in epoch {epoch} but the schedule says {expected_lr:.6g} "
                    f"(its lr {planned:.6g} x {engine.lr_schedule.kind} schedule factor {factors[i]:.6g}): "
                    "something rewrote the optimizer's lr behind the engine's back")
            in_group = {id(p) for p in pg["params"]}
            wrong = [n for n, p in g.params if p.requires_grad != (trainable and n not in frozen)]
            if wrong:
                state = "trainable" if trainable else "frozen"
                problems.append(f"group {g.name} is {state} in epoch {epoch} by the schedule, but requires_grad "
                                f"disagrees for {', '.join(wrong[:5])}{', ...' if len(wrong) > 5 else ''}")
            lost = [n for n, p in g.params if id(p) not in in_group]
            if lost:
                problems.append(f"parameters {', '.join(lost[:5])} of group {g.name} are not in its optimizer "
                                "param group")
            fields = {"group": g.name, "epoch": epoch, "trainable": trainable, "lr": lr, "planned_lr": planned,
                      "factor": factors[i], "expected_lr": expected_lr, "params": len(g.params),
                      "wrong_params": wrong, "ok": not problems, "problems": problems}
            if problems:
                engine.log.error(Event.LR_MASK_CHECK, **fields)
                for msg in problems:
                    engine.log.error(Event.CHECK_FAILED, check=self.check, group=g.name, message=msg)
                failures += problems
            else:
                engine.log.info(Event.LR_MASK_CHECK, **fields)
        self._fail(engine, failures)
def _grad_stats(gd: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[min, max, L2 norm] of one gradient as float64 on ``device``: finite iff min and max are (NaN propagates),
    non-zero iff either is.  Two reductions that allocate nothing the size of the gradient (a float64 copy and
    a boolean mask per check were most of this check's cost on a large model); the norm is accumulated in
    float32 (or wider), so ``grad_norm`` reads inf above about 1e19."""
    if not gd.numel():
        return torch.zeros(3, dtype=torch.float64, device=device)  # no element: reported as all zeros
    lo, hi = torch.aminmax(gd)
    norm = torch.linalg.vector_norm(gd, dtype=torch.float32 if gd.element_size() < 4 else None)
    return torch.stack([lo.double(), hi.double(), norm.double()]).to(device)


def build_checks(checks: ChecksConfig) -> list[tuple[str, Any]]:
    """The check observers ``[checks]`` turns on, as (name, plugin) pairs."""
    # Among trylast implementations pluggy calls the first registered first: grad flow reads its first-step
    # statistics before the weight-delta check speaks, so a specific cause ("gradient all zeros") comes before
    # the symptom ("did not move").
    out: list[tuple[str, Any]] = []
    if checks.grad_flow:
        out.append(("check:grad_flow", GradFlowCheck(checks)))
    if checks.weight_delta:
        out.append(("check:weight_delta", WeightDeltaCheck(checks)))
        out.append(("check:masked_params", MaskedParamsCheck(checks)))
    if checks.bn_stats:
        out.append(("check:bn_stats", BnStatsCheck(checks)))
    if checks.lr_mask:
        out.append(("check:lr_mask", LrMaskCheck(checks)))
    return out


__all__ = ["BnStatsCheck", "GradFlowCheck", "LrMaskCheck", "MaskedParamsCheck", "WeightDeltaCheck", "build_checks",
           "optimizer_membership"]
