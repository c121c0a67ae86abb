"""OHLC reading and validation, features and labels, embargoed splits, folds, pretraining cut, generic folds."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

from moola_engine.config import DataConfig
from moola_engine.core.data import build_splits, stratified_kfold
from moola_engine.errors import ConfigError, DataError
from moola_engine.runs.train import check_pretrain_cut
from moola_ohlc.pretrain import build_pretrain_data
from moola_ohlc.series import (
    OhlcOptions,
    OhlcSeries,
    WindowSpec,
    bar_features,
    build_dataset,
    bundled_names,
    make_windows,
    parse_options,
    plan_splits,
    pretrain_cut_date,
    range_expansion_labels,
    read_ohlc,
)

HEADER = "date,open,high,low,close,volume"


def synthetic(n: int, seed: int = 0, start: str = "2000-01-03", name: str = "SYN") -> OhlcSeries:
    """A random walk with volatility regimes (so the range label is learnable), on business days."""
    rng = np.random.default_rng(seed)
    vol = 0.01 * np.exp(np.cumsum(rng.normal(0, 0.05, n)))
    close = 100 * np.exp(np.cumsum(rng.normal(0, vol)))
    prev = np.r_[100.0, close[:-1]]
    open_ = prev * np.exp(rng.normal(0, vol / 4))
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, vol / 2)))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, vol / 2)))
    dates = np.busday_offset(np.datetime64(start, "D"), np.arange(n), roll="forward")
    return OhlcSeries(name=name, source=f"<{name}>", dates=dates, open=open_, high=high, low=low, close=close)


def write_series(path: Path, s: OhlcSeries) -> Path:
    lines = [HEADER] + [f"{d},{o:.4f},{h:.4f},{lo:.4f},{c:.4f},1000"
                        for d, o, h, lo, c in zip(s.dates, s.open, s.high, s.low, s.close)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write(tmp_path: Path, *rows: str, header: str = HEADER, name: str = "bad.csv") -> Path:
    p = tmp_path / name
    p.write_text("\n".join([header, *rows]) + "\n")
    return p


GOOD = ["2020-01-02,10,11,9,10.5,1", "2020-01-03,10.5,11.5,10,11,1", "2020-01-06,11,12,10.5,11.5,1"]


# --------------------------------------------------------------------------- reading and validation


def test_reads_valid_csv_and_bundled_series(tmp_path: Path) -> None:
    s = read_ohlc(write(tmp_path, *GOOD, name="ok.csv"))
    assert s.name == "ok" and len(s) == 3 and str(s.dates[-1]) == "2020-01-06"
    assert s.close.tolist() == [10.5, 11.0, 11.5]
    assert bundled_names() == ["AAPL", "GOOG", "IBM", "MSFT", "NASDAQ_COMPOSITE", "SPX"]
    spx = read_ohlc(Path(__file__).parent.parent / "ohlc/moola_ohlc/datasets/ohlc/SPX.csv.gz")
    assert len(spx) == 5031 and spx.date(0) == "1999-01-04" and spx.date(5030) == "2018-12-31"


@pytest.mark.parametrize(("rows", "header", "expected"), [
    (GOOD, "date,open,low,close", "missing column(s) high"),
    ([GOOD[0], "2020-01-02,10,11,9,10.5,1"], HEADER, "line 3, column 'date': duplicate date"),
    ([GOOD[1], GOOD[0]], HEADER, "line 3, column 'date': date goes backwards"),
    ([GOOD[0], "2020-01-03,10,9,11,10,1"], HEADER, "line 3, column 'high': high 9 is below low 11"),
    ([GOOD[0], "2020-01-03,10,10.5,9,11,1"], HEADER, "line 3, column 'high': high 10.5 is below max(open, close)"),
    ([GOOD[0], "2020-01-03,10,12,10.5,11,1"], HEADER, "line 3, column 'low': low 10.5 is above min(open, close)"),
    ([GOOD[0], "2020-01-03,10,11,9,nan,1"], HEADER, "line 3, column 'close': 'nan' is not a finite number"),
    ([GOOD[0], "2020-01-03,10,abc,9,10,1"], HEADER, "line 3, column 'high': expected a number, got 'abc'"),
    ([GOOD[0], "2020-01-03,,11,9,10,1"], HEADER, "line 3, column 'open': missing value"),
    ([GOOD[0], "2020-13-45,10,11,9,10,1"], HEADER, "line 3, column 'date': expected a date YYYY-MM-DD"),
    ([GOOD[0], "2020-01-03,10,11,9"], HEADER, "line 3: 4 cells, expected 6"),
    ([GOOD[0], "2020-01-03,0,11,9,10,1"], HEADER, "line 3, column 'open': prices must be > 0"),
    ([GOOD[0]], HEADER, "1 data row(s); need at least 2"),
])
def test_loader_errors_name_file_line_and_column(tmp_path: Path, rows: list[str], header: str, expected: str) -> None:
    path = write(tmp_path, *rows, header=header)
    with pytest.raises(DataError) as info:
        read_ohlc(path)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_file_level_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_ohlc(tmp_path / "none.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty file"):
        read_ohlc(tmp_path / "empty.csv")
    (tmp_path / "x.xlsx").write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        read_ohlc(tmp_path / "x.xlsx")
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"x.parquet: reading Parquet needs pyarrow, which is not installed"):
        read_ohlc(tmp_path / "x.parquet")


def test_unknown_target_lists_bundled_names(tmp_path: Path) -> None:
    cfg = DataConfig(kind="ohlc", options={"target": "SPY"})
    with pytest.raises(DataError, match=r"SPY: neither a bundled instrument \(AAPL, GOOG, IBM, MSFT"):
        build_splits(cfg, base_dir=tmp_path, seed=0)


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(("options", "expected"), [
    ({"windw": 32}, "extra fields found (windw) @ $.data.options"),
    ({"window": 0}, "expected a value > 0, got 0 @ $.data.options.window"),
    ({"label_budget": "some"}, "expected an integer >= 2 or \"all\", got 'some' @ $.data.options.label_budget"),
    ({"label_budget": 2.5}, "@ $.data.options.label_budget"),
    ({"test_fraction": 1.5}, "@ $.data.options.test_fraction"),
    ({"embargo": 10}, "the embargo must be at least 70 bars"),
])
def test_option_errors_name_the_key(options: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_splits(DataConfig(kind="ohlc", options=options), base_dir=Path("."), seed=0, source="exp.toml")
    assert str(info.value).startswith("exp.toml: ")
    assert expected in str(info.value)


def test_fold_out_of_range_and_options_on_generic_kinds(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"expected 0 <= fold < folds = 2, got 2 @ \$.data.fold"):
        build_splits(DataConfig(kind="ohlc", folds=2, fold=2), base_dir=tmp_path, seed=0)
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 5, 1)), y=np.arange(10) % 2)
    with pytest.raises(ConfigError, match=r"extra fields found \(window\) @ \$.data.options"):
        build_splits(DataConfig(kind="npz", path="d.npz", options={"window": 3}), base_dir=tmp_path, seed=0)


# --------------------------------------------------------------------------- features, labels, footprint


def test_features_are_log_ratios_to_previous_close() -> None:
    s = synthetic(50)
    f = bar_features(s)
    assert np.isnan(f[0]).all()
    t = 17
    expected = np.log(np.array([s.open[t], s.high[t], s.low[t], s.close[t]]) / s.close[t - 1])
    np.testing.assert_allclose(f[t], expected)


def test_label_matches_its_definition() -> None:
    s = synthetic(300, seed=3)
    spec = WindowSpec(window=20, horizon=5, median_lookback=60)
    e = 150
    future = np.log(s.high[e + 1:e + 6].max() / s.low[e + 1:e + 6].min())
    past = [np.log(s.high[t - 4:t + 1].max() / s.low[t - 4:t + 1].min()) for t in range(e - 59, e + 1)]
    assert range_expansion_labels(s, np.array([e]), spec)[0] == int(future > np.median(past))


@pytest.mark.parametrize("spec", [WindowSpec(), WindowSpec(window=16, horizon=3, median_lookback=40),
                                  WindowSpec(window=8, horizon=10, median_lookback=60)])
def test_a_window_reads_only_its_footprint(spec: WindowSpec) -> None:
    """Changing any bar outside [e - lookback, e + H] changes neither the window's inputs nor its label."""
    s = synthetic(400, seed=1)
    e = 250
    lo, hi = spec.footprint(e)

    def window_and_label(series: OhlcSeries) -> tuple[np.ndarray, int]:
        return make_windows(bar_features(series), np.array([e]), spec.window)[0], \
            int(range_expansion_labels(series, np.array([e]), spec)[0])

    x0, y0 = window_and_label(s)
    for bar in (lo - 1, hi + 1):
        shocked = OhlcSeries(name="x", source="x", dates=s.dates, open=s.open.copy(), high=s.high.copy(),
                             low=s.low.copy(), close=s.close.copy())
        for arr in (shocked.open, shocked.high, shocked.low, shocked.close):
            arr[bar] *= 5.0
        x1, y1 = window_and_label(shocked)
        np.testing.assert_array_equal(x0, x1)
        assert y0 == y1


