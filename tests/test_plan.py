"""Plans: what the dry run says, what validation refuses (messages pinned), the CLI table and JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import ROOT, TINY_GROUPS, TinyNet, make_engine, named
from torch import nn

from moola_engine import hookimpl
from moola_engine.cli import main
from moola_engine.config import EarlyStoppingConfig, GroupSpec, TrainConfig
from moola_engine.core.freezing import resolve_groups
from moola_engine.core.plan import compute_plan, validate_plan
from moola_engine.core.plugins import build_plugin_manager, load_strategies
from moola_engine.errors import ConfigError, ScheduleError

GROUPS = resolve_groups(TinyNet(), TINY_GROUPS)
NAMES = [g.name for g in GROUPS]


def plan_of(strategy: Any, epochs: int = 30, key: str = "s", **kw: Any) -> Any:
    strategy.name = key
    return compute_plan(strategy, NAMES, ["head"], epochs, 1e-3, name=key, model_groups=GROUPS, **kw)


def refusal(strategy: Any, key: str, epochs: int = 30, groups: Any = None) -> str:
    groups = groups or GROUPS
    strategy.name = key
    with pytest.raises(ScheduleError) as err:
        plan = compute_plan(strategy, [g.name for g in groups], [g.name for g in groups if g.head], epochs, 1e-3,
                            name=key, model_groups=groups)
        validate_plan(plan, strategy, key)
    return str(err.value)


NEVER = '.\n       Use strategy "frozen" for a frozen encoder, or pass --allow never-unfreeze.'


@pytest.mark.parametrize(("plugin", "params", "key", "message"), [
    ("two-phase", {"unfreeze_after": 40}, "two_phase",
     "strategy two_phase: unfreeze_after = 40 but training runs 30 epochs: the encoder would never train" + NEVER),
    ("two-phase", {"unfreeze_after": 30}, "two_phase",
     "strategy two_phase: unfreeze_after = 30 but training runs 30 epochs: the encoder would never train" + NEVER),
    ("two-phase", {"unfreeze_on": "plateau", "max_epoch": 30}, "two_phase_plateau",
     "strategy two_phase_plateau: max_epoch = 30 but training runs 30 epochs: the encoder might never train" + NEVER),
    ("gradual", {"every": 20}, "gradual",
     "strategy gradual: group encoder.layer0 would unfreeze at epoch 40 (start = 20, every = 20) but training runs "
     "30 epochs: encoder.layer0 would never train" + NEVER),
    ("gradual", {"every": 5, "start": 30}, "ulmfit",
     "strategy ulmfit: group encoder.layer1 would unfreeze at epoch 30 (start = 30, every = 5) but training runs "
     "30 epochs: encoder.layer1, encoder.layer0 would never train" + NEVER),
    ("gradual", {"unfreeze_on": "plateau", "max_epoch": 31}, "gradual",
     "strategy gradual: max_epoch = 31 but training runs 30 epochs: encoder groups might never train" + NEVER),
    ("chain-thaw", {"stage_epochs": 10}, "chain_thaw",
     "strategy chain_thaw: the all-groups stage would start at epoch 30 (3 stages x stage_epochs = 10) but training "
     "runs 30 epochs: the groups would never train together.\n"
     "       Pass --allow late-transition to run it anyway (the run log records it)."),
    ("chain-thaw", {"groups": ["encoder.layer1"]}, "chain_thaw",
     "strategy chain_thaw: groups = ['encoder.layer1'] leaves out encoder.layer0: its parameters are in no "
     "single-group stage.\n       Pass --allow no-phase to run it anyway (the run log records it)."),
    ("chain-thaw", {"groups": ["encoder.layer9", "encoder.layer0"]}, "chain_thaw",
     "strategy chain_thaw: groups = ['encoder.layer9', 'encoder.layer0'] has unknown encoder group(s) encoder.layer9; "
     "encoder groups are: encoder.layer0, encoder.layer1"),
    ("lp-ft", {"probe_epochs": 30}, "lp_ft",
     "strategy lp_ft: probe_epochs = 30 but training runs 30 epochs: full fine-tuning would never start" + NEVER),
    ("lp-ft", {"unfreeze_on": "plateau", "max_epoch": 45}, "lp_ft",
     "strategy lp_ft: max_epoch = 45 but training runs 30 epochs: full fine-tuning might never start" + NEVER),
])
def test_builtin_refusals_name_the_strategy_key(plugin: str, params: dict[str, Any], key: str, message: str) -> None:
    assert refusal(named(plugin, **params), key) == message


def test_bitfit_refuses_an_encoder_group_without_biases() -> None:
    model = TinyNet()
    model.enc0 = nn.Linear(3, 8, bias=False)
    groups = resolve_groups(model, TINY_GROUPS)
    assert refusal(named("bitfit"), "bitfit", groups=groups) == (
        "strategy bitfit: group encoder.layer0 never trains in 30 epochs, but the strategy promises to train it" + NEVER)


class LateOnValidation:
    """Unfreezes the encoder in on_validation_end of the last epoch: it would take effect after the run."""

    name = "late"

    @hookimpl
    def on_fit_start(self, engine: Any) -> None:
        engine.freezer.freeze("encoder.layer0", reason="wait")

    @hookimpl
    def on_validation_end(self, engine: Any, epoch: int, metrics: Any) -> None:
        if epoch == engine.epochs - 1:
            engine.freezer.unfreeze("encoder.layer0", reason="too late")


class MasksForever:
    """Holds enc0.weight frozen for the whole run without promising anything about it."""

    @hookimpl
    def on_fit_start(self, engine: Any) -> None:
        engine.freezer.freeze_params("encoder.layer0", lambda n: n.endswith("weight"), reason="mask")


class ZeroScale:
    @hookimpl
    def on_fit_start(self, engine: Any) -> None:
        engine.freezer.set_lr_scale("encoder.layer1", 0.0, reason="oops")


def test_generic_refusals() -> None:
    assert refusal(LateOnValidation(), "late", epochs=5) == (
        "strategy late: group encoder.layer0 would start training at epoch 5 (too late) but training runs 5 epochs "
        "(0-4).\n       Pass --allow late-transition to run it anyway (the run log records it).")
    assert refusal(MasksForever(), "mask", epochs=4) == (
        "strategy mask: parameter enc0.weight of group encoder.layer0 is in no phase: never trainable in 4 epochs.\n"
        "       Pass --allow no-phase to run it anyway (the run log records it).")
    assert refusal(ZeroScale(), "zero") == (
        "strategy zero: group encoder.layer1: lr_scale must be > 0, got 0.0 (a group with lr 0 never trains)")


def test_lr_scale_zero_in_strategies_toml_names_the_key(tmp_path: Any) -> None:
    f = tmp_path / "strategies.toml"
    f.write_text('[strategy.mine]\nplugin = "two-phase"\nlr_scale = 0\n\n[strategy.dl]\nplugin = "discriminative"\n'
                 "decay = 0.0\n")
    _, registry = build_plugin_manager()
    with pytest.raises(ConfigError) as err:
        load_strategies(f, registry)
    assert str(err.value) == (
        f"{f}: 2 problems\n"
        "  - invalid value, expected a value > 0, got 0.0 @ $.strategy.mine.lr_scale\n"
        "  - invalid value, expected 0 < value <= 1, got 0.0 @ $.strategy.dl.decay")


def test_plateau_parameters_of_the_wrong_mode_are_refused(tmp_path: Any) -> None:
    f = tmp_path / "strategies.toml"
    f.write_text('[strategy.a]\nplugin = "two-phase"\nunfreeze_on = "plateau"\n\n'
                 '[strategy.b]\nplugin = "gradual"\nunfreeze_on = "plateau"\nmax_epoch = 5\nevery = 2\n\n'
                 '[strategy.c]\nplugin = "lp-ft"\npatience = 2\n')
    _, registry = build_plugin_manager()
    with pytest.raises(ConfigError) as err:
        load_strategies(f, registry)
    assert str(err.value) == (
        f"{f}: 3 problems\n"
        '  - invalid value, required with unfreeze_on = "plateau" (the hard bound on the transition) @ $.strategy.a.max_epoch\n'
        '  - invalid value, every applies to unfreeze_on = "epoch"; with "plateau" use patience and max_epoch '
        "@ $.strategy.b.every\n"
        '  - invalid value, patience applies to unfreeze_on = "plateau" only @ $.strategy.c.patience')


def test_allow_records_the_override_in_the_run_log_and_runs(tmp_path: Any) -> None:
    from moola_engine.logs import RunLog, read_events

    runlog = RunLog(tmp_path / "events.jsonl", console="none")
    engine = make_engine(named("two-phase", unfreeze_after=4), epochs=3, runlog=runlog)
    with pytest.raises(ScheduleError):
        engine.fit()
    engine = make_engine(named("two-phase", unfreeze_after=4), epochs=3, runlog=runlog)
    engine.allow = {"never-unfreeze"}
    result = engine.fit()
    runlog.close()
    assert result.epochs_run == 3 and not engine.freezer.is_trainable("encoder.layer0")
    overrides = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "config.override"]
    assert [(e["allow"], e["message"], e["level"]) for e in overrides] == [(
        "never-unfreeze",
        "strategy two-phase: unfreeze_after = 4 but training runs 3 epochs: the encoder would never train",
        "warning")]


def test_plan_notes_early_stopping_hold_and_scheduler() -> None:
    train = TrainConfig(epochs=30, early_stopping=EarlyStoppingConfig(patience=3), scheduler="onecycle")
    plan = plan_of(named("gradual", every=4), train=train)
    assert plan.last_scheduled_transition() == 8
    assert plan.notes == [
        "early stopping (val_loss, patience 3) is held until epoch 8, the last scheduled transition, and patience counts "
        "from the last transition: it cannot end the run before a transition; restore_best may still return weights "
        "from before epoch 8",
        "lrs shown are base lr x group scale; the onecycle scheduler multiplies every group's lr by the same factor on top",
    ]


def test_plateau_plan_uses_the_max_epoch_bound_and_says_so() -> None:
    plan = plan_of(named("two-phase", unfreeze_on="plateau", max_epoch=12, patience=4), key="tp")
    assert plan.first_trainable_epoch("encoder.layer0") == 12
    assert plan.transitions[-2:] == [
        {"epoch": 12, "group": g, "to_state": "trainable", "lr": pytest.approx(3e-4), "reason": "max_epoch"}
        for g in ("encoder.layer0", "encoder.layer1")]
    assert plan.notes == ['tp: unfreeze_on = "plateau": the encoder unfreezes when val_loss has not improved for 4 '
                          "epochs, at the latest from epoch 12 (max_epoch); this plan shows that bound"]


def test_early_stopping_never_ends_the_run_before_a_scheduled_transition() -> None:
    # patience 1 on a metric that never improves after epoch 0 would stop at epoch 1; the transition is at epoch 4
    strat = named("two-phase", unfreeze_after=4)
    engine = make_engine(strat, epochs=8, train_kwargs={
        "early_stopping": EarlyStoppingConfig(metric="epoch", mode="min", patience=1), "restore_best": False})
    result = engine.fit()
    assert result.stopped_early and result.epochs_run == 5  # held through epoch 4, stops right after it
    assert engine.freezer.is_trainable("encoder.layer0")


def test_plan_with_batchnorm_shows_modes() -> None:
    model = nn.Sequential()
    model.enc0 = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model.enc1 = nn.Linear(4, 4)
    model.head = nn.Linear(4, 2)
    groups = resolve_groups(model, TINY_GROUPS)
    names = [g.name for g in groups]
    plan = compute_plan(named("two-phase", unfreeze_after=2), names, ["head"], 4, 1e-3, model_groups=groups)
    assert [e.bn["encoder.layer0"] for e in plan.epochs] == ["eval", "eval", "train", "train"]
    plan_bn = compute_plan(named("frozen"), names, ["head"], 2, 1e-3, model_groups=groups,
                           train=TrainConfig(train_bn=True))
    assert [e.bn["encoder.layer0"] for e in plan_bn.epochs] == ["train", "train"]
    from moola_engine.cli.commands.plan import render_plan
    assert render_plan(plan).splitlines()[:4] == [
        "strategy two-phase: 4 epochs, base lr 0.001",
        "epochs  encoder.layer0         encoder.layer1  head",
        "0-1     frozen bn:eval         frozen          train 0.001",
        "2-3     train 0.0003 bn:train  train 0.0003    train 0.001",
    ]


# --------------------------------------------------------------------------- the CLI


def test_cli_plan_table(capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["plan", "--strategy", "ulmfit", "--epochs", "30", "--config", "examples/plan-example.toml"]) == 0
    assert capsys.readouterr().out == (
        "strategy ulmfit: 30 epochs, base lr 0.001\n"
        "epochs  encoder.layer0  encoder.layer1  encoder.layer2  head\n"
        "0       frozen          frozen          frozen          train 0.001\n"
        "1       frozen          frozen          train 0.00038   train 0.001\n"
        "2       frozen          train 0.000144  train 0.00038   train 0.001\n"
        "3-29    train 5.49e-05  train 0.000144  train 0.00038   train 0.001\n"
        "BatchNorm: none in any group\n")


def test_cli_plan_json(capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["plan", "--strategy", "bitfit", "--epochs", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["groups"] == ["encoder.layer0", "head"]
    assert out["epochs"][0] == {
        "epoch": 0, "trainable": {"encoder.layer0": True, "head": True}, "lr": {"encoder.layer0": 1e-3, "head": 1e-3},
        "bn": {"encoder.layer0": "-", "head": "-"}, "params": {"encoder.layer0": "biases", "head": "all"},
        "frozen_params": {"encoder.layer0": ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l0_reverse",
                                             "lstm.weight_hh_l0_reverse"]}}


def test_cli_plan_refusal_exits_2(capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["plan", "--strategy", "two_phase", "--epochs", "10"]) == 2
    assert capsys.readouterr().err == (
        "error: strategy two_phase: unfreeze_after = 10 but training runs 10 epochs: the encoder would never train"
        + NEVER + "\n")
    assert main(["plan", "--strategy", "two_phase", "--epochs", "10", "--allow", "never-unfreeze"]) == 0


def test_docs_strategies_md_is_generated() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_strategies", ROOT / "benchmarks" / "docs_scripts" / "gen_strategies.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    committed = (ROOT / "docs" / "strategies.md").read_text(encoding="utf-8")
    assert committed == gen.render(committed), "docs/strategies.md is stale: run python benchmarks/docs_scripts/gen_strategies.py"


def test_head_flag_not_position_decides_the_head() -> None:
    # GroupSpec with head=True placed first still counts as head in the plan
    model = TinyNet()
    groups = resolve_groups(model, [GroupSpec(name="head", modules=["head"], head=True),
                                    GroupSpec(name="enc", modules=["enc0", "enc1"])])
    plan = compute_plan(named("frozen"), [g.name for g in groups], ["head"], 2, 1e-3, model_groups=groups)
    assert [e.trainable for e in plan.epochs] == [{"head": True, "enc": False}] * 2
    assert torch.is_tensor(groups[1].tensors[0])


class LateAndNeverTrains:
    """Its own check says late-transition; it also never unfreezes encoder.layer0, which it promises to train."""

    def validate_schedule(self, epochs: int, groups: list[str], head_groups: list[str]) -> list[tuple[str, str]]:
        return [("late-transition", "the last stage starts too late")]

    @hookimpl
    def on_fit_start(self, engine: Any) -> None:
        engine.freezer.freeze("encoder.layer0", reason="never released")


@pytest.mark.parametrize("strategy", [LateAndNeverTrains(), named("chain-thaw", stage_epochs=15)],
                         ids=["own-check", "chain-thaw"])
def test_allow_late_transition_does_not_lift_the_promise_check(strategy: Any) -> None:
    plan = plan_of(strategy, epochs=30, key="s")  # chain-thaw: one encoder group from 15, the other from 30
    [idle] = [g for g in NAMES if not plan.trains_ever(g)]
    with pytest.raises(ScheduleError, match=rf"(?s)group {idle} never trains in 30 epochs.*--allow never-unfreeze"):
        validate_plan(plan, strategy, "s", allow={"late-transition"})
    validate_plan(plan, strategy, "s", allow={"late-transition", "never-unfreeze"})  # each allow names its own
    with pytest.raises(ScheduleError, match="--allow late-transition"):
        validate_plan(plan, strategy, "s", allow={"never-unfreeze"})
