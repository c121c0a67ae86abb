"""LR schedulers across freeze transitions: the optimizer layout never changes, and at every step
each group's lr = base lr x its scale x the same scheduler factor a one-group reference computes."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import make_engine, named

from moola_engine import hookimpl
from moola_engine.config import TrainConfig, structure
from moola_engine.core.schedulers import build_lr_schedule
from moola_engine.errors import ConfigError, MoolaError

BASE_LR = 1e-2


class StepObserver:
    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []

    @hookimpl(trylast=True)
    def after_step(self, engine: Any, epoch: int, step: int, loss: Any) -> None:
        pgs = engine.optimizer.param_groups
        self.steps.append({
            "epoch": epoch,
            "lr": [pg["lr"] for pg in pgs],
            "scale": [engine.freezer.lr_scale(g) for g in engine.freezer.groups],
            "trainable": tuple(engine.freezer.trainable_groups()),
            "params": [tuple(id(p) for p in pg["params"]) for pg in pgs],
        })

    @hookimpl(trylast=True)
    def on_epoch_end(self, engine: Any, epoch: int, metrics: Any) -> None:
        pgs = engine.optimizer.param_groups
        self.epochs.append({"val_loss": metrics["val_loss"], "lr": [pg["lr"] for pg in pgs],
                            "scale": [engine.freezer.lr_scale(g) for g in engine.freezer.groups]})


def reference(kind: str, cfg: TrainConfig, steps_per_epoch: int) -> Any:
    """The same scheduler on a one-group optimizer at the base lr: the common factor x base lr."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    return build_lr_schedule(opt, cfg, steps_per_epoch), opt


STRATEGIES = [
    ("two-phase", {"unfreeze_after": 2, "lr_scale": 0.3, "lr_decay": 0.5}),
    ("gradual", {"every": 1, "lr_scale": 0.5, "lr_decay": 0.5}),
    ("chain-thaw", {"stage_epochs": 1, "lr_scale": 0.25}),
    ("lp-ft", {"probe_epochs": 2, "lr_scale": 0.2}),
]


@pytest.mark.parametrize("kind", ["onecycle", "cosine"])
@pytest.mark.parametrize(("plugin", "params"), STRATEGIES)
def test_per_step_schedulers_compose_with_group_scales(kind: str, plugin: str, params: dict[str, Any]) -> None:
    obs = StepObserver()
    engine = make_engine(named(plugin, **params), epochs=5, extra=(obs,), train_kwargs={"scheduler": kind})
    layout = [tuple(id(p) for p in pg["params"]) for pg in engine.optimizer.param_groups]
    engine.fit()
    ref, ref_opt = reference(kind, engine.config, 4)
    assert len(obs.steps) == 5 * 4
    phases = set()
    for s in obs.steps:
        ref_opt.step()  # a no-op (no grads): keeps torch's step-order check quiet
        ref.after_step()
        factor = ref_opt.param_groups[0]["lr"] / BASE_LR
        assert s["params"] == layout  # same param groups, same tensors, at every step
        for lr, scale in zip(s["lr"], s["scale"], strict=True):
            assert lr == pytest.approx(BASE_LR * scale * factor, rel=1e-9)
        phases.add((s["trainable"], tuple(s["scale"])))
    assert len(phases) >= 2  # transitions really happened under the scheduler
    if kind == "onecycle":
        assert engine.lr_schedule.scheduler.last_epoch == 5 * 4


@pytest.mark.parametrize(("plugin", "params"), STRATEGIES)
def test_reduce_on_plateau_composes_with_group_scales(plugin: str, params: dict[str, Any]) -> None:
    obs = StepObserver()
    # mode "max" on a falling val_loss with patience 0: most epochs are "no improvement" and halve every lr
    engine = make_engine(named(plugin, **params), epochs=6, extra=(obs,),
                         train_kwargs={"scheduler": "plateau", "plateau_patience": 0, "plateau_factor": 0.5,
                                       "scheduler_mode": "max"})
    engine.fit()
    ref, ref_opt = reference("plateau", engine.config, 4)
    reductions = 0
    for row in obs.epochs:
        ref.after_validation({"val_loss": row["val_loss"]})
        factor = ref_opt.param_groups[0]["lr"] / BASE_LR
        reductions += factor < 1
        for lr, scale in zip(row["lr"], row["scale"], strict=True):
            assert lr == pytest.approx(BASE_LR * scale * factor, rel=1e-9)
    assert reductions > 0  # the plateau scheduler really reduced
    assert len(engine.optimizer.param_groups) == 3


def test_rescale_keeps_onecycle_references_per_group() -> None:
    engine = make_engine(named("immediate"), epochs=2, train_kwargs={"scheduler": "onecycle"})
    pg = engine.optimizer.param_groups[0]
    before = {k: pg[k] for k in ("lr", "initial_lr", "max_lr", "min_lr")}
    engine.freezer.set_lr_scale("encoder.layer0", 0.25, reason="test")
    for k, v in before.items():
        assert pg[k] == pytest.approx(v * 0.25, rel=1e-12)
    assert engine.optimizer.param_groups[2]["max_lr"] == BASE_LR
    engine.freezer.set_lr_scale("encoder.layer0", 1.0, reason="test")
    assert pg["max_lr"] == pytest.approx(BASE_LR, rel=1e-12)


def test_no_scheduler_lr_is_exact() -> None:
    engine = make_engine(named("immediate"), epochs=1)
    engine.freezer.set_lr_scale("encoder.layer1", 0.3, reason="test")
    assert engine.optimizer.param_groups[1]["lr"] == BASE_LR * 0.3
    assert engine.optimizer.param_groups[1]["lr_scale"] == 0.3


def test_plateau_scheduler_without_its_metric_is_an_error() -> None:
    engine = make_engine(named("immediate"), epochs=1,
                         train_kwargs={"scheduler": "plateau", "scheduler_metric": "val_f1"})
    with pytest.raises(MoolaError) as err:
        engine.fit()
    assert str(err.value).startswith("train.scheduler = \"plateau\" needs metric 'val_f1' (train.scheduler_metric), "
                                     "but this run's metrics are: train_loss, val_accuracy")


def test_scheduler_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        structure({"scheduler": "step"}, TrainConfig, source="exp.toml", path="$.train")
    assert str(err.value) == ("exp.toml: invalid value, expected one of 'none', 'onecycle', 'plateau', 'cosine' "
                              "@ $.train.scheduler")
    with pytest.raises(ConfigError) as err:
        structure({"plateau_factor": 1.5}, TrainConfig, source="exp.toml", path="$.train")
    assert str(err.value) == ("exp.toml: invalid value, expected a value between 0 and 1 (exclusive), got 1.5 "
                              "@ $.train.plateau_factor")


def test_cosine_reaches_zero_at_the_last_step() -> None:
    engine = make_engine(named("immediate"), epochs=2, train_kwargs={"scheduler": "cosine"})
    engine.fit()
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert math.isclose(engine.lr_schedule.scheduler.base_lrs[2], BASE_LR)
