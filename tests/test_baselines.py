"""The logistic-regression baseline: exact features, a correct fit, and a learnable task on the bundled SPX."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moola_engine.cli import main
from moola_engine.config import DataConfig
from moola_engine.core.data import build_splits
from moola_ohlc.baselines import fit_logistic, logistic_baseline, predict_proba, range_features
from moola_ohlc.series import FeatureStats, bar_features, make_windows
from tests.test_ohlc import synthetic


def test_range_features_read_back_the_raw_prices() -> None:
    s = synthetic(200, seed=9)
    feats = bar_features(s)
    stats = FeatureStats.fit(s, feats, 1, 199)
    e, L = 150, 64
    x = make_windows(stats.apply(feats), np.array([e]), L)
    f = range_features(x, stats.mean, stats.std)[0]
    r5 = [np.log(s.high[t - 4:t + 1].max() / s.low[t - 4:t + 1].min()) for t in range(e - L + 5, e + 1)]
    assert f[0] == pytest.approx(np.log(r5[-1]) - np.log(np.median(r5)), abs=1e-5)
    daily = np.log(s.high / s.low)[e - L + 1:e + 1]
    assert f[1] == pytest.approx(np.log(daily[-5:].mean()) - np.log(daily.mean()), abs=1e-5)
    ret = np.log(s.close[1:] / s.close[:-1])[e - L:e]
    assert f[2] == pytest.approx(np.log(ret[-20:].std()) - np.log(ret.std()), abs=1e-5)


def test_fit_logistic_recovers_the_generating_weights() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 3))
    w_true = np.array([1.5, -2.0, 0.5, 0.3])
    y = (rng.random(20000) < predict_proba(w_true, x)).astype(float)
    np.testing.assert_allclose(fit_logistic(x, y, l2=1e-6), w_true, atol=0.08)


def test_the_task_is_learnable_on_bundled_spx_with_89_labels() -> None:
    res = logistic_baseline(build_splits(DataConfig(kind="ohlc"), base_dir=Path("."), seed=0))
    for split in ("val", "test"):
        assert res[split]["accuracy"] > res[split]["majority_rate"] + 0.08
        assert res[split]["auc"] > 0.68


def test_baseline_command_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["baseline", "--seeds", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["baselines"]["logistic-range"]
    assert [r["seed"] for r in out["runs"]] == [0, 1] and set(out["summary"]["test_auc"]) != {None}


def test_unknown_preset_lists_the_installed_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ablate", "--preset", "sed"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'sed'" in err and "installed: seed" in err and 'did you mean "seed"' in err
