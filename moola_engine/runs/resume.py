"""Resuming a run from its newest checkpoint (``moola-engine train --resume runs/<id>``).

Reading a checkpoint back (hashes checked, loads that never run code), restoring the weights and
:meth:`Engine.load_state_dict`, proving the restored freeze state is what the strategy says for that epoch
(``resume.check``), and the run folder's own record of how it was started (config.json).  The format is
:mod:`moola_engine.runs.checkpoint`'s.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import attrs
import torch

from moola_engine import jsonsafe
from moola_engine.config import ExperimentConfig, structure
from moola_engine.core.state import decode
from moola_engine.errors import CheckFailed, CheckpointError, ConfigError, MoolaError, WeightsError
from moola_engine.logs import Event
from moola_engine.runs.checkpoint import FORMAT, bn_modes, list_checkpoints, stateful_plugins, train_fingerprint
from moola_engine.runs.folders import ensure_writable
from moola_engine.safeio import load_safetensors, sha256

# --------------------------------------------------------------------------- reading and resuming


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """state.json and state.safetensors of one checkpoint, verified against the recorded hashes."""
    meta_path = path / "state.json"
    try:
        meta = jsonsafe.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: incomplete checkpoint (no state.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a moola-engine checkpoint of format {FORMAT} "
                              f"(format: {meta.get('format') if isinstance(meta, dict) else '?'})")
    for f, rec in meta.get("files", {}).items():
        p = path / f
        if not p.is_file() or p.stat().st_size != rec["bytes"] or sha256(p) != rec["sha256"]:
            raise CheckpointError(f"{p}: missing or corrupt (size or sha256 differs from state.json); "
                                  "delete this checkpoint folder to resume from the one before it")
    try:
        tensors = load_safetensors(path / "state.safetensors")
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from exc
    return meta, tensors


class ResumeState:
    """One checkpoint, ready to be restored into an :class:`~moola_engine.core.engine.Engine` by ``fit(start=...)``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.meta, self.tensors = read_checkpoint(self.path)
        self.expected: Any = None

    @classmethod
    def latest(cls, run_dir: Path) -> ResumeState:
        found = list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"{run_dir}: no checkpoint to resume from (the run stopped before its first "
                                  "checkpoint was written, or [checkpoint] enabled = false); start it again")
        return cls(found[-1])

    @property
    def next_epoch(self) -> int:
        return int(self.meta["next_epoch"])

    # ------------------------------------------------------------------ restore
    def restore(self, engine: Any) -> int:
        """Restore the weights and :meth:`Engine.load_state_dict` into ``engine``; returns the next epoch.

        The engine then starts its observers and calls :meth:`restore_plugins` (see ``Engine.fit``).
        """
        from moola_engine.core.plan import compute_plan

        meta = self.meta
        self._compatible(engine)
        # what the strategy says for each epoch, given the metrics the run really had: a fresh copy, replayed
        self.expected = compute_plan(engine.strategy, engine.freezer.groups, engine.freezer.head_groups,
                                     engine.epochs, engine.config.lr, name=engine.strategy_name,
                                     model_groups=engine.groups, train=engine.config, history=meta["history"])
        missing, unexpected = engine.model.load_state_dict(load_safetensors(self.path / "model.safetensors"),
                                                           strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{self.path}/model.safetensors does not fit the model: missing "
                                  f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        scheduler = meta["scheduler"]
        if scheduler is None:  # written before the engine saved its lr schedule (it always held "scheduler": null)
            if engine.lr_schedule.scheduler is not None:
                raise CheckpointError(
                    f"{self.path}: this checkpoint has no lr scheduler state (written by an older moola-engine, "
                    f'which never saved it), but this run uses train.scheduler = "{engine.lr_schedule.kind}": '
                    "it cannot continue the schedule exactly; start the run again")
            scheduler = {"kind": engine.lr_schedule.kind, "scheduler": None}
        else:
            scheduler = decode(scheduler, self.tensors)
        es = meta["early_stopping"]
        state = {
            "step": meta["step"], "epoch": self.next_epoch, "history": meta["history"], "freezer": meta["freezer"],
            "optimizer": decode(meta["optimizer"], self.tensors), "scheduler": scheduler,
            "rng": decode(meta["rng"], self.tensors),
            "early_stopping": {**es, "best_state": decode(es["best_state"], self.tensors)
                               if es["best_state"] is not None else None},
            "strategy": {"state": decode(meta["strategy"]["state"], self.tensors),
                         "unsaved": meta["strategy"]["unsaved"]},
        }
        try:
            engine.load_state_dict(state)
        except MoolaError as exc:
            raise CheckpointError(f"cannot resume from {self.path}: {exc}") from exc
        wrong = [n for g in engine.groups for n, p in g.params if p.requires_grad != meta["trainable_params"][n]]
        if wrong:
            raise CheckpointError(f"{self.path}: trainable mask differs after restoring the freezer: {wrong[:5]}")
        engine.last_checkpoint = self.path
        engine.log.info(Event.CHECKPOINT_LOADED, path=str(self.path), epoch=meta["epoch"], at_step=engine.step,
                        next_epoch=self.next_epoch, trainable=engine.freezer.trainable_groups())
        return self.next_epoch

    def restore_plugins(self, engine: Any) -> None:
        """The state of the other plugins that keep one (after their ``on_fit_start``, which resets them)."""
        meta = self.meta
        plugins = stateful_plugins(engine)
        if sorted(plugins) != sorted(meta["plugins"]):
            raise CheckpointError(f"{self.path}: plugins with state differ: checkpoint has "
                                  f"{sorted(meta['plugins']) or 'none'}, this run has {sorted(plugins) or 'none'}")
        for name, plugin in plugins.items():
            plugin.load_state_dict(decode(meta["plugins"][name], self.tensors))

    def _compatible(self, engine: Any) -> None:
        meta = self.meta
        problems = []
        if meta["strategy"]["unsaved"]:
            problems.append(f'strategy "{meta["strategy"]["name"]}" keeps state that was not saved: '
                            f'{", ".join(meta["strategy"]["unsaved"])}; give it state_dict()/load_state_dict()')
        if meta["strategy"]["name"] != engine.strategy_name:
            problems.append(f'strategy: checkpoint "{meta["strategy"]["name"]}", this run "{engine.strategy_name}"')
        ours = [{"name": g.name, "head": g.head, "params": [n for n, _ in g.params]} for g in engine.groups]
        if meta["groups"] != ours:
            problems.append("parameter groups differ: checkpoint "
                            f"{[g['name'] for g in meta['groups']]}, this model {[g['name'] for g in ours]}")
        fp = train_fingerprint(engine)
        for k, v in meta["train"].items():
            if fp.get(k) != v:
                problems.append(f"train.{k}: checkpoint {v!r}, this run {fp.get(k)!r}")
        if meta["device"] != engine.device.type:
            problems.append(f"device: checkpoint written on {meta['device']}, this run is on {engine.device.type} "
                            "(the batch order cannot continue exactly)")
        if problems:
            raise CheckpointError(f"cannot resume from {self.path}: " + "; ".join(problems))

    # ------------------------------------------------------------------ the check
    def check(self, engine: Any, epoch: int) -> None:
        """Before the first step: the freeze state must be what the strategy says for ``epoch`` (``resume.check``)."""
        planned = self.expected.epochs[epoch]
        fz = engine.freezer
        mismatches = []
        for g in fz.groups:
            if fz.is_trainable(g) != planned.trainable[g]:
                mismatches.append(f"group {g} is {'trainable' if fz.is_trainable(g) else 'frozen'} but the "
                                  f"strategy says {'trainable' if planned.trainable[g] else 'frozen'}")
            elif planned.trainable[g] and not _close(fz.lr(g), planned.lr[g]):
                mismatches.append(f"group {g} trains at lr {fz.lr(g):.6g} but the strategy says {planned.lr[g]:.6g}")
        flags = [n for grp in engine.groups for n, p in grp.params
                 if p.requires_grad != (fz.is_trainable(grp.name) and n not in set(fz.frozen_params(grp.name)))]
        if flags:
            mismatches.append(f"requires_grad disagrees with the freezer for {', '.join(flags[:5])}")
        modes = bn_modes(engine)
        status = "mismatch" if mismatches else "ok"
        (engine.log.error if mismatches else engine.log.info)(
            Event.RESUME_CHECK, status=status, checkpoint=str(self.path),
            expected={g: planned.trainable[g] for g in fz.groups},
            actual={g: fz.is_trainable(g) for g in fz.groups},
            lr={g: fz.lr(g) for g in fz.groups}, bn_modes=modes, mismatches=mismatches,
        )
        if mismatches:
            raise CheckFailed(f"resume check failed at epoch {epoch} after restoring {self.path}: "
                              + "; ".join(mismatches) + ". The run was stopped before its first step")


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1e-30)


