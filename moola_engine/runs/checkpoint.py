"""Checkpoints that know about freezing: what a checkpoint holds, and writing it (resuming: :mod:`.resume`).

A checkpoint is a folder ``runs/<id>/checkpoints/epoch-NNNN/`` written at the
end of epoch NNNN (after ``on_epoch_end``, before early stopping looks at it):

* ``model.safetensors``   the model's state_dict (weights and buffers);
* ``state.safetensors``   every other tensor: optimizer state, RNG states,
                          the best-so-far weights (``restore_best``), tensors
                          a strategy keeps;
* ``state.json``          everything else: epoch, step, history, the freezer
                          (trainable mask and lr scale by group, transitions),
                          the trainable mask by parameter name, BN modes,
                          per-group lr, optimizer param groups, lr scheduler,
                          the strategy's own state, early stopping, file hashes.

Everything but the weights comes from :meth:`Engine.state_dict` and goes back
through :meth:`Engine.load_state_dict`: this module only encodes, writes, reads
and decodes it, and touches nothing private of the engine.

It is written into a temporary folder, every file fsync'ed, renamed into
place, and the parent fsync'ed: a kill at any moment leaves either the
complete checkpoint or none.  Only the newest ``checkpoint.keep`` survive.
The training loop only captures the state and copies the weights to host
memory; the writing runs on a background thread, and a checkpoint counts
(``engine.last_checkpoint``, ``checkpoint.saved``) once it is complete: at
the next epoch end, at fit end, or before ``fit`` raises.

Resuming (``moola-engine train --resume runs/<id>``) restores all of it,
fires ``on_fit_start`` for the observers (never for the strategy: its state
comes from the checkpoint, so a resume cannot re-run its initial freeze), and
before the first step compares the freeze state with what the strategy says
for that epoch, replaying a fresh copy over the recorded metrics
(``resume.check``).  A mismatch stops the run.

A strategy's state: its ``state_dict()``/``load_state_dict()`` when it has both;
otherwise its attributes except ``params`` and ``name``, when they are
JSON-safe (numbers, strings, lists, dicts, tensors).  A strategy keeping
something else still checkpoints, but resuming it is refused with the
attribute named.  Other plugins take part when they define both methods.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import re
import shutil
import time
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moola_engine import jsonsafe
from moola_engine.config import CheckpointConfig
from moola_engine.core.freezing import apply_module_modes
from moola_engine.core.hookspecs import hookimpl
from moola_engine.core.state import Unencodable, encode, strategy_state
from moola_engine.errors import CheckpointError
from moola_engine.logs import Event
from moola_engine.runs.background import BackgroundWriter
from moola_engine.safeio import fsync_dir, fsync_file, sha256

FORMAT = 1
DIRNAME = "checkpoints"
_NAME = re.compile(r"^epoch-(\d{4,})$")


# --------------------------------------------------------------------------- what a run's state is


def stateful_plugins(engine: Any) -> dict[str, Any]:
    """Registered plugins (not the strategy, not modules) that define state_dict and load_state_dict."""
    out = {}
    for name, plugin in engine.pm.list_name_plugin():
        if plugin is engine.strategy or isinstance(plugin, (types.ModuleType, Checkpointer)) or plugin is None:
            continue
        if callable(getattr(plugin, "state_dict", None)) and callable(getattr(plugin, "load_state_dict", None)):
            out[name] = plugin
    return out


def rng_state(engine: Any) -> dict[str, Any]:
    """The engine's random streams (:meth:`~moola_engine.core.engine.Engine.rng_state`)."""
    state: dict[str, Any] = engine.rng_state()
    return state


def set_rng_state(engine: Any, state: Mapping[str, Any]) -> None:
    engine.set_rng_state(state)


