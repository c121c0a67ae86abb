"""Classification metrics on tensors (host or device), shared by the engine and the ablation.

The loss is computed by torch where the logits are; the rest on the host, after one copy of the
predictions: per-op dispatch of a handful of tiny torch ops cost more than the metrics themselves (and, on a
GPU, each ``float(t)`` was a host sync).  Accuracies are rounded through float32 exactly as the earlier
``(pred == y).float().mean()`` did, so recorded values are unchanged.

A validation set of up to :data:`LIST_PATH_MAX` samples is scored in plain Python on lists, a larger one
with numpy; both give bitwise the same numbers (tests/test_metrics.py).  The engine scores once per epoch,
right after the step loop, when every numpy routine's code is cold: timed inside a fine-tuning run
(18 validation windows) the numpy path cost about 0.5 ms an epoch, the list path about half of that.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

LIST_PATH_MAX = 4096
"""Largest validation set :func:`classification_metrics` scores on Python lists (numpy above it)."""


def _host(t: torch.Tensor | np.ndarray) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _rate(hits: np.ndarray) -> float:
    """Mean of a boolean array, rounded to float32 (exact count, one float32 division)."""
    return _f32_rate(int(np.count_nonzero(hits)), hits.size)


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
    loss_t = torch.nn.functional.cross_entropy(logits, y)
    binary = logits.shape[1] == 2
    if len(logits) <= LIST_PATH_MAX:
        return _list_metrics(loss_t, logits, y, binary, prefix)
    loss = float(loss_t)
    pred, labels = _host(logits.argmax(dim=1)), _host(y)
    out = {"loss": loss, "accuracy": accuracy(pred, labels), "balanced_accuracy": balanced_accuracy(pred, labels)}
    if binary:
        out["auc"] = roc_auc(torch.softmax(logits, dim=1)[:, 1], labels)
    return {f"{prefix}{k}": v for k, v in out.items()}


def _f32_rate(hits: int, n: int) -> float:
    """``hits / n`` rounded to float32, as ``(pred == y).float().mean()`` gives it: a float64 quotient rounded
    once more to float32 is the correctly rounded float32 quotient (53 >= 2 x 24 + 2 bits: double rounding is
    innocuous for division); NaN when ``n`` is 0."""
    return struct.unpack("f", struct.pack("f", hits / n))[0] if n else float("nan")


def _list_metrics(loss_t: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, binary: bool,
                  prefix: str) -> dict[str, float]:
    """Everything the metrics need in one host read (one sync on a GPU): the loss, the predicted classes, the
    labels and, for two classes, the positive class's probability, all exact in float32 (class indices up
    to 2**24)."""
    n = len(y)
    parts = [loss_t.reshape(1), logits.argmax(dim=1).float(), y.to(logits.device, torch.float32)]
    if binary:
        parts.append(torch.softmax(logits, dim=1)[:, 1])
    flat = torch.cat(parts).tolist()
    loss, pred, labels = flat[0], flat[1:n + 1], [int(v) for v in flat[n + 1:2 * n + 1]]
    per_class: dict[int, list[int]] = {}  # class -> [hits, count]
    hits = 0
    for p, t in zip(pred, labels, strict=True):
        acc = per_class.get(t)
        if acc is None:
            acc = per_class[t] = [0, 0]
        acc[1] += 1
        if p == t:
            acc[0] += 1
            hits += 1
    recalls = [_f32_rate(h, c) for _, (h, c) in sorted(per_class.items())]
    out = {"loss": loss, "accuracy": _f32_rate(hits, len(labels)),
           "balanced_accuracy": sum(recalls) / len(recalls) if recalls else float("nan")}
    if binary:
        out["auc"] = _list_auc(flat[2 * n + 1:], labels)
    return {f"{prefix}{k}": v for k, v in out.items()}


def _list_auc(score: list[float], labels: list[int]) -> float:
    """:func:`roc_auc` on lists: the rank statistic with average ranks over ties."""
    n = len(score)
    n_pos = labels.count(1)
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    if any(s != s for s in score):  # NaN: sorted() has no order for it; numpy's argsort puts it last
        return roc_auc(np.asarray(score), np.asarray(labels))
    order = sorted(range(n), key=score.__getitem__)
    pos_rank_sum = 0.0
    i = 0
    while i < n:  # a run of tied scores order[i..j] shares the average of ranks i+1..j+1
        j = i
        while j + 1 < n and score[order[j + 1]] == score[order[i]]:
            j += 1
        rank = (i + j + 2) / 2
        pos_rank_sum += rank * sum(1 for k in range(i, j + 1) if labels[order[k]] == 1)
        i = j + 1
    return (pos_rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
