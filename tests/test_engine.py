"""The engine loop: hook order, plugin failures, determinism, groups, early stopping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_GROUPS, TinyNet, make_engine, named, tiny_data
from torch import nn

from moola_engine import hookimpl
from moola_engine.config import ChecksConfig, EarlyStoppingConfig, GroupSpec, TrainConfig
from moola_engine.core.engine import Engine
from moola_engine.core.freezing import resolve_groups
from moola_engine.core.hookspecs import all_hook_names
from moola_engine.core.optim import build_optimizer, select_device
from moola_engine.core.plugins import build_plugin_manager, collect_strategies, register_checked
from moola_engine.errors import GroupError, PluginError, ScheduleError
from moola_engine.logs import Event, RunLog, read_events


class Recorder:
    """Implements every hook and records (hook, details) in call order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    @hookimpl
    def register_strategies(self, register: Any) -> None:
        self.calls.append(("register_strategies",))

    @hookimpl
    def on_fit_start(self, engine: Any) -> None:
        self.calls.append(("on_fit_start",))

    @hookimpl
    def on_epoch_start(self, engine: Any, epoch: int) -> None:
        self.calls.append(("on_epoch_start", epoch))

    @hookimpl
    def before_step(self, engine: Any, epoch: int, step: int, batch: Any) -> None:
        self.calls.append(("before_step", epoch, step))

    @hookimpl
    def after_step(self, engine: Any, epoch: int, step: int, loss: torch.Tensor) -> None:
        self.calls.append(("after_step", epoch, step))

    @hookimpl
    def on_freeze(self, engine: Any, group: str, epoch: int, reason: str) -> None:
        self.calls.append(("on_freeze", group, epoch))

    @hookimpl
    def on_unfreeze(self, engine: Any, group: str, epoch: int, lr: float, reason: str) -> None:
        self.calls.append(("on_unfreeze", group, epoch, lr))

    @hookimpl
    def on_validation_end(self, engine: Any, epoch: int, metrics: Any) -> None:
        self.calls.append(("on_validation_end", epoch))

    @hookimpl
    def on_epoch_end(self, engine: Any, epoch: int, metrics: Any) -> None:
        self.calls.append(("on_epoch_end", epoch))

    @hookimpl
    def on_fit_end(self, engine: Any, result: Any) -> None:
        self.calls.append(("on_fit_end", result.epochs_run))


def test_recorder_implements_every_hook() -> None:
    implemented = {n for n in dir(Recorder) if not n.startswith("_")}
    loop_hooks = {n for n in all_hook_names() if not n.startswith("register_")} | {"register_strategies"}
    assert implemented == loop_hooks


def test_hook_order_three_epochs_unfreeze_at_epoch_1() -> None:
    rec = Recorder()
    pm, _ = build_plugin_manager()
    register_checked(pm, rec, name="recorder")
    collect_strategies(pm)
    strategy = named("two-phase", unfreeze_after=1, lr_scale=0.5)
    register_checked(pm, strategy, name="strategy")
    engine = Engine(TinyNet(), train=TrainConfig(epochs=3, batch_size=16, lr=0.01, device="cpu"), groups=TINY_GROUPS,
                    pm=pm, strategy=strategy, train_data=tiny_data(n=64), val_data=tiny_data(n=16, seed=1))
    engine.fit()

    def steps(epoch: int) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        for s in range(4 * epoch, 4 * epoch + 4):
            out += [("before_step", epoch, s), ("after_step", epoch, s)]
        return out

    expected = [
        ("register_strategies",),
        ("on_fit_start",),
        ("on_freeze", "encoder.layer0", 0),
        ("on_freeze", "encoder.layer1", 0),
        ("on_epoch_start", 0), *steps(0), ("on_validation_end", 0), ("on_epoch_end", 0),
        ("on_epoch_start", 1),
        ("on_unfreeze", "encoder.layer0", 1, 0.005),
        ("on_unfreeze", "encoder.layer1", 1, 0.005),
        *steps(1), ("on_validation_end", 1), ("on_epoch_end", 1),
        ("on_epoch_start", 2), *steps(2), ("on_validation_end", 2), ("on_epoch_end", 2),
        ("on_fit_end", 3),
    ]
    assert rec.calls == expected


