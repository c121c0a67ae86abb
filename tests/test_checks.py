"""The verification observers catch each known silent failure, with a clear message, and raise no false alarm."""

from __future__ import annotations

import itertools
import math
from typing import Any

import attrs
import pytest
import torch
from conftest import TINY_GROUPS, NudgeAt, TinyNet, make_engine, named
from torch import nn

from moola_engine import hookimpl
from moola_engine.checks.delta import build_checks, optimizer_membership
from moola_engine.config import ChecksConfig, GroupSpec, structure
from moola_engine.core.engine import Engine
from moola_engine.core.plan import compute_plan, validate_plan
from moola_engine.core.plugins import build_plugin_manager
from moola_engine.errors import CheckFailed, ScheduleError
from moola_engine.logs import RunLog
from moola_engine.testing import assert_run


def run(strategy: Any, *, rogue: tuple[Any, ...] = (), checks: ChecksConfig | None = None, epochs: int = 3,
        **kw: Any) -> tuple[Engine, RunLog]:
    """A tiny engine with the check observers of ``checks`` registered as a run registers them."""
    checks = checks or ChecksConfig()
    log = RunLog(None, console="none", capture=True)
    observers = tuple(p for _, p in build_checks(checks))
    engine = make_engine(strategy, epochs=epochs, extra=(*observers, *rogue), checks=checks, runlog=log, **kw)
    return engine, log


def failures(log: RunLog) -> list[str]:
    return [e["message"] for e in log.events if e["event"] in ("weight_delta.violation", "check.failed")]


def only(**flags: bool) -> ChecksConfig:
    base = {"weight_delta": False, "grad_flow": False, "bn_stats": False, "lr_mask": False}
    return ChecksConfig(**{**base, **flags})


# --------------------------------------------------------------------------- (1) the seed's bug


class SeedTwoPhase:
    """The seed's schedule: ``unfreeze_encoder_after = 0`` silently meant "never"."""

    name = "seed_two_phase"

    def __init__(self, unfreeze_after: int) -> None:
        self.unfreeze_after = unfreeze_after

    @hookimpl
    def on_fit_start(self, engine: Any) -> None:
        for g in engine.freezer.encoder_groups:
            engine.freezer.freeze(g, reason="phase 1")

    @hookimpl
    def on_epoch_start(self, engine: Any, epoch: int) -> None:
        if epoch == self.unfreeze_after and epoch > 0:  # the seed's condition: 0 never fires
            for g in engine.freezer.encoder_groups:
                engine.freezer.unfreeze(g, reason="unfreeze_after")


def test_seed_bug_is_refused_before_training() -> None:
    engine, _ = run(SeedTwoPhase(unfreeze_after=0))
    w0 = engine.model.enc0.weight.detach().clone()
    with pytest.raises(ScheduleError) as err:
        engine.fit()
    assert "group encoder.layer0 never trains in 3 epochs, but the strategy promises to train it" in str(err.value)
    assert torch.equal(w0, engine.model.enc0.weight)  # refused before any step


class DefaultedThaw:
    """Unfreezes when val_loss reaches a target; a ``.get`` default makes its dry run unfreeze at once."""

    name = "defaulted_thaw"

    @hookimpl
    def on_fit_start(self, engine: Any) -> None:
        for g in engine.freezer.encoder_groups:
            engine.freezer.freeze(g, reason="phase 1")

    @hookimpl
    def on_validation_end(self, engine: Any, metrics: dict[str, float]) -> None:
        if metrics.get("val_loss", 0.0) <= 0.0:  # the plan (no metrics) thaws; a real loss is never <= 0
            for g in engine.freezer.encoder_groups:
                engine.freezer.unfreeze(g, reason="target reached")


def test_promise_broken_at_run_time_is_caught_at_fit_end() -> None:
    engine, log = run(DefaultedThaw())
    with pytest.raises(CheckFailed) as err:
        engine.fit()
    msg = "group encoder.layer0 never trained in 3 epoch(s), but strategy defaulted_thaw promises to train it"
    assert msg in str(err.value) and msg in " ".join(failures(log))
    fit = [e for e in log.events if e["event"] == "weight_delta.check" and e["scope"] == "fit"]
    assert {e["group"]: e["ok"] for e in fit} == {"encoder.layer0": False, "encoder.layer1": False, "head": True}


def test_allowed_never_unfreeze_is_not_a_failure() -> None:
    engine, log = run(SeedTwoPhase(unfreeze_after=0))
    engine.allow = {"never-unfreeze"}
    engine.fit()
    assert failures(log) == []
    fit = {e["group"]: e for e in log.events if e["event"] == "weight_delta.check" and e["scope"] == "fit"}
    assert fit["encoder.layer0"]["allowed"] is True and fit["encoder.layer0"]["moved"] is False


