"""Every built-in strategy, trained on TinyNet: what the plan says trains is exactly what changes.

An observer snapshots every parameter at each epoch's start (after the strategy
acted) and compares at the epoch's end: a tensor changed iff its group is
trainable that epoch and the tensor is not held by a parameter mask, and every
group's optimizer lr equals the plan's.  Each case also pins the schedule by
hand, so a plan that is wrong in the same way as the engine cannot pass.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import TINY_GROUPS, TinyNet, make_engine, named
from torch import nn

from moola_engine import hookimpl
from moola_engine.config import GroupSpec

G0, G1, H = "encoder.layer0", "encoder.layer1", "head"
SHORT = {"0": G0, "1": G1, "h": H}
BASE_LR = 1e-2


class EpochObserver:
    """Snapshots at on_epoch_start / on_epoch_end (trylast: after the strategy acted)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    @hookimpl(trylast=True)
    def on_epoch_start(self, engine: Any, epoch: int) -> None:
        self._before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
        self._state = engine.freezer.state()
        self._lr = {pg["group"]: pg["lr"] for pg in engine.optimizer.param_groups}
        self._n_groups = len(engine.optimizer.param_groups)

    @hookimpl(trylast=True)
    def on_epoch_end(self, engine: Any, epoch: int, metrics: Any) -> None:
        changed = {n: not torch.equal(self._before[n], p.detach()) for n, p in engine.model.named_parameters()}
        self.rows.append({"epoch": epoch, "changed": changed, "state": self._state, "lr": self._lr,
                          "n_groups": self._n_groups})


def trainable_sets(spec: str) -> list[set[str]]:
    """'h 01h' -> [{head}, {enc0, enc1, head}]: one token per epoch, '-' = nothing."""
    return [{SHORT[c] for c in tok if c != "-"} for tok in spec.split()]


def group_of(param: str) -> str:
    return {"enc0": G0, "enc1": G1, "head": H}[param.split(".")[0]]


def run(plugin: str, epochs: int, train_kwargs: dict[str, Any] | None = None, **params: Any) -> tuple[Any, EpochObserver]:
    obs = EpochObserver()
    engine = make_engine(named(plugin, **params), epochs=epochs, extra=(obs,), train_kwargs=train_kwargs)
    engine.fit()
    return engine, obs


def check_against(engine: Any, obs: EpochObserver, schedule: str, lrs: dict[str, float] | None = None,
                  *, plan_is_truth: bool = True, masked: dict[str, set[str]] | None = None) -> None:
    expected = trainable_sets(schedule)
    assert len(obs.rows) == len(expected) == len(engine.plan.epochs)
    masked = masked or {}
    for row, want, plan_row in zip(obs.rows, expected, engine.plan.epochs, strict=True):
        e = row["epoch"]
        actual = {g for g, s in row["state"].items() if s["trainable"]}
        assert actual == want, f"epoch {e}: trainable {sorted(actual)} != expected {sorted(want)}"
        if plan_is_truth:
            assert {g for g, t in plan_row.trainable.items() if t} == want, f"epoch {e}: plan disagrees"
            for g in plan_row.lr:
                assert row["lr"][g] == plan_row.lr[g], f"epoch {e} group {g}: optimizer lr != plan lr"
        for pname, did_change in row["changed"].items():
            g = group_of(pname)
            should = g in want and pname not in masked.get(g, set())
            assert did_change == should, f"epoch {e}: {pname} ({g}) changed={did_change}, expected {should}"
        assert row["n_groups"] == 3
        if lrs is not None:
            for g, lr in lrs.items():
                if g in want:
                    assert row["lr"][g] == pytest.approx(lr, rel=1e-12), f"epoch {e} group {g}"