class Exploder:
    @hookimpl
    def on_epoch_end(self, engine: Any, epoch: int) -> None:
        if epoch == 1:
            raise RuntimeError("boom")


def test_plugin_raising_in_hook_names_plugin_and_hook_and_log_stays_readable(tmp_path: Path) -> None:
    runlog = RunLog(tmp_path / "events.jsonl", console="none")
    engine = make_engine(named("immediate"), epochs=3, extra=(Exploder(),), runlog=runlog)
    with pytest.raises(PluginError) as err:
        engine.fit()
    runlog.close()
    assert str(err.value) == 'plugin "extra-0" raised in hook on_epoch_end: RuntimeError: boom'
    events = read_events(tmp_path / "events.jsonl")
    names = [e["event"] for e in events]
    assert names.count(Event.EPOCH_COMPLETED) == 1  # epoch 0 completed, epoch 1 failed before its event
    assert events[-1]["event"] == Event.PLUGIN_FAILED
    assert events[-1]["plugin"] == "extra-0" and events[-1]["hook"] == "on_epoch_end"
    assert events[-1]["epoch"] == 1


def test_same_seed_same_weights_on_cpu() -> None:
    a = make_engine(named("two-phase", unfreeze_after=1), epochs=3, seed=7)
    a.fit()
    b = make_engine(named("two-phase", unfreeze_after=1), epochs=3, seed=7)
    b.fit()
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_one_optimizer_param_group_per_model_group_and_lrs() -> None:
    engine = make_engine(named("two-phase", unfreeze_after=1, lr_scale=0.25), epochs=2)
    engine.fit()
    assert [g["group"] for g in engine.optimizer.param_groups] == ["encoder.layer0", "encoder.layer1", "head"]
    assert [g["lr"] for g in engine.optimizer.param_groups] == [0.0025, 0.0025, 0.01]


def test_frozen_params_have_no_grad_and_do_not_move_under_adamw_weight_decay() -> None:
    engine = make_engine(named("frozen"), epochs=2, train_kwargs={"weight_decay": 0.5})
    before = engine.model.enc0.weight.detach().clone()
    engine.fit()
    assert engine.model.enc0.weight.grad is None
    assert not engine.model.enc0.weight.requires_grad
    assert torch.equal(before, engine.model.enc0.weight)


def test_param_in_no_group_is_an_error() -> None:
    with pytest.raises(GroupError) as err:
        resolve_groups(TinyNet(), [GroupSpec(name="enc", modules=["enc0"]), GroupSpec(name="head", modules=["head"])])
    assert str(err.value) == (
        "model.groups: parameter enc1.weight (8, 8) is in no group; parameter enc1.bias (8,) is in no group"
    )


def test_param_in_two_groups_is_an_error() -> None:
    with pytest.raises(GroupError, match="parameter enc0.weight is in two groups: a, b"):
        resolve_groups(TinyNet(), [GroupSpec(name="a", modules=["enc0", "enc1"]), GroupSpec(name="b", modules=["enc0.*"]),
                                   GroupSpec(name="head", modules=["head"])])


def test_group_matching_nothing_is_an_error() -> None:
    specs = [*TINY_GROUPS, GroupSpec(name="ghost", modules=["decoder"])]
    with pytest.raises(GroupError, match="group ghost matches no parameter"):
        resolve_groups(TinyNet(), specs)


def test_equal_valued_parameters_are_distinct_members() -> None:
    """Two zero-initialised biases of the same shape: membership is by identity, never by value."""
    net = TinyNet()
    with torch.no_grad():
        net.enc0.bias.zero_()
        net.enc1.bias.zero_()
    assert torch.equal(net.enc0.bias, net.enc1.bias)
    groups = resolve_groups(net, TINY_GROUPS)
    members = [id(p) for g in groups for p in g.tensors]
    assert len(members) == len(set(members)) == len(list(net.parameters()))
    opt = build_optimizer(groups, TrainConfig())
    in_opt = [id(p) for pg in opt.param_groups for p in pg["params"]]
    assert sorted(in_opt) == sorted(id(p) for p in net.parameters())


