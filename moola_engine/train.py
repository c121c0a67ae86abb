"""One training run from config: the path ``moola-engine train`` takes.

TOML -> config objects -> plugin manager picks the named strategy -> plan
validated (before any data is loaded) -> run folder + event log -> data and
model -> pretrained weights -> engine loop -> test metrics -> result.json.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import attrs
import numpy as np

from . import __version__, distributed
from .checkpoint import ResumeState, open_resume, resume_strategy, seed_everything
from .config import ExperimentConfig, unstructure
from .data import build_splits
from .engine import Engine, FitResult, select_device
from .errors import ConfigError, MoolaError
from .freezing import resolve_groups
from .logs import Event, RunLog, bind, clear_contextvars, get_logger
from .models import build_model, group_specs
from .observers import build_observers
from .plan import compute_plan, validate_plan
from .plugins import (
    NamedStrategy,
    build_plugin_manager,
    default_strategies_file,
    load_strategies,
    register_checked,
    select_strategy,
)
from .run import create_run_dir, link_latest, new_run_id, write_json_atomic, write_metrics_csv
from .weights import load_pretrained


@attrs.define
class RunOutcome:
    run_id: str
    run_dir: Path
    fit: FitResult
    test_metrics: dict[str, float]
    strategy: str


def strategies_path(cfg: ExperimentConfig, override: str | None) -> Path:
    """--strategies FILE, else run.strategies_file (relative to the config), else ./strategies.toml."""
    if override:
        return Path(override)
    if cfg.run.strategies_file:
        p = Path(cfg.run.strategies_file)
        return p if p.is_absolute() else Path(cfg.source).parent / p
    found = default_strategies_file()
    if found is None:
        raise ConfigError("--strategies", "no strategies.toml here or beside the project; pass --strategies FILE")
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


def check_encoder_cut(path_str: str, base_dir: Path, meta: dict[str, Any], log: Any) -> None:
    """Refuse an encoder pretrained on bars after this run's training period (its sidecar names its cut date)."""
    from .ohlc import check_pretrain_cut

    path = Path(path_str)
    if not path.is_absolute():
        path = base_dir / path
    sidecar = path.with_suffix(".json")
    cut = meta.get("train_cut_date")
    if cut is None:
        return  # not a time series: nothing to leak through time
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
        if data is not None and len(data):
            arrays[f"{split}_outputs"] = engine.predict(data).cpu().numpy()
            arrays[f"{split}_y"] = data.y.cpu().numpy()
    if arrays:
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, **arrays)
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
    fit_fn: Callable[[Engine, ResumeState | None], FitResult] | None = None,
) -> RunOutcome:
    """Run one training as ``cfg`` describes; raises :class:`MoolaError` subclasses for user errors.

    ``resume``: a run folder to continue from its newest checkpoint, in place
    (``cfg`` is then ``checkpoint.run_config(resume)``; the strategy comes from its config.json).
    ``fit_fn``: what trains the built engine instead of ``engine.fit(start)`` (:mod:`.batched` trains several
    runs' engines as one stacked computation through it); everything before and after stays this function's.
    """
    if resume is None:
        pm, named = resolve_strategy(cfg, strategy, strategies_file, extra_plugins)
    else:
        pm, named = resume_strategy(Path(resume), extra_plugins)
    strat = named.build()
    base_dir = Path(cfg.source).parent if cfg.source != "<defaults>" else Path.cwd()
    allow = set(cfg.run.allow)

    # --- refuse a schedule that cannot keep its promise before any data is loaded
    seed_everything(cfg.train.seed)  # initial weights, and any plugin's numpy/random draws, follow train.seed
    model = build_model(cfg.model, cfg.source)
    specs = group_specs(model, cfg.model)
    groups = resolve_groups(model, specs)
    head = [g.name for g in groups if g.head]
    plan = compute_plan(strat, [g.name for g in groups], head, cfg.train.epochs, cfg.train.lr, name=named.name,
                        model_groups=groups, train=cfg.train)
    validate_plan(plan, strat, named.name, allow=allow, early_stopping=cfg.train.early_stopping,
                  log=get_logger())  # the engine validates again and logs any override in the run log

    start: ResumeState | None = None
    # torchrun: join the process group now; only rank 0 writes the run folder, rank k writes runs/.rank<k>/
    dist_ctx = distributed.setup(select_device(cfg.train.device))
    if resume is None:
        runs_dir = Path(cfg.run.runs_dir)
        if not runs_dir.is_absolute():
            runs_dir = Path.cwd() / runs_dir
        if not dist_ctx.is_main:
            runs_dir = runs_dir / f".rank{dist_ctx.rank}"
        run_dir = create_run_dir(runs_dir, new_run_id(named.name, cfg.train.seed, cfg.run.name))
    else:
        run_dir, start = open_resume(Path(resume))
    run_id = run_dir.name
    runlog = RunLog(run_dir / "events.jsonl", console=cfg.run.console, stream=stream or sys.stderr, capture=capture,
                    console_level="info" if dist_ctx.is_main else "error")
    log = runlog.logger
    clear_contextvars()
    bind(run_id=run_id, strategy=named.name)
    try:
        if resume is None:
            log.info(Event.RUN_STARTED, run_dir=str(run_dir), version=__version__, config_file=cfg.source)
        else:  # no checkpoint yet: the run starts over from its first step, in the same folder
            log.info(Event.RUN_RESUMED, run_dir=str(run_dir), version=__version__,
                     checkpoint=str(start.path) if start else None, next_epoch=start.next_epoch if start else 0)
        log.debug(Event.CONFIG_LOADED, config=unstructure(cfg))
        log.info(Event.STRATEGY_SELECTED, plugin=named.plugin, params=unstructure(named.params),
                 source=named.info.source, strategies_file=named.source)
        if resume is None:
            write_json_atomic(run_dir / "config.json", {"config": unstructure(cfg), "strategy": named.name,
                                                        "plugin": named.plugin, "params": unstructure(named.params),
                                                        "cwd": os.getcwd()})
        link_latest(run_dir)

        # pretrained weights after the model is built, before the engine; enabled = false is the control
        pretrained = load_pretrained(model, cfg.model.pretrained, groups=groups, base_dir=base_dir, log=log)
        splits = build_splits(cfg.data, base_dir=base_dir, seed=cfg.train.seed, source=cfg.source)
        write_json_atomic(run_dir / "data.json", splits.meta)  # spans, label, standardisation statistics
        log.info(Event.DATA_LOADED, kind=cfg.data.kind, train=len(splits.train), val=len(splits.val),
                 test=len(splits.test) if splits.test is not None else 0, train_cut_date=splits.meta.get("train_cut_date"))
        if pretrained is not None and cfg.model.pretrained is not None:
            check_encoder_cut(cfg.model.pretrained.path, base_dir, splits.meta, log)
        for obs_name, observer in build_observers(cfg, run_dir):
            register_checked(pm, observer, name=obs_name)
        register_checked(pm, strat, name=f"strategy:{named.name}")  # last: runs first among plain impls
        engine = Engine(
            model, train=cfg.train, groups=specs, pm=pm, strategy=strat, train_data=splits.train,
            val_data=splits.val, checks=cfg.checks, logger=log, run_dir=run_dir, strategy_name=named.name,
            allow=sorted(allow), pretrained=pretrained,
        )
        fit = engine.fit(start=start) if fit_fn is None else fit_fn(engine, start)
        test_metrics = engine.evaluate(splits.test, prefix="test_") if splits.test is not None else {}
        if test_metrics:
            log.info(Event.EVALUATION_COMPLETED, split="test", **test_metrics)
        write_metrics_csv(run_dir / "metrics.csv", fit.history)
        save_predictions(run_dir / "predictions.npz", engine, splits)
        write_json_atomic(run_dir / "result.json", {
            "run_id": run_id, "strategy": named.name, "epochs_run": fit.epochs_run, "best_epoch": fit.best_epoch,
            "stopped_early": fit.stopped_early, "stop_reason": fit.stop_reason, "seconds": fit.seconds,
            "final": fit.history[-1] if fit.history else {}, "test": test_metrics,
        })
        log.info(Event.RUN_FINISHED, epochs_run=fit.epochs_run, stop_reason=fit.stop_reason,
                 seconds=round(fit.seconds, 3), **test_metrics)
        return RunOutcome(run_id=run_id, run_dir=run_dir, fit=fit, test_metrics=test_metrics, strategy=named.name)
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
