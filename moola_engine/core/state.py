"""What a run's state is, beside its weights: the codec for plugin state, a strategy's state, the load proof.

The engine owns its resumable state (:meth:`moola_engine.core.engine.Engine.state_dict`); the checkpointer
(:mod:`moola_engine.runs.checkpoint`) writes and reads it through the codec here, and touches nothing private.

* :func:`encode` / :func:`decode`: nested state (dicts, lists, tuples, numbers, numpy arrays, tensors) to a
  JSON-safe form plus a flat dict of tensors, and back.
* :func:`strategy_state` / :func:`load_strategy_state`: a strategy's ``state_dict()`` when it has one, else its
  JSON-safe attributes (helpers that save themselves are nested).
* :func:`equals_loaded` / :func:`changed_since_load`: the load proof's comparison of the model's tensors with the
  file's, which the engine re-takes before the first training step.
"""

from __future__ import annotations

import random
import types
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from moola_engine.core.context import EngineView
from moola_engine.core.enginebase import EngineBase
from moola_engine.errors import CheckFailed, CheckpointError, MoolaError
from moola_engine.logs import Event

if TYPE_CHECKING:
    from moola_engine.core.context import Resumable

_SKIP_ATTRS = {"params", "name"}


# --------------------------------------------------------------------------- codec: nested state <-> JSON + tensors


class Unencodable(TypeError):
    def __init__(self, where: str, obj: Any) -> None:
        super().__init__(f"{where}: {type(obj).__name__} cannot be saved in a checkpoint")
        self.where = where


def encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-safe form of ``obj``; tensors go to ``tensors[key/...]`` and leave a reference behind."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise Unencodable(key, obj)
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, f"{key}/{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[encode(k, f"{key}/k{i}", tensors), encode(v, f"{key}/{i}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    raise Unencodable(key, obj)


def decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        key = obj["__tensor__"]
        if key not in tensors:
            raise CheckpointError(f"state.json refers to tensor {key!r}, which state.safetensors lacks")
        return tensors[key]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {decode(k, tensors): decode(v, tensors) for k, v in obj["__items__"]}
    return {k: decode(v, tensors) for k, v in obj.items()}


# --------------------------------------------------------------------------- a strategy's state


def strategy_state(strategy: Any) -> tuple[Any, list[str]]:
    """(state, unsaved attributes): ``state_dict()`` if defined, else the JSON-safe attributes."""
    if callable(getattr(strategy, "state_dict", None)) and callable(getattr(strategy, "load_state_dict", None)):
        return strategy.state_dict(), []
    if isinstance(strategy, types.ModuleType):
        return {}, []
    state: dict[str, Any] = {}
    unsaved: list[str] = []
    for k, v in getattr(strategy, "__dict__", {}).items():
        if k in _SKIP_ATTRS:
            continue
        if _has_state(v) and not _is_engine(v):  # a helper object (e.g. a PlateauWatcher) that saves itself
            v = {_NESTED: v.state_dict()}
        try:
            encode(v, k, {})
        except Unencodable:
            unsaved.append(f"{k} ({type(v).__name__})")
            continue
        state[k] = v
    return state, unsaved


_NESTED = "__state_dict__"


def _is_engine(obj: Any) -> bool:
    """The engine has state_dict() too, but a strategy holding it holds the run, not state of its own."""
    return isinstance(obj, EngineView)