# --------------------------------------------------------------------------- splits and embargo


@pytest.mark.parametrize(("n", "window", "horizon", "folds"), [(1500, 64, 5, 1), (1500, 16, 3, 3), (3000, 32, 10, 4)])
def test_no_window_of_a_later_split_touches_an_earlier_one(n: int, window: int, horizon: int, folds: int) -> None:
    s = synthetic(n, seed=2)
    opts = OhlcOptions(window=window, horizon=horizon, median_lookback=40, test_fraction=0.15, label_budget="all")
    for fold in range(folds):
        ds = build_dataset(s, opts, val_fraction=0.15, folds=folds, fold=fold, seed=0)
        spec, plan = opts.spec, ds.plan
        assert plan.embargo >= window + horizon
        order = ["train", "val", "test"]
        for a, b in itertools.pairwise(order):
            _, last_a = spec.footprint(ds.ends[a])
            first_b, _ = spec.footprint(ds.ends[b])
            assert last_a.max() < first_b.min(), (fold, a, b)  # in bars
            assert s.dates[last_a.max()] < s.dates[first_b.min()]  # in calendar dates
            assert ds.ends[b].min() - ds.ends[a].max() >= window + horizon
        assert ds.meta()["train_cut_date"] == s.date(int(spec.footprint(ds.ends["train"]).__getitem__(1).max()))
        # later folds move validation back in time, test never moves
        if fold > 0:
            prev = build_dataset(s, opts, val_fraction=0.15, folds=folds, fold=fold - 1, seed=0)
            assert ds.ends["val"].max() < prev.ends["val"].min()
            np.testing.assert_array_equal(ds.ends["test"], prev.ends["test"])


