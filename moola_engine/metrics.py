"""Classification metrics on tensors (host or device), shared by the engine and the ablation."""

from __future__ import annotations

import torch


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).float().mean()) if y.numel() else float("nan")


def balanced_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Mean per-class recall over the classes present in ``y``."""
    recalls = [float((pred[y == c] == c).float().mean()) for c in torch.unique(y).tolist()]
    return sum(recalls) / len(recalls) if recalls else float("nan")


def roc_auc(score: torch.Tensor, y: torch.Tensor) -> float:
    """Binary ROC AUC by the rank statistic (ties get average ranks); NaN with one class only."""
    score = score.detach().double().cpu()
    y = y.detach().cpu()
    pos = y == 1
    n_pos = int(pos.sum())
    n_neg = int(y.numel() - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(score)
    ranks = torch.empty_like(score)
    ranks[order] = torch.arange(1, score.numel() + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inverse = torch.unique(score, return_inverse=True)
    if uniq.numel() != score.numel():
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
        counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
        ranks = (sums / counts)[inverse]
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Loss, accuracy, balanced accuracy and (binary) AUC from logits of shape (N, C)."""
    logits = logits.detach().float()
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    pred = logits.argmax(dim=1)
    out = {
        "loss": loss,
        "accuracy": accuracy(pred, y),
        "balanced_accuracy": balanced_accuracy(pred.cpu(), y.cpu()),
    }
    if logits.shape[1] == 2:
        out["auc"] = roc_auc(torch.softmax(logits, dim=1)[:, 1], y)
    return {f"{prefix}{k}": v for k, v in out.items()}
