"""One training run from config: the path ``moola-engine train`` takes.

TOML -> config objects -> plugin manager picks the named strategy -> plan
validated (before any data is loaded) -> run folder + event log -> data and
model -> pretrained weights -> engine loop -> test metrics -> result.json.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

import attrs
import numpy as np

from moola_engine.checks.loading import load_pretrained
from moola_engine.config import ExperimentConfig, unstructure
from moola_engine.core import distributed
from moola_engine.core.components import registries
from moola_engine.core.context import FitResult
from moola_engine.core.data import build_splits, has_rows
from moola_engine.core.engine import Engine
from moola_engine.core.export import save_weights
from moola_engine.core.optim import select_device
from moola_engine.core.plugins import (
    NamedStrategy,
    build_plugin_manager,
    default_strategies_file,
    load_strategies,
    register_checked,
    select_strategy,
)
from moola_engine.core.preflight import preflight
from moola_engine.errors import ConfigError, DataError, MoolaError
from moola_engine.logs import Event, RunLog, bind, clear_contextvars
from moola_engine.runs.folders import create_run_dir, link_latest, new_run_id, write_json_atomic
from moola_engine.runs.observers import build_observers
from moola_engine.runs.resume import ResumeState, open_resume, resume_strategy
from moola_engine.runs.sinks import SinkRun, check_sinks, open_sinks
from moola_engine.version import __version__


@attrs.define
class RunOutcome:
    run_id: str
    run_dir: Path
    fit: FitResult
    test_metrics: dict[str, float]
    strategy: str
    model: Any = None
    """The trained model (the weights ``fit`` ended with: the best epoch's when ``train.restore_best``), on the
    training device; also saved as ``model.safetensors`` in the run folder (``moola-engine export``)."""


def resolve_run_dir(path: str | Path) -> Path:
    """A run folder given on the command line, with symlinks (``runs/latest``) resolved now, once.

    Everything after this uses the real folder: a concurrent run that moves ``latest`` cannot redirect it, and
    the run's events carry its real run id.
    """
    p = Path(path)
    try:
        real = p.resolve(strict=True)
    except FileNotFoundError:
        raise MoolaError(f"{p}: no such run folder") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long, ...
        raise MoolaError(f"{p}: cannot resolve this run folder ({exc})") from None
    if not real.is_dir():
        raise MoolaError(f"{p}: not a run folder (expected runs/<id>/)")
    return real


def strategies_path(cfg: ExperimentConfig, override: str | None) -> Path:
    """The strategies file, first found of: --strategies FILE; run.strategies_file (relative to the config);
    strategies.toml beside the config; ./strategies.toml; the project's.  ``strategy.selected`` names it."""
    if override:
        return Path(override)
    config_dir = Path(cfg.source).parent if cfg.source != "<defaults>" else None
    if cfg.run.strategies_file:
        p = Path(cfg.run.strategies_file)
        return p if p.is_absolute() or config_dir is None else config_dir / p
    found = default_strategies_file(config_dir)
    if found is None:
        where = f"beside {cfg.source}, " if config_dir is not None else ""
        raise ConfigError("--strategies", f"no strategies.toml {where}in the working directory or beside the project; "
                          "pass --strategies FILE")
    return found


def resolve_strategy(cfg: ExperimentConfig, name: str | None, strategies_file: str | None,
                     extra_plugins: tuple[Any, ...] = ()) -> tuple[Any, NamedStrategy]:
    pm, registry = build_plugin_manager(extra_plugins)
    path = strategies_path(cfg, strategies_file)
    named = load_strategies(path, registry)
    chosen = name or cfg.run.strategy
    if chosen is None:
        raise ConfigError("--strategy", f"no strategy selected; pass --strategy NAME (defined: {', '.join(sorted(named))})")
    return pm, select_strategy(chosen, named, str(path))


def check_pretrain_cut(encoder_cut_date: str, meta: dict[str, Any], encoder: str = "encoder") -> None:
    """Refuse an encoder pretrained on data after this run's training period (it has seen val/test): its
    ``cut_date`` against the ``train_cut_date`` the data kind reports (ISO dates)."""
    cut = meta.get("train_cut_date")
    if cut is not None and np.datetime64(encoder_cut_date) > np.datetime64(str(cut)):
        raise DataError(f"{encoder}: pretrained on data up to {encoder_cut_date}, but this run's training period "
                        f"ends on {cut}: the encoder has seen the validation/test period. Pretrain again with "
                        "the same [data] table (moola-engine pretrain --config ...)")


def check_encoder_cut(path: Path, meta: dict[str, Any], log: Any) -> None:
    """Refuse an encoder pretrained on data after this run's training period.

    The general form of the OHLC example's leakage check: a pretraining sidecar (``<encoder>.json``) that
    states ``cut_date`` (the last date its data reached) is compared with the ``train_cut_date`` the data
    kind reports in its meta (ISO dates).  Data without time order reports none: nothing to leak through time.
    """
    sidecar = path.with_suffix(".json")
    cut = meta.get("train_cut_date")
    if cut is None:
        return
    encoder_cut = json.loads(sidecar.read_text(encoding="utf-8")).get("cut_date") if sidecar.is_file() else None
    if encoder_cut is None:
        log.warning(Event.PRETRAIN_CUT_CHECK, ok=None, encoder=str(path), train_cut_date=cut,
                    message=f"{sidecar} has no cut_date: cannot prove the encoder never saw the validation/test period")
        return
    check_pretrain_cut(str(encoder_cut), meta, encoder=str(path))
    log.info(Event.PRETRAIN_CUT_CHECK, ok=True, encoder=str(path), encoder_cut_date=encoder_cut, train_cut_date=cut)


def save_predictions(path: Path, engine: Engine, splits: Any) -> None:
    """Validation (and test) outputs and targets, for red flags and paired statistics across runs."""
    arrays: dict[str, np.ndarray] = {}
    for split in ("val", "test"):
        data = getattr(splits, split)
        if has_rows(data):
            outputs, targets = engine.outputs(data)
            arrays[f"{split}_outputs"] = outputs.cpu().numpy()
            arrays[f"{split}_y"] = targets.cpu().numpy()
    if arrays:
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        cast(Any, np.savez)(tmp, **arrays)  # numpy's stub lets **arrays fill its keyword flags
        os.replace(tmp, path)


def train(
    cfg: ExperimentConfig,
    *,
    strategy: str | None = None,
    strategies_file: str | None = None,
    extra_plugins: tuple[Any, ...] = (),
    stream: IO[str] | None = None,
    capture: bool = False,
    resume: str | Path | None = None,
    on_run_dir: Callable[[Path], None] | None = None,
    pinned: dict[str, Any] | None = None,
    fit_fn: Callable[[Engine, ResumeState | None], FitResult] | None = None,
) -> RunOutcome:
    """Run one training as ``cfg`` describes; raises :class:`MoolaError` subclasses for user errors.

    ``resume``: a run folder to continue from its newest checkpoint, in place
    (``cfg`` is then ``resume.run_config(resume)``; the strategy comes from its config.json).
    A symlink (``runs/latest``) is resolved to its real folder before anything is read or written.
    ``on_run_dir``: called with the run folder as soon as it exists (before any training), e.g. to write its
    path to a file (``train --run-dir-file``): the race-free way to learn which folder this run writes.
    ``pinned``: ``[train]`` values set on the command line (``--epochs``): they win over the strategy's own
    ``[strategy.NAME.train]`` values, which win over the experiment's ``[train]``.
    ``fit_fn``: what trains the built engine instead of ``engine.fit(start)``
    (:mod:`moola_engine.experiments.batched` trains several runs' engines as one stacked computation through it);
    everything before and after stays this function's.
    """
    if resume is not None:
        resume = resolve_run_dir(resume)
    if resume is None:
        pm, named = resolve_strategy(cfg, strategy, strategies_file, extra_plugins)
    else:
        pm, named = resume_strategy(Path(resume), extra_plugins)
    cfg = named.configure(cfg)  # [strategy.NAME.train]: the strategy's own lr, epochs, optimizer, ...
    if pinned:
        cfg = attrs.evolve(cfg, train=attrs.evolve(cfg.train, **pinned))
    base_dir = cfg.base_dir
    allow = set(cfg.run.allow)

    # --- the pre-flight: refuse a schedule that cannot keep its promise before any data is loaded
    pre = preflight(cfg, pm=pm, named=named)
    strat, model, specs, groups = pre.strategy, pre.model, pre.specs, pre.groups
    sinks = check_sinks(cfg, pm)  # [[sinks]]: unknown names, bad options, missing extras fail here

    start: ResumeState | None = None
    # torchrun: join the process group now; only rank 0 writes the run folder, rank k writes runs/.rank<k>/
    dist_ctx = distributed.setup(select_device(cfg.train.device))
    if resume is None:
        runs_dir = cfg.resolve(cfg.run.runs_dir)  # against the experiment file, like every path in it
        if not dist_ctx.is_main:
            runs_dir = runs_dir / f".rank{dist_ctx.rank}"
        run_dir = create_run_dir(runs_dir, new_run_id(named.name, cfg.train.seed, cfg.run.name))
    else:
        run_dir, start = open_resume(Path(resume))
    run_id = run_dir.name
    if not dist_ctx.is_main:  # rank k keeps its own metrics.csv; dashboards get rank 0's run only
        sinks = [(info, params) for info, params in sinks if info.name == "csv"]
    fanout = open_sinks(sinks, SinkRun(run_dir=run_dir, run_id=run_id, strategy=named.name, resumed=resume is not None,
                                       history=list(start.meta.get("history", [])) if start is not None else []))
    runlog = RunLog(run_dir / "events.jsonl", console=cfg.run.console, stream=stream or sys.stderr, capture=capture,
                    console_level="info" if dist_ctx.is_main else "error", sinks=fanout)
    log = runlog.logger
    clear_contextvars()
    bind(run_id=run_id, strategy=named.name)
    try:
        if on_run_dir is not None:
            on_run_dir(run_dir)
        if resume is None:
            log.info(Event.RUN_STARTED, run_dir=str(run_dir), version=__version__, config_file=cfg.source,
                     pid=os.getpid(), host=socket.gethostname())  # `runs list` tells running from killed
        else:  # no checkpoint yet: the run starts over from its first step, in the same folder
            log.info(Event.RUN_RESUMED, run_dir=str(run_dir), version=__version__,
                     checkpoint=str(start.path) if start else None, next_epoch=start.next_epoch if start else 0,
                     pid=os.getpid(), host=socket.gethostname())
        log.debug(Event.CONFIG_LOADED, config=unstructure(cfg))
        pre.replay_overrides(log)
        log.info(Event.STRATEGY_SELECTED, plugin=named.plugin, params=unstructure(named.params),
                 source=named.info.source, strategies_file=named.source,
                 **({"train_overrides": unstructure(named.train)} if named.train else {}))
        if resume is None:
            write_json_atomic(run_dir / "config.json", {"config": unstructure(cfg), "strategy": named.name,
                                                        "plugin": named.plugin, "params": unstructure(named.params),
                                                        "cwd": os.getcwd()})
        link_latest(run_dir)

        # pretrained weights after the model is built, before the engine; enabled = false is the control
        pretrained = load_pretrained(model, cfg.model.pretrained, groups=groups, base_dir=base_dir, log=log)
        splits = build_splits(cfg.data, base_dir=base_dir, seed=cfg.train.seed, source=cfg.source, task=pre.task,
                              datasets=registries(pm)["dataset"])
        write_json_atomic(run_dir / "data.json", splits.meta)  # spans, label, standardisation statistics
        log.info(Event.DATA_LOADED, kind=cfg.data.kind, train=len(splits.train),
                 val=len(splits.val) if splits.val is not None else 0,
                 test=len(splits.test) if splits.test is not None else 0, train_cut_date=splits.meta.get("train_cut_date"))
        if pretrained is not None and cfg.model.pretrained is not None:
            check_encoder_cut(cfg.resolve(cfg.model.pretrained.path), splits.meta, log)
        for obs_name, observer in build_observers(cfg, run_dir):
            register_checked(pm, observer, name=obs_name)
        register_checked(pm, strat, name=f"strategy:{named.name}")  # last: runs first among plain impls
        engine = Engine(
            model, train=cfg.train, groups=specs, pm=pm, strategy=strat, train_data=splits.train,
            val_data=splits.val, checks=cfg.checks, logger=log, run_dir=run_dir, strategy_name=named.name,
            allow=sorted(allow), pretrained=pretrained, plan=pre.plan, loss_fn=pre.task.loss,
            eval_fn=pre.task.metrics, dist=dist_ctx,
        )
        fit = engine.fit(start=start) if fit_fn is None else fit_fn(engine, start)
        test_metrics = engine.evaluate(splits.test, prefix="test_") if splits.test is not None else {}
        if test_metrics:
            log.info(Event.EVALUATION_COMPLETED, split="test", **test_metrics)
        save_predictions(run_dir / "predictions.npz", engine, splits)
        if dist_ctx.is_main:  # the final weights, for `moola-engine export` and [model.pretrained] of a next run
            save_weights({k: v.detach().cpu().contiguous().clone() for k, v in engine.model.state_dict().items()},
                         run_dir / "model.safetensors", {"run_id": run_id, "strategy": named.name})
        write_json_atomic(run_dir / "result.json", {
            "run_id": run_id, "strategy": named.name, "epochs_run": fit.epochs_run, "best_epoch": fit.best_epoch,
            "stopped_early": fit.stopped_early, "stop_reason": fit.stop_reason, "seconds": fit.seconds,
            "restored_before_transitions": fit.restored_before,
            "final": fit.history[-1] if fit.history else {}, "test": test_metrics,
        })
        log.info(Event.RUN_FINISHED, epochs_run=fit.epochs_run, stop_reason=fit.stop_reason,
                 seconds=round(fit.seconds, 3), **test_metrics)
        return RunOutcome(run_id=run_id, run_dir=run_dir, fit=fit, test_metrics=test_metrics, strategy=named.name,
                          model=engine.model)
    except MoolaError as exc:
        log.error(Event.RUN_FAILED, error=str(exc), error_type=type(exc).__name__)
        raise
    except BaseException as exc:
        log.error(Event.RUN_FAILED, error=f"{type(exc).__name__}: {exc}", error_type=type(exc).__name__)
        raise
    finally:
        runlog.close()
        clear_contextvars()
        distributed.shutdown(dist_ctx)
