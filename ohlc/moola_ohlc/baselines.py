"""A plain logistic-regression baseline on three hand-made range features (numpy only).

It answers "is the task learnable from these labels at all?": a network that lands on the majority rate while
this baseline does clearly better has a bug, not a hard task.

The features are read back from the standardised OHLC windows themselves (un-standardised with the training
statistics the loader saved), so the baseline sees exactly the windows and labels the networks see:

1. ``range5``: log of the last 5-bar high-low range over the median of the window's 5-bar ranges
2. ``bar_range``: log of the mean daily high-low range of the last 5 bars over that of the whole window
3. ``vol20``: log of the standard deviation of the last 20 close-to-close returns over that of the whole window

They are standardised with training statistics and fitted by Newton's method with a small L2 penalty.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FEATURES = ("range5", "bar_range", "vol20")


def range_features(x: np.ndarray, mean: list[float], std: list[float], horizon: int = 5) -> np.ndarray:
    """(N, 3) hand-made features from standardised windows (N, L, 4) of log(o, h, l, c / previous close)."""
    raw = x.astype(np.float64) * np.asarray(std) + np.asarray(mean)
    _o, h, lo, c = (raw[..., i] for i in range(4))
    level = np.concatenate([np.zeros((len(x), 1)), np.cumsum(c, axis=1)[:, :-1]], axis=1)  # log prev close
    hi, low = level + h, level + lo
    win = np.lib.stride_tricks.sliding_window_view
    r5 = win(hi, horizon, axis=1).max(axis=2) - win(low, horizon, axis=1).min(axis=2)
    eps = 1e-8
    f1 = np.log(r5[:, -1] + eps) - np.log(np.median(r5, axis=1) + eps)
    daily = h - lo
    f2 = np.log(daily[:, -horizon:].mean(axis=1) + eps) - np.log(daily.mean(axis=1) + eps)
    f3 = np.log(c[:, -20:].std(axis=1) + eps) - np.log(c.std(axis=1) + eps)
    return np.stack([f1, f2, f3], axis=1)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 50) -> np.ndarray:
    """Weights (bias last) of an L2-penalised logistic regression, by Newton's method (IRLS)."""
    a = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    w = np.zeros(a.shape[1])
    reg = l2 * np.eye(a.shape[1])
    reg[-1, -1] = 0.0  # no penalty on the bias
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-a @ w))
        grad = a.T @ (p - y) + reg @ w
        hess = (a * (p * (1 - p))[:, None]).T @ a + reg
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


def predict_proba(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(x @ w[:-1] + w[-1])))


def _metrics(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    import torch

    from moola_engine.core.metrics import roc_auc

    pred = (p > 0.5).astype(np.int64)
    recalls = [float((pred[y == c] == c).mean()) for c in np.unique(y)]
    return {"accuracy": float((pred == y).mean()), "balanced_accuracy": float(np.mean(recalls)),
            "auc": roc_auc(torch.as_tensor(p), torch.as_tensor(y)), "majority_rate": float(max(y.mean(), 1 - y.mean()))}


def logistic_baseline(splits: Any, l2: float = 1e-2) -> dict[str, dict[str, float]]:
    """Fit on ``splits.train``, score ``val`` and ``test``; ``splits.meta['standardisation']`` un-standardises."""
    stats = splits.meta["standardisation"]
    horizon = int(splits.meta.get("horizon", 5))

    def feats(part: Any) -> tuple[np.ndarray, np.ndarray]:
        return range_features(part.x.cpu().numpy(), stats["mean"], stats["std"], horizon), part.y.cpu().numpy()

    xtr, ytr = feats(splits.train)
    mu, sd = xtr.mean(axis=0), xtr.std(axis=0) + 1e-12
    w = fit_logistic((xtr - mu) / sd, ytr.astype(np.float64), l2=l2)
    out = {"train": _metrics(predict_proba(w, (xtr - mu) / sd), ytr)}
    for name in ("val", "test"):
        part = getattr(splits, name)
        if part is not None and len(part):
            xs, ys = feats(part)
            out[name] = _metrics(predict_proba(w, (xs - mu) / sd), ys)
    out["weights"] = dict(zip([*FEATURES, "bias"], w.tolist()))
    return out