# --------------------------------------------------------------------------- (2) unfrozen but not optimized


class DropFromOptimizer:
    """Mimics an optimizer built from ``requires_grad`` params while the encoder was frozen."""

    @hookimpl
    def on_fit_start(self, engine: Any) -> None:
        engine.optimizer.param_groups[1]["params"] = []


class ZeroLr:
    @hookimpl
    def on_fit_start(self, engine: Any) -> None:
        engine.optimizer.param_groups[1]["lr"] = 0.0


def test_unfrozen_parameter_absent_from_optimizer() -> None:
    engine, log = run(named("immediate"), rogue=(DropFromOptimizer(),))
    with pytest.raises(CheckFailed) as err:
        engine.fit()
    assert "enc1.weight is trainable but in no optimizer param group: it can never change" in str(err.value)
    assert engine.step == 0  # raised in after_step of the very first step (step 0)
    bad = [e for e in log.events if e["event"] == "grad_flow.check" and not e["ok"]]
    assert [e["group"] for e in bad] == ["encoder.layer1"] and bad[0]["level"] == "error"


def test_unfrozen_parameter_in_group_with_lr_zero() -> None:
    engine, _ = run(named("immediate"), rogue=(ZeroLr(),))
    with pytest.raises(CheckFailed, match=r"enc1.weight is trainable but its optimizer param group 1 has lr 0"):
        engine.fit()


def test_absent_from_optimizer_caught_by_weight_delta_alone() -> None:
    engine, log = run(named("immediate"), rogue=(DropFromOptimizer(),), checks=only(weight_delta=True))
    with pytest.raises(CheckFailed) as err:
        engine.fit()
    assert "trainable group encoder.layer1 did not move in epoch 0 over 4 step(s)" in str(err.value)
    [v] = [e for e in log.events if e["event"] == "weight_delta.violation"]
    assert v["level"] == "error" and "encoder.layer1" in v["message"]


# --------------------------------------------------------------------------- (3) frozen by zeroing grads


class ZeroGradFreeze:
    """Declares the encoder frozen, then 'freezes' it by zeroing its gradients instead of clearing them."""

    name = "zero_grad_freeze"

    def __init__(self, from_epoch: int = 0) -> None:
        self.from_epoch = from_epoch

    def promised_groups(self, groups: list[str], head_groups: list[str]) -> list[str]:
        return list(head_groups)

    def _freeze(self, engine: Any) -> None:
        for g in engine.freezer.encoder_groups:
            engine.freezer.freeze(g, reason="zeroing")
        if getattr(engine, "dry_run", False):
            return
        for g in engine.groups:
            if g.name in engine.freezer.encoder_groups:
                for p in g.tensors:
                    p.requires_grad_(True)
                    p.register_hook(torch.zeros_like)

    @hookimpl
    def on_fit_start(self, engine: Any) -> None:
        if self.from_epoch == 0:
            self._freeze(engine)

    @hookimpl
    def on_epoch_start(self, engine: Any, epoch: int) -> None:
        if epoch == self.from_epoch and epoch > 0:
            self._freeze(engine)


def test_zeroed_grads_let_weight_decay_move_a_frozen_group() -> None:
    engine, log = run(ZeroGradFreeze(), checks=only(weight_delta=True), train_kwargs={"weight_decay": 0.1})
    with pytest.raises(CheckFailed) as err:
        engine.fit()
    assert "frozen group encoder.layer0 changed in epoch 0 (max |dw| = " in str(err.value)
    assert "grad zeroed instead of cleared to None? weight decay or momentum still acting?" in str(err.value)
    bad = [e for e in log.events if e["event"] == "weight_delta.check" and not e["ok"]]
    assert {e["group"] for e in bad} == {"encoder.layer0", "encoder.layer1"}
    assert all(e["expected"] == "zero" and e["max_abs_delta"] > 0 for e in bad)


def test_zeroed_grads_let_adam_momentum_move_a_frozen_group() -> None:
    # no weight decay at all: one epoch of training leaves momentum that keeps moving the "frozen" encoder
    engine, _ = run(ZeroGradFreeze(from_epoch=1), checks=only(weight_delta=True), train_kwargs={"weight_decay": 0.0})
    with pytest.raises(CheckFailed, match=r"frozen group encoder.layer0 changed in epoch 1 \(max \|dw\| = "):
        engine.fit()


