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

from .config import DataConfig
from .errors import DataError


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
    if "x_val" in arrays:
        val = TensorData(x=_as_float(arrays["x_val"]), y=torch.as_tensor(arrays["y_val"].astype(np.int64)))
        train = TensorData(x=_as_float(x), y=yt)
    else:
        tr, va = stratified_split(y, cfg.val_fraction, seed)
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
    tr, va = stratified_split(y, cfg.val_fraction, seed)
    full = TensorData(x=_as_float(x), y=torch.as_tensor(y.astype(np.int64)))
    return Splits(train=full.subset(tr), val=full.subset(va), meta={"source": str(path)})


LOADERS: dict[str, Callable[[Path, DataConfig, int], Splits]] = {
    "npz": load_npz,
    "table": load_series_table,
}


def build_splits(cfg: DataConfig, *, base_dir: Path, seed: int) -> Splits:
    """Build the train/val(/test) splits the ``[data]`` table describes."""
    if cfg.kind not in LOADERS:
        raise DataError(f"data.kind: unknown kind {cfg.kind!r}; expected one of {', '.join(sorted(LOADERS))}")
    if cfg.path is None and cfg.kind in {"npz", "table"}:
        raise DataError(f"data.path: required for data.kind = {cfg.kind!r}")
    path = Path(cfg.path) if cfg.path is not None else base_dir
    if not path.is_absolute():
        path = base_dir / path
    return LOADERS[cfg.kind](path, cfg, seed)
