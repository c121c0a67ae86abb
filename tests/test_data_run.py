"""A train run on ohlc data records its data spans and standardisation (data.json, data.loaded)."""

from __future__ import annotations

import json
from pathlib import Path

from moola_engine.cli import main
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
