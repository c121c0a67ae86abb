"""Datasets: in-memory tensors or torch Datasets, leakage-free splits, and the generic data kinds.

Data for the small-data regime this engine targets usually fits in memory: a
:class:`TensorData` is moved to the training device once, and batches are drawn
by index (no DataLoader, no per-step host-device copy, no host sync).  Larger or
streaming data comes as a torch ``Dataset``/``IterableDataset`` in a
:class:`LoaderData`, batched by a ``DataLoader`` (workers, pinned memory); its
batches may be tensors, tuples or dicts (multi-input models).

A data kind is a loader registered with ``register_datasets(register)`` (or named
by an import path): ``loader(request: DataRequest) -> Splits``.  The core's kinds
are ``npz`` and ``table`` (CSV/TSV, gzip'd or not, in the UCR layout: label
first, then the series).
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from moola_engine.config import DataConfig, non_negative
from moola_engine.core.hookspecs import hookimpl
from moola_engine.errors import ConfigError, DataError


@attrs.frozen(kw_only=True)
class TensorData:
    """Inputs ``x`` (N, ...) and targets ``y`` (N,) or (N, K), on one device."""

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
class LoaderOptions:
    """``[data.loader]``: how a :class:`LoaderData`'s DataLoader runs."""

    num_workers: int = attrs.field(default=0, validator=non_negative)
    pin_memory: bool = True
    """Pin host batches (only when training on CUDA) so the copy to the device does not block."""
    persistent_workers: bool = True
    """Keep worker processes between epochs (only with ``num_workers > 0``)."""


@attrs.frozen(kw_only=True)
class LoaderData:
    """A torch ``Dataset`` or ``IterableDataset`` batched by a ``DataLoader``.

    Each item is ``(inputs, target)``; ``inputs`` is a tensor, a tuple of tensors
    (``model(*inputs)``) or a dict of tensors (``model(**inputs)``).
    """

    dataset: Any
    options: LoaderOptions = attrs.Factory(LoaderOptions)

    @property
    def iterable(self) -> bool:
        return isinstance(self.dataset, torch.utils.data.IterableDataset)

    def __len__(self) -> int:
        try:
            return len(self.dataset)
        except TypeError:
            return 0  # an IterableDataset without __len__: counted while iterating

    def loader(self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None, device: torch.device,
               drop_last: bool = False) -> torch.utils.data.DataLoader[Any]:
        opts = self.options
        workers = opts.num_workers
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, shuffle=shuffle and not self.iterable, generator=generator,
            num_workers=workers, pin_memory=opts.pin_memory and device.type == "cuda",
            persistent_workers=opts.persistent_workers and workers > 0, drop_last=drop_last,
        )

    def to(self, device: torch.device | str) -> LoaderData:
        return self  # batches move to the device one at a time

    def targets(self) -> torch.Tensor:
        """Every target, in dataset order (for predictions.npz and paired statistics)."""
        ys = [torch.as_tensor(item[1]) for item in _iter_items(self.dataset)]
        return torch.stack(ys) if ys else torch.empty(0)


def _iter_items(dataset: Any) -> Any:
    if isinstance(dataset, torch.utils.data.IterableDataset):
        yield from dataset
    else:
        for i in range(len(dataset)):
            yield dataset[i]


Data = TensorData | LoaderData


def has_rows(data: Data | None) -> bool:
    """True unless ``data`` is absent or known to be empty (an IterableDataset without a length has rows)."""
    if data is None:
        return False
    if isinstance(data, LoaderData) and data.iterable:
        try:
            return len(data.dataset) > 0
        except TypeError:
            return True
    return len(data) > 0


@attrs.frozen(kw_only=True)
class Splits:
    train: Data
    val: Data | None
    test: Data | None = None
    meta: dict[str, Any] = attrs.Factory(dict)