@pytest.mark.parametrize(("plugin", "params", "epochs", "schedule", "lrs"), [
    ("frozen", {}, 3, "h h h", {H: BASE_LR}),
    ("immediate", {}, 3, "01h 01h 01h", {G0: BASE_LR, G1: BASE_LR, H: BASE_LR}),
    ("two-phase", {"unfreeze_after": 2, "lr_scale": 0.5}, 4, "h h 01h 01h", {G0: 5e-3, G1: 5e-3, H: BASE_LR}),
    ("two-phase", {"unfreeze_after": 0}, 2, "01h 01h", {G0: 3e-3, G1: 3e-3}),
    ("two-phase", {"unfreeze_after": 1, "lr_scale": 0.5, "lr_decay": 0.5}, 3, "h 01h 01h",
     {G1: 2.5e-3, G0: 1.25e-3, H: BASE_LR}),
    ("gradual", {"every": 1}, 4, "h 1h 01h 01h", {G0: BASE_LR, G1: BASE_LR, H: BASE_LR}),
    ("gradual", {"every": 2, "start": 0, "lr_decay": 0.5}, 4, "1h 1h 01h 01h", {G1: 5e-3, G0: 2.5e-3, H: BASE_LR}),
    ("gradual", {"every": 1, "lr_scale": 0.5}, 3, "h 1h 01h", {G1: 5e-3, G0: 5e-3}),
    ("discriminative", {"decay": 0.5}, 2, "01h 01h", {H: BASE_LR, G1: 5e-3, G0: 2.5e-3}),
    ("chain-thaw", {"stage_epochs": 1}, 5, "h 0 1 01h 01h", {G0: BASE_LR, G1: BASE_LR, H: BASE_LR}),
    ("chain-thaw", {"stage_epochs": 1, "direction": "top_down", "lr_scale": 0.5}, 4, "h 1 0 01h",
     {G0: 5e-3, G1: 5e-3, H: BASE_LR}),
    ("chain-thaw", {"stage_epochs": 1, "groups": ["encoder.layer1", "encoder.layer0"]}, 4, "h 1 0 01h", None),
    ("lp-ft", {"probe_epochs": 2, "lr_scale": 0.5}, 4, "h h 01h 01h", None),
    ("l2-sp", {"alpha": 0.1, "beta": 0.01}, 2, "01h 01h", {G0: BASE_LR, G1: BASE_LR, H: BASE_LR}),
])
def test_strategy_changes_exactly_what_the_plan_says(plugin: str, params: dict[str, Any], epochs: int, schedule: str,
                                                     lrs: dict[str, float] | None) -> None:
    engine, obs = run(plugin, epochs, **params)
    check_against(engine, obs, schedule, lrs)


def test_lp_ft_fine_tunes_head_and_encoder_at_lr_scale() -> None:
    engine, obs = run("lp-ft", 3, probe_epochs=1, lr_scale=0.5)
    check_against(engine, obs, "h 01h 01h")
    assert obs.rows[0]["lr"][H] == BASE_LR
    assert obs.rows[1]["lr"] == {G0: 5e-3, G1: 5e-3, H: 5e-3}


def test_chain_thaw_refrozen_group_stays_bitwise_with_sgd_momentum_and_weight_decay() -> None:
    # enc0 trains alone in epoch 1 (momentum buffers fill), then is frozen in epoch 2: grad None keeps SGD's
    # momentum and weight decay from moving it.
    engine, obs = run("chain-thaw", 4, train_kwargs={"optimizer": "sgd", "weight_decay": 0.01, "momentum": 0.9},
                      stage_epochs=1)
    check_against(engine, obs, "h 0 1 01h")
    assert "momentum_buffer" in engine.optimizer.state[engine.model.enc0.weight]  # it had momentum while frozen