def test_standardisation_uses_training_period_only() -> None:
    s = synthetic(1500, seed=4)
    opts = OhlcOptions(window=16, horizon=3, median_lookback=20)
    ds = build_dataset(s, opts, val_fraction=0.2, seed=0)
    cut = ds.plan.last_train_bar()
    late = OhlcSeries(name=s.name, source=s.source, dates=s.dates, open=s.open.copy(), high=s.high.copy(),
                      low=s.low.copy(), close=s.close.copy())
    for arr in (late.open, late.high, late.low, late.close):
        arr[cut + 1:] *= np.linspace(1, 3, len(s) - cut - 1)
    ds2 = build_dataset(late, opts, val_fraction=0.2, seed=0)
    assert ds.stats.mean == ds2.stats.mean and ds.stats.std == ds2.stats.std
    np.testing.assert_array_equal(ds.x["train"], ds2.x["train"])
    assert ds.stats.last_date <= s.date(cut)


def test_label_budget_is_stratified_seeded_and_from_the_training_period() -> None:
    s = synthetic(2000, seed=5)
    opts = OhlcOptions(window=16, horizon=3, median_lookback=20, label_budget=89, eval_stride=1)
    a = build_dataset(s, opts, val_fraction=0.15, seed=0)
    b = build_dataset(s, opts, val_fraction=0.15, seed=1)
    assert len(a.y["train"]) == 89 and len(np.unique(a.ends["train"])) == 89
    assert abs(a.y["train"].mean() * 89 - a.pool_positive_rate * 89) <= 1
    assert not np.array_equal(a.ends["train"], b.ends["train"])
    assert a.ends["train"].max() <= a.plan.train[1]
    fixed = OhlcOptions(window=16, horizon=3, median_lookback=20, label_budget=89, label_seed=7)
    np.testing.assert_array_equal(build_dataset(s, fixed, val_fraction=0.15, seed=0).ends["train"],
                                  build_dataset(s, fixed, val_fraction=0.15, seed=1).ends["train"])
    assert len(a.ends["val"]) > 200 and len(a.ends["test"]) > 200
    strided = build_dataset(s, OhlcOptions(window=16, horizon=3, median_lookback=20), val_fraction=0.15, seed=0)
    assert set(np.diff(strided.ends["val"])) == {2} and strided.ends["val"][0] == a.ends["val"][0]