def test_zeroed_grads_caught_by_grad_flow_after_first_step() -> None:
    engine, _ = run(ZeroGradFreeze(), checks=only(grad_flow=True), train_kwargs={"weight_decay": 0.1})
    with pytest.raises(CheckFailed) as err:
        engine.fit()
    assert "enc0.weight is in frozen group encoder.layer0 but has requires_grad = True" in str(err.value)
    assert ("enc0.weight is frozen but its grad is not None: a zeroed grad still lets AdamW weight decay and "
            "momentum move it") in str(err.value)
    assert engine.step == 0  # raised in after_step of step 0


def test_fingerprint_snapshots_catch_the_same_movement() -> None:
    engine, log = run(ZeroGradFreeze(), checks=ChecksConfig(
        grad_flow=False, bn_stats=False, lr_mask=False, snapshots="fingerprint"), train_kwargs={"weight_decay": 0.1})
    with pytest.raises(CheckFailed, match=r"frozen group encoder.layer0 changed in epoch 0:"):
        engine.fit()
    bad = [e for e in log.events if e["event"] == "weight_delta.check" and not e["ok"]]
    assert bad and all(e["mode"] == "fingerprint" and e["max_abs_delta"] is None and e["estimate"] for e in bad)


# --------------------------------------------------------------------------- (4) BatchNorm drifting while frozen


class TinyBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc0 = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8))
        self.enc1 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.enc1(torch.relu(self.enc0(x.mean(dim=1))))))


class TrainModeEveryStep:
    """A well-meant ``model.train()`` that undoes the engine's eval mode for frozen BatchNorm."""

    @hookimpl
    def before_step(self, engine: Any) -> None:
        engine.model.train()


def test_batchnorm_statistics_drifting_in_frozen_encoder() -> None:
    engine, log = run(named("frozen"), rogue=(TrainModeEveryStep(),), model=TinyBN())
    with pytest.raises(CheckFailed) as err:
        engine.fit()
    assert ("BatchNorm running statistics of frozen group encoder.layer0 drifted in epoch 0 (max |delta| = "
            in str(err.value))
    [bn] = [e for e in log.events if e["event"] == "bn_stats.check"]
    assert bn["group"] == "encoder.layer0" and bn["ok"] is False and bn["expected"] == "zero"
    # the weights themselves stayed bitwise frozen: only the statistics moved
    wd = [e for e in log.events if e["event"] == "weight_delta.check" and e["group"] == "encoder.layer0"]
    assert wd and all(e["ok"] and not e["moved"] for e in wd)


def test_batchnorm_frozen_properly_and_train_bn_opt_in_are_clean() -> None:
    engine, log = run(named("frozen"), model=TinyBN())
    engine.fit()
    bn = [e for e in log.events if e["event"] == "bn_stats.check"]
    assert len(bn) == 3 and all(e["ok"] and not e["moved"] for e in bn)
    engine, log = run(named("frozen"), model=TinyBN(), train_kwargs={"train_bn": True})
    engine.fit()
    bn = [e for e in log.events if e["event"] == "bn_stats.check"]
    assert len(bn) == 3 and all(e["ok"] and e["moved"] and e["expected"] == "any" for e in bn)


# --------------------------------------------------------------------------- (7) no gradient reaches a group


class BranchNet(TinyNet):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.enc0(x.mean(dim=1)))
        h = h.detach() if self.mode == "detach" else h * 0.0 + 1.0
        return self.head(torch.relu(self.enc1(h)))


def test_detached_branch_gets_no_gradient() -> None:
    engine, _ = run(named("immediate"), model=BranchNet("detach"))
    with pytest.raises(CheckFailed) as err:
        engine.fit()
    assert ("enc0.weight is trainable but got no gradient (grad None): the loss does not reach it "
            "(detached branch or unused module?)") in str(err.value)


def test_all_zero_gradients_for_a_trainable_group() -> None:
    engine, log = run(named("immediate"), model=BranchNet("zero"))
    with pytest.raises(CheckFailed) as err:
        engine.fit()
    assert "enc0.weight is trainable but its gradient is all zeros" in str(err.value)
    [bad] = [e for e in log.events if e["event"] == "grad_flow.check" and not e["ok"]]
    assert bad["group"] == "encoder.layer0" and bad["grad_norm"] == 0.0


def test_non_strict_mode_logs_and_continues() -> None:
    checks = ChecksConfig(strict=False)
    engine, log = run(named("immediate"), model=BranchNet("zero"), checks=checks)
    engine.fit()
    assert engine.step == 12 and any("gradient is all zeros" in m for m in failures(log))
    with pytest.raises(AssertionError, match=r"enc0.weight is trainable but its gradient is all zeros"):
        assert_run(log.events, {"require_finished": False})


# --------------------------------------------------------------------------- (9) membership by identity


