"""A train run on ohlc data records its data spans and standardisation (data.json, data.loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moola_engine.cli import main
from moola_engine.core.data import Splits, TensorData
from moola_engine.logs import read_events
from tests.test_ohlc import synthetic, write_series

ROOT = Path(__file__).resolve().parent.parent


def test_train_on_ohlc_writes_data_json(tmp_path: Path) -> None:
    write_series(tmp_path / "t.csv", synthetic(900, seed=21))
    (tmp_path / "exp.toml").write_text(f"""
[run]
strategies_file = "{ROOT / 'strategies.toml'}"
console = "none"
[train]
epochs = 1
threads = 1
device = "cpu"
[model]
params = {{ hidden_size = 8, head_hidden = 4 }}
[data]
kind = "ohlc"
path = "t.csv"
[data.options]
window = 16
horizon = 3
median_lookback = 20
label_budget = 20
""")
    assert main(["train", "--config", str(tmp_path / "exp.toml"), "--strategy", "immediate",
                 "--runs-dir", str(tmp_path / "runs")]) == 0
    run = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir() and not p.is_symlink())
    meta = json.loads((run / "data.json").read_text())
    assert meta["target"] == "t" and meta["splits"]["train"]["windows"] == 20
    assert len(meta["standardisation"]["mean"]) == 4
    loaded = [e for e in read_events(run / "events.jsonl") if e["event"] == "data.loaded"]
    assert loaded[0]["train"] == 20 and loaded[0]["train_cut_date"] == meta["train_cut_date"]


def no_val_split(req: object) -> Splits:
    """A data kind (named by import path below) that returns no validation split, which Splits allows."""
    x = torch.randn(32, 5, 3, generator=torch.Generator().manual_seed(0))
    return Splits(train=TensorData(x=x, y=(x[:, :, 0].mean(dim=1) > 0).long()), val=None)


def test_train_without_a_validation_split_logs_zero_val_rows(tmp_path: Path) -> None:
    """``Splits.val`` may be None; data.loaded used to call ``len(None)`` and the run died (found by mypy)."""
    (tmp_path / "exp.toml").write_text(f"""
[run]
strategies_file = "{ROOT / 'strategies.toml'}"
console = "none"
[train]
epochs = 1
threads = 1
device = "cpu"
[model]
name = "tests.conftest:TinyNet"
[[model.groups]]
name = "encoder"
modules = ["enc0", "enc1"]
[[model.groups]]
name = "head"
modules = ["head"]
head = true
[data]
kind = "tests.test_data_run:no_val_split"
""")
    assert main(["train", "--config", str(tmp_path / "exp.toml"), "--strategy", "immediate",
                 "--runs-dir", str(tmp_path / "runs")]) == 0
    run = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir() and not p.is_symlink())
    loaded = [e for e in read_events(run / "events.jsonl") if e["event"] == "data.loaded"]
    assert (loaded[0]["train"], loaded[0]["val"]) == (32, 0)
