"""Pure torch helpers for freezing, testable without the engine.

* :func:`resolve_groups` sees a model as an ordered list of named parameter
  groups (input -> output) declared by module-name patterns.  A parameter in
  no group or in two is an error; membership is by identity, never by value.
* :class:`Freezer` is the API strategies call: ``freeze(group)``,
  ``unfreeze(group, lr_scale=...)``, ``set_lr_scale(group, ...)``.  It sets
  ``requires_grad``, clears grads to None (so momentum and weight decay cannot
  move a frozen weight: optimizers skip parameters whose grad is None), writes
  the group's lr into *its own* optimizer param group (one per model group from
  step 0: freezing never adds or removes param groups), logs
  ``freeze.transition`` and queues the ``on_freeze``/``on_unfreeze`` hooks.
* ``freeze_params(group, predicate, reason=)`` freezes single parameters of a
  group by name (BitFit: everything but the biases) under the same rules
  (``requires_grad`` False, grad None); the mask stands until
  ``clear_param_mask`` and survives later ``freeze``/``unfreeze`` of the group.
* Per-group lrs compose with an lr scheduler: a scale change multiplies the
  group's lr and every reference lr the scheduler keeps for it (see
  :mod:`moola_engine.core.schedulers`), so ``lr = base lr x scale x scheduler factor``.
* Without a model (``groups`` given as names, optionally ``param_names``) the same
  class is the recording freezer that ``moola-engine plan`` dry-runs a strategy against.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from moola_engine.config import GroupSpec
from moola_engine.errors import GroupError, ScheduleError
from moola_engine.logs import Event, get_logger

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@attrs.define(eq=False)
class ParamGroup:
    """One named group: its parameters (by name) and the modules it owns."""

    name: str
    head: bool
    params: list[tuple[str, nn.Parameter]]
    modules: list[tuple[str, nn.Module]] = attrs.Factory(list)

    @property
    def tensors(self) -> list[nn.Parameter]:
        return [p for _, p in self.params]

    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)


def matches(name: str, pattern: str) -> bool:
    """``pattern`` matches a dotted name when it globs it or names one of its parent modules."""
    return fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")


def resolve_groups(model: nn.Module, specs: Sequence[GroupSpec]) -> list[ParamGroup]:
    """Assign every parameter of ``model`` to exactly one group of ``specs`` (ordered input -> output).

    Errors (:class:`GroupError`): no groups declared; a group matching no
    parameter; a parameter matched by two groups; a parameter in no group.
    Shared parameters (one tensor under two names) count once, by identity.
    """
    if not specs:
        raise GroupError("model.groups: no parameter groups declared (expected at least one [[model.groups]])")
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise GroupError(f"model.groups: group names must be unique, repeated: {', '.join(dupes)}")
    if not any(s.head for s in specs):
        specs = [*specs[:-1], attrs.evolve(specs[-1], head=True)]
    groups = [ParamGroup(name=s.name, head=s.head, params=[]) for s in specs]
    owner: dict[int, str] = {}
    problems: list[str] = []
    for pname, param in model.named_parameters(remove_duplicate=True):
        hits = [g for s, g in zip(specs, groups, strict=True) if any(matches(pname, pat) for pat in s.modules)]
        if not hits:
            problems.append(f"parameter {pname} {tuple(param.shape)} is in no group")
            continue
        if len(hits) > 1:
            problems.append(f"parameter {pname} is in two groups: {', '.join(g.name for g in hits)}")
            continue
        if id(param) in owner:
            continue
        owner[id(param)] = hits[0].name
        hits[0].params.append((pname, param))
    for s, g in zip(specs, groups, strict=True):
        if not g.params and not problems:
            problems.append(f"group {g.name} matches no parameter (patterns: {', '.join(s.modules)})")
        for mname, module in model.named_modules():
            if mname and any(matches(mname, pat) for pat in s.modules):
                g.modules.append((mname, module))
    if problems:
        raise GroupError("model.groups: " + "; ".join(problems))
    return groups


def set_trainable(params: Iterable[nn.Parameter], trainable: bool) -> None:
    """Set ``requires_grad`` and clear grads to None (a zeroed grad would still feed momentum)."""
    for p in params:
        p.requires_grad_(trainable)
        p.grad = None


def apply_module_modes(groups: Sequence[ParamGroup], trainable: dict[str, bool], *, train_bn: bool,
                       frozen_dropout: bool) -> dict[str, str]:
    """After ``model.train()``: frozen groups' BatchNorm to eval (unless ``train_bn``), dropout likewise.

    Returns the BN mode per group (``train``/``eval``/``-`` when it has none).
    """
    modes: dict[str, str] = {}
    for g in groups:
        frozen = not trainable[g.name]
        has_bn = False
        for _, m in g.modules:
            for sub in m.modules():
                if isinstance(sub, _BN_TYPES):
                    has_bn = True
                    if frozen and not train_bn:
                        sub.eval()
                elif isinstance(sub, _DROPOUT_TYPES) and frozen and not frozen_dropout:
                    sub.eval()
        modes[g.name] = ("eval" if frozen and not train_bn else "train") if has_bn else "-"
    return modes


@attrs.frozen
class Transition:
    group: str
    epoch: int
    to_state: str  # "trainable" | "frozen"
    from_state: str
    lr: float
    reason: str


class Freezer:
    """The freeze API strategies call.  See the module docstring for what each call guarantees.

    ``groups``: :class:`ParamGroup` objects (a real model) or plain names (dry run).
    ``optimizer``: its param group *i* belongs to model group *i*; lrs are written there.
    """

    def __init__(
        self,
        groups: Sequence[ParamGroup] | Sequence[str],
        *,
        base_lr: float,
        head_groups: Sequence[str] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        logger: Any = None,
        param_names: dict[str, list[str]] | None = None,
    ) -> None:
        self.param_groups: list[ParamGroup] = [g for g in groups if isinstance(g, ParamGroup)]
        self.groups: list[str] = [g.name if isinstance(g, ParamGroup) else g for g in groups]
        if head_groups is None:
            head_groups = [g.name for g in self.param_groups if g.head] or self.groups[-1:]
        self.head_groups: list[str] = [g for g in self.groups if g in set(head_groups)]
        self.encoder_groups: list[str] = [g for g in self.groups if g not in set(head_groups)]
        self.base_lr = float(base_lr)
        self.optimizer = optimizer
        self.log = logger or get_logger()
        self.epoch = 0
        self._trainable = dict.fromkeys(self.groups, True)
        self._scale = dict.fromkeys(self.groups, 1.0)
        self.pending: list[Transition] = []
        self.history: list[Transition] = []
        self._by_name = {g.name: g for g in self.param_groups}
        # parameter names per group (None: unknown, a dry run without a model) and the standing masks
        self._param_names: dict[str, list[str]] | None = (
            {g.name: [n for n, _ in g.params] for g in self.param_groups} if self.param_groups
            else ({g: list(param_names.get(g, [])) for g in self.groups} if param_names is not None else None))
        self._masked: dict[str, set[str]] = {g: set() for g in self.groups}
        self._mask_label: dict[str, str] = {}
        self.lr_schedule: Any = None  # a moola_engine.core.schedulers.LrSchedule, attached by the engine
        self.mask_listeners: list[Callable[[str, str], None]] = []
        """Called as ``fn(group, "before")`` right before a parameter mask of ``group`` changes and
        ``fn(group, "after")`` right after (the weight checks end an interval there, as at a transition)."""
        if optimizer is not None and len(optimizer.param_groups) != len(self.groups):
            raise ScheduleError(
                f"optimizer has {len(optimizer.param_groups)} param groups, expected one per model group "
                f"({len(self.groups)}: {', '.join(self.groups)})"
            )

    # ------------------------------------------------------------------ queries
    def is_trainable(self, group: str) -> bool:
        """The group trains: not frozen, and at least one of its parameters is outside its mask."""
        self._check(group)
        if not self._trainable[group]:
            return False
        names = self.param_names(group)
        return names is None or not self._masked[group] or any(n not in self._masked[group] for n in names)

    def param_names(self, group: str) -> list[str] | None:
        """The group's parameter names, or None in a dry run that was not told them."""
        return None if self._param_names is None else list(self._param_names[self._check(group)])

    def frozen_params(self, group: str) -> list[str]:
        """Names of the group's parameters held frozen by ``freeze_params`` (whatever the group's state)."""
        names = self.param_names(self._check(group)) or sorted(self._masked[group])
        return [n for n in names if n in self._masked[group]]

    def mask_label(self, group: str) -> str | None:
        """The label given to ``freeze_params`` for the group (``"biases"``), None when unmasked."""
        return self._mask_label.get(self._check(group))

    def trainable_groups(self) -> list[str]:
        return [g for g in self.groups if self._trainable[g]]

    def lr_scale(self, group: str) -> float:
        return self._scale[self._check(group)]

    def lr(self, group: str) -> float:
        """The group's lr before any lr scheduler factor: base lr x the group's scale."""
        return self.base_lr * self._scale[self._check(group)]

    def state(self) -> dict[str, dict[str, Any]]:
        return {g: {"trainable": self.is_trainable(g), "lr_scale": self._scale[g], "lr": self.lr(g),
                    "frozen_params": self.frozen_params(g)} for g in self.groups}

    def distance_from_head(self, group: str) -> int:
        """0 for head groups; 1 for the encoder group right below the head, and so on."""
        self._check(group)
        if group in self.head_groups:
            return 0
        return len(self.encoder_groups) - self.encoder_groups.index(group)

    # ------------------------------------------------------------------ actions
    def freeze(self, group: str, *, reason: str) -> None:
        """Stop ``group`` training from the next step: requires_grad False, grads None."""
        self._check(group)
        if not self._trainable[group]:
            return
        self._trainable[group] = False
        if group in self._by_name:
            set_trainable(self._by_name[group].tensors, False)
        self._record(group, "frozen", "trainable", reason)

    def unfreeze(self, group: str, *, reason: str, lr_scale: float | None = None) -> None:
        """Make ``group`` train from the next step, at base lr x ``lr_scale`` (default: its current scale)."""
        self._check(group)
        if lr_scale is not None:
            self._set_scale(group, lr_scale)
        if self._trainable[group]:
            return
        self._trainable[group] = True
        if group in self._by_name:
            set_trainable([p for n, p in self._by_name[group].params if n not in self._masked[group]], True)
        self._record(group, "trainable", "frozen", reason)

    def freeze_params(self, group: str, predicate: Callable[[str], bool], *, reason: str,
                      label: str | None = None) -> list[str]:
        """Freeze the parameters of ``group`` whose qualified name satisfies ``predicate``.

        The frozen parameters get ``requires_grad`` False and grad None, like a
        frozen group; the group's other parameters keep their state.  The mask
        stands: a later ``unfreeze(group)`` trains only the parameters outside
        it, until :meth:`clear_param_mask`.  ``label`` names what still trains
        (``"biases"``) in plans.  Returns the names frozen.  In a dry run that was
        not told the parameter names, only the label is recorded.
        """
        self._check(group)
        names = self.param_names(group)
        hit = [n for n in names if predicate(n)] if names is not None else []
        self._notify_mask(group, "before")
        self._masked[group].update(hit)
        if label is not None:
            self._mask_label[group] = label
        if group in self._by_name:
            set_trainable([p for n, p in self._by_name[group].params if n in self._masked[group]], False)
        self._notify_mask(group, "after")
        self.log.info(Event.FREEZE_PARAMS, group=group, frozen=hit, label=label, reason=reason, epoch=self.epoch)
        return hit

    def clear_param_mask(self, group: str, *, reason: str) -> None:
        """Lift ``freeze_params`` from ``group``: its parameters follow the group's state again."""
        self._check(group)
        released = sorted(self._masked[group])
        self._notify_mask(group, "before")
        self._masked[group].clear()
        self._mask_label.pop(group, None)
        if group in self._by_name and self._trainable[group]:
            set_trainable(self._by_name[group].tensors, True)
        self._notify_mask(group, "after")
        self.log.info(Event.FREEZE_PARAMS, group=group, frozen=[], released=released, reason=reason, epoch=self.epoch)

    def set_lr_scale(self, group: str, lr_scale: float, *, reason: str) -> None:
        """Change a group's lr without changing whether it trains (logged as ``lr.changed``)."""
        self._check(group)
        old = self._scale[group]
        self._set_scale(group, lr_scale)
        if old != lr_scale:
            self.log.info(Event.LR_CHANGED, group=group, lr=self.lr(group), lr_scale=lr_scale, reason=reason)

    # ------------------------------------------------------------------ internals
    def _notify_mask(self, group: str, when: str) -> None:
        for fn in list(self.mask_listeners):
            fn(group, when)

    def _check(self, group: str) -> str:
        if group not in self._trainable:
            raise ScheduleError(f"unknown group {group!r}; groups are: {', '.join(self.groups)}")
        return group

    def _set_scale(self, group: str, lr_scale: float) -> None:
        if not lr_scale > 0 or not math.isfinite(lr_scale):
            raise ScheduleError(f"group {group}: lr_scale must be > 0, got {lr_scale!r} (a group with lr 0 never trains)")
        old = self._scale[group]
        self._scale[group] = float(lr_scale)
        if self.optimizer is not None:
            index = self.groups.index(group)
            pg = self.optimizer.param_groups[index]
            pg["lr_scale"] = float(lr_scale)
            if self.lr_schedule is None or self.lr_schedule.scheduler is None:
                pg["lr"] = self.lr(group)  # no scheduler: exactly base lr x scale
            elif old != lr_scale:
                self.lr_schedule.rescale(index, lr_scale / old)  # keeps base x scale x scheduler factor

    def _record(self, group: str, to_state: str, from_state: str, reason: str) -> None:
        t = Transition(group=group, epoch=self.epoch, to_state=to_state, from_state=from_state,
                       lr=self.lr(group), reason=reason)
        self.pending.append(t)
        self.history.append(t)
        self.log.info(Event.FREEZE_TRANSITION, group=group, from_state=from_state, to_state=to_state,
                      lr=t.lr, reason=reason, epoch=self.epoch)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state: trainable mask and lr scale by group, the transition history."""
        return {"trainable": dict(self._trainable), "lr_scale": dict(self._scale),
                "masked": {g: sorted(m) for g, m in self._masked.items() if m},
                "mask_label": dict(self._mask_label),
                "history": [attrs.asdict(t) for t in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` silently (no transition is logged or queued: none happened)."""
        if sorted(state["trainable"]) != sorted(self.groups):
            raise GroupError(f"checkpoint groups {', '.join(state['trainable'])} differ from this model's "
                             f"groups {', '.join(self.groups)}")
        masked = state.get("masked", {})
        self._mask_label = dict(state.get("mask_label", {}))
        for g in self.groups:
            self._trainable[g] = bool(state["trainable"][g])
            self._scale[g] = float(state["lr_scale"][g])
            self._masked[g] = set(masked.get(g, []))
            if g in self._by_name:  # parameters held by a mask (BitFit) stay frozen inside a trainable group
                params = self._by_name[g].params
                set_trainable([p for n, p in params if n not in self._masked[g]], self._trainable[g])
                set_trainable([p for n, p in params if n in self._masked[g]], False)
        self.history = [Transition(**t) for t in state["history"]]
        self.pending = []

    def take_pending(self) -> list[Transition]:
        out, self.pending = self.pending, []
        return out
