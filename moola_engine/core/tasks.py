"""Tasks: what the labels are, the loss, the metrics, and which metric an experiment is judged by.

A task owns the label handling (dtype and shape of the targets, whether splits can
be stratified), the training loss and the validation/test metrics.  The built-in
tasks register through our own entry point like any plugin's::

    classification   binary or multi-class; outputs (N, C) logits, targets class indices (N,)
    multi-label      outputs (N, K) logits, targets 0/1 (N, K); loss BCE-with-logits
    regression       outputs (N,) or (N, K), float targets of the same shape; loss MSE

``[task] name = "classification"`` (the default) or an import path; a plugin
registers its own with ``register_tasks(register)``.  Every task returns host
floats from :meth:`Task.metrics`, always including ``loss``; ``primary`` names the
metric the ablation's statistics compare and ``higher_is_better`` its direction.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs
import numpy as np
import torch

from moola_engine.config import TaskConfig, structure
from moola_engine.core.hookspecs import hookimpl
from moola_engine.core.metrics import classification_metrics
from moola_engine.core.registry import Registry, resolve
from moola_engine.errors import ConfigError, DataError, PluginError


@runtime_checkable
class Task(Protocol):
    """The contract a task plugin's object satisfies (checked when the run is built)."""

    name: str
    primary: str
    """The metric (a key of :meth:`metrics`) the ablation compares arms by, e.g. ``accuracy`` or ``rmse``."""
    higher_is_better: bool
    classes: bool
    """True when targets are class indices: splits are stratified and the majority rate is a reference."""

    def targets(self, y: np.ndarray, *, where: str) -> torch.Tensor:
        """Targets as the loss expects them (dtype, shape); ``where`` names the file in errors."""
        ...

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss (a 0-dim tensor on the outputs' device)."""
        ...

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Host floats, ``loss`` included; at most one host read on a GPU."""
        ...


@attrs.frozen
class NoTaskParams:
    """The built-in tasks take no parameters."""


class BuiltinTask:
    """What the built-in tasks share: their :class:`Task` attributes, given as class keywords, and ``params``."""

    name: str
    primary: str
    higher_is_better: bool
    classes: bool

    def __init_subclass__(cls, **kwargs: Any) -> None:
        for key in ("name", "primary", "higher_is_better", "classes"):  # a subclass may keep its base's
            if key in kwargs:
                setattr(cls, key, kwargs.pop(key))
        super().__init_subclass__(**kwargs)

    def __init__(self, params: Any = None) -> None:
        self.params = params


class Classification(BuiltinTask, name="classification", primary="accuracy", higher_is_better=True, classes=True):
    """Binary or multi-class classification: cross-entropy on (N, C) logits; accuracy, balanced accuracy, AUC."""

    def targets(self, y: np.ndarray, *, where: str) -> torch.Tensor:
        y = np.asarray(y)
        if y.ndim != 1:
            raise DataError(f"{where}: task classification expects one class index per row, got labels of shape "
                            f"{y.shape} (use task \"multi-label\" for 0/1 columns)")
        if y.dtype.kind == "f":
            if not np.isfinite(y).all() or not np.all(y == np.round(y)):
                raise DataError(f"{where}: task classification expects integer class labels, got non-integer values "
                                f"(use task \"regression\" for real-valued targets)")
        elif y.dtype.kind not in "iub":
            raise DataError(f"{where}: task classification expects integer class labels, got dtype {y.dtype}")
        if y.size and y.min() < 0:
            raise DataError(f"{where}: class labels must be >= 0, got {int(y.min())}")
        return torch.as_tensor(y.astype(np.int64))

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(outputs, targets)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        return classification_metrics(outputs, targets)


class MultiLabel(BuiltinTask, name="multi-label", primary="micro_f1", higher_is_better=True, classes=False):
    """Multi-label classification: BCE-with-logits on (N, K) outputs; subset accuracy, label accuracy, micro F1."""

    def targets(self, y: np.ndarray, *, where: str) -> torch.Tensor:
        y = np.asarray(y)
        if y.ndim != 2 or not np.isin(y, (0, 1)).all():
            raise DataError(f"{where}: task multi-label expects 0/1 targets of shape (N, K), got shape {y.shape}")
        return torch.as_tensor(y.astype(np.float32))

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(outputs.float(), targets.float())

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        outputs = outputs.detach().float()
        loss = self.loss(outputs, targets)
        pred = outputs > 0
        truth = targets > 0.5
        tp = (pred & truth).sum()
        fp = (pred & ~truth).sum()
        fn = (~pred & truth).sum()
        exact = (pred == truth).all(dim=1).float().mean()
        label = (pred == truth).float().mean()
        values = torch.stack([loss, exact, label, tp.float(), fp.float(), fn.float()]).tolist()  # one host read
        loss_v, exact_v, label_v, tp_v, fp_v, fn_v = values
        denom = 2 * tp_v + fp_v + fn_v
        return {"loss": loss_v, "subset_accuracy": exact_v, "label_accuracy": label_v,
                "micro_f1": 2 * tp_v / denom if denom else math.nan}


class Regression(BuiltinTask, name="regression", primary="rmse", higher_is_better=False, classes=False):
    """Regression: mean squared error on (N,) or (N, K) outputs; RMSE, MAE and R^2."""

    def targets(self, y: np.ndarray, *, where: str) -> torch.Tensor:
        y = np.asarray(y)
        if y.dtype.kind not in "iuf":
            raise DataError(f"{where}: task regression expects numeric targets, got dtype {y.dtype}")
        if not np.isfinite(y).all():
            raise DataError(f"{where}: task regression got a non-finite target")
        return torch.as_tensor(y.astype(np.float32))

    @staticmethod
    def _shape(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if outputs.dim() == targets.dim() + 1 and outputs.shape[-1] == 1:
            return outputs.squeeze(-1)
        return outputs

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out = self._shape(outputs, targets)
        if out.shape != targets.shape:
            raise DataError(f"task regression: model outputs of shape {tuple(outputs.shape)} do not match targets of "
                            f"shape {tuple(targets.shape)}")
        return torch.nn.functional.mse_loss(out.float(), targets.float())

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        out = self._shape(outputs.detach().float(), targets)
        t = targets.float()
        err = out - t
        mse = (err ** 2).mean()
        mae = err.abs().mean()
        var = ((t - t.mean()) ** 2).mean()
        mse_v, mae_v, var_v = torch.stack([mse, mae, var]).tolist()
        return {"loss": mse_v, "rmse": math.sqrt(mse_v), "mae": mae_v,
                "r2": 1.0 - mse_v / var_v if var_v > 0 else math.nan}


@hookimpl
def register_tasks(register: Any) -> None:
    register("classification", Classification)
    register("multi-label", MultiLabel)
    register("regression", Regression)


def build_task(cfg: TaskConfig, *, source: str = "config", tasks: Registry | None = None,
               base_dir: Path | None = None) -> Task:
    """The task ``[task]`` names, with its params; an object lacking part of :class:`Task` is refused."""
    if tasks is None:
        from moola_engine.core.components import default_registries

        tasks = default_registries()["task"]
    comp = resolve(tasks, cfg.name, source=source, key="$.task.name", base_dir=base_dir)
    params = structure(cfg.params, comp.params, source=source, path="$.task.params") if comp.params else cfg.params
    if comp.params is None and cfg.params:
        raise ConfigError(source, f"extra fields found ({', '.join(cfg.params)}) @ $.task.params "
                                  f"(task {cfg.name!r} takes no parameters)")
    task = comp.factory(params)
    missing = [a for a in ("primary", "higher_is_better", "classes", "targets", "loss", "metrics")
               if not hasattr(task, a)]
    if missing:
        raise PluginError(f"task {cfg.name!r} ({comp.source}): the task object lacks {', '.join(missing)} "
                          "(see docs/writing-plugins.md#tasks)")
    return task  # type: ignore[no-any-return]
