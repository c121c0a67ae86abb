"""In-memory datasets and the generic loaders (``.npz`` arrays, one-series-per-row CSV/TSV).

Data for the small-data regime this engine targets fits in memory: a
:class:`TensorData` is moved to the training device once, and batches are
drawn by index (no DataLoader, no per-step host-device copy).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from moola_engine.config import DataConfig
from moola_engine.errors import ConfigError, DataError


@attrs.frozen(kw_only=True)
class TensorData:
    """Inputs ``x`` (N, T, C) and targets ``y`` (N,) or (N, K), on one device."""

    x: torch.Tensor
    y: torch.Tensor

    def __attrs_post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(f"x has {self.x.shape[0]} rows but y has {self.y.shape[0]}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device | str) -> TensorData:
        return TensorData(x=self.x.to(device, non_blocking=True), y=self.y.to(device, non_blocking=True))

    def subset(self, index: torch.Tensor | np.ndarray | list[int]) -> TensorData:
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long, device=self.x.device)
        return TensorData(x=self.x[idx], y=self.y[idx])


@attrs.frozen(kw_only=True)
class Splits:
    train: TensorData
    val: TensorData
    test: TensorData | None = None
    meta: dict[str, Any] = attrs.Factory(dict)


def stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with each class split in the same proportion; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        k = max(1, round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        val.extend(idx[:k].tolist())
        train.extend(idx[k:].tolist())
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def stratified_folds(y: np.ndarray, folds: int, fold: int, val_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, val, test) of repeated stratified K-fold: fold ``fold`` of ``folds`` is the test set.

    Each class is shuffled with ``seed`` (one repeat per seed; every strategy of a seed sees the same
    partition, so runs pair) and dealt round-robin into ``folds`` parts; the validation set (early
    stopping, best epoch) is a stratified ``val_fraction`` of the remaining rows.
    """
    if not 0 <= fold < folds:
        raise DataError(f"data.fold = {fold}: expected 0 <= fold < data.folds = {folds}")
    rng = np.random.default_rng(seed)
    part = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        part[idx] = (np.arange(len(idx)) + int(rng.integers(folds))) % folds
    test = np.flatnonzero(part == fold)
    rest = np.flatnonzero(part != fold)
    if len(test) == 0 or len(rest) < 2:
        raise DataError(f"data.folds = {folds}: {len(y)} rows are too few for {folds} folds")
    tr, va = stratified_split(y[rest], val_fraction, seed + 7919 * (fold + 1))
    return rest[tr], rest[va], test


def stratified_kfold(y: np.ndarray, folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) of fold ``fold`` of a stratified ``folds``-fold partition, shuffled by ``seed``.

    Each class is shuffled and dealt round-robin into the folds (starting where the previous class stopped), so
    every fold holds each class in about the same proportion; another seed gives another partition (repeated
    stratified k-fold).
    """
    if not 0 <= fold < folds:
        raise DataError(f"data.fold: expected 0 <= fold < folds = {folds}, got {fold}")
    rng = np.random.default_rng(seed)
    assign = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        assign[idx] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)
    if np.bincount(assign, minlength=folds).min() == 0:
        raise DataError(f"data.folds: {len(y)} samples are too few for {folds} folds")
    return np.flatnonzero(assign != fold), np.flatnonzero(assign == fold)


def holdout_split(y: np.ndarray, cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``data.folds > 1``: fold ``data.fold`` of a stratified k-fold; else a stratified ``val_fraction`` split."""
    if cfg.folds > 1:
        return stratified_kfold(y, cfg.folds, cfg.fold, seed)
    return stratified_split(y, cfg.val_fraction, seed)


def _as_float(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)


