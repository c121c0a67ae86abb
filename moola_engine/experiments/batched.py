"""Batched multi-run training: K runs of one model shape trained as ONE stacked computation.

``train_batched(cfgs)`` trains several runs (the seeds of one arm, arms that differ only in strategy schedule
and lr, ...) with K stacked copies of the parameters and one ``torch.func.vmap`` of the model's
``functional_call`` per step, and still gives each run everything a separate ``train()`` gives it:

* **its own run folder and event log.**  Every run goes through :func:`moola_engine.train.train` (run folder,
  config.json, data, pretrained weights, test metrics, predictions, result.json) with a ``fit_fn`` that hands
  its built :class:`~moola_engine.engine.Engine` to the batched loop instead of calling ``engine.fit``.  The
  runs are set up one after another, each in its own thread that waits at ``fit_fn``, so every run's model
  initialisation and data split come from its own seed exactly as in a separate run.
* **its own schedule and checks.**  The loop fires each run's real hooks (strategy, weight-delta,
  masked-params, BatchNorm and gradient-flow checks) on that run's engine, inside that run's logging context,
  so its ``freeze.transition``, ``weight_delta.check``, ``grad_flow.check``, ``epoch.completed`` and
  ``early_stop.triggered`` events are the ones a separate run writes.  Each run's model parameters are views
  into the stacked tensors: the checks read the real trained values.  Because the hooks are real, metric-driven
  schedules (``unfreeze_on = "plateau"``) and the plateau lr scheduler work too: each run sees its own metrics.
* **its own freeze state, lr, batch order and optimizer state.**  Per run and per parameter: a trainable mask
  (frozen groups and ``freeze_params`` masks get no update, no weight decay and no optimizer-state change:
  ``torch.where`` keeps them bitwise), the lr its own engine's optimizer param group holds (the strategy's
  scale x the scheduler factor), weight decay, momentum and gradient clipping; the batch order comes from the
  run's own ``torch.Generator`` seeded with ``train.seed``, as in ``Engine._train_epoch``.
  :class:`StackedOptimizer` implements SGD (momentum), Adam and AdamW over the stacked tensors.

What falls back to separate runs (each such run logs ``batched.fallback`` with the reason and trains with
``engine.fit``): strategies that implement hooks beyond the schedule hooks (``l2-sp``: it adds a penalty
through tensor hooks), any plugin with step hooks other than the gradient-flow check, BatchNorm (running
statistics cannot be updated per run under ``vmap``), dropout with ``train.frozen_dropout = false`` (module
modes would differ between runs), ``train.compile``, DDP, runs alone in their shape group, and models
``vmap`` cannot batch (``nn.LSTM``: ``Batching rule not implemented for aten::lstm.input``; found by a probe
step before training).  Checkpoints are not written by batched runs (``batched.started`` says so); a run
that falls back keeps them.

Dropout inside a batched run draws its masks under ``vmap(randomness="different")``: independent per run,
but not the masks a separate run draws.  Without dropout, batched and separate runs agree up to float
rounding: ``vmap`` turns the per-run matmuls into batched ones whose reductions run in another order (see
docs/performance.md, "Batched multi-run training", for the tolerance).
"""

from __future__ import annotations

import contextvars
import math
import random
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import IO, Any

import attrs
import numpy as np
import structlog
import torch
from torch.func import functional_call, grad_and_value, vmap

from moola_engine.checks.delta import GradFlowCheck
from moola_engine.config import ExperimentConfig
from moola_engine.core.context import FitResult
from moola_engine.core.data import TensorData
from moola_engine.core.engine import Engine
from moola_engine.core.freezing import _BN_TYPES, _DROPOUT_TYPES, apply_module_modes
from moola_engine.errors import MoolaError
from moola_engine.logs import Event, bind

