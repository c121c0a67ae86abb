"""Classification metrics on tensors (host or device), shared by the engine and the ablation.

The loss is computed by torch where the logits are; the rest on the host with numpy, after one copy of the
predictions: per-op dispatch of a handful of tiny torch ops cost more than the metrics themselves (and, on a
GPU, each ``float(t)`` was a host sync).  Accuracies are rounded through float32 exactly as the earlier
``(pred == y).float().mean()`` did, so recorded values are unchanged.
"""

from __future__ import annotations

import numpy as np
import torch


def _host(t: torch.Tensor | np.ndarray) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _rate(hits: np.ndarray) -> float:
    """Mean of a boolean array, rounded to float32 (exact count, one float32 division)."""
    return float(np.float32(np.count_nonzero(hits)) / np.float32(hits.size)) if hits.size else float("nan")


def accuracy(pred: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    return _rate(_host(pred) == _host(y))


def balanced_accuracy(pred: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y``."""
    pred, y = _host(pred), _host(y)
    recalls = [_rate(pred[y == c] == c) for c in np.unique(y).tolist()]
    return sum(recalls) / len(recalls) if recalls else float("nan")


def roc_auc(score: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Binary ROC AUC by the rank statistic (ties get average ranks); NaN with one class only."""
    score = _host(score).astype(np.float64).reshape(-1)
    pos = _host(y).reshape(-1) == 1
    n_pos = int(np.count_nonzero(pos))
    n_neg = int(pos.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = np.empty_like(score)
    ranks[np.argsort(score, kind="stable")] = np.arange(1, score.size + 1, dtype=np.float64)
    uniq, inverse = np.unique(score, return_inverse=True)
    if uniq.size != score.size:  # average ranks over ties
        ranks = (np.bincount(inverse, weights=ranks) / np.bincount(inverse))[inverse]
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Loss, accuracy, balanced accuracy and (binary) AUC from logits of shape (N, C)."""
    logits = logits.detach().float()
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    pred, labels = _host(logits.argmax(dim=1)), _host(y)
    out = {"loss": loss, "accuracy": accuracy(pred, labels), "balanced_accuracy": balanced_accuracy(pred, labels)}
    if logits.shape[1] == 2:
        out["auc"] = roc_auc(torch.softmax(logits, dim=1)[:, 1], labels)
    return {f"{prefix}{k}": v for k, v in out.items()}