def load_npz(path: Path, cfg: DataConfig, seed: int) -> Splits:
    """``.npz`` with ``x`` (N, T, C) and ``y`` (N,); optional ``x_val``/``y_val``, ``x_test``/``y_test``."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}  # read now: a pickled object array is refused here
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        why = ("an array holds Python objects, which would need unpickling (refused)"
               if "allow_pickle" in str(exc) else str(exc))
        raise DataError(f"{path}: not a readable .npz file ({why})") from exc
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path}: missing array {key!r} (found: {', '.join(arrays) or 'none'})")
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3:
        raise DataError(f"{path}: array 'x' must have shape (N, T, C) or (N, T), got {x.shape}")
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise DataError(f"{path}: array 'x' has a non-finite value at index {tuple(int(i) for i in bad)}")
    yt = torch.as_tensor(y.astype(np.int64))
    if "x_val" in arrays and cfg.folds > 1:
        raise DataError(f"{path}: data.folds = {cfg.folds} needs the validation rows to rotate, but the file fixes "
                        "them ('x_val'); drop 'x_val'/'y_val' or set data.folds = 1")
    if "x_val" in arrays:
        val = TensorData(x=_as_float(arrays["x_val"]), y=torch.as_tensor(arrays["y_val"].astype(np.int64)))
        train = TensorData(x=_as_float(x), y=yt)
    elif cfg.folds > 1 and "x_test" not in arrays:  # no test set given: the held-out fold is the test set
        tr, va, te = stratified_folds(y, cfg.folds, cfg.fold, cfg.val_fraction, seed)
        full = TensorData(x=_as_float(x), y=yt)
        meta = {"source": str(path), "folds": cfg.folds, "fold": cfg.fold}
        return Splits(train=full.subset(tr), val=full.subset(va), test=full.subset(te), meta=meta)
    else:
        tr, va = holdout_split(y, cfg, seed)
        full = TensorData(x=_as_float(x), y=yt)
        train, val = full.subset(tr), full.subset(va)
    test = None
    if "x_test" in arrays:
        test = TensorData(x=_as_float(arrays["x_test"]), y=torch.as_tensor(arrays["y_test"].astype(np.int64)))
    return Splits(train=train, val=val, test=test, meta={"source": str(path)})


def load_series_table(path: Path, cfg: DataConfig, seed: int) -> Splits:
    """CSV/TSV, one series per row, label first (the UCR layout); one channel."""
    delim = "\t" if path.suffix.lower() in {".tsv", ".tab"} else ","
    rows: list[list[float]] = []
    labels: list[int] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable text table ({exc})") from exc
    width = None
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        cells = line.split(delim)
        if width is None:
            width = len(cells)
        elif len(cells) != width:
            raise DataError(f"{path}: row {i} has {len(cells)} columns, expected {width}")
        try:
            labels.append(int(float(cells[0])))
        except ValueError:
            raise DataError(f"{path}: row {i}, column 1 (label): expected an integer, got {cells[0]!r}") from None
        values = []
        for j, c in enumerate(cells[1:], start=2):
            try:
                v = float(c)
            except ValueError:
                raise DataError(f"{path}: row {i}, column {j}: expected a number, got {c!r}") from None
            if not np.isfinite(v):
                raise DataError(f"{path}: row {i}, column {j}: non-finite value {c!r}")
            values.append(v)
        rows.append(values)
    if not rows:
        raise DataError(f"{path}: no rows")
    y = np.array(labels)
    _, y = np.unique(y, return_inverse=True)
    x = np.array(rows, dtype=np.float32)[:, :, None]
    tr, va = holdout_split(y, cfg, seed)
    full = TensorData(x=_as_float(x), y=torch.as_tensor(y.astype(np.int64)))
    return Splits(train=full.subset(tr), val=full.subset(va), meta={"source": str(path)})


def load_ohlc(path: Path, cfg: DataConfig, seed: int, source: str = "config") -> Splits:
    """Daily OHLC windows and the range-expansion label (:mod:`moola_ohlc.series`); ``data.path`` optional."""
    from moola_ohlc.series import build_dataset, parse_options, target_series

    opts = parse_options(cfg.options, source)
    # build_splits resolved data.path against the config's folder; without it, ``path`` is that folder
    series = target_series(opts, path if cfg.path is not None else None, path if cfg.path is None else None)
    ds = build_dataset(series, opts, val_fraction=cfg.val_fraction, folds=cfg.folds, fold=cfg.fold, seed=seed,
                       source=source)
    parts = {k: TensorData(x=_as_float(ds.x[k]), y=torch.as_tensor(ds.y[k])) for k in ("train", "val", "test")}
    return Splits(train=parts["train"], val=parts["val"], test=parts["test"], meta=ds.meta())


LOADERS: dict[str, Callable[..., Splits]] = {
    "npz": load_npz,
    "table": load_series_table,
    "ohlc": load_ohlc,
}
"""``data.kind`` -> loader ``(path, cfg, seed, source=) -> Splits``; ``source`` names the config file in errors."""


def build_splits(cfg: DataConfig, *, base_dir: Path, seed: int, source: str = "config") -> Splits:
    """Build the train/val(/test) splits the ``[data]`` table describes."""
    if cfg.kind not in LOADERS:
        raise DataError(f"data.kind: unknown kind {cfg.kind!r}; expected one of {', '.join(sorted(LOADERS))}")
    if cfg.path is None and cfg.kind in {"npz", "table"}:
        raise DataError(f"data.path: required for data.kind = {cfg.kind!r}")
    path = Path(cfg.path) if cfg.path is not None else base_dir
    if not path.is_absolute():
        path = base_dir / path
    loader = LOADERS[cfg.kind]
    if cfg.kind in {"npz", "table"}:
        if cfg.options:
            raise ConfigError(source, f"extra fields found ({', '.join(cfg.options)}) @ $.data.options "
                                      f"(data.kind = {cfg.kind!r} takes no options)")
        return loader(path, cfg, seed)
    return loader(path, cfg, seed, source=source)