SCHEDULE_HOOKS = frozenset({"on_fit_start", "on_epoch_start", "on_validation_end", "on_epoch_end"})
"""The hooks a batched run replays for its strategy (what :func:`moola_engine.plan.compute_plan` dry-runs)."""


# --------------------------------------------------------------------------- the optimizer


def _per_run(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(K,) -> (K, 1, 1, ...) broadcastable against ``like`` (K, ...)."""
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))


class StackedOptimizer:
    """SGD / Adam / AdamW over stacked (K, ...) tensors with per-run lr, weight decay, momentum and trainable mask.

    The update of a run whose mask is False leaves the parameter and its optimizer state bitwise unchanged (the
    step count of that parameter does not advance), as a parameter with grad None is skipped by torch's
    optimizers.  The formulas are torch's (``torch.optim.SGD``/``Adam``/``AdamW`` with default betas and eps,
    no nesterov, no amsgrad).
    """

    def __init__(self, kind: str, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if kind not in ("sgd", "adam", "adamw"):
            raise MoolaError(f"train.optimizer = {kind!r}: batched training implements sgd, adam and adamw")
        self.kind = kind
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], *, lr: dict[str, torch.Tensor],
             mask: dict[str, torch.Tensor], weight_decay: torch.Tensor, momentum: torch.Tensor) -> None:
        """Update ``params[name]`` in place for every name in ``grads``; ``lr``/``mask`` by name, (K,) each.

        A parameter every run trains (the seeds of one arm: masks are all True or all False) takes an in-place
        path; a mixed mask computes the update out of place and keeps the masked runs' slices with
        ``torch.where``, so they stay bitwise unchanged.
        """
        any_wd = bool((weight_decay != 0).any())
        for name, g in grads.items():
            p = params[name]
            st = self.state.get(name)
            if st is None:
                st = self.state[name] = {"step": torch.zeros(p.shape[0], dtype=torch.float64, device=p.device)}
                if self.kind == "sgd":
                    st["momentum_buffer"] = torch.zeros_like(p)
                else:
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            everyone = bool(mask[name].all())
            if everyone:
                self._update(p, g, st, lr[name], weight_decay, momentum, any_wd, inplace=True)
                st["step"] += 1
                continue
            m = _per_run(mask[name], p)
            new_p, new_state = self._update(p, g, st, lr[name], weight_decay, momentum, any_wd, inplace=False)
            for key, value in new_state.items():
                st[key] = torch.where(m, value, st[key])
            p.copy_(torch.where(m, new_p, p))
            st["step"] = st["step"] + mask[name].to(torch.float64)

    def _update(self, p: torch.Tensor, g: torch.Tensor, st: dict[str, torch.Tensor], lr: torch.Tensor,
                weight_decay: torch.Tensor, momentum: torch.Tensor, any_wd: bool,
                inplace: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """torch's update for every run; in place, or as (new parameter, new state) when ``inplace`` is False."""
        lr_k = _per_run(lr, p)
        wd = _per_run(weight_decay, p)
        if self.kind == "sgd":
            d = g + wd * p if any_wd else g
            first = _per_run(st["step"] == 0, p)
            buf = torch.where(first, d, _per_run(momentum, p) * st["momentum_buffer"] + d)
            if inplace:
                st["momentum_buffer"] = buf
                p.sub_(lr_k * buf)
                return p, {}
            return p - lr_k * buf, {"momentum_buffer": buf}
        step = st["step"] + 1
        bc1 = _per_run((1 - self.beta1 ** step).to(p.dtype), p)
        bc2_sqrt = _per_run((1 - self.beta2 ** step).sqrt().to(p.dtype), p)
        if self.kind == "adam" and any_wd:
            g = g + wd * p
        if inplace:
            if self.kind == "adamw" and any_wd:
                p.mul_(1 - lr_k * wd)
            exp_avg, exp_avg_sq = st["exp_avg"].lerp_(g, 1 - self.beta1), st["exp_avg_sq"].mul_(self.beta2)
            exp_avg_sq.addcmul_(g, g, value=1 - self.beta2)
            denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(self.eps)
            p.sub_(exp_avg.div(denom).mul_(lr_k / bc1))
            return p, {}
        base = p * (1 - lr_k * wd) if self.kind == "adamw" and any_wd else p
        exp_avg = st["exp_avg"].lerp(g, 1 - self.beta1)
        exp_avg_sq = st["exp_avg_sq"] * self.beta2 + (1 - self.beta2) * g * g
        denom = exp_avg_sq.sqrt() / bc2_sqrt + self.eps
        return base - exp_avg / denom * (lr_k / bc1), {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


# --------------------------------------------------------------------------- what can be batched


def batch_problem(engine: Engine) -> str | None:
    """Why this run cannot join a batched group (None: it can), checked on its built engine."""
    cfg = engine.config
    if not isinstance(engine.train_data, TensorData):
        return "Dataset-backed data (a DataLoader): only in-memory tensors are stacked"
    if engine.dist.active:
        return "DDP (WORLD_SIZE > 1) runs are not batched"
    if cfg.compile:
        return "train.compile = true: torch.compile is not combined with vmap here"
    pm = engine.pm
    for hook_name in ("before_step", "after_step", "on_freeze", "on_unfreeze", "on_fit_end", "on_fit_start",
                      "on_epoch_start", "on_validation_end", "on_epoch_end"):
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin = impl.plugin
            if plugin is engine.strategy and hook_name not in SCHEDULE_HOOKS:
                return (f"strategy {engine.strategy_name} implements {hook_name}, beyond the schedule hooks "
                        f"({', '.join(sorted(SCHEDULE_HOOKS))}) a batched run replays: it may act on tensors "
                        "(penalties, gradient hooks) that the stacked computation never sees")
            if hook_name in ("before_step", "after_step") and not isinstance(plugin, GradFlowCheck) \
                    and plugin is not engine.strategy:
                return f"plugin {impl.plugin_name} implements {hook_name}: per-step hooks are not batched"
    for mod in engine.model.modules():
        if isinstance(mod, _BN_TYPES):
            return "the model has BatchNorm: per-run running statistics cannot be updated under vmap"
        if isinstance(mod, _DROPOUT_TYPES) and mod.p > 0 and not cfg.frozen_dropout:
            return "dropout with train.frozen_dropout = false: module modes would differ between runs"
    return None


def signature(engine: Engine) -> tuple[Any, ...]:
    """Runs with equal signatures can share one stacked computation."""
    cfg = engine.config
    params = tuple((g.name, tuple((n, tuple(p.shape), str(p.dtype)) for n, p in g.params)) for g in engine.groups)
    buffers = tuple((n, tuple(b.shape), str(b.dtype)) for n, b in engine.model.named_buffers())
    data = engine.train_data
    assert isinstance(data, TensorData)  # batch_problem refused the others
    return (type(engine.model).__qualname__, params, buffers, tuple(data.x.shape), str(data.x.dtype),
            tuple(data.y.shape), cfg.batch_size, cfg.optimizer, cfg.precision, str(engine.device),
            _loss_key(engine.loss_fn))


def _loss_key(fn: Any) -> tuple[Any, ...]:
    """Equal for equal losses: each run's task is its own object, so a bound ``task.loss`` is compared by its
    function and the task's class and parameters."""
    owner = getattr(fn, "__self__", None)
    return (getattr(fn, "__func__", fn), type(owner), repr(getattr(owner, "params", None)))


# --------------------------------------------------------------------------- one run inside the loop


@attrs.define(eq=False)
class _Run:
    index: int
    engine: Engine
    ctx: contextvars.Context
    active: bool = True
    error: BaseException | None = None
    finished: bool = False
    history_seen: int = 0
    grad_hook_due: bool = False
    t0: float = 0.0
    trained: list[str] = attrs.field(factory=list)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` in this run's logging context; an exception ends this run only."""
        if not self.active:
            return None
        try:
            return self.ctx.run(fn, *args, **kwargs)
        except BaseException as exc:
            self.error, self.active = exc, False
            return None


class _Stack:
    """The stacked parameters, buffers and the vmapped step of one group of runs."""

    def __init__(self, runs: list[_Run]) -> None:
        e0 = runs[0].engine
        self.runs = runs
        self.k = len(runs)
        self.device = e0.device
        self.base = e0.model
        self.names = [n for g in e0.groups for n, _ in g.params]  # Engine's order: groups, then parameters
        self.group_of = {n: i for i, g in enumerate(e0.groups) for n, _ in g.params}
        per_run = [dict(r.engine.model.named_parameters()) for r in runs]
        with torch.no_grad():
            self.params = {n: torch.stack([pr[n].detach() for pr in per_run]) for n in self.names}
            self.buffers = {n: torch.stack([dict(r.engine.model.named_buffers())[n].detach() for r in runs])
                            for n, _ in e0.model.named_buffers()}
        for k, pr in enumerate(per_run):  # each run's parameters become views of its slice
            for n in self.names:
                pr[n].data = self.params[n][k]
        data = [r.engine.train_data for r in runs]
        assert all(isinstance(d, TensorData) for d in data)  # batch_problem refused the others
        self.x = torch.stack([d.x for d in data])  # type: ignore[union-attr]
        self.y = torch.stack([d.y for d in data])  # type: ignore[union-attr]
        self.opt = StackedOptimizer(e0.config.optimizer)
        dev = self.device
        self.wd = torch.tensor([r.engine.config.weight_decay for r in runs], device=dev)
        self.momentum = torch.tensor([r.engine.config.momentum for r in runs], device=dev)
        clips = [r.engine.config.grad_clip for r in runs]
        self.clip = None if all(c is None for c in clips) else torch.tensor(
            [math.inf if c is None else c for c in clips], device=dev)
        self.bf16 = e0.config.precision == "bf16"
        loss_fn = e0.loss_fn
        base = self.base

        def loss_of(trained: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor],
                    buffers: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            state = {**trained, **fixed, **buffers}
            if self.bf16:
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
                    return loss_fn(functional_call(base, state, (xb,)).float(), yb)
            return loss_fn(functional_call(base, state, (xb,)), yb)

        self.step_fn = vmap(grad_and_value(loss_of), randomness="different")
        self.loss_fn = vmap(loss_of, randomness="different")  # every parameter frozen in every run: no gradient

    def split(self, need: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        trained = {n: self.params[n] for n in need}
        fixed = {n: self.params[n] for n in self.names if n not in trained}
        return trained, fixed

    def probe(self, batch_size: int) -> None:
        """One gradient and one forward computation on the first rows (nothing is updated).

        Raises RuntimeError where vmap cannot batch the model (no batching rule: ``aten::lstm.input`` without
        gradients), or where it would only loop over the runs (torch's "performance drop" fallback warning:
        ``aten::mkldnn_rnn_layer`` with gradients), which is no batching at all.
        """
        trained, fixed = self.split(self.names)
        b = min(batch_size, self.x.shape[1])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.step_fn(trained, fixed, self.buffers, self.x[:, :b], self.y[:, :b])
            with torch.no_grad():
                self.loss_fn({}, {**trained, **fixed}, self.buffers, self.x[:, :b], self.y[:, :b])
        slow = [str(w.message) for w in caught if "batching rule" in str(w.message)]
        if slow:
            raise RuntimeError(slow[0].split(". Please")[0])


# --------------------------------------------------------------------------- the loop (mirrors Engine.fit)


def _fit_prelude(run: _Run) -> None:
    from moola_engine.core.plan import compute_plan, validate_plan

    e = run.engine
    cfg = e.config
    e.result = FitResult()
    run.t0 = time.perf_counter()
    bind(epoch=0, step=0)
    e.log.info(Event.DEVICE_SELECTED, device=str(e.device), precision=cfg.precision, compile=cfg.compile)
    e.log.info(Event.GROUPS_RESOLVED,
               groups=[{"name": g.name, "head": g.head, "tensors": len(g.params), "numel": g.numel()}
                       for g in e.groups])
    if e.plan is None:  # train() passes the pre-flight's validated plan
        e.plan = compute_plan(e.strategy, e.freezer.groups, e.freezer.head_groups, cfg.epochs, cfg.lr,
                              name=e.strategy_name, model_groups=e.groups, train=cfg)
        validate_plan(e.plan, e.strategy, e.strategy_name, allow=e.allow, log=e.log)
    e.log.debug(Event.PLAN_COMPUTED, plan=e.plan.to_json())
    e._hooks_with_impls = {n for n in dir(e.pm.hook) if not n.startswith("_") and getattr(e.pm.hook, n).get_hookimpls()}
    es = cfg.early_stopping
    e.es_best = math.inf if (es is None or es.mode == "min") else -math.inf
    e.best_state = None
    e._since_improved = 0
    e._fire("on_fit_start")
    hooked = [n for g in e.groups for n, p in g.params if getattr(p, "_backward_hooks", None)]
    if hooked:
        raise MoolaError(f"batched run: after on_fit_start, parameter(s) {', '.join(hooked[:5])} carry tensor hooks "
                         "that the stacked computation would never call; train this strategy without --batched")


def _epoch_start(run: _Run, epoch: int) -> None:
    e = run.engine
    e.epoch = e.freezer.epoch = epoch
    bind(epoch=epoch, step=e.step)
    e._fire("on_epoch_start", epoch=epoch)
    e.model.train()
    apply_module_modes(e.groups, {g: e.freezer.is_trainable(g) for g in e.freezer.groups},
                       train_bn=e.config.train_bn, frozen_dropout=e.config.frozen_dropout)
    run.trained = e.freezer.trainable_groups()
    if len(e.freezer.history) != run.history_seen or epoch == 0:
        run.history_seen = len(e.freezer.history)
        run.grad_hook_due = "after_step" in e._hooks_with_impls


def _epoch_end(run: _Run, epoch: int, train_loss: float) -> None:
    e = run.engine
    metrics: dict[str, float] = {"train_loss": train_loss}
    if e.val_data is not None and len(e.val_data):
        metrics.update(e.evaluate(e.val_data, prefix="val_"))
    metrics["epoch"] = epoch
    e.history.append(metrics)
    e.lr_schedule.after_validation(metrics)
    e._fire("on_validation_end", epoch=epoch, metrics=metrics)
    e._fire("on_epoch_end", epoch=epoch, metrics=metrics)
    e.log.info(Event.EPOCH_COMPLETED, trainable=run.trained,  # the groups that trained in this epoch
               **{k: v for k, v in metrics.items() if k != "epoch"})
    e.result.epochs_run = epoch + 1
    if e._early_stopping(epoch, metrics):
        _finish(run)


def _finish(run: _Run) -> None:
    e = run.engine
    result = e.result
    result.history = e.history
    result.seconds = time.perf_counter() - run.t0
    e._fire("on_fit_end", result=result)
    run.finished = True
    run.active = False


def _restore_best(run: _Run) -> None:
    e = run.engine
    if e.best_state is not None:
        e.model.load_state_dict(e.best_state)


def _fit_group(runs: list[_Run], stack: _Stack) -> None:
    """Train ``runs`` (equal signatures) as one stacked computation, firing each run's hooks."""
    for r in runs:
        r.call(_fit_prelude, r)
    e0 = runs[0].engine
    n = len(e0.train_data)
    bs = e0.config.batch_size
    k_all = torch.arange(stack.k, device=stack.device)
    epochs = max(r.engine.config.epochs for r in runs)
    for epoch in range(epochs):
        for r in runs:
            if r.active and epoch >= r.engine.config.epochs:
                r.call(_finish, r)
        live = [r for r in runs if r.active]
        if not live:
            break
        for r in live:
            r.call(_epoch_start, r, epoch)
        losses = _train_epoch(stack, runs, epoch, n, bs, k_all)
        for r in runs:
            if r.active and losses is not None:
                loss = r.call(r.engine._epoch_loss, *losses[r.index])
                r.call(_epoch_end, r, epoch, loss)
    for r in runs:
        if r.active:
            r.call(_finish, r)
    for r in runs:
        if r.error is None:
            try:
                r.ctx.run(_restore_best, r)
            except BaseException as exc:
                r.error = exc


def _train_epoch(stack: _Stack, runs: list[_Run], epoch: int, n: int, bs: int,
                 k_all: torch.Tensor) -> dict[int, tuple[Any, ...]] | None:
    """One epoch of the stacked computation; per run the arguments of ``Engine._epoch_loss``."""
    dev = stack.device
    live = [r.active for r in runs]
    if not any(live):
        return None
    perms = torch.stack([torch.randperm(n, generator=r.engine._gen, device=dev) if r.active
                         else torch.arange(n, device=dev) for r in runs])
    # per parameter: which runs train it this epoch, and the lr each run's optimizer param group holds
    masks: dict[str, torch.Tensor] = {}
    for name in stack.names:
        g = stack.group_of[name]
        masks[name] = torch.tensor([
            r.active and r.engine.freezer.is_trainable(r.engine.groups[g].name)
            and name not in r.engine.freezer.frozen_params(r.engine.groups[g].name) for r in runs], device=dev)
    need = [nm for nm in stack.names if bool(masks[nm].any())]
    need_idx = torch.tensor([stack.names.index(nm) for nm in need], dtype=torch.long, device=dev)
    mask_matrix = torch.stack([masks[nm] for nm in stack.names], dim=1)  # (K, P)
    per_step_lr = any(r.engine.lr_schedule.per_step for r in runs)

    def read_lrs() -> dict[str, torch.Tensor]:
        by_group = torch.tensor([[float(pg["lr"]) for pg in r.engine.optimizer.param_groups] for r in runs], device=dev)
        return {nm: by_group[:, stack.group_of[nm]] for nm in need}

    lrs = read_lrs()
    first_step = {r.index: r.engine.step for r in runs}
    losses: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []
    counts: list[int] = []
    zeros = torch.zeros(stack.k, len(stack.names), device=dev)
    for idx in perms.split(bs, dim=1):  # type: ignore[no-untyped-call]  # torch leaves Tensor.split unannotated
        xb = stack.x[k_all[:, None], idx]
        yb = stack.y[k_all[:, None], idx]
        trained, fixed = stack.split(need)
        if need:
            grads, loss = stack.step_fn(trained, fixed, stack.buffers, xb, yb)
        else:
            with torch.no_grad():
                loss = stack.loss_fn(trained, fixed, stack.buffers, xb, yb)
            grads = {}
        if need:
            tensor_norms = torch.stack([grads[nm].flatten(1).norm(dim=1) for nm in need], dim=1)  # (K, P_need)
            full = zeros.index_copy(1, need_idx, tensor_norms)
            full = torch.where(mask_matrix, full, zeros)  # a frozen parameter has no grad (Engine: zero)
        else:
            full = zeros
        norms.append(full)
        if stack.clip is not None and need:
            total = full.norm(dim=1)
            coef = (stack.clip / (total + 1e-6)).clamp(max=1.0)
            grads = {nm: gr * _per_run(coef, gr) for nm, gr in grads.items()}
        if need:
            stack.opt.step(stack.params, grads, lr=lrs, mask=masks, weight_decay=stack.wd, momentum=stack.momentum)
        if per_step_lr:
            for r in runs:
                if r.active and r.engine.lr_schedule.per_step:
                    r.engine.optimizer.step()  # no parameter has a grad: only marks the step for the scheduler
                    r.engine.lr_schedule.after_step()
            lrs = read_lrs()
        detached = loss.detach()
        losses.append(detached)
        counts.append(idx.shape[1])
        for r in runs:
            if r.active and r.grad_hook_due:
                r.grad_hook_due = False
                r.call(_fire_after_step, r, stack, grads, masks, epoch, detached[r.index])
            r.engine.step += 1 if r.active else 0
    stacked_losses = torch.stack(losses)  # (steps, K)
    stacked_norms = torch.stack(norms)  # (steps, K, P)
    out = {}
    for r in runs:
        if r.active:
            bind_step = r.engine.step - 1
            r.ctx.run(bind, step=bind_step)
            out[r.index] = (list(stacked_losses[:, r.index]), counts, n, epoch, first_step[r.index],
                            list(stacked_norms[:, r.index]))
    return out


def _fire_after_step(run: _Run, stack: _Stack, grads: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                     epoch: int, loss: torch.Tensor) -> None:
    """The first step of a phase: give the run's parameters their gradients (None where frozen), fire after_step."""
    e = run.engine
    k = run.index
    params = [p for g in e.groups for _, p in g.params]
    try:
        for name, p in zip(stack.names, params, strict=True):
            p.grad = grads[name][k] if name in grads and bool(masks[name][k]) else None
        bind(step=e.step)
        e._fire("after_step", epoch=epoch, step=e.step, loss=loss)
    finally:
        for p in params:
            p.grad = None


# --------------------------------------------------------------------------- threads: one train() per run


@attrs.define(eq=False)
class _Slot:
    index: int
    cfg: ExperimentConfig
    arrived: threading.Event = attrs.Factory(threading.Event)
    release: threading.Event = attrs.Factory(threading.Event)
    done: threading.Event = attrs.Factory(threading.Event)
    engine: Engine | None = None
    ctx: contextvars.Context | None = None
    rng: Any = None
    mode: str = "batched"
    reason: str = ""
    run: _Run | None = None
    outcome: Any = None
    thread: threading.Thread | None = None

    def fit_fn(self, engine: Engine, start: Any) -> FitResult:
        if start is not None:
            raise MoolaError("batched training does not resume runs; resume each run with `moola-engine train --resume`")
        self.engine = engine
        self.ctx = contextvars.copy_context()
        self.rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        self.arrived.set()
        self.release.wait()
        if self.mode == "fallback":
            engine.log.warning(Event.BATCHED_FALLBACK, reason=self.reason, message=f"trained as a separate run: {self.reason}")
            random.setstate(self.rng[0])
            np.random.set_state(self.rng[1])
            torch.set_rng_state(self.rng[2])
            return engine.fit(start)
        run = self.run
        if run is None:
            raise MoolaError("batched training stopped before this run started (see the error of train_batched)")
        # epoch/step as the batched loop left them in this run's context
        bind(**run.ctx.run(structlog.contextvars.get_contextvars))
        if run.error is not None:
            raise run.error
        return engine.result


def train_batched(
    cfgs: Sequence[ExperimentConfig],
    *,
    strategy: str | Sequence[str | None] | None = None,
    strategies_file: str | None = None,
    extra_plugins: tuple[Any, ...] = (),
    stream: IO[str] | None = None,
    capture: bool = False,
    pinned: dict[str, Any] | None = None,
) -> list[Any]:
    """Train ``cfgs`` (one run each), batching the runs of equal shape into one stacked computation.

    ``strategy``: one name for every run, or one per config (None: the config's ``run.strategy``).
    ``pinned``: ``[train]`` values from the command line, as :func:`~moola_engine.runs.train.train` takes them.
    Returns, in order, each run's :class:`~moola_engine.train.RunOutcome`, or the exception that ended it
    (a run's failure, a failed check included, ends that run only).  Every run has its own run folder.
    """
    from moola_engine.core.preflight import seed_everything
    from moola_engine.runs.train import train

    cfgs = list(cfgs)
    names = list(strategy) if isinstance(strategy, (list, tuple)) else [strategy] * len(cfgs)
    if len(names) != len(cfgs):
        raise MoolaError(f"train_batched: {len(cfgs)} configs but {len(names)} strategies")
    slots = [_Slot(i, c) for i, c in enumerate(cfgs)]

    def target(slot: _Slot, name: str | None) -> None:
        try:
            # as an ablation cell (workers.run_cell) and every separate run start: the global RNGs from this run's
            # seed, whatever the previous run's set-up drew (the runs are set up one at a time, so no other
            # thread draws meanwhile)
            seed_everything(slot.cfg.train.seed)
            slot.outcome = train(slot.cfg, strategy=name, strategies_file=strategies_file,
                                 extra_plugins=extra_plugins, stream=stream, capture=capture, fit_fn=slot.fit_fn,
                                 pinned=pinned)
        except BaseException as exc:
            slot.outcome = exc
        finally:
            slot.done.set()
            slot.arrived.set()

    # set the runs up one at a time: each seeds the global RNGs, builds its model and loads its data
    for slot, name in zip(slots, names, strict=True):
        slot.thread = threading.Thread(target=target, args=(slot, name), name=f"moola-batched-{slot.index}",
                                       daemon=True)
        slot.thread.start()
        slot.arrived.wait()
    ready = [s for s in slots if s.engine is not None and not s.done.is_set()]
    groups: dict[tuple[Any, ...], list[_Slot]] = {}
    for s in ready:
        assert s.engine is not None
        problem = batch_problem(s.engine)
        if problem is not None:
            s.mode, s.reason = "fallback", problem
            continue
        groups.setdefault(signature(s.engine), []).append(s)
    for members in groups.values():
        if len(members) == 1:
            members[0].mode, members[0].reason = "fallback", "no other run of the same shape to batch with"
    try:
        for s in ready:  # separate runs first, one at a time
            if s.mode == "fallback":
                _release(s)
        for members in groups.values():
            if len(members) > 1:
                _run_group(members)
    finally:
        for s in slots:  # whatever happened, no thread is left waiting
            s.release.set()
            if s.thread is not None:
                s.thread.join()
    return [s.outcome for s in slots]


def _release(slot: _Slot) -> None:
    slot.release.set()
    assert slot.thread is not None
    slot.thread.join()


def _run_group(members: list[_Slot]) -> None:
    runs = []
    for i, s in enumerate(members):
        assert s.engine is not None and s.ctx is not None
        runs.append(_Run(index=i, engine=s.engine, ctx=s.ctx))
        s.run = runs[-1]
    stack = _Stack(runs)
    try:
        stack.probe(runs[0].engine.config.batch_size)
    except RuntimeError as exc:
        reason = f"torch.func.vmap cannot batch this model: {str(exc).splitlines()[0]}"
        for s in members:
            s.mode, s.reason = "fallback", reason
            _release(s)
        return
    for r in runs:
        checkpointer = r.engine.pm.unregister(name="checkpointer") is not None
        r.call(r.engine.log.info, Event.BATCHED_STARTED, runs=len(runs), index=r.index,
               checkpoints="off in a batched run" if checkpointer else "off",
               message=f"trained as run {r.index + 1} of {len(runs)} in one stacked computation")
    # a failure of the loop itself (not of one run's hooks) ends every run of the group with it
    try:
        _fit_group(runs, stack)
    except BaseException as exc:
        for r in runs:
            r.error = r.error or exc
    for s in members:
        _release(s)