def _has_state(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def load_strategy_state(strategy: Any, state: Any) -> None:
    if _has_state(strategy):
        strategy.load_state_dict(state)
        return
    for k, v in state.items():
        if isinstance(v, dict) and set(v) == {_NESTED}:
            getattr(strategy, k).load_state_dict(v[_NESTED])
        else:
            setattr(strategy, k, v)


# --------------------------------------------------------------------------- the load proof


def equals_loaded(now: torch.Tensor, src: torch.Tensor) -> bool:
    """The load proof for one tensor: the model's tensor is bitwise the file's (cast to the model's dtype)."""
    return bool(torch.equal(now.detach().cpu(), src.to(dtype=now.dtype)))


def changed_since_load(model: nn.Module, loaded: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of ``loaded`` (what :func:`load_pretrained` returned) whose tensor in ``model`` no longer equals it.

    The engine re-takes the load proof with this right before the first training step, after every setup
    hook and the DDP broadcast: a hook that re-initialises a loaded tensor is caught before it trains.
    """
    state = model.state_dict()
    return [k for k, v in loaded.items() if k not in state or not equals_loaded(state[k], v)]


# --------------------------------------------------------------------------- the engine's resumable state


class EngineState(EngineBase):
    """Part of :class:`~moola_engine.core.engine.Engine`: its resumable state and the re-taken load proof."""

    def rng_state(self) -> dict[str, Any]:
        """Every random stream the run draws from: the batch order's generator, torch (CPU, CUDA), numpy, random."""
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "engine": self._gen.get_state(),
            "numpy": np.random.get_state(legacy=False),
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda"] = list(torch.cuda.get_rng_state_all())
        return state

    def set_rng_state(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        self._gen.set_state(state["engine"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            cuda = state["cuda"]
            if len(cuda) != torch.cuda.device_count():
                raise MoolaError(f"the checkpoint holds RNG states of {len(cuda)} GPUs, this machine has "
                                 f"{torch.cuda.device_count()}: the run cannot continue exactly")
            torch.cuda.set_rng_state_all(cuda)

    def state_dict(self) -> dict[str, Any]:
        """Everything but the model's weights that the run needs to continue bitwise equal from here.

        Keys: ``step``, ``epoch``, ``history``, ``freezer``, ``optimizer``, ``scheduler`` (the lr schedule),
        ``rng`` (:meth:`rng_state`), ``early_stopping`` (best value, best epoch and metric, epochs since the
        last improvement, the best weights kept for ``restore_best``) and ``strategy`` (``state``: the
        strategy's ``state_dict()`` or its JSON-safe attributes; ``unsaved``: attributes that could not be
        kept).  Values hold live tensors: copy them before the run goes on (the checkpointer encodes them).
        Taken at an epoch end (the checkpointer's ``on_epoch_end``).
        """
        from moola_engine.core.state import strategy_state

        strat, unsaved = strategy_state(self.strategy)
        result = self.result
        # transitions requested inside on_epoch_end are applied but their hooks (and the clock reset in
        # _on_transition) come right after it: the saved clock must be the one the next epoch starts with
        since_improved = 0 if self.freezer.pending else self._since_improved
        return {
            "step": self.step,
            "epoch": self.epoch,
            "history": [dict(h) for h in self.history],
            "freezer": self.freezer.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.lr_schedule.state_dict(),
            "rng": self.rng_state(),
            "early_stopping": {"best": self.es_best, "best_epoch": result.best_epoch,
                               "best_metric": result.best_metric, "since_improved": since_improved,
                               "best_state": self.best_state},
            "strategy": {"state": strat, "unsaved": unsaved},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the model's weights are the caller's).  Nothing is logged or fired."""
        from moola_engine.core.state import load_strategy_state

        self.freezer.load_state_dict(state["freezer"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["scheduler"])
        load_strategy_state(self.strategy, state["strategy"]["state"])
        self.step = int(state["step"])
        self.epoch = self.freezer.epoch = int(state["epoch"])
        self.history[:] = [dict(h) for h in state["history"]]
        es = state["early_stopping"]
        self.es_best, self._since_improved = es["best"], int(es["since_improved"])
        self.result.best_epoch, self.result.best_metric = es["best_epoch"], es["best_metric"]
        best = es["best_state"]
        self.best_state = {k: v.to(self.device) for k, v in best.items()} if best is not None else None
        self.set_rng_state(state["rng"])

    def _resume(self, start: Resumable) -> int:
        """Restore a checkpoint; returns the epoch to continue at (``epochs``: none left)."""
        first = start.restore(self)  # weights and load_state_dict(): optimizer, freezer, scheduler, strategy, RNG
        self.result.epochs_run = first
        rng = self.rng_state()
        # observers start as in any run; the strategy does not: its state was restored
        self._fire("on_fit_start", skip=[self.strategy])
        start.restore_plugins(self)  # after their on_fit_start, which resets them
        self.set_rng_state(rng)  # last: whatever a plugin drew while starting, the batch order goes on unchanged
        # the interrupted run's last epoch ended with early stopping's bookkeeping, after the save
        if first > 0 and self._early_stopping(first - 1, self.history[-1]):
            return self.epochs
        return first

    def _prove_loaded(self, hooks: Sequence[str], *, final: bool = True) -> None:
        """Re-take the load proof: every pretrained tensor still bitwise the file's (``weights.reverified``).

        Called after ``on_fit_start`` and right before the first training step (after every setup hook and
        the DDP broadcast).  A tensor that changed stops the run, naming it and the plugins implementing the
        hooks that ran since the load (observers excluded).  The file's tensors stay in ``pretrained`` for the
        distance-from-pretrained figures of the weight-delta check."""
        if not self._proof_pending or self.pretrained is None:
            return
        from moola_engine.core.state import changed_since_load

        changed = changed_since_load(self.model, self.pretrained)
        if not changed and not final:
            return
        self._proof_pending = False
        suspects = sorted({impl.plugin_name for h in hooks for impl in getattr(self.pm.hook, h).get_hookimpls()
                           if not impl.plugin_name.startswith("check:") and impl.plugin_name != "checkpointer"})
        fields = {"ok": not changed, "tensors": len(self.pretrained), "changed": changed, "hooks": list(hooks),
                  "suspects": suspects if changed else []}
        if not changed:
            self.log.info(Event.WEIGHTS_REVERIFIED, **fields)
            return
        self.log.error(Event.WEIGHTS_REVERIFIED, **fields)
        where = f"plugin(s) {', '.join(suspects)}" if suspects else "no plugin (the engine's own setup?)"
        raise CheckFailed(
            f"{len(changed)} pretrained tensor(s) no longer equal the file before the first training step: "
            f"{', '.join(changed[:8])}{', ...' if len(changed) > 8 else ''}; changed in {' / '.join(hooks)} by "
            f"{where}: a setup hook re-initialised them (reset_parameters()/init_weights() after loading?)")