def test_bitfit_trains_encoder_biases_and_head_only() -> None:
    engine, obs = run("bitfit", 2)
    masked = {G0: {"enc0.weight"}, G1: {"enc1.weight"}}
    check_against(engine, obs, "01h 01h", {G0: BASE_LR, G1: BASE_LR, H: BASE_LR}, masked=masked)
    assert engine.plan.epochs[0].frozen_params == {G0: ["enc0.weight"], G1: ["enc1.weight"]}
    assert engine.plan.epochs[0].params == {G0: "biases", G1: "biases", H: "all"}
    assert not engine.model.enc0.weight.requires_grad and engine.model.enc0.weight.grad is None
    assert engine.model.enc0.bias.requires_grad


# --------------------------------------------------------------------------- metric-driven transitions
# metrics["epoch"] never improves in mode "min" (0, 1, 2, ...): a deterministic plateau after `patience` epochs;
# in mode "max" it improves every epoch: the plateau never comes and the max_epoch bound decides.


def test_two_phase_plateau_unfreezes_when_metric_stalls() -> None:
    engine, obs = run("two-phase", 5, unfreeze_on="plateau", patience=2, max_epoch=4, metric="epoch", mode="min",
                      lr_scale=0.5)
    # plateau seen at the validation of epoch 2 -> the encoder trains from epoch 3 (the plan's bound is epoch 4)
    check_against(engine, obs, "h h h 01h 01h", {G0: 5e-3, G1: 5e-3}, plan_is_truth=False)
    assert [e.trainable[G0] for e in engine.plan.epochs] == [False] * 4 + [True]


def test_two_phase_plateau_falls_back_to_max_epoch_exactly_as_planned() -> None:
    engine, obs = run("two-phase", 4, unfreeze_on="plateau", patience=1, max_epoch=2, metric="epoch", mode="max")
    check_against(engine, obs, "h h 01h 01h")


def test_gradual_plateau_unfreezes_one_group_per_plateau() -> None:
    engine, obs = run("gradual", 5, unfreeze_on="plateau", patience=1, max_epoch=4, metric="epoch", mode="min")
    # epoch 1 stalls -> enc1 from 2; the count restarts; epoch 3 stalls -> enc0 from 4
    check_against(engine, obs, "h h 1h 1h 01h", plan_is_truth=False)
    assert [sorted(g for g, t in e.trainable.items() if t) for e in engine.plan.epochs][3:] == [[H], [G0, G1, H]]


def test_lp_ft_plateau_bound() -> None:
    engine, obs = run("lp-ft", 3, unfreeze_on="plateau", max_epoch=1, metric="epoch", mode="max")
    check_against(engine, obs, "h 01h 01h")


def test_plateau_without_the_metric_is_an_error_naming_the_strategy() -> None:
    from moola_engine.errors import ScheduleError

    strat = named("two-phase", unfreeze_on="plateau", max_epoch=2, metric="val_f1")
    engine = make_engine(strat, epochs=3)
    with pytest.raises(ScheduleError) as err:
        engine.fit()
    msg = str(err.value)
    assert msg.startswith("strategy two-phase: unfreeze_on = \"plateau\" watches metric 'val_f1', but this run's "
                          "metrics are: train_loss, val_accuracy, ")  # the metric list grows with the engine
    assert msg.endswith(", val_loss (is there validation data?)")


# --------------------------------------------------------------------------- L2-SP


def test_l2_sp_gradient_is_the_penalised_loss_gradient() -> None:
    alpha, beta = 0.3, 0.05
    strat = named("l2-sp", alpha=alpha, beta=beta)
    engine = make_engine(strat, epochs=1)
    strat.on_fit_start(engine)
    model = engine.model
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # move away from the reference so the pull is not zero
        for p in model.parameters():
            p.add_(0.1)
    x, y = engine.train_data.x[:16], engine.train_data.y[:16]
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    strat.on_fit_end(engine, None)  # hooks removed: the reference below is plain autograd

    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    for n, p in model.named_parameters():
        penalty = beta / 2 * (p ** 2).sum() if n.startswith("head") else alpha / 2 * ((p - w0[n]) ** 2).sum()
        loss = loss + penalty
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-6, atol=1e-7)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    assert not torch.allclose(got["enc0.weight"], model.enc0.weight.grad)  # the penalty really contributed