def bn_modes(engine: Any) -> dict[str, str]:
    """The BatchNorm mode each group trains with under the current freeze state (``-``: no BN)."""
    trainable = {g: engine.freezer.is_trainable(g) for g in engine.freezer.groups}
    saved = {name: m.training for name, m in engine.model.named_modules()}
    try:
        return apply_module_modes(engine.groups, trainable, train_bn=engine.config.train_bn,
                                  frozen_dropout=engine.config.frozen_dropout)
    finally:
        for name, m in engine.model.named_modules():
            m.training = saved[name]


def train_fingerprint(engine: Any) -> dict[str, Any]:
    c = engine.config
    return {"epochs": c.epochs, "batch_size": c.batch_size, "lr": c.lr, "optimizer": c.optimizer, "seed": c.seed,
            "n_train": len(engine.train_data)}


def capture(engine: Any, epoch: int, reasons: list[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The state of ``engine`` at the end of ``epoch``: (state.json content, tensors for state.safetensors)."""
    tensors: dict[str, torch.Tensor] = {}
    state = engine.state_dict()
    strat, unsaved = state["strategy"]["state"], state["strategy"]["unsaved"]
    try:
        strat_json = encode(strat, "strategy", tensors)
    except Unencodable as exc:
        raise CheckpointError(f'strategy "{engine.strategy_name}": state_dict() returned something that cannot '
                              f"be saved ({exc})") from exc
    plugins = {}
    for name, plugin in stateful_plugins(engine).items():
        try:
            plugins[name] = encode(plugin.state_dict(), f"plugin/{name}", tensors)
        except Unencodable as exc:
            raise CheckpointError(f'plugin "{name}": state_dict() returned something that cannot be saved ({exc})') from exc
    es = state["early_stopping"]
    best = es["best_state"]
    meta = {
        "format": FORMAT,
        "epoch": epoch,
        "next_epoch": epoch + 1,
        "step": state["step"],
        "reasons": reasons,
        "saved_at": dt.datetime.now(dt.UTC).isoformat(),
        "device": engine.device.type,
        "strategy": {"name": engine.strategy_name, "class": type(engine.strategy).__qualname__,
                     "state": strat_json, "unsaved": unsaved},
        "plugins": plugins,
        "train": train_fingerprint(engine),
        "groups": [{"name": g.name, "head": g.head, "params": [n for n, _ in g.params]} for g in engine.groups],
        "freezer": state["freezer"],
        "trainable_params": {n: bool(p.requires_grad) for g in engine.groups for n, p in g.params},
        "bn_modes": bn_modes(engine),
        "lr": {g: {"lr": pg["lr"], "lr_scale": engine.freezer.lr_scale(g)}
               for g, pg in zip(engine.freezer.groups, engine.optimizer.param_groups, strict=True)},
        "optimizer": encode(state["optimizer"], "optimizer", tensors),
        "scheduler": encode(state["scheduler"], "scheduler", tensors),
        "rng": encode(state["rng"], "rng", tensors),
        "early_stopping": {"best": es["best"], "best_epoch": es["best_epoch"],
                           "best_metric": es["best_metric"], "since_improved": es["since_improved"],
                           "best_state": encode(best, "best", tensors) if best is not None else None},
        "history": state["history"],
    }
    return meta, tensors


# --------------------------------------------------------------------------- writing


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def save_checkpoint(engine: Any, root: Path, epoch: int, reasons: list[str]) -> Path:
    """Write the checkpoint of ``epoch`` under ``root`` atomically, in this thread; returns its folder."""
    meta, tensors = capture(engine, epoch, reasons)
    # one independent contiguous copy per entry: cuDNN packs LSTM weights into one flat buffer on CUDA,
    # and safetensors refuses tensors that share storage
    weights = {k: v.detach().contiguous().clone() for k, v in engine.model.state_dict().items()}
    return write_checkpoint(root, epoch, meta, tensors, weights, engine.last_checkpoint)


def host_copy(state: Mapping[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
    """The tensors of ``state`` copied into host memory, into ``buffers`` (reused from the last call when the
    shapes and dtypes match: no allocation per checkpoint).  From CUDA the buffers are pinned and the copies
    do not block: the returned event (None on the CPU) completes when they are done.  Each entry is its own
    contiguous buffer (cuDNN packs LSTM weights into one flat buffer; safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    cuda_devices = set()
    for k, v in state.items():
        v = v.detach()
        buf = buffers.get(k)
        if buf is None or buf.shape != v.shape or buf.dtype != v.dtype:
            buf = buffers[k] = torch.empty(v.shape, dtype=v.dtype, device="cpu", pin_memory=v.is_cuda)
        buf.copy_(v, non_blocking=v.is_cuda)
        if v.is_cuda:
            cuda_devices.add(v.device)
        out[k] = buf
    for name in [k for k in buffers if k not in state]:
        del buffers[name]
    events = []
    for dev in cuda_devices:
        ev = torch.cuda.Event()  # type: ignore[no-untyped-call]  # torch leaves Event.__init__ unannotated
        ev.record(torch.cuda.current_stream(dev))
        events.append(ev)
    return out, events or None


def write_checkpoint(root: Path, epoch: int, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                     weights: dict[str, torch.Tensor], previous: Path | None, ready: Any = None) -> Path:
    """Write a captured checkpoint atomically (files, fsync, rename, fsync of the parent); returns its folder.

    Touches no engine: it runs on the checkpointer's background thread.  ``ready``: CUDA events to wait for
    before ``weights`` may be read (their non-blocking copies).  ``previous`` is named in the error message."""
    final = root / checkpoint_name(epoch)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for ev in ready or ():
            ev.synchronize()
        save_file(weights, str(tmp / "model.safetensors"))
        save_file(tensors, str(tmp / "state.safetensors"))
        meta["files"] = {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256(tmp / f)}
                         for f in ("model.safetensors", "state.safetensors")}
        with open(tmp / "state.json", "w", encoding="utf-8") as fh:
            jsonsafe.dump(meta, fh, indent=1)  # strict JSON: inf/nan (an early-stopping best) tagged
        for f in ("model.safetensors", "state.safetensors", "state.json"):
            fsync_file(tmp / f)
        fsync_dir(tmp)
        if final.exists():  # only when a resumed run re-saves an epoch: move the old one aside first
            trash = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        last = f"; the previous checkpoint {previous} is intact" if previous else ""
        raise CheckpointError(f"cannot write checkpoint {final}: {exc.strerror or exc}{last}") from exc
    except Unencodable as exc:  # pragma: no cover - capture() encodes everything first
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(str(exc)) from exc
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (renamed into place, so complete), oldest first."""
    root = Path(run_dir) / DIRNAME
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints, and temporary folders of interrupted saves."""
    removed = []
    for stale in root.glob(".tmp-*"):
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(root.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    if removed:
        fsync_dir(root)
    return removed


# --------------------------------------------------------------------------- the observer


class Checkpointer:
    """Observer plugin: a resumable checkpoint at epoch ends, keeping the newest ``keep``.

    Saves at the end of epoch ``e`` when ``(e + 1) % every == 0``, when a
    transition happened during ``e`` (``transition``), when the plan schedules
    one at ``e + 1`` (``before-transition``: the state the transition acts on),
    and at the last epoch.  Epoch ends are the only points where the whole
    loop's state is known; a transition inside ``on_epoch_start`` is redone on
    resume by the restored strategy, and ``resume.check`` proves it was.
    """

    def __init__(self, run_dir: Path, cfg: CheckpointConfig) -> None:
        self.root = Path(run_dir) / DIRNAME
        self.cfg = cfg
        self._transitioned = False
        self._writer: BackgroundWriter | None = None
        self._pending: dict[str, Any] | None = None  # the write in flight: what to log once it is complete
        self._host: dict[str, torch.Tensor] = {}  # host buffers of the weights, reused checkpoint to checkpoint

    @hookimpl(trylast=True)
    def on_fit_start(self, engine: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        prune(self.root, self.cfg.keep)  # leftovers of a save interrupted by a kill
        if self._writer is None:
            self._writer = BackgroundWriter("moola-checkpoint")
        if hasattr(engine, "on_exit"):
            engine.on_exit.append(lambda failing: self._finish(engine, raise_errors=not failing))

    @hookimpl(trylast=True)
    def on_fit_end(self, engine: Any) -> None:
        self._finish(engine, raise_errors=True)

    def _finish(self, engine: Any, raise_errors: bool) -> None:
        """Wait for the write in flight.  A failure raises (``raise_errors``) or, when the run is already
        failing, is logged as ``checkpoint.failed`` so that the error that stopped the run stays the one raised."""
        try:
            self._collect(engine)
        except CheckpointError as exc:
            if raise_errors:
                raise
            engine.log.error(Event.CHECKPOINT_FAILED, error=str(exc))

    @hookimpl(trylast=True)
    def on_freeze(self, engine: Any) -> None:
        self._transitioned = True

    @hookimpl(trylast=True)
    def on_unfreeze(self, engine: Any) -> None:
        self._transitioned = True

    def reasons(self, engine: Any, epoch: int) -> list[str]:
        """Why a checkpoint is written at the end of ``epoch`` (empty: none is).  The weight checks ask too
        (``checks.every``): an epoch that is saved is always checked first."""
        reasons = []
        if (epoch + 1) % self.cfg.every == 0:
            reasons.append("every")
        if self._transitioned or engine.freezer.pending:
            reasons.append("transition")
        if engine.plan is not None and any(t["epoch"] == epoch + 1 for t in engine.plan.transitions):
            reasons.append("before-transition")
        if epoch == engine.epochs - 1:
            reasons.append("last")
        return reasons

    @hookimpl(trylast=True)
    def on_epoch_end(self, engine: Any, epoch: int) -> None:
        reasons = self.reasons(engine, epoch)
        self._transitioned = False
        # the previous write is complete (or its error surfaces) before this epoch's state is taken: one write
        # in flight at most, and its host buffers are free to reuse
        self._collect(engine)
        if not reasons:
            return
        t0 = time.perf_counter()
        meta, tensors = capture(engine, epoch, reasons)
        meta = copy.deepcopy(meta)  # JSON data only; the background thread must not see the run's later changes
        weights, ready = host_copy(engine.model.state_dict(), self._host)
        unsaved = strategy_state(engine.strategy)[1]
        if self._writer is None:  # used without on_fit_start (no on_exit wait: the caller collects)
            self._writer = BackgroundWriter("moola-checkpoint")
        self._pending = {"reasons": reasons, "at_step": engine.step, "t0": t0, "unsaved": unsaved,
                         "blocking": time.perf_counter() - t0}
        self._writer.submit(self._write, epoch, meta, tensors, weights, engine.last_checkpoint, ready)

    def _write(self, epoch: int, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
               weights: dict[str, torch.Tensor], previous: Path | None, ready: Any) -> tuple[Path, list[Path]]:
        """On the background thread: the files, fsync, the atomic rename (the commit point), then pruning."""
        path = write_checkpoint(self.root, epoch, meta, tensors, weights, previous, ready)
        return path, prune(self.root, self.cfg.keep)

    def _collect(self, engine: Any) -> None:
        """Wait for the write in flight, if any: a complete checkpoint becomes ``engine.last_checkpoint`` and is
        logged (``checkpoint.saved``); a failed write raises its CheckpointError here, in the training thread."""
        pending, self._pending = self._pending, None
        if pending is None or self._writer is None:
            return
        path, removed = self._writer.result()
        engine.last_checkpoint = path
        unsaved = pending["unsaved"]
        engine.log.info(Event.CHECKPOINT_SAVED, path=str(path), reasons=pending["reasons"], at_step=pending["at_step"],
                        bytes=sum((path / f).stat().st_size for f in ("model.safetensors", "state.safetensors",
                                                                      "state.json")),
                        seconds=round(time.perf_counter() - pending["t0"], 4),
                        blocking_seconds=round(pending["blocking"], 4), removed=[p.name for p in removed],
                        resumable=not unsaved, **({"unsaved": unsaved} if unsaved else {}))
