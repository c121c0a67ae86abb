"""The one pre-flight: strategy -> model -> groups -> task -> plan -> validation, before any data is loaded.

``train``, ``plan``, ``ablate`` and resume all call :func:`preflight`; the engine
takes what it returns instead of rebuilding it.  A schedule that cannot keep its
promise is refused here, in a second, before a run folder exists.  Overrides the
user allowed (``--allow``) are kept in :attr:`Preflight.overrides` so the run log
records them once it exists.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import pluggy
import torch
from torch import nn

from moola_engine.config import ExperimentConfig, GroupSpec
from moola_engine.core.components import registries
from moola_engine.core.freezing import ParamGroup, resolve_groups
from moola_engine.core.models import build_model, group_specs
from moola_engine.core.plan import Plan, compute_plan, validate_plan
from moola_engine.core.plugins import NamedStrategy
from moola_engine.core.tasks import Task, build_task
from moola_engine.logs import Event


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random from ``seed``: every process draws at random otherwise."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class _Recorder:
    """Collects the ``config.override`` warnings validation emits, to replay into the run log."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.records.append({"event": str(event), **fields})

    def info(self, event: str, **fields: Any) -> None:  # pragma: no cover - validation only warns today
        self.records.append({"event": str(event), **fields})

    debug = info


@attrs.frozen(kw_only=True)
class Preflight:
    """Everything a run needs that does not need data, validated."""

    pm: pluggy.PluginManager
    named: NamedStrategy
    strategy: Any
    """The strategy object of this run (fresh from ``named.build()``), registered later by the caller."""
    model: nn.Module
    specs: list[GroupSpec]
    groups: list[ParamGroup]
    task: Task
    plan: Plan
    overrides: list[dict[str, Any]]
    """``config.override`` records (allowed schedule problems) to log into the run log."""

    def replay_overrides(self, log: Any) -> None:
        for rec in self.overrides:
            fields = {k: v for k, v in rec.items() if k != "event"}
            log.warning(Event.CONFIG_OVERRIDE, **fields)


def preflight(cfg: ExperimentConfig, *, pm: pluggy.PluginManager, named: NamedStrategy,
              allow: Sequence[str] | None = None, model: nn.Module | None = None) -> Preflight:
    """Build and validate the run ``cfg`` describes with strategy ``named``; no data is read.

    ``model``: an already built model to reuse (the ablation dry-runs every arm on one model).
    """
    regs = registries(pm)
    strat = named.build()
    if model is None:
        seed_everything(cfg.train.seed)  # initial weights, and any plugin's numpy/random draws, follow train.seed
        model = build_model(cfg.model, cfg.source, models=regs["model"], base_dir=cfg.base_dir)
    specs = group_specs(model, cfg.model)
    groups = resolve_groups(model, specs)
    task = build_task(cfg.task, source=cfg.source, tasks=regs["task"], base_dir=cfg.base_dir)
    head = [g.name for g in groups if g.head]
    plan = compute_plan(strat, [g.name for g in groups], head, cfg.train.epochs, cfg.train.lr, name=named.name,
                        model_groups=groups, train=cfg.train)
    recorder = _Recorder()
    validate_plan(plan, strat, named.name, allow=set(cfg.run.allow if allow is None else allow), log=recorder)
    return Preflight(pm=pm, named=named, strategy=strat, model=model, specs=specs, groups=groups, task=task, plan=plan,
                     overrides=recorder.records)