def test_l2_sp_pulls_encoder_toward_start_and_removes_its_hooks() -> None:
    torch.manual_seed(0)
    free = make_engine(named("immediate"), epochs=4)
    w0 = free.model.enc0.weight.detach().clone()
    free.fit()
    pulled = make_engine(named("l2-sp", alpha=5.0), epochs=4)
    assert torch.equal(pulled.model.enc0.weight, w0)  # same seed, same start
    pulled.fit()
    d_free = (free.model.enc0.weight - w0).norm()
    d_pulled = (pulled.model.enc0.weight - w0).norm()
    assert d_pulled < d_free
    assert not pulled.model.enc0.weight._backward_hooks


# --------------------------------------------------------------------------- BatchNorm and dropout of frozen groups


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc0 = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
        self.enc1 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.enc1(self.enc0(x.mean(dim=1)))))


class ModeProbe:
    def __init__(self) -> None:
        self.modes: list[tuple[int, bool, bool]] = []

    @hookimpl(trylast=True)
    def before_step(self, engine: Any, epoch: int, step: int, batch: Any) -> None:
        self.modes.append((epoch, engine.model.enc0[1].training, engine.model.enc0[2].training))


@pytest.mark.parametrize(("train_bn", "frozen_dropout"), [(False, True), (True, False)])
def test_frozen_group_batchnorm_and_dropout_modes(train_bn: bool, frozen_dropout: bool) -> None:
    probe = ModeProbe()
    engine = make_engine(named("two-phase", unfreeze_after=1), epochs=2, model=BNNet(), groups=TINY_GROUPS,
                         extra=(probe,), train_kwargs={"train_bn": train_bn, "frozen_dropout": frozen_dropout})
    stats0 = engine.model.enc0[1].running_mean.clone()
    seen: dict[int, torch.Tensor] = {}

    class StatsAtEpochEnd:
        @hookimpl(trylast=True)
        def on_epoch_end(self, engine: Any, epoch: int, metrics: Any) -> None:
            seen[epoch] = engine.model.enc0[1].running_mean.clone()

    from moola_engine.core.plugins import register_checked
    register_checked(engine.pm, StatsAtEpochEnd(), name="stats")
    engine.fit()
    frozen_epoch = {(bn, dr) for e, bn, dr in probe.modes if e == 0}
    trained_epoch = {(bn, dr) for e, bn, dr in probe.modes if e == 1}
    assert frozen_epoch == {(train_bn, frozen_dropout)}
    assert trained_epoch == {(True, True)}
    assert torch.equal(seen[0], stats0) is (not train_bn)  # eval-mode BN keeps its running statistics bitwise
    assert not torch.equal(seen[1], seen[0])
    assert engine.plan.epochs[0].bn == {G0: "train" if train_bn else "eval", G1: "-", H: "-"}


def test_freeze_params_api_keeps_mask_across_freeze_and_unfreeze() -> None:
    from moola_engine.core.freezing import Freezer, resolve_groups

    model = TinyNet()
    groups = resolve_groups(model, TINY_GROUPS)
    opt = torch.optim.SGD([{"params": g.tensors, "group": g.name} for g in groups], lr=0.1)
    fz = Freezer(groups, base_lr=0.1, optimizer=opt)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert fz.freeze_params(G0, lambda n: n.endswith("weight"), reason="t", label="biases") == ["enc0.weight"]
    assert model.enc0.weight.grad is None and not model.enc0.weight.requires_grad
    assert model.enc0.bias.requires_grad and model.enc0.bias.grad is not None
    assert fz.is_trainable(G0) and fz.frozen_params(G0) == ["enc0.weight"] and fz.mask_label(G0) == "biases"
    fz.freeze(G0, reason="t")
    fz.unfreeze(G0, reason="t")
    assert not model.enc0.weight.requires_grad and model.enc0.bias.requires_grad
    fz.freeze_params(G0, lambda n: True, reason="t")
    assert not fz.is_trainable(G0)  # every parameter masked: the group does not train
    fz.clear_param_mask(G0, reason="t")
    assert model.enc0.weight.requires_grad and fz.is_trainable(G0) and fz.frozen_params(G0) == []
    dry = Freezer([G0, H], base_lr=0.1, param_names={G0: ["enc0.weight", "enc0.bias"], H: ["head.weight"]})
    assert dry.freeze_params(G0, lambda n: n.endswith("weight"), reason="t") == ["enc0.weight"]
    assert dry.is_trainable(G0)


