"""Pretraining for any model and data, export, per-arm overrides, the label-budget axis, task metrics in the ablation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moola_engine.cli import main
from moola_engine.config import load_config
from moola_engine.errors import ConfigError, MoolaError
from moola_engine.experiments.ablation import prepare
from moola_engine.experiments.grid import build_grid
from moola_engine.runs.train import train
from moola_engine.safeio import sha256
from tests.conftest import ROOT

EXP = """
[run]
strategies_file = "{strategies}"
console = "none"
[train]
epochs = 3
batch_size = 16
lr = 1e-2
threads = 1
[task]
name = "{task}"
[model]
name = "tests.conftest:TinyNet"
params = {params}
[[model.groups]]
name = "encoder.layer0"
modules = ["enc0"]
[[model.groups]]
name = "encoder.layer1"
modules = ["enc1"]
[[model.groups]]
name = "head"
modules = ["head"]
head = true
[data]
kind = "npz"
path = "d.npz"
[pretrain]
objective = "supervised"
"""


def workspace(tmp_path: Path, *, task: str = "classification", pretrained: bool = False,
              strategies: str | None = None) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((80, 5, 3)).astype(np.float32)
    score = x[:, :, 0].mean(axis=1)
    y = score.astype(np.float32) if task == "regression" else (score > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    sfile = ROOT / "strategies.toml"
    if strategies is not None:
        sfile = tmp_path / "strategies.toml"
        sfile.write_text(strategies)
    text = EXP.format(strategies=sfile, task=task, params="{ classes = 1 }" if task == "regression" else "{}")
    if pretrained:
        text += '[model.pretrained]\npath = "enc.safetensors"\n'
    (tmp_path / "exp.toml").write_text(text)
    return tmp_path / "exp.toml"


def test_supervised_pretrain_keeps_the_encoder_and_states_the_data_it_saw(tmp_path: Path) -> None:
    cfg = workspace(tmp_path)
    assert main(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "enc.safetensors"), "--console", "none",
                 "--epochs", "2"]) == 0
    tensors = load_file(tmp_path / "enc.safetensors")
    assert sorted(tensors) == ["enc0.bias", "enc0.weight", "enc1.bias", "enc1.weight"]  # the head is dropped
    side = json.loads((tmp_path / "enc.json").read_text())
    seen = side["data_seen"]
    assert side["objective"] == "supervised" and side["epochs_run"] == 2 and side["head_dropped"] == ["head"]
    assert seen["kind"] == "npz" and seen["files"][0]["sha256"] == sha256(tmp_path / "d.npz")
    assert seen["rows"] == {"train": 64, "val": 16} and "train rows only" in seen["trained_on"]
    assert "cut_date" not in side  # npz rows have no time order
    # the encoder differs from a fresh model's: it trained (the same seed builds the same initial weights)
    torch.manual_seed(0)
    from tests.conftest import TinyNet

    assert not torch.equal(tensors["enc0.weight"], TinyNet().enc0.weight.detach())


def test_supervised_module_param_selects_groups_and_refuses_an_unknown_name(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = workspace(tmp_path)
    out = tmp_path / "l0.safetensors"
    assert main(["pretrain", "--config", str(cfg), "--out", str(out), "--console", "none", "--epochs", "1",
                 "--param", 'module=["encoder.layer0"]']) == 0
    assert sorted(load_file(out)) == ["enc0.bias", "enc0.weight"]
    assert main(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "x.safetensors"), "--console", "none",
                 "--param", 'module=["decoder"]']) == 2
    assert "'decoder' names no group and no submodule of the model" in capsys.readouterr().err


def test_train_returns_the_model_and_saves_its_final_weights(tmp_path: Path) -> None:
    cfg = workspace(tmp_path)
    out = train(load_config(cfg), strategy="immediate")
    assert isinstance(out.model, torch.nn.Module)
    saved = load_file(out.run_dir / "model.safetensors")
    assert all(torch.equal(saved[k], v.cpu()) for k, v in out.model.state_dict().items())


def test_pretrain_then_fine_tune_then_export_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg = workspace(tmp_path, pretrained=True)
    assert main(["pretrain", "--config", str(cfg), "--console", "none", "--epochs", "2"]) == 0  # -> enc.safetensors
    assert main(["train", "--config", str(cfg), "--strategy", "two_phase", "--allow", "never-unfreeze"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["export", "latest", "--module", "encoder", "--out", "out/encoder.safetensors"]) == 0
    keys = sorted(load_file(tmp_path / "out" / "encoder.safetensors"))
    assert keys == ["enc0.bias", "enc0.weight", "enc1.bias", "enc1.weight"]
    side = json.loads((tmp_path / "out" / "encoder.json").read_text())
    assert side["weights_origin"] == "final weights" and side["data_seen"]["kind"] == "npz"
    # the exported encoder loads back as a pretrained encoder of the same model
    assert main(["export", "latest", "--module", "nope", "--out", "out/x.safetensors"]) == 2
    assert "'nope' names no group and no submodule" in capsys.readouterr().err
    assert main(["export", "latest", "--module", "encoder", "--out", "out/encoder.safetensors"]) == 2  # exists


def test_export_falls_back_to_the_newest_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = workspace(tmp_path)
    out = train(load_config(cfg), strategy="immediate")
    (out.run_dir / "model.safetensors").unlink()  # a run killed before its end has checkpoints only
    monkeypatch.chdir(tmp_path)
    assert main(["export", out.run_dir.name, "--out", "all.safetensors"]) == 0
    side = json.loads((tmp_path / "all.json").read_text())
    assert side["weights_origin"].startswith("checkpoint ") and len(side["keys"]) == 6


STRATS = """
[strategy.immediate]
plugin = "immediate"