def test_bundled_default_spx() -> None:
    sp = build_splits(DataConfig(kind="ohlc"), base_dir=Path("."), seed=0)
    assert sp.train.x.shape == (89, 64, 4) and len(sp.val) > 300 and len(sp.test) > 300
    m = sp.meta
    assert m["target"] == "SPX" and m["train_cut_date"] < m["splits"]["val"]["first_bar"]
    assert m["splits"]["val"]["last_bar"] < m["splits"]["test"]["first_bar"]
    assert abs(float(sp.train.x.mean())) < 0.3  # standardised, not raw ~1e-2 returns


def test_data_path_wins_over_target(tmp_path: Path) -> None:
    write_series(tmp_path / "mine.csv", synthetic(1200, seed=6))
    cfg = DataConfig(kind="ohlc", path="mine.csv", options={"window": 16, "horizon": 3, "median_lookback": 20})
    sp = build_splits(cfg, base_dir=tmp_path, seed=0)
    assert sp.meta["target"] == "mine" and sp.train.x.shape[1:] == (16, 4)


# --------------------------------------------------------------------------- pretraining cut


def test_pretraining_instruments_are_cut_at_the_target_training_end() -> None:
    target = synthetic(2000, seed=7, name="T")
    other = synthetic(1800, seed=8, start="2001-06-01", name="O")  # another calendar
    opts = OhlcOptions(window=16, horizon=3, median_lookback=20)
    for folds in (1, 3):
        cut = pretrain_cut_date(target, opts, val_fraction=0.15, folds=folds)
        data = build_pretrain_data([target, other], opts.spec, cut)
        for info in data.instruments:
            assert info["last_bar_read"] <= cut
        for fold in range(folds):
            ds = build_dataset(target, opts, val_fraction=0.15, folds=folds, fold=fold, seed=0)
            assert np.datetime64(cut) <= np.datetime64(ds.meta()["train_cut_date"])
            assert cut < ds.meta()["splits"]["val"]["first_bar"]
            check_pretrain_cut(cut, ds.meta())
    late = build_dataset(target, opts, val_fraction=0.15, folds=3, fold=2, seed=0).meta()
    with pytest.raises(DataError, match="has seen the validation/test period"):
        check_pretrain_cut(pretrain_cut_date(target, opts, val_fraction=0.15, folds=1), late)


def test_plan_refuses_too_short_series() -> None:
    with pytest.raises(DataError, match="too few"):
        plan_splits(300, WindowSpec(), val_fraction=0.2, test_fraction=0.2)


def test_parse_options_defaults() -> None:
    o = parse_options({}, "x")
    assert o.target == "SPX" and o.label_budget == 89 and o.window == 64 and "SPX" not in o.pretrain
    assert parse_options({"label_budget": "all"}, "x").label_budget == "all"


# --------------------------------------------------------------------------- generic folds


def test_stratified_folds_partition_and_balance() -> None:
    y = np.r_[np.zeros(30, int), np.ones(12, int)]
    vals = [stratified_kfold(y, 3, k, seed=0)[1] for k in range(3)]
    assert sorted(np.concatenate(vals).tolist()) == list(range(42))
    for v in vals:
        assert len(v) == 14 and int(y[v].sum()) == 4
    tr, va = stratified_kfold(y, 3, 1, seed=0)
    assert not set(tr) & set(va)
    assert not np.array_equal(stratified_kfold(y, 3, 0, seed=1)[1], vals[0])


def test_npz_honours_folds(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.arange(40 * 3, dtype=np.float32).reshape(40, 3), y=np.arange(40) % 2)
    seen = []
    for k in range(4):  # no test array in the file: the held-out fold is the test set
        sp = build_splits(DataConfig(kind="npz", path="d.npz", folds=4, fold=k), base_dir=tmp_path, seed=0)
        assert sp.test is not None and len(sp.test) == 10 and len(sp.train) + len(sp.val) == 30
        parts = [set(d.x[:, 0, 0].tolist()) for d in (sp.train, sp.val, sp.test)]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
        seen += sp.test.x[:, 0, 0].tolist()
    assert sorted(seen) == [3.0 * i for i in range(40)]