def test_every_named_strategy_in_strategies_toml_plans_30_epochs() -> None:
    from conftest import ROOT

    from moola_engine.core.freezing import resolve_groups
    from moola_engine.core.plan import compute_plan, validate_plan
    from moola_engine.core.plugins import build_plugin_manager, load_strategies
    from moola_ohlc.models import SimpleLSTM

    _, registry = build_plugin_manager()
    strategies = load_strategies(ROOT / "strategies.toml", registry)
    assert {s.plugin for s in strategies.values()} == set(registry.names())  # every plugin has a named entry
    groups = resolve_groups(SimpleLSTM(num_layers=2), SimpleLSTM(num_layers=2).default_groups())
    for name, ns in strategies.items():
        plan = compute_plan(ns.build(), [g.name for g in groups], ["head"], 30, 1e-3, name=name, model_groups=groups)
        validate_plan(plan, ns.build(), name)
        assert plan.trains_ever("head")


def test_groups_spec_for_custom_head_is_respected() -> None:
    # A model whose head group is not last in name order: the head flag decides, not position.
    groups = [GroupSpec(name="a", modules=["enc0"]), GroupSpec(name="b", modules=["enc1"]),
              GroupSpec(name="top", modules=["head"], head=True)]
    obs = EpochObserver()
    engine = make_engine(named("gradual", every=1), epochs=3, extra=(obs,), groups=groups)
    engine.fit()
    assert [sorted(g for g, t in e.trainable.items() if t) for e in engine.plan.epochs] == [
        ["top"], ["b", "top"], ["a", "b", "top"]]


def test_the_strategy_skeleton_keeps_its_params_and_takes_its_name_from_strategies_toml() -> None:
    from moola_engine.core.plugins import build_plugin_manager
    from moola_engine.strategy_kit import Strategy

    class Mine(Strategy[int]):
        pass

    assert Mine(3).params == 3 and Mine(3).name is None
    _, registry = build_plugin_manager()
    for plugin in ("frozen", "immediate", "bitfit", "discriminative"):
        assert issubclass(registry[plugin].factory, Strategy)
    built = named("frozen")
    assert isinstance(built, Strategy) and built.name == "frozen" and built.params is not None


def test_an_epoch_field_defaults_when_not_given_and_is_refused_with_plateau() -> None:
    import attrs

    from moola_engine.config import FieldValueError, positive
    from moola_engine.strategy_kit import MetricTrigger, epoch_field

    @attrs.frozen(kw_only=True)
    class MyParams(MetricTrigger):
        warmup: int | None = epoch_field(4, validator=positive)

    assert MyParams().epoch_value("warmup") == 4 and MyParams(warmup=2).epoch_value("warmup") == 2
    with pytest.raises(FieldValueError, match='warmup applies to unfreeze_on = "epoch"'):
        MyParams(unfreeze_on="plateau", max_epoch=5, warmup=2)
    with pytest.raises(FieldValueError, match='patience applies to unfreeze_on = "plateau" only'):
        MyParams(patience=2)
    assert named("lp-ft").transition_epoch() == 10 and named("two-phase", unfreeze_after=0).transition_epoch() == 0