def test_unknown_group_in_strategy_is_an_error() -> None:
    class Typo:
        @hookimpl
        def on_fit_start(self, engine: Any) -> None:
            engine.freezer.freeze("encoder.layer9", reason="typo")

    engine = make_engine(Typo(), epochs=1)
    with pytest.raises(ScheduleError, match="unknown group 'encoder.layer9'; groups are: encoder.layer0, encoder.layer1, head"):
        engine.fit()


def test_early_stopping_waits_for_the_scheduled_transition() -> None:
    """Patience 1 would stop after epoch 1; the encoder unfreezes at epoch 4, so the run must reach it."""
    es = EarlyStoppingConfig(metric="val_loss", patience=1, min_delta=10.0)  # nothing ever "improves" enough
    engine = make_engine(named("two-phase", unfreeze_after=4), epochs=8, train_kwargs={"early_stopping": es})
    result = engine.fit()
    assert result.stopped_early
    assert result.epochs_run >= 5  # epoch 4 ran with the encoder trainable
    assert engine.freezer.is_trainable("encoder.layer0")


def test_unknown_early_stopping_metric_is_an_error() -> None:
    es = EarlyStoppingConfig(metric="val_los", patience=2)
    engine = make_engine(named("immediate"), epochs=2, train_kwargs={"early_stopping": es})
    with pytest.raises(Exception, match="train.early_stopping.metric = 'val_los' is not a metric of this run"):
        engine.fit()


def test_device_auto_is_cpu_without_cuda() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected


def test_default_groups_of_simple_lstm() -> None:
    from moola_ohlc.models import SimpleLSTM

    model = SimpleLSTM(hidden_size=4, head_hidden=3)
    groups = resolve_groups(model, model.default_groups())
    assert [g.name for g in groups] == ["encoder.layer0", "head"]
    assert len(groups[0].params) == 8  # both directions: ih/hh weights and biases


def test_bn_of_frozen_group_in_eval_mode() -> None:
    class BNNet(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.enc0 = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8))

    engine = make_engine(named("frozen"), epochs=1, model=BNNet())
    stats = engine.model.enc0[1].running_mean.clone()
    engine.fit()
    assert torch.equal(stats, engine.model.enc0[1].running_mean)


# --------------------------------------------------------------------------- restore_best before an unfreeze


def test_restore_best_from_before_the_unfreeze_warns_records_and_fails_verify() -> None:
    from conftest import make_engine, named

    from moola_engine.checks.delta import build_checks
    from moola_engine.checks.verify import Expectations, GroupExpectation, verify_events
    from moola_engine.config import ChecksConfig, EarlyStoppingConfig
    from moola_engine.logs import RunLog

    runlog = RunLog(None, console="none", capture=True)
    # min_delta so large that only epoch 0 counts as an improvement: the flat-validation-loss case, best epoch 0
    es = EarlyStoppingConfig(metric="val_loss", patience=10, min_delta=100.0)
    engine = make_engine(named("two-phase", unfreeze_after=2, lr_scale=0.5), epochs=4, runlog=runlog,
                         extra=tuple(p for _, p in build_checks(ChecksConfig())),
                         train_kwargs={"early_stopping": es, "restore_best": True})
    result = engine.fit()
    assert result.best_epoch == 0
    assert result.restored_before == [{"group": "encoder.layer0", "epoch": 2, "to_state": "trainable"},
                                      {"group": "encoder.layer1", "epoch": 2, "to_state": "trainable"}]
    [warn] = [e for e in runlog.events if e["event"] == "restore_best.before_transition"]
    assert warn["level"] == "warning" and warn["best_epoch"] == 0 and "epoch 2" in warn["message"]
    runlog.logger.info("run.finished")
    events = list(runlog.events)
    expect = Expectations(expect=[GroupExpectation(group="encoder.layer0", moves_after=2)])
    failures = verify_events(events, expect).failures
    assert failures == ["encoder.layer0: restore_best delivered the weights of epoch 0, from before its transition at "
                        "epoch 2: the delivered model never had it fine-tuned (set train.restore_best = false)"]
    assert verify_events(events).failures == []  # without an expectation that the group trains: a warning only