class TwinBiases(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        nn.init.zeros_(self.enc0.bias)
        nn.init.zeros_(self.enc1.bias)


class DedupeByValue:
    """What a by-value membership test does: drop a parameter equal to one already seen."""

    @hookimpl
    def on_fit_start(self, engine: Any) -> None:
        seen: list[torch.Tensor] = []
        for pg in engine.optimizer.param_groups:
            kept = []
            for p in pg["params"]:
                if any(q.shape == p.shape and torch.equal(q, p) for q in seen):
                    continue
                seen.append(p)
                kept.append(p)
            pg["params"] = kept


def test_equal_valued_parameters_both_reach_the_optimizer() -> None:
    model = TwinBiases()
    assert torch.equal(model.enc0.bias, model.enc1.bias)
    engine, log = run(named("immediate"), model=model)
    member = optimizer_membership(engine.optimizer)
    assert id(model.enc0.bias) in member and id(model.enc1.bias) in member
    assert member[id(model.enc0.bias)][0] != member[id(model.enc1.bias)][0]
    engine.fit()
    assert failures(log) == []
    assert not torch.equal(model.enc0.bias, model.enc1.bias)  # both trained, separately


def test_value_dedupe_dropping_a_twin_is_caught() -> None:
    engine, _ = run(named("immediate"), model=TwinBiases(), rogue=(DedupeByValue(),))
    with pytest.raises(CheckFailed, match=r"enc1.bias is trainable but in no optimizer param group"):
        engine.fit()


# --------------------------------------------------------------------------- no false alarm


def _fit_three_epochs(info: Any) -> Any:
    """Default params, with int schedule fields that would not fit in 3 epochs shortened to 1."""
    fields = {f.name: 1 for f in attrs.fields(info.params)
              if f.type in (int, "int") and isinstance(f.default, int) and f.default >= 3} if attrs.has(info.params) else {}
    obj = info.factory(structure(fields, info.params, source="test"))
    obj.name = info.name
    return obj


_, REGISTRY = build_plugin_manager()


@pytest.mark.parametrize("plugin", REGISTRY.names())
def test_builtin_strategies_run_clean_across_10_seeds(plugin: str) -> None:
    info = REGISTRY[plugin]
    strat = _fit_three_epochs(info)
    epochs = 3
    groups = [g.name for g in TINY_GROUPS]
    while True:  # a strategy added later whose defaults need longer still runs, just longer
        plan = compute_plan(strat, groups, ["head"], epochs, 1e-2, name=plugin)
        try:
            validate_plan(plan, strat, plugin)
            break
        except ScheduleError:
            epochs += 1
            assert epochs <= 12, f"strategy {plugin}: no valid plan within 12 epochs"
    for seed in range(10):
        optimizer = ("adamw", "sgd", "adam")[seed % 3]
        snapshots = "fingerprint" if seed % 5 == 4 else "exact"
        model = TinyBN() if seed % 2 else TinyNet()
        engine, log = run(_fit_three_epochs(info), epochs=epochs, seed=seed, model=model,
                          checks=ChecksConfig(snapshots=snapshots),
                          train_kwargs={"optimizer": optimizer, "weight_decay": 0.01})
        engine.fit()
        assert failures(log) == [], f"{plugin} seed {seed}"
        result = assert_run(log.events, {"require_finished": False})
        assert result.counts["weight_delta"] > 0 and result.counts["grad_flow"] > 0


def test_groups_declared_per_module_pattern_list() -> None:
    """A group spanning two modules is checked as one group (no false alarm from the grouping itself)."""
    groups = [GroupSpec(name="encoder", modules=["enc0", "enc1"]), GroupSpec(name="head", modules=["head"], head=True)]
    engine, log = run(named("two-phase", unfreeze_after=1), groups=groups)
    engine.fit()
    assert failures(log) == []
    assert_run(log.events, {"require_finished": False,
                            "expect": [{"group": "encoder", "trainable_from_epoch": 1, "frozen_before": 1,
                                        "moves_after": 1}]})


# --------------------------------------------------------------------------- (6) the live optimizer against the plan


class RewritesEncoderLr:
    """A plugin that sets the encoder's lr behind the engine's back, every step (planned 0.01, used 0.003)."""

    @hookimpl
    def after_step(self, engine: Any) -> None:
        for pg in engine.optimizer.param_groups:
            if pg["group"] == "encoder.layer0":
                pg["lr"] = 0.003


class DropsOneRequiresGrad:
    """Turns requires_grad off on one tensor of a trainable group mid-run; the group's bias still moves."""

    @hookimpl
    def on_epoch_start(self, engine: Any, epoch: int) -> None:
        if epoch == 1:
            engine.model.enc0.weight.requires_grad_(False)


def test_an_lr_rewritten_behind_the_engines_back_fails_the_run() -> None:
    engine, log = run(named("immediate"), rogue=(RewritesEncoderLr(),), checks=only(lr_mask=True))
    with pytest.raises(CheckFailed, match=r"lr_mask check failed: group encoder.layer0 trained at lr 0.003 in "
                                          r"epoch 0 but the schedule says 0.01 \(its lr 0.01 x none schedule"):
        engine.fit()
    [bad] = [e for e in log.events if e["event"] == "lr_mask.check" and not e["ok"]]
    assert (bad["group"], bad["lr"], bad["expected_lr"], bad["factor"]) == ("encoder.layer0", 0.003, 0.01, 1.0)


def test_a_tensor_losing_requires_grad_in_a_trainable_group_fails_even_if_the_group_moved() -> None:
    engine, log = run(named("immediate"), rogue=(DropsOneRequiresGrad(),),
                      checks=only(lr_mask=True, weight_delta=True))
    with pytest.raises(CheckFailed, match="group encoder.layer0 is trainable in epoch 1 by the schedule, but "
                                          "requires_grad disagrees for enc0.weight"):
        engine.fit()
    # without it, every other check passes: the group's bias moved, and grad flow looks at each phase's first step
    engine, log = run(named("immediate"), rogue=(DropsOneRequiresGrad(),), checks=ChecksConfig(lr_mask=False))
    engine.fit()
    moved = [e for e in log.events if e["event"] == "weight_delta.check" and e["group"] == "encoder.layer0"
             and e["epoch"] == 1]
    assert moved and all(e["ok"] and e["moved"] for e in moved)


@pytest.mark.parametrize("scheduler", ["none", "onecycle", "cosine", "plateau"])
@pytest.mark.parametrize("strategy", [{"unfreeze_after": 1, "lr_scale": 0.3},
                                      {"unfreeze_on": "plateau", "patience": 1, "max_epoch": 3, "lr_scale": 0.3}],
                         ids=["epoch", "metric"])
def test_lr_mask_check_passes_clean_runs_under_every_scheduler(scheduler: str, strategy: dict[str, Any]) -> None:
    engine, log = run(named("two-phase", **strategy), epochs=4,
                      train_kwargs={"scheduler": scheduler, "plateau_patience": 0, "scheduler_mode": "max"})
    engine.fit()
    events = [e for e in log.events if e["event"] == "lr_mask.check"]
    assert len(events) == 4 * 3 and all(e["ok"] for e in events), [e["problems"] for e in events if not e["ok"]]
    if scheduler != "none":
        assert any(e["factor"] != 1.0 for e in events)  # the schedule really acted, and the check followed it


def test_lr_mask_check_can_be_switched_off() -> None:
    engine, log = run(named("immediate"), rogue=(RewritesEncoderLr(),), checks=ChecksConfig(lr_mask=False))
    engine.fit()
    assert not [e for e in log.events if e["event"] == "lr_mask.check"]


def _builtin_cases() -> list[tuple[str, dict[str, Any]]]:
    from conftest import ROOT

    from moola_engine.config import unstructure
    from moola_engine.core.plugins import load_strategies

    _, registry = build_plugin_manager()
    table = load_strategies(ROOT / "strategies.toml", registry)
    return [(key, {"plugin": n.plugin, **unstructure(n.params)}) for key, n in table.items()]


@pytest.mark.parametrize("scheduler", ["none", "onecycle", "plateau"])
@pytest.mark.parametrize(("key", "spec"), _builtin_cases(), ids=[k for k, _ in _builtin_cases()])
def test_no_false_alarm_from_lr_mask_for_any_strategy_of_strategies_toml(key: str, spec: dict[str, Any],
                                                                         scheduler: str) -> None:
    spec = dict(spec)
    plugin = spec.pop("plugin")
    for epochs in (4, 6, 8, 12):
        strategy = named(plugin, **{k: v for k, v in spec.items() if v is not None})
        plan = compute_plan(strategy, [g.name for g in TINY_GROUPS], ["head"], epochs, 0.01, name=key)
        try:
            validate_plan(plan, strategy, key)
        except ScheduleError:
            continue
        break
    else:
        pytest.skip(f"{key}: no schedule within 12 epochs")
    engine, log = run(named(plugin, **{k: v for k, v in spec.items() if v is not None}), epochs=epochs,
                      checks=only(lr_mask=True), train_kwargs={"scheduler": scheduler, "plateau_patience": 0})
    engine.fit()
    events = [e for e in log.events if e["event"] == "lr_mask.check"]
    assert events and all(e["ok"] for e in events), [e["problems"] for e in events if not e["ok"]]
def test_grad_stats_find_nan_inf_zeros_and_the_norm_without_a_float64_copy() -> None:
    from moola_engine.checks.delta import _grad_stats

    cpu = torch.device("cpu")

    def verdict(g):
        lo, hi, norm = _grad_stats(g, cpu).tolist()
        return math.isfinite(lo) and math.isfinite(hi), lo != 0.0 or hi != 0.0, norm

    assert verdict(torch.tensor([1.0, math.nan, 2.0]))[0] is False
    assert verdict(torch.tensor([math.nan, 1.0]))[0] is False
    assert verdict(torch.tensor([1.0, -math.inf]))[0] is False
    assert verdict(torch.tensor([0.0, -0.0]))[:2] == (True, False)  # all zeros, the sign of zero aside
    assert verdict(torch.zeros(0))[:2] == (True, False)
    finite, nonzero, norm = verdict(torch.tensor([3.0, -4.0]))
    assert finite and nonzero and norm == pytest.approx(5.0)
    assert verdict(torch.full((4,), 60000.0, dtype=torch.float16))[2] == pytest.approx(120000.0)  # no fp16 overflow


def test_a_transition_reads_an_unchanged_group_once_for_its_phase_and_interval_checks(monkeypatch: Any) -> None:
    """The frozen encoder's phase snapshot is its interval snapshot: one comparison serves both checks."""
    from moola_engine.checks import snapshots
    from moola_engine.checks.delta import WeightDeltaCheck

    reads: list[tuple[str, int]] = []  # (first tensor name, step) of every comparison against the live tensors
    for method in ("delta", "delta_and_take"):
        real = getattr(snapshots.ExactStore, method)

        def spy(self: Any, snap: Any, named: Any, device: Any, *a: Any, _real: Any = real, **kw: Any) -> Any:
            named = list(named)
            reads.append((named[0][0], check.engine.step))
            return _real(self, snap, named, device, *a, **kw)

        monkeypatch.setattr(snapshots.ExactStore, method, spy)

    check = WeightDeltaCheck(ChecksConfig())
    engine = make_engine(named("two-phase", unfreeze_after=1), epochs=2, extra=(check,))
    check.engine = engine
    engine.fit()  # 4 steps an epoch: epoch 0 ends at step 4, the encoder unfreezes at epoch 1's start (step 4)
    at_step_4 = [name for name, step in reads if step == 4 and name == "enc0.weight"]
    # epoch 0's interval check; at encoder.layer0's unfreeze one comparison for its phase and interval checks
    # (two before); at encoder.layer1's unfreeze (another hook call) the interval check of every group
    assert at_step_4 == ["enc0.weight"] * 3


def test_grad_flow_check_answers_every_phase_start_and_end_hook() -> None:
    from moola_engine.checks.delta import GradFlowCheck
    from moola_engine.core.plugins import new_plugin_manager

    pm = new_plugin_manager()
    check = GradFlowCheck()
    pm.register(check, name="grad-flow")
    for hook in ("on_fit_start", "on_freeze", "on_unfreeze", "on_epoch_end", "on_fit_end", "after_step"):
        impls = getattr(pm.hook, hook).get_hookimpls()
        assert [i.plugin for i in impls] == [check], hook
        assert impls[0].trylast, hook


# --------------------------------------------------------------------------- checks.every


def _intervals(log: RunLog, group: str) -> list[dict[str, Any]]:
    return [e for e in log.events if e["event"] == "weight_delta.check" and e.get("scope") == "interval"
            and e["group"] == group]


def test_checks_every_spaces_the_interval_checks_and_still_covers_every_step() -> None:
    every_epoch, log1 = run(named("immediate"), epochs=5)
    every_epoch.fit()
    spaced, log2 = run(named("immediate"), epochs=5, checks=ChecksConfig(every=2))
    spaced.fit()
    assert [e["epoch"] for e in _intervals(log1, "head")] == [0, 1, 2, 3, 4]
    assert [e["epoch"] for e in _intervals(log2, "head")] == [1, 3, 4]  # every 2nd epoch, and always the last
    steps = [(e["from_step"], e["to_step"]) for e in _intervals(log2, "head")]
    assert steps[0][0] == 0 and steps[-1][1] == spaced.step
    assert all(a[1] == b[0] for a, b in itertools.pairwise(steps))  # contiguous: no step left unchecked
    assert all(e["ok"] and e["moved"] for e in _intervals(log2, "head"))


def test_checks_every_still_catches_a_frozen_group_moving_in_a_skipped_epoch() -> None:
    engine, _ = run(ZeroGradFreeze(), epochs=4, checks=ChecksConfig(every=2, grad_flow=False, lr_mask=False),
                    train_kwargs={"weight_decay": 0.1})
    with pytest.raises(CheckFailed, match=r"frozen group encoder.layer0 changed in epoch 1 \(max \|dw\| = "):
        engine.fit()  # epoch 0 moved it; epoch 0 is not checked on its own, its steps are in epoch 1's interval


def test_checks_every_checks_the_steps_after_the_last_epoch_check_at_an_early_stop() -> None:
    from moola_engine.config import EarlyStoppingConfig

    stop = EarlyStoppingConfig(patience=1, min_delta=1e9)  # nothing ever improves by 1e9: stops after epoch 1
    engine, log = run(named("immediate"), epochs=6, checks=ChecksConfig(every=3),
                      train_kwargs={"early_stopping": stop, "restore_best": False})
    engine.fit()
    assert engine.result.epochs_run == 2
    [last] = _intervals(log, "head")  # epoch 1 is no check epoch (every 3): the fit's end checks its steps
    assert (last["reason"], last["from_step"], last["to_step"], last["ok"]) == ("fit end", 0, engine.step, True)


def test_checks_every_still_checks_every_epoch_that_writes_a_checkpoint(tmp_path: Any) -> None:
    from moola_engine.config import CheckpointConfig
    from moola_engine.runs.checkpoint import Checkpointer

    checks = ChecksConfig(every=10)
    log = RunLog(None, console="none", capture=True)
    observers = tuple(p for _, p in build_checks(checks))
    saver = Checkpointer(tmp_path, CheckpointConfig(every=2))
    engine = make_engine(named("immediate"), epochs=5, extra=observers, checks=checks, runlog=log)
    from moola_engine.core.plugins import register_checked

    register_checked(engine.pm, saver, name="checkpointer")  # last, as build_observers registers it
    engine.fit()
    # saved at epochs 1 and 3 (every 2) and 4 (the last): exactly those are checked, no checkpoint holds
    # weights the checks have not seen, and a resumed run's checks start from checked weights
    assert [e["epoch"] for e in _intervals(log, "head")] == [1, 3, 4]


# --------------------------------------------------------------------------- fingerprints of a group still pretrained


def _pretrained_run(strategy: Any, checks: ChecksConfig, rogue: tuple[Any, ...] = (), epochs: int = 3,
                    runlog: RunLog | None = None) -> Engine:
    from conftest import tiny_data

    from moola_engine.config import TrainConfig
    from moola_engine.core.plugins import register_checked

    torch.manual_seed(0)
    pm, _ = build_plugin_manager()
    for i, plugin in enumerate((*(p for _, p in build_checks(checks)), *rogue)):
        register_checked(pm, plugin, name=f"extra-{i}")
    register_checked(pm, strategy, name="strategy")
    model = TinyNet()
    loaded = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("enc")}  # as train() loads them
    return Engine(model, train=TrainConfig(epochs=epochs, batch_size=16, lr=1e-2, seed=0, device="cpu"),
                  groups=TINY_GROUPS, pm=pm, strategy=strategy, train_data=tiny_data(), val_data=tiny_data(32, seed=1),
                  checks=checks, pretrained=loaded, **({"logger": runlog.logger} if runlog else {}))


