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

import types
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from moola_engine.core.context import EngineView
from moola_engine.errors import CheckpointError

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
