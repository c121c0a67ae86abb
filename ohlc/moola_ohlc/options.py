"""The OHLC package's option classes: light (no torch), so registering the plugin imports nothing heavy."""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np

from moola_engine.config import FieldValueError, converter, fraction, non_negative, positive

DEFAULT_TARGET = "SPX"
DEFAULT_PRETRAIN = ("NASDAQ_COMPOSITE", "AAPL", "IBM", "MSFT", "GOOG")


@attrs.frozen(kw_only=True)
class WindowSpec:
    """Window length, label horizon and the trailing-median lookback: which bars a window touches."""

    window: int = 64
    horizon: int = 5
    median_lookback: int = 60

    @property
    def lookback(self) -> int:
        """Bars before the window's end that its inputs or its label's median read."""
        return max(self.window, self.median_lookback + self.horizon - 2)

    @property
    def min_embargo(self) -> int:
        """Smallest gap between the last end of one split and the first end of the next (disjoint footprints)."""
        return self.lookback + self.horizon + 1

    def footprint(self, end: int | np.ndarray) -> tuple[Any, Any]:
        """First and last bar (inclusive) a window ending at ``end`` touches, its label included."""
        return end - self.lookback, end + self.horizon

    def valid_ends(self, n: int) -> tuple[int, int]:
        """First and last window end (inclusive) a series of ``n`` bars allows."""
        return self.lookback, n - 1 - self.horizon


def _label_budget(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not (value == "all" or (isinstance(value, int) and value >= 2)):
        raise FieldValueError(attr.name, f"expected an integer >= 2 or \"all\", got {value!r}")


@attrs.frozen(kw_only=True)
class OhlcOptions:
    """``[data.options]`` for ``kind = "ohlc"``."""

    target: str = DEFAULT_TARGET
    """Bundled instrument name or CSV/Parquet path (``data.path``, when set, wins)."""
    pretrain: list[str] = attrs.Factory(lambda: list(DEFAULT_PRETRAIN))
    """Instruments for ``moola-engine pretrain`` besides the target's own pre-cut history."""
    window: int = attrs.field(default=64, validator=positive)
    horizon: int = attrs.field(default=5, validator=positive)
    median_lookback: int = attrs.field(default=60, validator=positive)
    test_fraction: float = attrs.field(default=0.15, validator=fraction)
    embargo: int | None = attrs.field(default=None, validator=positive)
    """Bars between the last window end of a split and the first of the next (default: the minimum)."""
    label_budget: int | str = attrs.field(default=89, validator=_label_budget)
    """Labeled training windows drawn (stratified) from the training period, or ``"all"``."""
    label_seed: int | None = None
    """Seed of the labeled draw (default: the run's seed, so each seed sees another draw)."""
    eval_stride: int = attrs.field(default=2, validator=positive)
    """Stride between validation/test window ends: neighbours share all but one input bar and most label bars,
    so every second window loses little and halves the evaluation cost."""

    @property
    def spec(self) -> WindowSpec:
        return WindowSpec(window=self.window, horizon=self.horizon, median_lookback=self.median_lookback)


def _structure_budget(value: Any, _type: Any) -> int | str:
    if isinstance(value, (int, str)):
        return value
    raise TypeError(f"expected an integer or \"all\", got {type(value).__name__}")


converter.register_structure_hook(int | str, _structure_budget)


@attrs.frozen(kw_only=True)
class PretrainConfig:
    """Parameters of the ``ohlc-multitask`` pretraining objective (defaults: about 2-3 minutes on two CPU cores)."""

    epochs: int = attrs.field(default=4, validator=positive)
    batch_size: int = attrs.field(default=128, validator=positive)
    lr: float = attrs.field(default=2e-3, validator=positive)
    weight_decay: float = attrs.field(default=1e-4, validator=non_negative)
    samples_per_epoch: int | None = attrs.field(default=8192, validator=positive)
    """Windows drawn (without replacement) per epoch; None: all of them."""
    stride: int = attrs.field(default=1, validator=positive)
    holdout_fraction: float = attrs.field(default=0.1, validator=fraction)
    """The last part (in time) of each instrument's windows, after an embargo: per-task held-out metrics."""
    mask_fraction: float = attrs.field(default=0.15, validator=fraction)
    eval_windows: int = attrs.field(default=1024, validator=positive)
    """Windows (a fixed sample) on which training and held-out metrics are measured each epoch."""
    task_weights: dict[str, float] = attrs.Factory(lambda: {"expansion": 1.0, "swing": 1.0, "candle": 1.0,
                                                            "masked": 1.0})
    hidden_size: int = attrs.field(default=128, validator=positive)
    num_layers: int = attrs.field(default=2, validator=positive)
    grad_clip: float = attrs.field(default=1.0, validator=positive)
    seed: int = 0
    device: str = "auto"
    threads: int | None = attrs.field(default=1, validator=positive)
    """torch CPU threads (None: torch's default).  One: a small-batch LSTM gains little from a second core and
    slows down many times over when the cores are shared with other work."""



