"""The core's pretraining objective ``supervised``: train ``[model]`` on ``[data]`` with ``[task]``'s loss, keep the encoder.

``moola-engine pretrain --config source.toml`` with ``[pretrain] objective = "supervised"`` trains the
experiment's model on the experiment's data (every group trainable from the first step: the engine with the
``immediate`` strategy, so the run is logged and checked like any other), then saves the tensors ``module``
names (default: everything but the head groups) as ``<out>.safetensors`` with a ``<out>.json`` sidecar stating
which data the encoder saw::

    data_seen = {kind, files: [{key, path, sha256}], rows: {train, val}, labels, seed, val_fraction, folds, fold}
    cut_date  = the data's train_cut_date (time-ordered data only): runs refuse an encoder that saw their
                validation/test period (moola_engine.runs.train.check_encoder_cut)

The encoder sees the training rows only: it trains for a fixed number of epochs, validation is reported but
selects nothing (no early stopping, no best-epoch restore), so the validation rows leak nowhere.  Every
parameter defaults to the experiment's ``[train]`` value; ``[pretrain.params]`` or the command line override it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import attrs

from moola_engine.config import ExperimentConfig, non_negative, positive, structure, unstructure
from moola_engine.core.hookspecs import hookimpl


def _device(inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        from moola_engine.config import _device as check

        check(inst, attr, value)


@attrs.frozen(kw_only=True)
class SupervisedParams:
    """``[pretrain.params]`` of ``objective = "supervised"``; None: the experiment's ``[train]`` value."""

    epochs: int | None = attrs.field(default=None, validator=positive)
    lr: float | None = attrs.field(default=None, validator=positive)
    batch_size: int | None = attrs.field(default=None, validator=positive)
    seed: int | None = attrs.field(default=None, validator=non_negative)
    device: str | None = attrs.field(default=None, validator=_device)
    threads: int | None = attrs.field(default=None, validator=positive)
    optimizer: Literal["adamw", "adam", "sgd"] | None = None
    weight_decay: float | None = attrs.field(default=None, validator=non_negative)
    module: list[str] | None = None
    """What to keep: group names, group-name prefixes (``encoder``) or submodule paths; default: all but head groups."""


TRAIN_KEYS = ("epochs", "lr", "batch_size", "seed", "device", "threads", "optimizer", "weight_decay")


def data_seen(cfg: ExperimentConfig, *, rows: dict[str, int], meta: dict[str, Any], trained_on: str) -> dict[str, Any]:
    """What a run's data was: kind, files with their sha256, rows, the draw, and the time cut (when the data has one).

    ``meta``: the data kind's ``Splits.meta`` (``train_cut_date`` for time-ordered data); ``trained_on`` says which
    rows reached the weights (e.g. "train rows only")."""
    from moola_engine.safeio import sha256

    files = []
    for key in ("path",):  # the test file (data.test_path) is loaded by the kind but never trained on
        value = getattr(cfg.data, key)
        if value is not None:
            p = cfg.resolve(value)
            files.append({"key": f"data.{key}", "path": str(p), "sha256": sha256(p) if p.is_file() else None})
    seen: dict[str, Any] = {
        "kind": cfg.data.kind, "files": files, "options": dict(cfg.data.options), "rows": rows,
        "labels": cfg.data.labels, "seed": cfg.train.seed, "val_fraction": cfg.data.val_fraction,
        "folds": cfg.data.folds, "fold": cfg.data.fold, "config": cfg.source, "trained_on": trained_on,
    }
    if meta.get("train_cut_date") is not None:
        seen["cut_date"] = meta["train_cut_date"]
    return seen


