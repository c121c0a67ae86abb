"""The ablation's non-network reference row: logistic regression on three range features, per (seed, fold)."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import numpy as np
import pytest

from moola_engine.config import DataConfig, ExperimentConfig, ModelConfig, PretrainedConfig, load_config
from moola_engine.core.data import build_splits
from moola_engine.experiments.ablation import run_grid
from moola_engine.experiments.grid import build_grid
from moola_engine.experiments.report import console_summary, table_rows, write_report
from moola_engine.experiments.summary import METRICS, collect, summarize
from moola_ohlc.baselines import logistic_baseline
from tests.test_ablation import fake_grid, fake_run
from tests.test_ohlc import synthetic, write_series

BASELINE_KEY = "logistic-range"  # registered by the OHLC package
BASELINE_LABEL = "logistic regression (3 range features)"

STRATEGIES = """
[strategy.frozen]
plugin = "frozen"
[strategy.immediate]
plugin = "immediate"
"""

OPTIONS = {"window": 24, "horizon": 5, "median_lookback": 20, "label_budget": 40, "eval_stride": 4}


def tiny_ohlc_experiment(tmp: Path) -> Path:
    write_series(tmp / "syn.csv", synthetic(900, seed=3))
    (tmp / "strategies.toml").write_text(STRATEGIES)
    cfg = tmp / "tiny_ohlc.toml"
    opts = ", ".join(f"{k} = {v}" for k, v in OPTIONS.items())
    cfg.write_text(f"""
[train]
epochs = 1
batch_size = 16
lr = 0.01
device = "cpu"
[model]
name = "simple_lstm"
params = {{ hidden_size = 4, head_hidden = 4 }}
[data]
kind = "ohlc"
path = "syn.csv"
folds = 2
options = {{ {opts} }}
[run]
strategies_file = "strategies.toml"
[checkpoint]
enabled = false
""")
    return cfg


def test_the_ablation_reports_the_logistic_baseline_beside_the_networks(tmp_path: Path) -> None:
    cfg = load_config(tiny_ohlc_experiment(tmp_path))
    grid = build_grid(cfg, strategies=["frozen"], seeds=2, out=tmp_path / "grid")
    run_grid(grid, jobs=1, threads=1)
    records, missing = collect(grid)
    assert not missing
    res = summarize(grid, records=records, missing=missing, n_boot=200)

    ref = res["baselines"][BASELINE_KEY]
    assert ref["label"] == BASELINE_LABEL and ref["reference"] is True
    assert ref["n"] == 4 and ref["pairs"] == 4  # 2 seeds x 2 folds, each paired with the control's run
    assert {(r["seed"], r["fold"]) for r in ref["runs"]} == {(0, 0), (0, 1), (1, 0), (1, 1)}

    # one cell, built here without the ablation's help: the same numbers
    direct = logistic_baseline(build_splits(attrs.evolve(cfg.data, folds=2, fold=1), base_dir=tmp_path, seed=1,
                                            source=cfg.source))
    cell = next(r for r in ref["runs"] if (r["seed"], r["fold"]) == (1, 1))
    assert cell["split"] == "test"
    for m in METRICS:
        assert cell[m] == pytest.approx(direct["test"][m], abs=1e-12)
        assert ref["metrics"][m]["mean"] == pytest.approx(np.mean([r[m] for r in ref["runs"]]))

    # paired with the control over the same seeds and folds, on the very labels the control was scored on
    ctrl = {(r["seed"], r["fold"]): r for r in res["runs"] if r["label"] == "control"}
    diffs = [r["accuracy"] - ctrl[(r["seed"], r["fold"])]["accuracy"] for r in ref["runs"]]
    assert ref["vs_control"]["accuracy"]["mean"] == pytest.approx(np.mean(diffs))
    assert ref["vs_control"]["accuracy"]["n"] == 4 and ref["vs_control"]["accuracy"]["p"] is not None
    assert not any(f["code"] == "baseline-data-mismatch" for f in res["red_flags"])

    # shown as a marked row in every table
    rows = table_rows(res, "auc")
    assert rows[-1][0] == BASELINE_LABEL and rows[-1][1] == "4" and rows[-1][-1] == "non-network reference"
    assert BASELINE_LABEL in console_summary(res)
    paths = write_report(grid, res, records, command="moola-engine ablate ...", with_figures=False)
    md = paths["markdown"].read_text()
    assert md.count(f"| {BASELINE_LABEL} | 4 |") == 3 and "non-network reference" in md
    assert "<tr class='ref'><td>logistic regression (3 range features)</td>" in paths["html"].read_text()
    saved = json.loads(paths["results"].read_text())["baselines"][BASELINE_KEY]
    assert saved["vs_control"]["auc"] == json.loads(json.dumps(ref["vs_control"]["auc"]))


def test_no_baseline_for_npz_data_and_the_note_says_why(tmp_path: Path) -> None:
    grid = fake_grid(tmp_path, {"probe": "frozen"}, seeds=2)  # data.kind "npz"
    for cell in grid.cells():
        y = np.array([0, 1] * 5)
        fake_run(grid, cell, y, y, [["head"]])
    res = summarize(grid, n_boot=100)
    assert res["baselines"] == {}
    assert any(f"no {BASELINE_LABEL} baseline" in n and "data.kind = 'npz'" in n for n in res["notes"])
    assert all(BASELINE_LABEL not in r[0] for r in table_rows(res))


def ohlc_fake_grid(tmp: Path, seeds: int) -> tuple:
    tiny_ohlc_experiment(tmp)
    cfg = ExperimentConfig(model=ModelConfig(pretrained=PretrainedConfig(path="enc.safetensors")),
                           data=DataConfig(kind="ohlc", path="syn.csv", folds=2, options=OPTIONS),
                           source=str(tmp / "x.toml"))
    grid = fake_grid(tmp, {"probe": "frozen"}, seeds=seeds)
    return attrs.evolve(grid, cfg=cfg, folds=2), cfg


def test_a_baseline_on_other_labels_than_the_runs_is_flagged_not_paired(tmp_path: Path) -> None:
    grid, _ = ohlc_fake_grid(tmp_path, seeds=1)
    for cell in grid.cells():
        y = np.array([0, 1] * 5)  # not the test labels of this data: the runs saw other data
        fake_run(grid, cell, y, y, [["head"]])
    res = summarize(grid, n_boot=100)
    ref = res["baselines"][BASELINE_KEY]
    assert ref["n"] == 2 and ref["pairs"] == 0 and ref["vs_control"]["accuracy"]["mean"] is None
    assert any(f["code"] == "baseline-data-mismatch" for f in res["red_flags"])


def test_networks_at_the_majority_rate_beside_a_learnable_baseline_are_suspect(tmp_path: Path) -> None:
    grid, cfg = ohlc_fake_grid(tmp_path, seeds=3)
    for cell in grid.cells():
        y = build_splits(attrs.evolve(cfg.data, fold=cell.fold), base_dir=tmp_path, seed=cell.seed).test.y.numpy()
        majority = np.full_like(y, int(np.bincount(y).argmax()))
        fake_run(grid, cell, majority, y, [["head"]])  # every network predicts the majority class
    res = summarize(grid, n_boot=500)
    ref = res["baselines"][BASELINE_KEY]
    assert ref["pairs"] == 6 and ref["vs_majority"]["lo"] > 0
    flag = next(f for f in res["red_flags"] if f["code"] == "near-majority")
    assert f"the {BASELINE_LABEL} baseline does" in flag["message"] and "suspect the networks" in flag["message"]