@attrs.frozen(kw_only=True)
class DataRequest:
    """What a data kind's loader is asked for: the ``[data]`` table, its structured options, and context."""

    cfg: DataConfig
    options: Any
    """``data.options`` structured into the kind's registered params class (a dict when it registered none)."""
    base_dir: Path
    """The experiment file's folder: relative paths in ``[data]`` resolve against it."""
    seed: int
    source: str
    """The experiment file, for error messages."""
    task: Any
    """The run's task (:class:`moola_engine.core.tasks.Task`): converts labels with ``task.targets(y, where=...)``."""

    def path(self, key: str = "path", *, required: bool = True) -> Path | None:
        """``data.<key>`` resolved against the experiment file's folder."""
        value = getattr(self.cfg, key)
        if value is None:
            if required:
                raise ConfigError(self.source, f"required field missing @ $.data.{key} (data.kind = {self.cfg.kind!r})")
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def stratify(self, y: np.ndarray) -> np.ndarray | None:
        """Labels to stratify splits by (class tasks), else None."""
        return y if getattr(self.task, "classes", True) and np.asarray(y).ndim == 1 else None


def _strata(y: np.ndarray | None, n: int) -> list[np.ndarray]:
    """Row indices per class (one stratum of every row when ``y`` is None: unstratified)."""
    if y is None:
        return [np.arange(n)]
    return [np.flatnonzero(y == c) for c in np.unique(y)]


