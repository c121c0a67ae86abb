"""Daily OHLC series: reading, validation, window features, the range-expansion label, leakage-free splits.

The pieces, in the order data flows through them::

    read_ohlc(file)            CSV / CSV.gz / Parquet -> OhlcSeries (validated: every error names file, line, column)
    bar_features(series)       (n, 4) log(open|high|low|close / previous close); row 0 is NaN
    WindowSpec                 window length L, label horizon H, median lookback M -> which bars a window touches
    range_expansion_labels     1 if the next-H-bar range exceeds the trailing M-bar median of H-bar ranges
    plan_splits                chronological train / validation / test of window END bars, with an embargo
    build_dataset              standardise with training-period statistics, draw the label budget, cut windows

**Features.**  Bar ``t`` is described by ``log(open_t / close_{t-1})``, ``log(high_t / close_{t-1})``,
``log(low_t / close_{t-1})`` and ``log(close_t / close_{t-1})``.  Log ratios to the previous close remove the price
level (SPX at 1,200 and at 2,900 look alike), are additive over time, keep the candle shape (high - low is the
bar's range) and are defined for every bar after the first.  Each feature is then standardised with the mean and
standard deviation of the *training period only*; unscaled, these returns are ~1e-2 and a BiLSTM collapsed to the
majority class on them.

**Which bars a window touches.**  A window ending at bar ``e`` reads bars ``e-L .. e`` (``e-L`` for the previous
close of the first bar), its label's trailing median reads the H-bar ranges ending at ``e-M+1 .. e`` (bars from
``e-M-H+2``), and its label reads bars ``e+1 .. e+H``.  So it touches ``[e - lookback, e + H]`` with
``lookback = max(L, M + H - 2)`` (:meth:`WindowSpec.footprint`).  Consecutive splits are separated by an embargo
of ``lookback + H + 1`` window-end bars at least, so no bar touched by a later split's window is touched by an
earlier split's window.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import math
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from moola_engine.config import structure
from moola_engine.errors import ConfigError, DataError
from moola_ohlc.options import OhlcOptions, WindowSpec

REQUIRED_COLUMNS = ("date", "open", "high", "low", "close")
FEATURE_NAMES = ("open", "high", "low", "close")
BUNDLED_DIR = Path(__file__).resolve().parent / "datasets" / "ohlc"
_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".parquet")


# --------------------------------------------------------------------------- reading and validation


@attrs.frozen(kw_only=True, eq=False)
class OhlcSeries:
    """One instrument's daily bars, validated: dates strictly increasing, prices positive and consistent."""

    name: str
    source: str
    dates: np.ndarray  # datetime64[D]
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray

    def __len__(self) -> int:
        return int(self.dates.shape[0])

    def cut(self, last_date: np.datetime64 | str) -> OhlcSeries:
        """The bars dated on or before ``last_date`` (the pretraining cut)."""
        n = int(np.searchsorted(self.dates, np.datetime64(last_date, "D"), side="right"))
        return attrs.evolve(self, dates=self.dates[:n], open=self.open[:n], high=self.high[:n], low=self.low[:n],
                            close=self.close[:n])

    def date(self, i: int) -> str:
        return str(self.dates[i])


def bundled_names() -> list[str]:
    """Instruments shipped inside the package (``moola_ohlc/datasets/ohlc``), see its NOTICE.md."""
    return sorted(p.name.split(".")[0] for p in BUNDLED_DIR.glob("*.csv.gz"))


def resolve_series(name_or_path: str, base_dir: Path | None = None) -> Path:
    """A bundled instrument name (``SPX``) or a file path (relative to ``base_dir``)."""
    if name_or_path in bundled_names():
        return BUNDLED_DIR / f"{name_or_path}.csv.gz"
    p = Path(name_or_path)
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    if p.is_file():
        return p
    raise DataError(f"{name_or_path}: neither a bundled instrument ({', '.join(bundled_names())}) nor a file"
                    f"{f' (looked for {p})' if p != Path(name_or_path) else ''}")


