"""Exact ranking and classification metrics."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def target_ranks(scores: Tensor, targets: Tensor, exclude: Tensor | None = None) -> Tensor:
    """0-based rank of each row's target among all candidates (ties count against it).

    ``exclude`` ([B, V] bool) removes candidates (padding id, already-seen items); the target
    itself is never excluded.
    """
    scores = scores.float().clone()
    if exclude is not None:
        exclude = exclude.clone()
        exclude[torch.arange(len(targets)), targets] = False
        scores = scores.masked_fill(exclude, float("-inf"))
    target_score = scores.gather(1, targets.unsqueeze(1))
    return (scores >= target_score).sum(1) - 1


def ranking_sums(ranks: Tensor, ks: list[int]) -> dict[str, float]:
    """Sums (not means: ranks are reduced over ranks and batches) of HR@K, NDCG@K and MRR."""
    ranks = ranks.double()
    out = {"count": float(ranks.numel()), "mrr": float((1.0 / (ranks + 1)).sum())}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.sum())
        out[f"ndcg@{k}"] = float((hit / torch.log2(ranks + 2)).sum())
    return out


def means(sums: dict[str, float]) -> dict[str, float]:
    count = max(sums["count"], 1.0)
    return {k: v / count for k, v in sums.items() if k != "count"}


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum statistic, ties averaged."""
    labels = labels.astype(bool)
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def log_loss(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(probs, eps, 1 - eps)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
