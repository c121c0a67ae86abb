"""Validation metrics: AUC against its pairwise definition, accuracies as torch rounds them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moola_engine.core import metrics
from moola_engine.core.metrics import accuracy, balanced_accuracy, classification_metrics, roc_auc


def pairwise_auc(score: list[float], y: list[int]) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie), over every pair."""
    pos = [s for s, t in zip(score, y, strict=True) if t == 1]
    neg = [s for s, t in zip(score, y, strict=True) if t != 1]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def count_list_path(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A spy on the list path: the returned list grows by one per call."""
    calls: list[int] = []
    real = metrics._list_metrics

    def spy(*args: object, **kwargs: object) -> dict[str, float]:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(metrics, "_list_metrics", spy)
    return calls


@pytest.fixture(params=["lists", "numpy"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Run a test through each of classification_metrics' two paths (small sets on lists, large with numpy),
    and check afterwards that the test went through the path it names."""
    if request.param == "numpy":
        monkeypatch.setattr(metrics, "LIST_PATH_MAX", -1)
    calls = count_list_path(monkeypatch)
    yield str(request.param)
    assert bool(calls) == (request.param == "lists"), f"{request.param}: list path called {len(calls)} time(s)"


@pytest.mark.parametrize("seed", range(20))
def test_metrics_match_their_definitions(seed: int, path: str) -> None:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 60, (1,), generator=g))
    logits = torch.randn(n, 2, generator=g)
    if seed % 2:
        logits = (logits * 2).round() / 2  # many tied scores
    y = torch.randint(0, 2, (n,), generator=g)
    y[0], y[1] = 0, 1  # both classes present
    m = classification_metrics(logits, y)
    pred = logits.argmax(1)
    assert m["loss"] == float(torch.nn.functional.cross_entropy(logits, y))
    assert m["accuracy"] == float((pred == y).float().mean())  # float32-rounded, as torch gives it
    recalls = [float((pred[y == c] == c).float().mean()) for c in (0, 1)]
    assert m["balanced_accuracy"] == sum(recalls) / 2
    score = torch.softmax(logits, 1)[:, 1].double().tolist()
    assert m["auc"] == pytest.approx(pairwise_auc(score, y.tolist()), abs=1e-12)


@pytest.mark.parametrize("seed", range(40))
def test_the_two_paths_agree_bitwise(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 80, (1,), generator=g))
    classes = 2 if seed % 4 else 3
    logits = torch.randn(n, classes, generator=g)
    if seed % 3 == 0:
        logits = logits.round()  # ties in the scores and in argmax
    if seed % 10 == 7:
        logits[n // 2] = float("nan")  # NaN scores: the list path hands AUC to numpy
    y = torch.randint(0, classes, (n,), generator=g)
    on_lists = classification_metrics(logits, y)
    monkeypatch.setattr(metrics, "LIST_PATH_MAX", -1)
    with_numpy = classification_metrics(logits, y)
    assert on_lists.keys() == with_numpy.keys()
    for k, v in on_lists.items():
        assert v == with_numpy[k] or (math.isnan(v) and math.isnan(with_numpy[k])), (k, v, with_numpy[k])


def test_numpy_helpers_edge_cases() -> None:
    assert math.isnan(roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([1, 1])))  # one class: no AUC
    assert roc_auc(np.array([0.2, 0.2, 0.2]), np.array([0, 1, 0])) == 0.5  # all tied
    assert math.isnan(accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)))
    assert balanced_accuracy(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0])) == 0.75  # classes present in y only


def test_the_list_path_takes_sets_up_to_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_list_path(monkeypatch)
    g = torch.Generator().manual_seed(0)
    for n, on_lists in [(0, True), (metrics.LIST_PATH_MAX, True), (metrics.LIST_PATH_MAX + 1, False)]:
        before = len(calls)
        logits, y = torch.randn(n, 2, generator=g), torch.randint(0, 2, (n,), generator=g)
        out = classification_metrics(logits, y)
        assert (len(calls) > before) == on_lists, n
        if n == 0:  # nothing to score: every metric is NaN, nothing raises
            assert all(math.isnan(v) for v in out.values()), out
        else:  # the other path gives the same numbers, bitwise
            with monkeypatch.context() as m:
                m.setattr(metrics, "LIST_PATH_MAX", -1 if on_lists else n)
                assert classification_metrics(logits, y) == out


def test_edge_cases(path: str) -> None:
    three = classification_metrics(torch.eye(3)[[0, 1, 2, 2]], torch.tensor([0, 1, 2, 1]))
    assert "auc" not in three and three["accuracy"] == 0.75
    assert three["balanced_accuracy"] == (1.0 + 0.5 + 1.0) / 3
    one_class = classification_metrics(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 1]))
    assert math.isnan(one_class["auc"]) and one_class["accuracy"] == 0.5 and one_class["balanced_accuracy"] == 0.5