[strategy.probe]
plugin = "frozen"
[strategy.probe.train]
lr = 0.05
epochs = 2
optimizer = "sgd"
"""


def test_a_strategy_sets_its_own_lr_epochs_and_optimizer(tmp_path: Path) -> None:
    cfg = workspace(tmp_path, strategies=STRATS)
    out = train(load_config(cfg), strategy="probe")
    assert out.fit.epochs_run == 2  # the experiment's [train] says 3
    events = [json.loads(x) for x in (out.run_dir / "events.jsonl").read_text().splitlines()]
    sel = next(e for e in events if e["event"] == "strategy.selected")
    assert sel["train_overrides"] == {"lr": 0.05, "epochs": 2, "optimizer": "sgd"}
    config = json.loads((out.run_dir / "config.json").read_text())["config"]
    assert config["train"]["lr"] == 0.05 and config["train"]["optimizer"] == "sgd"
    assert train(load_config(cfg), strategy="immediate").fit.epochs_run == 3  # other arms keep [train]
    # the command line wins over the strategy's own values (a quick smoke run stays quick)
    assert main(["train", "--config", str(cfg), "--strategy", "probe", "--epochs", "1", "--console", "none"]) == 0
    assert json.loads((tmp_path / "runs" / "latest" / "result.json").read_text())["epochs_run"] == 1


def test_a_bad_strategy_train_table_names_the_key(tmp_path: Path) -> None:
    cfg = workspace(tmp_path, strategies=STRATS + "[strategy.bad]\nplugin = \"frozen\"\n[strategy.bad.train]\n"
                                                  "threads = 2\nlr = \"fast\"\n")
    with pytest.raises(ConfigError, match=r"extra fields found \(threads\) @ \$\.strategy\.bad\.train"):
        train(load_config(cfg), strategy="probe")


def test_the_grid_fingerprint_includes_an_arms_overrides(tmp_path: Path) -> None:
    cfg = workspace(tmp_path, strategies=STRATS)
    grid = build_grid(load_config(cfg), strategies=["probe"], seeds=1, out=tmp_path / "g")
    assert grid.arm("probe").definition["train"] == {"lr": 0.05, "epochs": 2, "optimizer": "sgd"}
    prepare(grid)
    (tmp_path / "strategies.toml").write_text(STRATS.replace("lr = 0.05", "lr = 0.1"))
    with pytest.raises(MoolaError, match=r"changed: arms\.probe\.train\.lr"):
        prepare(build_grid(load_config(cfg), strategies=["probe"], seeds=1, out=tmp_path / "g"))


def test_ablate_label_budgets_pair_per_budget_and_draw_a_curve(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    cfg = workspace(tmp_path)
    args = ["ablate", "--config", str(cfg), "--strategies", "frozen", "--seeds", "2", "--labels", "30,10", "--jobs", "1",
            "--out", str(tmp_path / "g"), "--no-figures"]
    assert main(args) == 0
    res = json.loads((tmp_path / "g" / "results.json").read_text())
    assert res["labels"] == [10, 30] and res["label_budget"] == 30 and res["runs_finished"] == 8
    curve = res["budget_curve"]
    assert curve["metric"] == "accuracy" and [p["labels"] for p in curve["arms"]["frozen"]] == [10, 30]
    assert all(p["vs_control"]["n"] == 2 for p in curve["arms"]["frozen"])
    runs = {(r["label"], r["seed"], r["labels"]) for r in res["runs"]}
    assert len(runs) == 8
    for key in ("10", "30"):
        assert res["budgets"][key]["runs_finished"] == 4
    cfg_10 = json.loads(next((tmp_path / "g" / "runs").glob("*frozen-f0-n10-s0*")).joinpath("config.json").read_text())
    assert cfg_10["config"]["data"]["labels"] == 10
    assert json.loads((tmp_path / "g" / "grid.json").read_text())["labels"] == [10, 30]
    assert "## Label-budget curve" in (tmp_path / "g" / "report.md").read_text()
    capsys.readouterr()
    assert main(args) == 0  # resume: nothing to run
    assert "8 of 8 runs already done" in capsys.readouterr().err
    assert main([*args[:7], *args[9:], "--report-only"]) == 0  # without --labels: the grid's own budgets
    assert "using its budgets 10,30" in capsys.readouterr().err
    assert main([*args[:8], "10,0", *args[9:]]) == 2


def test_a_regression_grid_reports_the_tasks_metrics_and_no_majority_rate(tmp_path: Path) -> None:
    cfg = workspace(tmp_path, task="regression")
    assert main(["ablate", "--config", str(cfg), "--strategies", "frozen", "--seeds", "2", "--jobs", "1",
                 "--out", str(tmp_path / "g"), "--no-figures"]) == 0
    res = json.loads((tmp_path / "g" / "results.json").read_text())
    assert res["task"] == {"name": "regression", "primary": "rmse", "higher_is_better": False, "classes": False,
                           "metrics": ["rmse", "mae", "r2"]}
    assert res["majority_rate"] is None
    frozen = next(a for a in res["arms"] if a["label"] == "frozen")
    assert set(frozen["metrics"]) == {"rmse", "mae", "r2"} and "vs_majority" not in frozen
    assert set(frozen["vs_control"]) == {"rmse", "mae", "r2"}
    assert not [f for f in res["red_flags"] if f["code"] in ("near-majority", "single-class")]
    md = (tmp_path / "g" / "report.md").read_text()
    assert "## rmse (lower is better)" in md and "Majority-class" not in md and "## accuracy" not in md


def test_export_of_time_ordered_data_dates_the_encoder_by_what_chose_its_weights(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose validation rows chose its best epoch saw the validation period: the sidecar's cut_date is its end."""
    cfg = workspace(tmp_path)
    out = train(load_config(cfg), strategy="immediate")
    (out.run_dir / "data.json").write_text(json.dumps({
        "train_cut_date": "2011-07-20", "splits": {"val": {"last_bar": "2013-01-04"}}}))
    monkeypatch.chdir(tmp_path)
    assert main(["export", out.run_dir.name, "--out", "e.safetensors"]) == 0
    side = json.loads((tmp_path / "e.json").read_text())
    assert side["cut_date"] == "2013-01-04" and side["data_seen"]["train_cut_date"] == "2011-07-20"
    (out.run_dir / "data.json").write_text(json.dumps({"train_cut_date": "2011-07-20"}))
    assert main(["export", out.run_dir.name, "--out", "f.safetensors"]) == 0
    side = json.loads((tmp_path / "f.json").read_text())
    assert "cut_date" not in side and "cut_date_unknown" in side["data_seen"]