@pytest.mark.parametrize("mode", ["exact", "fingerprint"])
def test_phase_events_carry_the_distance_from_the_pretrained_weights(mode: str) -> None:
    """A frozen phase that ends still bitwise pretrained is 0.0 from them (no second pass needed: the phase
    comparison against the pretrained snapshot is that distance); the trained phase at fit end matches the
    distance computed here from the weights."""
    log = RunLog(None, console="none", capture=True)
    checks = ChecksConfig(snapshots=mode, grad_flow=False, bn_stats=False, lr_mask=False)
    engine = _pretrained_run(named("two-phase", unfreeze_after=2, lr_scale=0.5), checks, epochs=4, runlog=log)
    pre = engine.model.enc0.weight.detach().clone(), engine.model.enc0.bias.detach().clone()
    engine.fit()
    phases = [e for e in log.events if e["event"] == "weight_delta.check" and e.get("scope") == "phase"
              and e["group"] == "encoder.layer0"]
    assert [(p["expected"], p["moved"]) for p in phases] == [("zero", False), ("nonzero", True)]
    assert phases[0]["from_pretrained"] == 0.0
    now = torch.cat([engine.model.enc0.weight.detach().reshape(-1), engine.model.enc0.bias.detach()])
    w0 = torch.cat([pre[0].reshape(-1), pre[1]])
    want = float((now.double() - w0.double()).norm() / w0.double().norm())
    assert phases[1]["from_pretrained"] == pytest.approx(want, rel=1e-5 if mode == "exact" else 0.5)
    assert phases[1]["from_pretrained"] > 0