class Supervised:
    """Supervised pretraining on a source dataset's labels: the experiment's model, data and task; keeps the encoder."""

    def __init__(self, params: SupervisedParams | None = None) -> None:
        self.params = params or SupervisedParams()

    def run_config(self, cfg: ExperimentConfig) -> ExperimentConfig:
        p = self.params
        changes = {k: getattr(p, k) for k in TRAIN_KEYS if getattr(p, k) is not None}
        train = attrs.evolve(cfg.train, **changes, early_stopping=None, restore_best=False)
        return attrs.evolve(cfg, train=train, model=attrs.evolve(cfg.model, pretrained=None))

    def pretrain(self, cfg: ExperimentConfig, *, out: Path, console: str = "pretty") -> dict[str, Any]:
        from moola_engine.core.components import registries
        from moola_engine.core.data import build_splits
        from moola_engine.core.engine import Engine
        from moola_engine.core.export import save_weights, select_state
        from moola_engine.core.plugins import NamedStrategy, NoParams, build_plugin_manager, register_checked
        from moola_engine.core.preflight import preflight
        from moola_engine.logs import Event, RunLog
        from moola_engine.runs.folders import write_json_atomic

        run_cfg = self.run_config(cfg)
        pm, strategies = build_plugin_manager()
        info = strategies["immediate"]
        named = NamedStrategy(name="immediate", plugin="immediate",
                              params=structure({}, info.params or NoParams, source="supervised", path="$"),
                              description=info.description, info=info, source="objective supervised")
        pre = preflight(run_cfg, pm=pm, named=named)
        keep = select_state(pre.model, pre.groups, self.params.module, source=f"{cfg.source} $.pretrain.params.module")
        runlog = RunLog(out.with_suffix(".events.jsonl"), console=console)
        log = runlog.logger
        try:
            splits = build_splits(run_cfg.data, base_dir=cfg.base_dir, seed=run_cfg.train.seed, source=cfg.source,
                                  task=pre.task, datasets=registries(pm)["dataset"])
            seen = data_seen(run_cfg, rows={"train": len(splits.train),
                                             "val": len(splits.val) if splits.val is not None else 0},
                             meta=splits.meta, trained_on="train rows only (validation reported, never used for selection)")
            log.info(Event.PRETRAIN_STARTED, objective="supervised", model=cfg.model.name, task=cfg.task.name,
                     kind=cfg.data.kind, train=seen["rows"]["train"], val=seen["rows"]["val"],
                     epochs=run_cfg.train.epochs, kept=len(keep))
            register_checked(pm, pre.strategy, name="strategy:immediate")
            engine = Engine(pre.model, train=run_cfg.train, groups=pre.specs, pm=pm, strategy=pre.strategy,
                            train_data=splits.train, val_data=splits.val, checks=cfg.checks, logger=log,
                            strategy_name="immediate", plan=pre.plan, loss_fn=pre.task.loss, eval_fn=pre.task.metrics)
            fit = engine.fit()
            tensors = select_state(engine.model, pre.groups, self.params.module)
            last = {k: v for k, v in (fit.history[-1] if fit.history else {}).items()
                    if isinstance(v, (int, float)) and math.isfinite(v)}
            meta: dict[str, Any] = {
                "objective": "supervised", "model": {"name": cfg.model.name, "params": cfg.model.params},
                "task": cfg.task.name, "module": self.params.module, "keys": sorted(tensors),
                "head_dropped": [g.name for g in pre.groups if g.head] if self.params.module is None else None,
                "train": unstructure(run_cfg.train), "epochs_run": fit.epochs_run, "final": last,
                "seconds": round(fit.seconds, 3), "data_seen": seen,
            }
            if "cut_date" in seen:
                meta["cut_date"] = seen["cut_date"]
            path = save_weights(tensors, out, {"objective": "supervised"})
            sidecar = out.with_suffix(".json")
            write_json_atomic(sidecar, meta)
            log.info(Event.PRETRAIN_SAVED, path=str(path), sidecar=str(sidecar), tensors=len(tensors),
                     seconds=round(fit.seconds, 1), **{k: round(v, 4) for k, v in last.items() if k.startswith("val_")})
        finally:
            runlog.close()
        val = {k: v for k, v in last.items() if k.startswith("val_")}
        summary = f"{len(tensors)} tensors, {seen['rows']['train']} training rows of {cfg.data.kind}"
        if val:
            summary += ", " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(val.items())[:3])
        return {"encoder": path, "sidecar": sidecar, "summary": summary}


@hookimpl
def register_objectives(register: Any) -> None:
    register("supervised", Supervised, params=SupervisedParams)
