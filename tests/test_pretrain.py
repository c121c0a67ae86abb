"""Pretraining lowers its own task losses; the saved encoder has the 16 lstm tensors and an honest sidecar."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moola_engine.cli import main
from moola_ohlc.pretrain import (
    TASKS,
    PretrainConfig,
    build_pretrain_data,
    candle_type,
    pretrain,
    save_encoder,
    sidecar,
)
from moola_ohlc.series import OhlcOptions, pretrain_cut_date
from tests.test_ohlc import synthetic, write_series

OPTS = OhlcOptions(window=16, horizon=3, median_lookback=20)
TINY = PretrainConfig(epochs=8, batch_size=32, lr=1e-2, samples_per_epoch=256, hidden_size=8, seed=0, threads=1,
                      eval_windows=256, device="cpu")


@pytest.fixture(scope="module")
def tiny_run():
    series = [synthetic(700, seed=11, name="A"), synthetic(600, seed=12, start="2000-06-01", name="B")]
    cut = pretrain_cut_date(series[0], OPTS, val_fraction=0.15)
    data = build_pretrain_data(series, OPTS.spec, cut)
    return data, pretrain(data, TINY), cut


def test_pretraining_lowers_every_task_loss(tiny_run) -> None:
    _, result, _ = tiny_run
    first, last = result.history[0], result.history[-1]
    assert first["epoch"] == 0 and last["epoch"] == TINY.epochs
    for task in [*TASKS, "masked"]:
        assert last[f"train_{task}_loss"] < first[f"train_{task}_loss"], task
        assert np.isfinite(last[f"holdout_{task}_loss"])


def test_saved_encoder_has_the_16_lstm_tensors_and_a_sidecar(tiny_run, tmp_path: Path) -> None:
    data, result, cut = tiny_run
    meta = sidecar(result, data, TINY, OPTS.spec, cut_date=cut, target="A", data_options={"window": 16})
    path, meta_path = save_encoder(result, tmp_path / "enc", meta)
    tensors = load_file(str(path))
    expected = {f"lstm.{kind}_{p}_l{layer}{sfx}" for kind in ("weight", "bias") for p in ("ih", "hh")
                for layer in (0, 1) for sfx in ("", "_reverse")}
    assert set(tensors) == expected and len(tensors) == 16
    for k, v in tensors.items():
        assert torch.equal(v, result.model.lstm.state_dict()[k.removeprefix("lstm.")].cpu())
    side = json.loads(meta_path.read_text())
    assert side["cut_date"] == cut and side["architecture"]["num_layers"] == 2
    assert side["architecture"]["input_size"] == 4 and side["seed"] == 0
    assert len(side["history"]) == TINY.epochs + 1
    assert {i["name"] for i in side["instruments"]} == {"A", "B"}
    assert all(i["last_bar_read"] <= cut for i in side["instruments"])
    assert "mean" in side["instruments"][0]["standardisation"]


def test_candle_types() -> None:
    s = synthetic(20)
    s.open[:3] = [10, 10, 10]
    s.close[:3] = [11, 9, 10.01]
    s.high[:3] = [11.5, 10.5, 10.5]
    s.low[:3] = [9.5, 8.5, 9.5]
    assert candle_type(s, np.array([0, 1, 2])).tolist() == [2, 0, 1]


def test_pretrain_command_end_to_end(tmp_path: Path) -> None:
    write_series(tmp_path / "t.csv", synthetic(900, seed=13))
    (tmp_path / "exp.toml").write_text(
        '[data]\nkind = "ohlc"\npath = "t.csv"\n[data.options]\nwindow = 16\nhorizon = 3\nmedian_lookback = 20\n'
        'pretrain = []\n[pretrain]\nobjective = "ohlc-multitask"\n')
    out = tmp_path / "out" / "enc.safetensors"
    rc = main(["pretrain", "--config", str(tmp_path / "exp.toml"), "--out", str(out), "--epochs", "1",
               "--param", "samples_per_epoch=64", "--param", "hidden_size=8", "--threads", "1", "--console", "none"])
    assert rc == 0 and out.is_file()
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["target"] == "t" and side["data_options"]["window"] == 16
    events = [json.loads(line)["event"] for line in out.with_suffix(".events.jsonl").read_text().splitlines()]
    assert events == ["pretrain.started", "pretrain.epoch", "pretrain.epoch", "pretrain.saved"]


def test_pretrain_command_refuses_other_data_kinds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "exp.toml").write_text('[data]\nkind = "npz"\npath = "x.npz"\n')
    assert main(["pretrain", "--config", str(tmp_path / "exp.toml"), "--objective", "ohlc-multitask"]) == 2
    assert 'objective ohlc-multitask needs data.kind = "ohlc", got \'npz\' @ $.data.kind' in capsys.readouterr().err


def test_pretrain_command_without_objective_lists_installed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "exp.toml").write_text('[data]\nkind = "npz"\npath = "x.npz"\n')
    assert main(["pretrain", "--config", str(tmp_path / "exp.toml")]) == 2
    err = capsys.readouterr().err
    assert "no pretraining objective" in err and "ohlc-multitask" in err


def test_pretrain_command_refuses_unknown_param(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "exp.toml").write_text('[pretrain]\nobjective = "ohlc-multitask"\n')
    assert main(["pretrain", "--config", str(tmp_path / "exp.toml"), "--param", "hiden_size=8"]) == 2
    assert "extra fields found (hiden_size) @ $.pretrain.params" in capsys.readouterr().err