def test_fingerprints_of_a_group_still_equal_to_its_pretrained_weights_take_no_pass(monkeypatch: Any) -> None:
    from moola_engine.checks.snapshots import FingerprintStore

    passes: list[tuple[int, ...]] = []
    real = FingerprintStore.fingerprint

    def counting(self: Any, t: torch.Tensor, light: bool = False) -> Any:
        passes.append(tuple(t.shape))
        return real(self, t, light)

    monkeypatch.setattr(FingerprintStore, "fingerprint", counting)
    checks = ChecksConfig(snapshots="fingerprint", grad_flow=False, bn_stats=False, lr_mask=False)
    engine = _pretrained_run(named("frozen"), checks, epochs=4)
    engine.fit()
    enc = tuple(engine.model.enc0.weight.shape)
    # the frozen encoder: fingerprinted once at fit start (its reference, which its pretrained weights then share);
    # every later check finds it bitwise equal to the loaded tensors by memcmp
    assert passes.count(enc) == 1
    assert passes.count(tuple(engine.model.head.weight.shape)) >= 4  # the head moves: a pass every check


def test_fingerprints_are_light_only_where_every_comparison_expects_a_change(monkeypatch: Any) -> None:
    from moola_engine.checks.snapshots import FingerprintStore

    taken: list[tuple[str, bool, int]] = []  # (which tensor, light, epoch)
    real = FingerprintStore.fingerprint
    holder: dict[str, Any] = {}

    def recording(self: Any, t: torch.Tensor, light: bool = False) -> Any:
        model = holder["engine"].model
        which = {id(model.enc0.weight): "enc0", id(model.head.weight): "head"}.get(id(t), "other")
        taken.append((which, light, holder["engine"].epoch))
        return real(self, t, light)

    monkeypatch.setattr(FingerprintStore, "fingerprint", recording)
    checks = ChecksConfig(snapshots="fingerprint", grad_flow=False, bn_stats=False, lr_mask=False)
    engine = _pretrained_run(named("two-phase", unfreeze_after=2, lr_scale=0.5), checks, epochs=5)
    holder["engine"] = engine
    engine.fit()
    enc = [(light, epoch) for which, light, epoch in taken if which == "enc0"]
    head = [(light, epoch) for which, light, epoch in taken if which == "head"]
    # the encoder, frozen for epochs 0-1 (its unfreeze reuses its pretrained weights' full fingerprints): light
    # from the first interval it trains through (epoch 2's end) on
    assert enc[0] == (False, 0) and not any(light for light, epoch in enc if epoch < 2)
    assert [e for e in enc if e[1] >= 2] == [(True, 2), (True, 3), (True, 4)]
    # the head trains throughout: light from the first epoch end (after the fit start's full reference)
    assert head[0] == (False, 0) and (True, 1) in head and all(light for light, epoch in head[2:])