def test_restore_best_after_the_unfreeze_says_nothing() -> None:
    from conftest import make_engine, named

    from moola_engine.config import EarlyStoppingConfig
    from moola_engine.logs import RunLog

    runlog = RunLog(None, console="none", capture=True)
    es = EarlyStoppingConfig(metric="val_loss", patience=10)
    engine = make_engine(named("two-phase", unfreeze_after=1, lr_scale=0.5), epochs=4, runlog=runlog,
                         train_kwargs={"early_stopping": es, "restore_best": True})
    result = engine.fit()
    assert result.best_epoch >= 1 and result.restored_before == []
    assert not [e for e in runlog.events if e["event"] == "restore_best.before_transition"]


def test_the_engine_and_the_planner_both_provide_the_engine_view() -> None:
    """Hooks get one typed contract: the training engine and the dry-run planner both satisfy EngineView,
    and a strategy sees the real groups in a plan as in training."""
    from moola_engine import EngineView
    from moola_engine.core.plan import compute_plan

    seen: list[tuple[bool, list[str]]] = []

    class Looks:
        @hookimpl
        def on_fit_start(self, engine: EngineView) -> None:
            assert isinstance(engine, EngineView)
            seen.append((engine.dry_run, [g.name for g in engine.groups]))

    eng = make_engine(Looks(), epochs=1)
    eng.fit()
    compute_plan(Looks(), [g.name for g in eng.groups], ["head"], 1, 1e-3, model_groups=eng.groups)
    names = [g.name for g in eng.groups]
    # fit() dry-runs its own plan first (no pre-flight here), then trains; compute_plan dry-runs once more
    assert seen == [(True, names), (False, names), (True, names)]


def test_engine_view_refuses_an_object_missing_its_members() -> None:
    from moola_engine import EngineView

    class Half:
        dry_run = False
        freezer = None

    assert not isinstance(Half(), EngineView)
class FirstSteps:
    """Step hooks wanted for the first ``n`` steps of each epoch only (want_step_hooks)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls: list[tuple[str, int]] = []

    @hookimpl
    def on_epoch_start(self, engine: Any) -> None:
        engine.want_step_hooks(self, until_step=engine.step + self.n)

    @hookimpl
    def before_step(self, step: int) -> None:
        self.calls.append(("before", step))

    @hookimpl
    def after_step(self, step: int) -> None:
        self.calls.append(("after", step))


def test_step_hooks_are_called_only_for_the_steps_a_plugin_wants() -> None:
    gated, always = FirstSteps(2), Recorder()
    engine = make_engine(named("two-phase", unfreeze_after=1), epochs=3, extra=(gated, always))
    engine.fit()  # 64 samples, batch 16: 4 steps an epoch
    assert gated.calls == [(k, s) for e in range(3) for s in (4 * e, 4 * e + 1) for k in ("before", "after")]
    assert [c[2] for c in always.calls if c[0] == "after_step"] == list(range(12))  # the others: every step


def test_the_gradient_check_is_called_after_the_first_step_of_each_phase_only() -> None:
    from moola_engine.checks.delta import GradFlowCheck

    seen: list[int] = []

    class Counting(GradFlowCheck):
        @hookimpl(trylast=True)
        def after_step(self, engine: Any, step: int) -> None:
            seen.append(step)
            super().after_step(engine, step)

    check = Counting(ChecksConfig())
    engine = make_engine(named("two-phase", unfreeze_after=1), epochs=3, extra=(check,))
    engine.fit()
    assert seen == [0, 4]  # phase 1 starts at step 0, phase 2 (encoder unfrozen at epoch 1) at step 4
    assert check.phase == 2  # and both phases were checked
