"""The epoch loop, readable top to bottom.  Hook order: see :mod:`moola_engine.core.hookspecs`."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pluggy
import torch
from torch import nn

from moola_engine.config import ChecksConfig, GroupSpec, TrainConfig
from moola_engine.core import distributed
from moola_engine.core.context import FitResult, Resumable
from moola_engine.core.data import TensorData
from moola_engine.core.freezing import Freezer, ParamGroup, apply_module_modes, resolve_groups
from moola_engine.core.hostsync import sync_guard
from moola_engine.core.metrics import classification_metrics
from moola_engine.core.schedulers import build_lr_schedule
from moola_engine.errors import CheckFailed, MoolaError, PluginError
from moola_engine.logs import Event, bind, get_logger

if TYPE_CHECKING:
    from moola_engine.core.plan import Plan

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
EvalFn = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]


def select_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU.  An explicit device that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoolaError(f"train.device = {name!r} but CUDA is not available here (use \"auto\" or \"cpu\")")
    return dev


def build_optimizer(groups: Sequence[ParamGroup], cfg: TrainConfig) -> torch.optim.Optimizer:
    """One optimizer param group per model group, every parameter included from step 0."""
    param_groups = [{"params": g.tensors, "lr": cfg.lr, "group": g.name} for g in groups]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Engine:
    """Runs the epoch loop on one device and fires the hooks.

    Strategies and observers reach the run through this object: ``freezer``,
    ``model``, ``optimizer``, ``groups``, ``epochs``, ``config``, ``log``,
    ``run_dir``, ``history``, ``device``, ``step``, ``epoch``, ``result``,
    ``last_checkpoint`` (set by the checkpointer: the newest complete checkpoint).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        train: TrainConfig,
        groups: Sequence[GroupSpec] | None = None,
        pm: pluggy.PluginManager,
        strategy: Any,
        train_data: TensorData,
        val_data: TensorData | None = None,
        checks: ChecksConfig | None = None,
        loss_fn: LossFn | None = None,
        eval_fn: EvalFn | None = None,
        logger: Any = None,
        run_dir: Path | None = None,
        strategy_name: str | None = None,
        allow: Sequence[str] = (),
        pretrained: Mapping[str, torch.Tensor] | None = None,
        plan: Plan | None = None,
        dist: distributed.DistContext | None = None,
    ) -> None:
        self.config = train
        self.checks = checks or ChecksConfig()
        self.log = logger or get_logger()
        self.pm = pm
        self.strategy = strategy
        self.strategy_name = strategy_name or getattr(strategy, "name", None) or type(strategy).__name__
        self.run_dir = run_dir
        self.allow = set(allow)
        self.epochs = train.epochs
        self.dry_run = False
        # torchrun (WORLD_SIZE > 1): join the process group; on CUDA each rank takes cuda:LOCAL_RANK
        self.dist = dist if dist is not None else distributed.setup(select_device(train.device))
        self.device = self.dist.device
        self.history: list[dict[str, float]] = []
        self.pretrained = pretrained  # name -> tensor as loaded (for distance-from-pretrained checks)

        torch.manual_seed(train.seed)
        if train.threads is not None:
            torch.set_num_threads(train.threads)
        self.model = model.to(self.device)
        specs = list(groups) if groups else list(getattr(model, "default_groups", lambda: [])())
        self.groups = resolve_groups(self.model, specs)
        self.optimizer = build_optimizer(self.groups, train)
        self.freezer = Freezer(self.groups, base_lr=train.lr, optimizer=self.optimizer, logger=self.log)
        self.lr_schedule = build_lr_schedule(self.optimizer, train, math.ceil(len(train_data) / train.batch_size))
        self.freezer.lr_schedule = self.lr_schedule  # scale changes rescale the scheduler's per-group lrs
        self.train_data = train_data.to(self.device)
        self.val_data = val_data.to(self.device) if val_data is not None else None
        self.loss_fn: LossFn = loss_fn or nn.functional.cross_entropy
        self.eval_fn: EvalFn = eval_fn or classification_metrics
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(train.seed)
        self.step = 0
        self.epoch = 0
        self.plan: Any = plan
        """The validated plan (:func:`moola_engine.core.preflight.preflight`); None: computed and validated in fit."""
        self._since_improved = 0
        self.result = FitResult()
        self.es_best = math.nan  # best early-stopping metric so far (set by fit)
        self.best_state: dict[str, torch.Tensor] | None = None
        self.last_checkpoint: Path | None = None
        self.on_exit: list[Callable[[bool], None]] = []
        """Called with ``failing`` (True when ``fit`` is raising) when ``fit`` returns or raises, and before the
        engine names the last good checkpoint in an error; last registered first.  Plugins with work in flight
        (the checkpointer's background write) finish it there; when failing they must not raise.  Registered in
        on_fit_start; may be called more than once."""
        self._step_until: dict[int, tuple[Any, int]] = {}  # id(plugin) -> (plugin, first step it skips)
        self._step_cache: dict[tuple[int, ...], tuple[Any, Any]] = {}
        self._hooks_with_impls: set[str] = set()
        self._proof_pending = False  # the load proof is re-taken right before the first training step
        self._model_fn: Callable[[torch.Tensor], torch.Tensor] = self.model
        if train.compile:
            self._model_fn = torch.compile(self.model)  # type: ignore[assignment]
        # The training step calls _step_fn: the model itself, or under DDP a wrapper rebuilt after every
        # transition (_wrap_stale); predict/evaluate always call the unwrapped model (no collectives).
        self._step_fn: Callable[[torch.Tensor], torch.Tensor] = self._model_fn
        self._wrap_stale = self.dist.active
        self.sync_debug: str | None = None
        """``"warn"``/``"error"``: report host-device syncs inside the step loop (see :mod:`.hostsync`)."""
        if self.dist.active:
            from moola_engine.core.plugins import register_checked

            self.dist.broadcast_module(self.model)  # every rank starts from rank 0's weights
            register_checked(pm, distributed.ConsistencyCheck(self.dist), name="check:ddp.consistency")

    # ------------------------------------------------------------------ hooks
    def want_step_hooks(self, plugin: Any, until_step: int | None = None) -> None:
        """Call ``plugin``'s ``before_step``/``after_step`` only for steps before ``until_step`` (None: every step,
        the default of every plugin).  A check that needs a phase's first step asks for the steps it needs and
        costs nothing on the others: e.g. ``until_step=engine.step + 1`` inside ``after_step``: no more calls,
        then ``until_step=None`` when the next phase starts.  Effective from the next step; reset at fit start."""
        if until_step is None:
            self._step_until.pop(id(plugin), None)
        else:
            self._step_until[id(plugin)] = (plugin, int(until_step))

    def _step_callers(self, step: int) -> tuple[Any, Any]:
        """(before_step caller or None, after_step caller or None) for ``step``: the plugins that want it."""
        off = tuple(sorted(id(p) for p, until in self._step_until.values() if step >= until))
        cached = self._step_cache.get(off)
        if cached is None:
            skip = [p for p, until in self._step_until.values() if id(p) in off]
            callers = []
            for name in ("before_step", "after_step"):
                impls = [i for i in getattr(self.pm.hook, name).get_hookimpls() if id(i.plugin) not in off]
                callers.append(None if not impls else
                               self.pm.subset_hook_caller(name, remove_plugins=skip) if skip else
                               getattr(self.pm.hook, name))
            cached = self._step_cache[off] = (callers[0], callers[1])
        return cached

    def _fire(self, name: str, *, skip: Sequence[Any] = (), caller: Any = None, **kwargs: Any) -> None:
        """Call hook ``name`` (except on the ``skip`` plugins; or through ``caller``, a subset caller of it);
        then fire on_freeze/on_unfreeze for transitions requested inside it."""
        if name in self._hooks_with_impls:
            hook = caller or (self.pm.subset_hook_caller(name, remove_plugins=skip) if skip
                              else getattr(self.pm.hook, name))
            try:
                hook(engine=self, **kwargs)
            except MoolaError:
                raise
            except Exception as exc:
                plugin = self._blame(name, exc)
                self.log.error(Event.PLUGIN_FAILED, plugin=plugin, hook=name, error=f"{type(exc).__name__}: {exc}")
                raise PluginError(
                    f'plugin "{plugin}" raised in hook {name}: {type(exc).__name__}: {exc}'
                ) from exc
        if self.freezer.pending and name not in ("on_freeze", "on_unfreeze"):
            self._flush_transitions()

    def _flush_transitions(self) -> None:
        while self.freezer.pending:
            for t in self.freezer.take_pending():
                self._on_transition()
                if t.to_state == "frozen":
                    self._fire("on_freeze", group=t.group, epoch=t.epoch, reason=t.reason)
                else:
                    self._fire("on_unfreeze", group=t.group, epoch=t.epoch, lr=t.lr, reason=t.reason)

    def _blame(self, hook_name: str, exc: BaseException) -> str:
        """The plugin whose implementation of ``hook_name`` raised, read off the traceback."""
        hook = getattr(self.pm.hook, hook_name)
        codes = {}
        for impl in hook.get_hookimpls():
            fn = getattr(impl.function, "__func__", impl.function)
            code = getattr(fn, "__code__", None)
            if code is not None:
                codes[code] = impl.plugin_name
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code in codes:
                return codes[tb.tb_frame.f_code]
            tb = tb.tb_next
        return "?"

    # ------------------------------------------------------------------ the loop
    def fit(self, start: Resumable | None = None) -> FitResult:
        """Train from epoch 0, or continue an interrupted run from a checkpoint (``start``).

        Whether it returns or raises, the ``on_exit`` callbacks run before it does: nothing a plugin started
        in the background (a checkpoint being written) is still running when ``fit`` is over."""
        self.on_exit = []
        try:
            result = self._fit(start)
        except BaseException:
            self._settle(failing=True)
            self.on_exit = []
            raise
        callbacks, self.on_exit = self.on_exit, []
        self._settle(failing=False, callbacks=callbacks)
        return result

    def _settle(self, failing: bool, callbacks: list[Callable[[bool], None]] | None = None) -> None:
        """Run the ``on_exit`` callbacks (all of them; when not failing, the first error is raised after)."""
        first: BaseException | None = None
        for cb in reversed(self.on_exit if callbacks is None else callbacks):
            try:
                cb(failing)
            except BaseException as err:
                first = first or err
        if first is not None and not failing:
            raise first

    def _fit(self, start: Resumable | None) -> FitResult:
        from moola_engine.core.plan import compute_plan, validate_plan

        cfg = self.config
        result = self.result = FitResult()
        t0 = time.perf_counter()
        bind(epoch=0, step=0)
        self.log.info(Event.DEVICE_SELECTED, device=str(self.device), precision=cfg.precision, compile=cfg.compile)
        self.log.info(
            Event.GROUPS_RESOLVED,
            groups=[{"name": g.name, "head": g.head, "tensors": len(g.params), "numel": g.numel()} for g in self.groups],
        )

        # --- the plan: dry-run the strategy's own hooks, refuse a schedule that cannot keep its promise
        if self.plan is None:  # an engine built by hand; train/ablate pass the pre-flight's validated plan
            self.plan = compute_plan(self.strategy, self.freezer.groups, self.freezer.head_groups, cfg.epochs, cfg.lr,
                                     name=self.strategy_name, model_groups=self.groups, train=cfg)
            validate_plan(self.plan, self.strategy, self.strategy_name, allow=self.allow, log=self.log)
        self.log.debug(Event.PLAN_COMPUTED, plan=self.plan.to_json())

        self._hooks_with_impls = {n for n in dir(self.pm.hook) if not n.startswith("_")
                                  and getattr(self.pm.hook, n).get_hookimpls()}
        self._step_until, self._step_cache = {}, {}
        es = cfg.early_stopping
        self.es_best = math.inf if (es is None or es.mode == "min") else -math.inf
        self.best_state = None
        self._since_improved = 0
        if start is None:
            self._fire("on_fit_start")
            self._proof_pending = self.pretrained is not None
            self._prove_loaded(("on_fit_start",), final=False)
            first = 0
        else:
            first = self._resume(start)

        for epoch in range(first, cfg.epochs):
            self.epoch = self.freezer.epoch = epoch
            bind(epoch=epoch, step=self.step)  # the next step to run
            self._fire("on_epoch_start", epoch=epoch)
            if start is not None and epoch == first:
                start.check(self, epoch)  # the restored freeze state must be what the strategy says for this epoch
            trained = self.freezer.trainable_groups()  # the groups this epoch's steps train (docs/events.md)
            train_metrics = self._train_epoch(epoch)

            # --- validation: host floats once per epoch
            metrics = dict(train_metrics)
            if self.val_data is not None and len(self.val_data):
                # every rank validates on the full set; rank 0's metrics decide for all (DDP)
                metrics.update(self.dist.agree(self.evaluate(self.val_data, prefix="val_")))
            metrics["epoch"] = epoch
            self.history.append(metrics)
            self.lr_schedule.after_validation(metrics)
            self._fire("on_validation_end", epoch=epoch, metrics=metrics)
            self._fire("on_epoch_end", epoch=epoch, metrics=metrics)
            self.log.info(Event.EPOCH_COMPLETED, trainable=trained,
                          **{k: v for k, v in metrics.items() if k != "epoch"})
            result.epochs_run = epoch + 1
            if self._early_stopping(epoch, metrics):
                break

        result.history = self.history
        result.seconds = time.perf_counter() - t0
        self._fire("on_fit_end", result=result)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
            self._warn_restored_before_transition(result)
        return result

    def _warn_restored_before_transition(self, result: FitResult) -> None:
        """``restore_best`` can hand back weights from before an unfreeze: say so loudly (a warning event,
        ``result.json``, and a ``verify`` failure under expectations that the group moves)."""
        from moola_engine.core.plan import compute_plan

        replayed = compute_plan(self.strategy, self.freezer.groups, self.freezer.head_groups, self.epochs,
                                self.config.lr, name=self.strategy_name, model_groups=self.groups, train=self.config,
                                history=self.history)
        seen: dict[tuple[str, int, str], dict[str, Any]] = {}
        for t in [*self.plan.transitions, *replayed.transitions]:  # scheduled, and as the run's metrics made them
            if t["group"] in self.freezer.head_groups or not 0 < t["epoch"] < result.epochs_run:
                continue
            if t["epoch"] > result.best_epoch:
                seen.setdefault((t["group"], t["epoch"], t["to_state"]),
                                {"group": t["group"], "epoch": t["epoch"], "to_state": t["to_state"]})
        result.restored_before = sorted(seen.values(), key=lambda t: (t["epoch"], t["group"]))
        if result.restored_before:
            first = result.restored_before[0]
            self.log.warning(
                Event.RESTORE_BEST_BEFORE_TRANSITION, best_epoch=result.best_epoch, transitions=result.restored_before,
                message=f"restore_best returned the weights of epoch {result.best_epoch}, from before "
                        f"{len(result.restored_before)} transition(s) of encoder groups (first: {first['group']} "
                        f"{'unfreezes' if first['to_state'] == 'trainable' else 'freezes'} at epoch {first['epoch']}): "
                        "the delivered model does not have them trained as scheduled; set train.restore_best = "
                        "false to keep the last epoch's weights")

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

    # ------------------------------------------------------------------ resumable state
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

    def _early_stopping(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        """Update the early-stopping state with this epoch's metrics; True to stop.

        Patience counts from the last transition, and the run never stops before
        the plan's last scheduled transition.
        """
        es, result = self.config.early_stopping, self.result
        if es is None:
            return False
        value = metrics.get(es.metric, math.nan)
        if math.isnan(value):
            raise MoolaError(f"train.early_stopping.metric = {es.metric!r} is not a metric of this run; "
                             f"metrics: {', '.join(sorted(metrics))}")
        improved = value < self.es_best - es.min_delta if es.mode == "min" else value > self.es_best + es.min_delta
        if improved:
            self.es_best, result.best_epoch, result.best_metric = value, epoch, value
            if self.config.restore_best:
                self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self._since_improved = 0
        else:
            self._since_improved += 1
        hold_until = self.plan.last_scheduled_transition()  # never stop before a promised transition
        if self._since_improved >= es.patience and (hold_until is None or epoch >= hold_until):
            result.stopped_early, result.stop_reason = True, "early_stopping"
            self.log.info(Event.EARLY_STOP, metric=es.metric, best=self.es_best, best_epoch=result.best_epoch,
                          patience=es.patience)
            return True
        return False

    def _on_transition(self) -> None:
        # A transition restarts the early-stopping clock: the new phase gets its full patience.
        self._since_improved = 0
        # DDP registers only parameters that required grad when built: rebuild before the next step.
        self._wrap_stale = self.dist.active

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

    def _rewrap(self) -> None:
        self._step_fn = None  # type: ignore[assignment]  # release the old wrapper first
        self._step_fn = self.dist.wrap(self.model, compile=self.config.compile) or self._model_fn
        self._wrap_stale = False

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.config
        data = self.train_data
        self.model.train()
        apply_module_modes(self.groups, {g: self.freezer.is_trainable(g) for g in self.freezer.groups},
                           train_bn=cfg.train_bn, frozen_dropout=cfg.frozen_dropout)
        trainable = [p for g in self.groups if self.freezer.is_trainable(g.name) for p in g.tensors]
        everything = [p for g in self.groups for p in g.tensors]
        grad_amax: list[torch.Tensor] = []  # per step: |grad| of every tensor (NaN/inf propagate), no host sync
        no_grad = torch.zeros((), device=self.device)
        n = len(data)
        perm = torch.randperm(n, generator=self._gen, device=self.device)
        bf16 = cfg.precision == "bf16"
        # Hot path.  Per-step losses stay device tensors (no host sync); they are weighted, summed and
        # checked for non-finite values once, after the loop.  Binding the step into the log context and
        # calling step hooks cost microseconds per step, so they happen only when a plugin implements one.
        step_hooks = not self._hooks_with_impls.isdisjoint(("before_step", "after_step"))
        shard = self.dist.shard if self.dist.active else None
        losses: list[torch.Tensor] = []
        counts: list[int] = []
        first_step = self.step
        bind(epoch=epoch, step=first_step)
        if self._wrap_stale:
            self._rewrap()
        if self._proof_pending and not step_hooks:
            self._prove_loaded(("on_fit_start", "on_epoch_start"))
        with sync_guard(self.device, self.sync_debug):
            for idx in perm.split(cfg.batch_size):
                scale = 1.0
                if shard is not None:  # DDP: this rank's slice of the global batch
                    idx, count, scale = shard(idx)
                else:
                    count = idx.shape[0]
                xb, yb = data.x[idx], data.y[idx]
                before = after = None
                if step_hooks:  # only the plugins that want this step (want_step_hooks)
                    before, after = self._step_callers(self.step)
                    if before is not None or after is not None:
                        bind(step=self.step)
                if before is not None:
                    self._fire("before_step", caller=before, epoch=epoch, step=self.step, batch=(xb, yb))
                    if self._wrap_stale:
                        self._rewrap()
                    if self._proof_pending:
                        self._prove_loaded(("on_fit_start", "on_epoch_start", "before_step"))
                self.optimizer.zero_grad(set_to_none=True)
                if bf16:
                    with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                        loss = self.loss_fn(self._step_fn(xb).float(), yb)
                else:
                    loss = self.loss_fn(self._step_fn(xb), yb)
                (loss * scale if shard is not None else loss).backward()
                if everything:  # before clipping smears one NaN over every gradient
                    # an L2 norm is NaN/inf exactly when an element is (or when it overflows, above ~1e19 in
                    # float32: a blow-up all the same); 15x cheaper on CPU than the max-abs norm
                    grad_amax.append(torch.stack(torch._foreach_norm(
                        [p.grad if p.grad is not None else no_grad for p in everything], 2)))
                if cfg.grad_clip is not None and trainable:
                    nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                self.optimizer.step()
                self.lr_schedule.after_step()
                detached = loss.detach()
                losses.append(detached)
                counts.append(count)
                if after is not None:
                    self._fire("after_step", caller=after, epoch=epoch, step=self.step, loss=detached)
                self.step += 1
        if self.step > first_step:
            bind(step=self.step - 1)
        return {"train_loss": self._epoch_loss(losses, counts, n, epoch, first_step, grad_amax)}

    def _epoch_loss(self, losses: list[torch.Tensor], counts: list[int], n: int, epoch: int, first_step: int,
                    grad_amax: list[torch.Tensor]) -> float:
        """Mean training loss of the epoch (over all ranks); refuses a non-finite loss or gradient.

        One host read per epoch: the weighted loss sum and one probe of the gradient norms (their float64 sum,
        finite exactly when every norm is: norms are >= 0, so nothing cancels).  Only when something is not
        finite does a second pass find the first bad step and tensor (:meth:`_first_nonfinite_steps`)."""
        if not losses:
            return math.nan
        stacked = torch.stack(losses).float()
        total = (stacked * torch.tensor(counts, dtype=stacked.dtype, device=stacked.device)).sum().double()
        probe = torch.stack(grad_amax).double().sum() if grad_amax else torch.zeros_like(total)
        rows = self.dist.gather(torch.stack([total, probe]))  # (world, 2): every rank decides alike
        values = rows.tolist()  # the epoch's host read
        if all(math.isfinite(v) for row in values for v in row):
            return sum(row[0] for row in values) / max(n, 1)
        finite = torch.isfinite(stacked)
        none_bad = torch.tensor(float(len(losses)), device=stacked.device)
        first_bad = torch.where(finite, none_bad, torch.arange(len(losses), device=stacked.device).float()).amin()
        bad = int(self.dist.gather(first_bad.reshape(1)).amin())
        grad_steps = self._first_nonfinite_steps(grad_amax, first_step)
        loss_step = first_step + bad if bad < len(losses) else -1
        if loss_step >= 0 or max(grad_steps, default=-1) >= 0:
            self._nonfinite(epoch, loss_step, grad_steps)
        # every value of this rank is finite, yet a sum is not (an overflow, or another rank's): never go on quietly
        raise MoolaError(f"epoch {epoch}: the epoch's loss or gradient-norm sums are not finite on some rank "
                         f"(per rank [loss sum, gradient-norm sum]: {values}); lower train.lr or set train.grad_clip")

    @staticmethod
    @torch.no_grad()
    def _first_nonfinite_steps(grad_amax: list[torch.Tensor], first_step: int) -> list[int]:
        """Per tensor, the first step of the epoch whose gradient held a NaN/inf (-1: none)."""
        if not grad_amax:
            return []
        bad = ~torch.isfinite(torch.stack(grad_amax))  # (steps, tensors)
        first = bad.float().argmax(dim=0)
        return torch.where(bad.any(dim=0), first + first_step, -1).tolist()

    def _nonfinite(self, epoch: int, loss_step: int, grad_steps: list[int]) -> None:
        """Stop the run, naming the first bad step and the group(s) whose gradients went non-finite there."""
        names = [(g.name, pname) for g in self.groups for pname, _ in g.params]
        step = min(s for s in [loss_step, *grad_steps] if s >= 0)
        hits = [names[i] for i, s in enumerate(grad_steps) if s == step]
        groups = list(dict.fromkeys(g for g, _ in hits))
        tensor = hits[0][1] if hits else None
        what = "training loss" if loss_step == step else "gradient"
        self._settle(failing=True)  # a checkpoint still being written counts once complete: name the newest
        self.log.error(Event.NONFINITE_DETECTED, what=what, at_step=step, groups=groups, tensor=tensor,
                       last_checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None)
        where = f"group {', '.join(groups)} (first tensor: {tensor})" if groups else ""
        msg = f"non-finite {what} at step {step} (epoch {epoch})"
        if where:
            msg += f" in {where}" if what == "gradient" else f"; gradients non-finite in {where}"
        keep = f"; last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else ""
        raise MoolaError(f"{msg}; lower train.lr or set train.grad_clip{keep}")

    @torch.no_grad()
    def predict(self, data: TensorData, batch_size: int = 1024) -> torch.Tensor:
        """Model outputs for ``data`` (on any device: moved to the engine's) in eval mode, on the device."""
        data = data.to(self.device)  # no copy when it is there already (train/val); held-out splits are not
        was_training = self.model.training
        self.model.eval()
        outs = [self._model_fn(data.x[i:i + batch_size]).float() for i in range(0, len(data), batch_size)]
        self.model.train(was_training)
        return torch.cat(outs)

    def evaluate(self, data: TensorData, prefix: str = "") -> dict[str, float]:
        data = data.to(self.device)
        metrics = self.eval_fn(self.predict(data), data.y)
        return {f"{prefix}{k}": v for k, v in metrics.items()}
