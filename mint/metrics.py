"""Ranking metrics over a score matrix [N, C] (higher = more likely) and true labels [N].

Generic numpy, shared by the teacher stage and evaluation. Ties are counted
against the prediction: a true label tied with another class gets the worse
rank, so a constant scorer earns chance-level accuracy, never a perfect one.
"""

from __future__ import annotations

import numpy as np


def ranks(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1-based rank of each sample's true label: the number of classes scoring >= the true one."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    true = scores[np.arange(len(labels)), labels]
    rank = (scores >= true[:, None]).sum(axis=1)
    # A NaN anywhere in a row compares False and would rank the truth first: count it as last.
    return np.where(np.isnan(scores).any(axis=1), scores.shape[1], rank)


def topk_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per-sample 1.0 where the true label is among the top k, else 0.0."""
    return (ranks(scores, labels) <= k).astype(np.float64)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    return float(topk_hits(scores, labels, k).mean()) if len(labels) else float("nan")


def reciprocal_ranks(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return 1.0 / ranks(scores, labels)


def mrr(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean reciprocal rank of the true label."""
    return float(reciprocal_ranks(scores, labels).mean()) if len(labels) else float("nan")


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-sample values and its percentile-bootstrap (1 - alpha) CI."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(values.mean()), float(low), float(high)


def ranking_metrics(
    scores: np.ndarray, labels: np.ndarray, k: int, prefix: str, n_boot: int = 1000, seed: int = 0
) -> dict[str, float]:
    """`{prefix}/top1`, `{prefix}/topk`, `{prefix}/mrr`, each with `_ci_low` / `_ci_high`."""
    per_sample = {
        "top1": topk_hits(scores, labels, 1),
        "topk": topk_hits(scores, labels, k),
        "mrr": reciprocal_ranks(scores, labels),
    }
    out: dict[str, float] = {}
    for name, values in per_sample.items():
        mean, low, high = bootstrap_ci(values, n_boot=n_boot, seed=seed)
        out[f"{prefix}/{name}"] = mean
        out[f"{prefix}/{name}_ci_low"] = low
        out[f"{prefix}/{name}_ci_high"] = high
    return out