# --------------------------------------------------------------------------- run folders


def run_record(run_dir: Path) -> dict[str, Any]:
    """``config.json`` of a run folder (config, strategy name, plugin, params)."""
    path = Path(run_dir) / "config.json"
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder")
    try:
        rec = jsonsafe.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {run_dir} is not a moola-engine run folder") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(rec, dict) or not {"config", "strategy", "plugin", "params"} <= set(rec):
        raise CheckpointError(f"{path}: expected keys config, strategy, plugin, params")
    return rec


def run_config(run_dir: Path) -> ExperimentConfig:
    """The experiment config a run was started with (paths resolved as they were then)."""
    rec = run_record(run_dir)
    data = copy.deepcopy(rec["config"])
    source = data.pop("source", "<defaults>") if isinstance(data, dict) else "<defaults>"
    cwd = rec.get("cwd")
    if source != "<defaults>" and cwd and not Path(source).is_absolute():
        source = str(Path(cwd) / source)
    try:
        cfg = structure(data, ExperimentConfig, source=str(Path(run_dir) / "config.json"), path="$.config")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc
    return attrs.evolve(cfg, source=source)


def open_resume(run_dir: Path) -> tuple[Path, ResumeState | None]:
    """A run folder to continue in (unfinished, writable) and its newest checkpoint.

    None when the run was stopped before its first checkpoint: it then starts
    over from step 0 (its initial weights follow ``train.seed``, so nothing is lost).
    """
    run_dir = Path(run_dir)
    run_record(run_dir)
    if (run_dir / "result.json").exists():
        raise CheckpointError(f"{run_dir}: this run finished (result.json exists); nothing to resume")
    ensure_writable(run_dir)
    return run_dir, ResumeState.latest(run_dir) if list_checkpoints(run_dir) else None


def resume_strategy(run_dir: Path, extra_plugins: tuple[Any, ...] = ()) -> tuple[Any, Any]:
    """(plugin manager, NamedStrategy) as the run recorded them: strategies.toml is not read again."""
    from moola_engine.core.plugins import NamedStrategy, NoParams, build_plugin_manager

    rec = run_record(run_dir)
    source = str(Path(run_dir) / "config.json")
    pm, registry = build_plugin_manager(extra_plugins)
    if rec["plugin"] not in registry:
        raise CheckpointError(f'{source}: strategy plugin "{rec["plugin"]}" is not installed; installed plugins: '
                              f"{', '.join(registry.names())}")
    info = registry[rec["plugin"]]
    params: Any = structure(rec["params"], info.params or NoParams, source=source, path="$.params")
    return pm, NamedStrategy(name=rec["strategy"], plugin=rec["plugin"], params=params,
                             description=info.description, info=info, source=source)