def test_two_sign_flips_in_a_frozen_chunk_are_caught_by_the_checksums() -> None:
    class FlipTwo:
        @hookimpl
        def after_step(self, engine: Any, step: int) -> None:
            if step == 5:
                with torch.no_grad():
                    flat = engine.model.enc0.weight.view(-1)
                    flat[:2] = -flat[:2]  # two sign bits: +-2**31 each, so the words' sum mod 2**32 is unchanged

    checks = ChecksConfig(snapshots="fingerprint", grad_flow=False, lr_mask=False)
    engine = _pretrained_run(named("frozen"), checks, rogue=(FlipTwo(),), epochs=3)
    with pytest.raises(CheckFailed, match=r"frozen group encoder.layer0 changed in epoch 1"):
        engine.fit()
    # the same flips before an unfreeze, with no epoch-end check in between (checks.every): the transition ends
    # an interval that started frozen, so its fingerprint is full even though the group trains from now on
    checks = ChecksConfig(snapshots="fingerprint", grad_flow=False, lr_mask=False, every=3)
    engine = _pretrained_run(named("two-phase", unfreeze_after=2, lr_scale=0.5), checks, rogue=(FlipTwo(),),
                             epochs=4)
    with pytest.raises(CheckFailed, match=r"frozen group encoder.layer0 changed"):
        engine.fit()


def test_a_frozen_group_that_moved_away_from_its_pretrained_weights_is_still_caught() -> None:
    checks = ChecksConfig(snapshots="fingerprint", grad_flow=False, lr_mask=False)
    engine = _pretrained_run(named("frozen"), checks, rogue=(NudgeAt(step=5),), epochs=3)
    with pytest.raises(CheckFailed, match=r"frozen group encoder.layer0 changed in epoch 1"):
        engine.fit()