def test_a_label_budget_above_the_training_rows_is_refused(tmp_path: Path) -> None:
    """--labels 200 on 64 training rows must not silently train on 64."""
    from moola_engine.config import DataConfig
    from moola_engine.core.data import build_splits
    from moola_engine.errors import DataError

    workspace(tmp_path)
    with pytest.raises(DataError, match=r"data.labels = 200, but the training split .* holds 64 rows"):
        build_splits(DataConfig(kind="npz", path="d.npz", labels=200), base_dir=tmp_path, seed=0)
    assert len(build_splits(DataConfig(kind="npz", path="d.npz", labels=64), base_dir=tmp_path, seed=0).train) == 64


def test_the_budget_curve_table_shows_reference_baselines_per_budget() -> None:
    from moola_engine.experiments.report import REFERENCE_MARK, curve_rows

    est = {"mean": 0.7, "lo": 0.6, "hi": 0.8, "n": 5}
    diff = {"mean": 0.05, "lo": 0.01, "hi": 0.09, "n": 5, "p": 0.06}
    results = {"budget_curve": {
        "metric": "accuracy", "labels": [10, 20], "control": "control",
        "arms": {"control": [{"labels": 10, "metric": est}, {"labels": 20, "metric": est}],
                 "frozen": [{"labels": 10, "metric": est, "vs_control": diff}]},
        "references": {"logistic": [{"labels": 20, "metric": est, "vs_control": diff}]}}}
    rows = curve_rows(results)
    assert rows[0] == ["arm", "10 labels", "20 labels"]
    assert rows[2][1] == "0.700 (0.600..0.800); vs control +0.050 (+0.010..+0.090) p=0.060"
    assert rows[2][2].startswith("n/a")  # a budget an arm has no runs at says so
    assert rows[3][0] == f"logistic ({REFERENCE_MARK})" and rows[3][1].startswith("n/a")


