"""The epoch loop, readable top to bottom.  Hook order: see :mod:`moola_engine.core.hookspecs`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy
import torch
from torch import nn

from moola_engine.config import ChecksConfig, GroupSpec, TrainConfig
from moola_engine.core import distributed
from moola_engine.core.batches import eval_batches, forward, steps_per_epoch, train_batches
from moola_engine.core.context import FitResult, Resumable
from moola_engine.core.data import Data, TensorData, has_rows
from moola_engine.core.dispatch import HookDispatch
from moola_engine.core.freezing import Freezer, apply_module_modes, resolve_groups
from moola_engine.core.guards import LossGuard
from moola_engine.core.hostsync import sync_guard
from moola_engine.core.metrics import classification_metrics
from moola_engine.core.optim import build_optimizer, select_device
from moola_engine.core.schedulers import build_lr_schedule
from moola_engine.core.state import EngineState
from moola_engine.core.stopping import EarlyStopping
from moola_engine.logs import Event, bind, get_logger

if TYPE_CHECKING:
    from moola_engine.core.plan import Plan

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
EvalFn = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]


class Engine(HookDispatch, EngineState, EarlyStopping, LossGuard):
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
        train_data: Data,
        val_data: Data | None = None,
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
        self.lr_schedule = build_lr_schedule(self.optimizer, train, steps_per_epoch(train_data, train, self.dist.active))
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
        self.on_exit: list[Callable[[bool], None]] = []  # see EngineBase.on_exit
        self._step_until: dict[int, tuple[Any, int]] = {}  # id(plugin) -> (plugin, first step it skips)
        self._step_cache: dict[tuple[int, ...], tuple[Any, Any]] = {}
        self._hooks_with_impls: set[str] = set()
        self._proof_pending = False  # the load proof is re-taken right before the first training step
        self._model_fn: Callable[[torch.Tensor], torch.Tensor] = self.model
        if train.compile:
            self._model_fn = torch.compile(self.model)
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
            if self.val_data is not None and has_rows(self.val_data):
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
        grad_amax: list[torch.Tensor] = []  # grad_guard "step": every gradient's norm per step (no host sync)
        no_grad = torch.zeros((), device=self.device)
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
        batches = train_batches(data, batch_size=cfg.batch_size, generator=self._gen, device=self.device, shard=shard,
                                seed=cfg.seed, epoch=epoch)
        with sync_guard(self.device, self.sync_debug):
            for xb, yb, count, scale in batches:
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
                        loss = self.loss_fn(forward(self._step_fn, xb).float(), yb)
                else:
                    loss = self.loss_fn(forward(self._step_fn, xb), yb)
                (loss * scale if shard is not None else loss).backward()  # type: ignore[no-untyped-call]
                if cfg.grad_guard == "step" and everything:  # before clipping smears one NaN over every gradient
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
        n = len(data) if isinstance(data, TensorData) else sum(counts)  # the global rows (DDP: every rank's)
        return {"train_loss": self._epoch_loss(losses, counts, n, epoch, first_step, grad_amax)}

    @torch.no_grad()
    def outputs(self, data: Data, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """(model outputs, targets) for ``data`` in eval mode, on the engine's device."""
        was_training = self.model.training
        self.model.eval()
        pairs = [(forward(self._model_fn, x).float(), y) for x, y in eval_batches(data, batch_size, self.device)]
        self.model.train(was_training)
        return torch.cat([o for o, _ in pairs]), torch.cat([y for _, y in pairs])

    def predict(self, data: Data, batch_size: int = 1024) -> torch.Tensor:
        """Model outputs for ``data`` (on any device: moved to the engine's) in eval mode, on the device."""
        return self.outputs(data, batch_size)[0]

    def evaluate(self, data: Data, prefix: str = "") -> dict[str, float]:
        metrics = self.eval_fn(*self.outputs(data))
        return {f"{prefix}{k}": v for k, v in metrics.items()}