def read_ohlc(path: str | Path, name: str | None = None) -> OhlcSeries:
    """Read and validate ``date,open,high,low,close[,volume]`` from CSV (optionally .gz), TSV or Parquet."""
    path = Path(path)
    if name is None:
        name = path.name.split(".")[0]
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    lower = path.name.lower()
    if lower.endswith(".parquet"):
        columns, rows = _read_parquet(path)
        where = "row"
        first = 1
    elif lower.endswith((".csv", ".csv.gz", ".tsv", ".txt")):
        columns, rows = _read_text(path)
        where = "line"
        first = 2  # line 1 is the header
    else:
        raise DataError(f"{path}: unknown file type; expected one of {', '.join(_SUFFIXES)}")
    return _validate(path, name, columns, rows, where, first)


def _read_text(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
        text = raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text ({exc})") from exc
    delim = "\t" if path.name.lower().endswith(".tsv") else ","
    reader = csv.reader(io.StringIO(text), delimiter=delim)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty file (expected a header {','.join(REQUIRED_COLUMNS)}[,volume])") from None
    columns = [c.strip().lower() for c in header]
    _check_columns(path, columns)
    rows: list[list[str]] = []
    for i, cells in enumerate(reader, start=2):
        if not cells or all(not c.strip() for c in cells):
            raise DataError(f"{path}: line {i}: empty line inside the data")
        if len(cells) != len(columns):
            raise DataError(f"{path}: line {i}: {len(cells)} cells, expected {len(columns)} ({','.join(columns)})")
        rows.append(cells)
    return columns, rows


def _read_parquet(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow, which is not installed "
                        "(pip install pyarrow, or convert the file to CSV)") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own exception types
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    columns = [c.strip().lower() for c in table.column_names]
    data = table.to_pydict()
    values = [data[c] for c in table.column_names]
    rows = [["" if v is None else str(v) for v in row] for row in zip(*values)]
    return columns, rows


def _check_columns(path: Path, columns: list[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'} "
                        f"(expected {','.join(REQUIRED_COLUMNS)}[,volume])")
    dupes = sorted({c for c in columns if columns.count(c) > 1 and c in REQUIRED_COLUMNS})
    if dupes:
        raise DataError(f"{path}: column(s) {', '.join(dupes)} appear more than once in the header")


def _validate(path: Path, name: str, columns: list[str], rows: list[list[str]], where: str, first: int) -> OhlcSeries:
    _check_columns(path, columns)
    if len(rows) < 2:
        raise DataError(f"{path}: {len(rows)} data row(s); need at least 2")
    col = {c: columns.index(c) for c in REQUIRED_COLUMNS}
    n = len(rows)
    dates = np.empty(n, dtype="datetime64[D]")
    prices = {c: np.empty(n, dtype=np.float64) for c in FEATURE_NAMES}
    for r, cells in enumerate(rows):
        at = f"{path}: {where} {r + first}"
        text = cells[col["date"]].strip()
        try:
            dates[r] = np.datetime64(dt.date.fromisoformat(text[:10]) if len(text) >= 10 else dt.date.fromisoformat(text))
        except ValueError:
            raise DataError(f"{at}, column 'date': expected a date YYYY-MM-DD, got {text!r}") from None
        for c in FEATURE_NAMES:
            cell = cells[col[c]].strip()
            try:
                v = float(cell)
            except ValueError:
                if cell == "":
                    raise DataError(f"{at}, column {c!r}: missing value") from None
                raise DataError(f"{at}, column {c!r}: expected a number, got {cell!r}") from None
            if not math.isfinite(v):
                raise DataError(f"{at}, column {c!r}: {cell!r} is not a finite number (NaN/inf)")
            if v <= 0:
                raise DataError(f"{at}, column {c!r}: prices must be > 0 (log ratios), got {cell!r}")
            prices[c][r] = v
        if r > 0 and dates[r] <= dates[r - 1]:
            what = "duplicate date" if dates[r] == dates[r - 1] else "date goes backwards"
            raise DataError(f"{at}, column 'date': {what}: {dates[r]} after {dates[r - 1]} "
                            f"(dates must be strictly increasing)")
        o, h, lo, c_ = (prices[c][r] for c in FEATURE_NAMES)
        tol = 1e-9 * h
        if h < lo - tol:
            raise DataError(f"{at}, column 'high': high {h:g} is below low {lo:g}")
        if h < max(o, c_) - tol:
            raise DataError(f"{at}, column 'high': high {h:g} is below max(open, close) = {max(o, c_):g}")
        if lo > min(o, c_) + tol:
            raise DataError(f"{at}, column 'low': low {lo:g} is above min(open, close) = {min(o, c_):g}")
    return OhlcSeries(name=name, source=str(path), dates=dates, **prices)


# --------------------------------------------------------------------------- features and labels


def bar_features(s: OhlcSeries) -> np.ndarray:
    """(n, 4): log(open, high, low, close / previous close); row 0 has no previous close (NaN)."""
    prev = np.concatenate([[np.nan], s.close[:-1]])
    return np.log(np.stack([s.open, s.high, s.low, s.close], axis=1) / prev[:, None])


def past_range(s: OhlcSeries, h: int) -> np.ndarray:
    """``r[t] = log(max high[t-h+1..t] / min low[t-h+1..t])``; NaN for ``t < h-1``."""
    out = np.full(len(s), np.nan)
    if len(s) >= h:
        hi = np.lib.stride_tricks.sliding_window_view(s.high, h).max(axis=1)
        lo = np.lib.stride_tricks.sliding_window_view(s.low, h).min(axis=1)
        out[h - 1:] = np.log(hi / lo)
    return out


def range_expansion_labels(s: OhlcSeries, ends: np.ndarray, spec: WindowSpec) -> np.ndarray:
    """1 where the H-bar range after ``e`` exceeds the median of the M H-bar ranges ending at ``e-M+1 .. e``.

    The median uses only bars up to ``e`` (known when the window closes); the label itself reads the H future
    bars by design, and the embargo keeps those bars out of every later split.
    """
    ends = np.asarray(ends, dtype=np.int64)
    r = past_range(s, spec.horizon)
    future = r[ends + spec.horizon]
    idx = ends[:, None] + np.arange(-spec.median_lookback + 1, 1)[None, :]
    median = np.median(r[idx], axis=1)
    if np.isnan(future).any() or np.isnan(median).any():
        raise DataError(f"{s.source}: window ends outside the range the label can be computed for")
    return (future > median).astype(np.int64)


def make_windows(features: np.ndarray, ends: np.ndarray, window: int) -> np.ndarray:
    """(N, L, C) float32: rows ``e-L+1 .. e`` of ``features`` for each end ``e``."""
    idx = np.asarray(ends, dtype=np.int64)[:, None] + np.arange(-window + 1, 1)[None, :]
    return np.ascontiguousarray(features[idx], dtype=np.float32)


@attrs.frozen(kw_only=True)
class FeatureStats:
    """Per-feature mean and standard deviation, and the bars (dates) they were computed from."""

    names: list[str]
    mean: list[float]
    std: list[float]
    first_date: str
    last_date: str
    bars: int

    @classmethod
    def fit(cls, s: OhlcSeries, features: np.ndarray, first: int, last: int) -> FeatureStats:
        first = max(first, 1)  # bar 0 has no previous close
        block = features[first:last + 1]
        std = block.std(axis=0)
        if block.shape[0] < 2 or not np.all(std > 0):
            raise DataError(f"{s.source}: cannot standardise features over bars {first}..{last} "
                            f"({block.shape[0]} bars, std {std.tolist()})")
        return cls(names=list(FEATURE_NAMES), mean=block.mean(axis=0).tolist(), std=std.tolist(),
                   first_date=s.date(first), last_date=s.date(last), bars=int(block.shape[0]))

    def apply(self, features: np.ndarray) -> np.ndarray:
        return (features - np.asarray(self.mean)) / np.asarray(self.std)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


# --------------------------------------------------------------------------- splits


@attrs.frozen(kw_only=True)
class SplitPlan:
    """Inclusive ranges of window-END bars per split, chronological, separated by ``embargo`` bars."""

    spec: WindowSpec
    embargo: int
    train: tuple[int, int]
    val: tuple[int, int]
    test: tuple[int, int]
    fold: int = 0
    folds: int = 1

    def last_train_bar(self) -> int:
        """The last bar any training window touches (its label included): the calendar cut."""
        return int(self.spec.footprint(self.train[1])[1])


def plan_splits(n: int, spec: WindowSpec, *, val_fraction: float, test_fraction: float, folds: int = 1,
                fold: int = 0, embargo: int | None = None, source: str = "data") -> SplitPlan:
    """Chronological train / val / test over the valid window ends of an ``n``-bar series.

    The test block is the last ``test_fraction`` of the window ends and never moves.  Validation blocks have
    ``val_fraction`` of the ends each; fold 0 sits right before the test block (embargo between), fold ``k``
    ``k`` blocks earlier (blocked, expanding-window folds: training is everything before the fold's validation
    block minus the embargo, so later folds train on less).  Bars between a fold's validation block and the
    test block are unused in that fold.
    """
    if not 0 <= fold < folds:
        raise ConfigError(source, f"invalid value, expected 0 <= fold < folds = {folds}, got {fold} @ $.data.fold")
    gap = spec.min_embargo if embargo is None else embargo
    if gap < spec.min_embargo:
        raise ConfigError(source, f"invalid value, the embargo must be at least {spec.min_embargo} bars "
                                  f"(window/median lookback {spec.lookback} + horizon {spec.horizon} + 1) so that "
                                  f"no window of a later split reads a bar of an earlier one, got {gap} "
                                  "@ $.data.options.embargo")
    first, last = spec.valid_ends(n)
    usable = last - first + 1
    test_len = round(test_fraction * usable)
    val_len = round(val_fraction * usable)
    test = (last - test_len + 1, last)
    val_last = test[0] - gap - fold * val_len
    val = (val_last - val_len + 1, val_last)
    train = (first, val[0] - gap)
    if test_len < 1 or val_len < 1 or train[1] - train[0] + 1 < 2 * spec.window:
        raise DataError(f"{source}: {n} bars are too few for window {spec.window}, horizon {spec.horizon}, "
                        f"embargo {gap}, val_fraction {val_fraction}, test_fraction {test_fraction}, "
                        f"{folds} fold(s): fold {fold} would train on {max(0, train[1] - train[0] + 1)} window "
                        f"end(s), validate on {val_len}, test on {test_len} (need >= {2 * spec.window} for training)")
    return SplitPlan(spec=spec, embargo=gap, train=train, val=val, test=test, fold=fold, folds=folds)


# --------------------------------------------------------------------------- the [data] options of kind "ohlc"


def parse_options(options: dict[str, Any], source: str) -> OhlcOptions:
    """Structure ``[data.options]``; an unknown or invalid key is a ConfigError at ``$.data.options.<key>``."""
    return structure(options, OhlcOptions, source=source, path="$.data.options")


# --------------------------------------------------------------------------- dataset


@attrs.frozen(kw_only=True, eq=False)
class OhlcDataset:
    """Windows per split with their end bars (for audits), labels and the standardisation used."""

    series: OhlcSeries
    plan: SplitPlan
    stats: FeatureStats
    ends: dict[str, np.ndarray]
    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    pool_size: int
    pool_positive_rate: float

    def meta(self) -> dict[str, Any]:
        s, spec = self.series, self.plan.spec
        splits = {}
        for name, ends in self.ends.items():
            lo, hi = spec.footprint(ends)
            splits[name] = {
                "windows": len(ends), "positive_rate": float(self.y[name].mean()),
                "first_end": s.date(int(ends.min())), "last_end": s.date(int(ends.max())),
                "first_bar": s.date(int(lo.min())), "last_bar": s.date(int(hi.max())),
            }
        splits["train"]["pool"] = self.pool_size
        splits["train"]["pool_positive_rate"] = self.pool_positive_rate
        return {
            "kind": "ohlc", "source": s.source, "target": s.name, "bars": len(s),
            "span": [s.date(0), s.date(len(s) - 1)], "window": spec.window, "horizon": spec.horizon,
            "median_lookback": spec.median_lookback, "embargo": self.plan.embargo, "fold": self.plan.fold,
            "folds": self.plan.folds, "train_cut_date": s.date(self.plan.last_train_bar()),
            "label": f"log range of the next {spec.horizon} bars > median of the {spec.median_lookback} trailing "
                     f"{spec.horizon}-bar ranges",
            "features": [f"log({f}/prev_close)" for f in FEATURE_NAMES], "standardisation": self.stats.to_json(),
            "splits": splits,
        }


def stratified_draw(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` indices of ``y`` with each class in proportion (largest remainders), sorted."""
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * k / counts.sum()
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take))[: k - take.sum()]:
        take[i] += 1
    picked = [rng.choice(np.flatnonzero(y == c), size=t, replace=False) for c, t in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def build_dataset(series: OhlcSeries, opts: OhlcOptions, *, val_fraction: float, folds: int = 1, fold: int = 0,
                  seed: int = 0, source: str = "data") -> OhlcDataset:
    spec = opts.spec
    plan = plan_splits(len(series), spec, val_fraction=val_fraction, test_fraction=opts.test_fraction, folds=folds,
                       fold=fold, embargo=opts.embargo, source=source)
    feats = bar_features(series)
    # statistics from the bars the training windows read, nothing later
    stats = FeatureStats.fit(series, feats, plan.train[0] - spec.window + 1, plan.train[1])
    std = stats.apply(feats)
    pool = np.arange(plan.train[0], plan.train[1] + 1)
    pool_y = range_expansion_labels(series, pool, spec)
    if opts.label_budget == "all":
        train_ends = pool
    else:
        budget = int(opts.label_budget)
        if budget > len(pool):
            raise DataError(f"{series.source}: label_budget {budget} exceeds the {len(pool)} training windows "
                            f"of fold {fold}")
        rng = np.random.default_rng(seed if opts.label_seed is None else opts.label_seed)
        train_ends = pool[stratified_draw(pool_y, budget, rng)]
    ends = {
        "train": train_ends,
        "val": np.arange(plan.val[0], plan.val[1] + 1, opts.eval_stride),
        "test": np.arange(plan.test[0], plan.test[1] + 1, opts.eval_stride),
    }
    x = {k: make_windows(std, e, spec.window) for k, e in ends.items()}
    y = {k: range_expansion_labels(series, e, spec) for k, e in ends.items()}
    for k, v in y.items():
        if len(np.unique(v)) < 2:
            raise DataError(f"{series.source}: the {k} split has only class {int(v[0])}; the label is degenerate here")
    return OhlcDataset(series=series, plan=plan, stats=stats, ends=ends, x=x, y=y, pool_size=len(pool),
                       pool_positive_rate=float(pool_y.mean()))


def target_series(opts: OhlcOptions, path: Path | None, base_dir: Path | None) -> OhlcSeries:
    """``path`` (the resolved ``data.path``) when set, else ``options.target`` (a bundled name or a path)."""
    if path is not None:
        return read_ohlc(path)
    return read_ohlc(resolve_series(opts.target, base_dir), name=opts.target if opts.target in bundled_names() else None)


def pretrain_cut_date(series: OhlcSeries, opts: OhlcOptions, *, val_fraction: float, folds: int = 1) -> str:
    """The calendar date pretraining data must end by: the earliest fold's last training bar.

    With several folds the encoder is shared by all of them, so it may only see what the fold with the
    shortest training period may see.
    """
    plan = plan_splits(len(series), opts.spec, val_fraction=val_fraction, test_fraction=opts.test_fraction,
                       folds=folds, fold=folds - 1, embargo=opts.embargo)
    return series.date(plan.last_train_bar())