def test_the_budget_figure_draws_each_arm_with_its_band_and_the_control_only_on_the_left(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moola_engine.experiments import report

    est = {"mean": 0.7, "lo": 0.6, "hi": 0.8, "n": 5}
    diff = {"mean": 0.05, "lo": 0.01, "hi": 0.09, "n": 5, "p": 0.06}
    results = {"budget_curve": {
        "metric": "accuracy", "labels": [10, 20], "control": "control",
        "arms": {"control": [{"labels": 10, "metric": est}, {"labels": 20, "metric": est}],
                 "frozen": [{"labels": 10, "metric": est, "vs_control": diff},
                            {"labels": 20, "metric": {**est, "lo": None}, "vs_control": diff}]},
        "references": {}}}
    drawn: list[object] = []
    monkeypatch.setattr(report, "_png", lambda fig: drawn.append(fig) or "png")
    assert report.budget_figure(plt, results) == "png"
    ax1, ax2 = drawn[0].axes  # type: ignore[attr-defined]
    assert [line.get_label() for line in ax1.lines] == ["control", "frozen"]
    assert [line.get_label() for line in ax2.lines if not line.get_label().startswith("_")] == ["frozen"]
    assert len(ax1.collections) == 1  # the control's band; frozen has a point without a lower bound: no band
    assert len(ax2.collections) == 1  # frozen's paired band
    plt.close(drawn[0])  # type: ignore[arg-type]
