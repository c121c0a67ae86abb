"""Getting weights out: which tensors of a model form "the encoder", and writing them as ``.safetensors``.

``select_state(model, groups, module)`` picks state-dict keys (weights and buffers, e.g. BatchNorm statistics):

* ``module = None``: everything but the head groups (the encoder of any model with declared groups);
* otherwise a list of names, each one of: a group name (``encoder.block1``), a group-name prefix (``encoder``
  selects ``encoder.block1`` and ``encoder.block2``), or a submodule path of the model (``backbone.layers.0``).

Keys keep the model's names, so the file loads into the same model (``[model.pretrained] path = ...``) with
no key mapping.  Used by the ``supervised`` pretraining objective and ``moola-engine export``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from moola_engine.core.freezing import ParamGroup
from moola_engine.errors import ConfigError


def group_keys(model: nn.Module, group: ParamGroup) -> set[str]:
    """State-dict keys a group owns: its parameters and the buffers of its modules."""
    keys = {name for name, _ in group.params}
    for mod_name, _ in group.modules:
        prefix = f"{mod_name}." if mod_name else ""
        keys |= {k for k in model.state_dict() if k.startswith(prefix)} if prefix else set()
    return keys


def select_state(model: nn.Module, groups: Sequence[ParamGroup], module: Sequence[str] | None, *,
                 source: str = "--module") -> dict[str, torch.Tensor]:
    """The tensors of ``model`` that ``module`` names (None: every key outside the head groups), detached copies."""
    state = model.state_dict()
    if module is None:
        head: set[str] = set()
        for g in groups:
            if g.head:
                head |= group_keys(model, g)
        keep = [k for k in state if k not in head]
    else:
        if isinstance(module, str) or not list(module):
            raise ConfigError(source, f"expected a non-empty list of group or module names, got {module!r}")
        modules = dict(model.named_modules())
        keep_set: set[str] = set()
        for name in module:
            hit = [g for g in groups if g.name == name or g.name.startswith(name + ".")]
            if hit:
                for g in hit:
                    keep_set |= group_keys(model, g)
            elif name in modules and name:
                keep_set |= {k for k in state if k.startswith(name + ".")}
            else:
                tops = sorted({k.split(".")[0] for k in state})
                raise ConfigError(source, f"{name!r} names no group and no submodule of the model "
                                          f"(groups: {', '.join(g.name for g in groups) or 'none'}; "
                                          f"top-level modules: {', '.join(tops)})")
        keep = [k for k in state if k in keep_set]
    if not keep:
        raise ConfigError(source, f"{module!r} selects no tensor of the model (every tensor is in a head group?)")
    # independent contiguous copies: safetensors refuses shared storage (cuDNN's flat LSTM buffers, tied weights)
    return {k: state[k].detach().to("cpu").contiguous().clone() for k in keep}


def save_weights(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` to ``path`` atomically (a temporary file beside it, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata else None)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