def stratified_split(y: np.ndarray | None, val_fraction: float, seed: int,
                     n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with each class split in the same proportion; deterministic in ``seed``.

    ``y = None`` (regression, multi-label) splits the ``n`` rows without strata."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for idx in _strata(y, len(y) if y is not None else int(n or 0)):
        rng.shuffle(idx)
        k = max(1, round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        val.extend(idx[:k].tolist())
        train.extend(idx[k:].tolist())
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def fold_assignment(y: np.ndarray | None, folds: int, seed: int, n: int | None = None) -> np.ndarray:
    """The fold of every row: each class shuffled with ``seed`` and dealt round-robin into ``folds`` parts
    from a random start, so every fold holds each class in about the same proportion (repeated stratified
    K-fold: another seed, another partition; every strategy of a seed sees the same one, so runs pair).
    The one k-fold rule of the engine."""
    size = len(y) if y is not None else int(n or 0)
    rng = np.random.default_rng(seed)
    part = np.empty(size, dtype=np.int64)
    for idx in _strata(y, size):
        rng.shuffle(idx)
        part[idx] = (np.arange(len(idx)) + int(rng.integers(folds))) % folds
    if size < folds or np.bincount(part, minlength=folds).min() == 0:
        raise DataError(f"data.folds = {folds}: {size} rows are too few for {folds} folds")
    return part


def _check_fold(folds: int, fold: int) -> None:
    if not 0 <= fold < folds:
        raise DataError(f"data.fold = {fold}: expected 0 <= fold < data.folds = {folds}")


def stratified_folds(y: np.ndarray | None, folds: int, fold: int, val_fraction: float,
                     seed: int, n: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, val, test): fold ``fold`` of :func:`fold_assignment` is the test set, and the
    validation set (early stopping, best epoch) a stratified ``val_fraction`` of the remaining rows."""
    _check_fold(folds, fold)
    part = fold_assignment(y, folds, seed, n)
    test = np.flatnonzero(part == fold)
    rest = np.flatnonzero(part != fold)
    if len(rest) < 2:
        raise DataError(f"data.folds = {folds}: {len(part)} rows are too few for {folds} folds")
    tr, va = stratified_split(y[rest] if y is not None else None, val_fraction, seed + 7919 * (fold + 1), len(rest))
    return rest[tr], rest[va], test


def stratified_kfold(y: np.ndarray | None, folds: int, fold: int, seed: int,
                     n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): fold ``fold`` of :func:`fold_assignment` is the validation set (a separate test
    file is the test set)."""
    _check_fold(folds, fold)
    part = fold_assignment(y, folds, seed, n)
    return np.flatnonzero(part != fold), np.flatnonzero(part == fold)


def holdout_split(y: np.ndarray | None, cfg: DataConfig, seed: int, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``data.folds > 1``: fold ``data.fold`` of the k-fold partition; else a stratified ``val_fraction`` split."""
    if cfg.folds > 1:
        return stratified_kfold(y, cfg.folds, cfg.fold, seed, n)
    return stratified_split(y, cfg.val_fraction, seed, n)


def label_budget(y: np.ndarray | None, k: int, seed: int, n: int | None = None) -> np.ndarray:
    """Indices of ``k`` training rows drawn with ``seed``: stratified (each class in proportion, at least one
    row per class) for class labels, uniform otherwise; sorted."""
    size = len(y) if y is not None else int(n or 0)
    if k >= size:
        return np.arange(size)
    rng = np.random.default_rng(seed + 104729)
    if y is None:
        return np.sort(rng.choice(size, size=k, replace=False))
    strata = _strata(y, size)
    if k < len(strata):
        raise DataError(f"data.labels = {k} is fewer than the {len(strata)} classes of the training rows: a "
                        "stratified draw needs one row per class at least")
    quota = [max(1, int(np.floor(k * len(s) / size))) for s in strata]
    while sum(quota) < k:  # hand out the remainder to the largest fractional parts, in class order
        frac = [k * len(s) / size - q for s, q in zip(strata, quota)]
        i = int(np.argmax([f if q < len(s) else -1 for f, q, s in zip(frac, quota, strata)]))
        quota[i] += 1
    while sum(quota) > k:
        i = int(np.argmax(quota))
        quota[i] -= 1
    picked = [rng.choice(s, size=q, replace=False) for s, q in zip(strata, quota)]
    return np.sort(np.concatenate(picked))


def _as_float(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)


def _finite(x: np.ndarray, where: str, name: str) -> None:
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise DataError(f"{where}: array {name!r} has a non-finite value at index {tuple(int(i) for i in bad)}")


def _split_rows(x: np.ndarray, y: np.ndarray, req: DataRequest, *, has_test: bool, where: str) -> Splits:
    """Train/val(/test) from one labeled array: the k-fold's held-out fold is the test set when no test
    file is given; otherwise a validation split (k-fold fold or ``val_fraction``)."""
    cfg = req.cfg
    strat = req.stratify(y)
    full = TensorData(x=_as_float(x), y=req.task.targets(y, where=where))
    meta: dict[str, Any] = {"source": where}
    if cfg.folds > 1 and not has_test:
        tr, va, te = stratified_folds(strat, cfg.folds, cfg.fold, cfg.val_fraction, req.seed, len(y))
        meta.update(folds=cfg.folds, fold=cfg.fold)
        return Splits(train=full.subset(tr), val=full.subset(va), test=full.subset(te), meta=meta)
    tr, va = holdout_split(strat, cfg, req.seed, len(y))
    return Splits(train=full.subset(tr), val=full.subset(va), meta=meta)


# --------------------------------------------------------------------------- npz


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read now (a pickled object array is refused here)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError) as exc:
        why = ("an array holds Python objects, which would need unpickling (refused)"
               if "allow_pickle" in str(exc) else str(exc))
        raise DataError(f"{path}: not a readable .npz file ({why})") from exc


def _npz_xy(arrays: dict[str, np.ndarray], path: Path, xk: str = "x", yk: str = "y") -> tuple[np.ndarray, np.ndarray]:
    for key in (xk, yk):
        if key not in arrays:
            raise DataError(f"{path}: missing array {key!r} (found: {', '.join(arrays) or 'none'})")
    x, y = arrays[xk], arrays[yk]
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim < 2:
        raise DataError(f"{path}: array {xk!r} must have shape (N, T, C), (N, T) or (N, ...), got {x.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{path}: array {xk!r} has {x.shape[0]} rows but {yk!r} has {y.shape[0]}")
    _finite(x, str(path), xk)
    return x, y


def load_npz(req: DataRequest) -> Splits:
    """``.npz`` with ``x`` (N, T, C) and ``y``; optional ``x_val``/``y_val`` and ``x_test``/``y_test``, or a
    separate ``data.test_path`` npz holding ``x``/``y``."""
    path = req.path()
    assert path is not None
    arrays = read_npz(path)
    x, y = _npz_xy(arrays, path)
    test_path = req.path("test_path", required=False)
    test: TensorData | None = None
    if test_path is not None:
        if "x_test" in arrays:
            raise DataError(f"{path}: holds 'x_test' and data.test_path = {req.cfg.test_path!r} names another "
                            "test set; keep one")
        tx, ty = _npz_xy(read_npz(test_path), test_path)
        test = TensorData(x=_as_float(tx), y=req.task.targets(ty, where=str(test_path)))
    elif "x_test" in arrays:
        tx, ty = _npz_xy(arrays, path, "x_test", "y_test")
        test = TensorData(x=_as_float(tx), y=req.task.targets(ty, where=str(path)))
    if "x_val" in arrays:
        if req.cfg.folds > 1:
            raise DataError(f"{path}: data.folds = {req.cfg.folds} needs the validation rows to rotate, but the file "
                            "fixes them ('x_val'); drop 'x_val'/'y_val' or set data.folds = 1")
        vx, vy = _npz_xy(arrays, path, "x_val", "y_val")
        val = TensorData(x=_as_float(vx), y=req.task.targets(vy, where=str(path)))
        train = TensorData(x=_as_float(x), y=req.task.targets(y, where=str(path)))
        return Splits(train=train, val=val, test=test, meta={"source": str(path)})
    splits = _split_rows(x, y, req, has_test=test is not None, where=str(path))
    return splits if test is None else attrs.evolve(splits, test=test)


# --------------------------------------------------------------------------- table (UCR layout)


@attrs.frozen(kw_only=True)
class TableOptions:
    """``data.options`` of ``kind = "table"``."""

    delimiter: str | None = None
    """``","``, ``"\\t"``, ``" "`` (any run of whitespace); default: guessed from the first line."""
    label_column: int = attrs.field(default=0, validator=non_negative)
    """The column holding the label (0: the UCR layout, label first); every other column is one time step."""


def _read_lines(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from exc
    if raw[:2] == b"\x1f\x8b":  # gzip, whatever the suffix
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: a truncated or corrupt gzip file ({exc})") from exc
    try:
        return io.StringIO(raw.decode("utf-8")).read().splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text table ({exc})") from exc


def _guess_delimiter(line: str) -> str:
    for d in ("\t", ","):
        if d in line:
            return d
    return " "


def read_table(path: Path, opts: TableOptions) -> tuple[np.ndarray, np.ndarray]:
    """(values (N, T), labels (N,) as read) of a one-series-per-row table."""
    lines = [ln for ln in _read_lines(path) if ln.strip()]
    if not lines:
        raise DataError(f"{path}: no rows")
    delim = opts.delimiter or _guess_delimiter(lines[0])
    rows: list[list[float]] = []
    labels: list[str] = []
    width = None
    for i, line in enumerate(lines, start=1):
        cells = line.split() if delim == " " else line.split(delim)
        if width is None:
            width = len(cells)
            if width < 2 or opts.label_column >= width:
                raise DataError(f"{path}: row 1 has {width} column(s); expected a label column "
                                f"(data.options.label_column = {opts.label_column}) and at least one value")
        elif len(cells) != width:
            raise DataError(f"{path}: row {i} has {len(cells)} columns, expected {width}")
        labels.append(cells[opts.label_column].strip())
        values = []
        for j, c in enumerate(cells, start=1):
            if j - 1 == opts.label_column:
                continue
            try:
                v = float(c)
            except ValueError:
                raise DataError(f"{path}: row {i}, column {j}: expected a number, got {c!r}") from None
            if not np.isfinite(v):
                raise DataError(f"{path}: row {i}, column {j}: non-finite value {c!r}")
            values.append(v)
        rows.append(values)
    return np.array(rows, dtype=np.float32), np.array(labels)


def _table_labels(raw: np.ndarray, task: Any, path: Path, classes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Class tasks: labels as written (``1``, ``-1``, ``2.0``, ``abnormal``) mapped to 0..C-1 in sorted order of
    the training file's classes; other tasks: numbers."""
    if getattr(task, "classes", True):
        if classes is None:
            classes = np.unique(raw)
        known = np.isin(raw, classes)
        if not known.all():
            bad = str(raw[~known][0])
            raise DataError(f"{path}: label {bad!r} does not occur in the training file "
                            f"(classes: {', '.join(map(str, classes))})")
        return np.searchsorted(classes, raw), classes
    try:
        return raw.astype(np.float64), None
    except ValueError as exc:
        raise DataError(f"{path}: labels must be numbers for task {getattr(task, 'name', '?')!r} ({exc})") from None


def load_table(req: DataRequest) -> Splits:
    """CSV/TSV (gzip'd or not), one series per row, label first (the UCR layout), one channel; an optional
    ``data.test_path`` in the same layout is the held-out test set."""
    opts: TableOptions = req.options
    path = req.path()
    assert path is not None
    values, raw = read_table(path, opts)
    y, classes = _table_labels(raw, req.task, path, None)
    x = values[:, :, None]
    test_path = req.path("test_path", required=False)
    test = None
    if test_path is not None:
        tvalues, traw = read_table(test_path, opts)
        if tvalues.shape[1] != values.shape[1]:
            raise DataError(f"{test_path}: rows have {tvalues.shape[1]} values, but {path} has {values.shape[1]}")
        ty, _ = _table_labels(traw, req.task, test_path, classes)
        test = TensorData(x=_as_float(tvalues[:, :, None]), y=req.task.targets(ty, where=str(test_path)))
    splits = _split_rows(x, y, req, has_test=test is not None, where=str(path))
    meta = {**splits.meta, **({"classes": [str(c) for c in classes]} if classes is not None else {})}
    return attrs.evolve(splits, test=test if test is not None else splits.test, meta=meta)


@hookimpl
def register_datasets(register: Callable[..., None]) -> None:
    register("npz", load_npz, description="arrays x (N, T, C) and y in an .npz file (x_val/x_test or test_path optional)")
    register("table", load_table, params=TableOptions,
             description="CSV/TSV, gzip'd or not, one series per row, label first (UCR); test_path optional")


# --------------------------------------------------------------------------- building a run's splits


def apply_label_budget(splits: Splits, k: int | None, req: DataRequest) -> Splits:
    """Keep ``k`` labeled training rows (``data.labels``), drawn per seed; validation and test stay whole."""
    if k is None:
        return splits
    train = splits.train
    if not isinstance(train, TensorData):
        raise ConfigError(req.source, "data.labels needs in-memory data (a Dataset-backed kind draws its own budget) "
                                      "@ $.data.labels")
    if k > len(train):  # a budget larger than the rows would silently train on fewer labels than asked for
        raise DataError(f"data.labels = {k}, but the training split of {req.source} holds {len(train)} rows "
                        f"(data.kind = {req.cfg.kind!r}; a kind with its own budget option, such as the OHLC kind's "
                        "label_budget, draws first): lower data.labels or raise the kind's own budget")
    y = train.y.cpu().numpy()
    idx = label_budget(req.stratify(y), k, req.seed, len(y))
    meta = {**splits.meta, "label_budget": k, "train_rows_before_budget": len(train)}
    return attrs.evolve(splits, train=train.subset(idx), meta=meta)


def build_splits(cfg: DataConfig, *, base_dir: Path, seed: int, source: str = "config", task: Any = None,
                 datasets: Any = None) -> Splits:
    """Build the train/val(/test) splits the ``[data]`` table describes, then apply ``data.labels``."""
    from moola_engine.config import structure
    from moola_engine.core.registry import resolve
    from moola_engine.core.tasks import Classification

    if datasets is None:
        from moola_engine.core.components import default_registries

        datasets = default_registries()["dataset"]
    comp = resolve(datasets, cfg.kind, source=source, key="$.data.kind", base_dir=base_dir)
    options: Any  # the kind's params class (any attrs class), or a plain dict when it registered none
    if comp.params is not None:
        options = structure(cfg.options, comp.params, source=source, path="$.data.options")
    elif cfg.options and comp.source != "import path":
        raise ConfigError(source, f"extra fields found ({', '.join(cfg.options)}) @ $.data.options "
                                  f"(data.kind = {cfg.kind!r} takes no options)")
    else:
        options = dict(cfg.options)
    req = DataRequest(cfg=cfg, options=options, base_dir=base_dir, seed=seed, source=source,
                      task=task if task is not None else Classification())
    splits = comp.factory(req)
    if not isinstance(splits, Splits):
        raise DataError(f"data.kind = {cfg.kind!r}: the loader returned a {type(splits).__name__}, expected "
                        "moola_engine.core.data.Splits")
    return apply_label_budget(splits, cfg.labels, req)
