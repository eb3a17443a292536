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


def per_user(ranks: np.ndarray, ks: list[int]) -> dict[str, np.ndarray]:
    """Each user's reciprocal rank, HR@K and NDCG@K, from its target's 0-based rank."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {"mrr": 1.0 / (ranks + 1)}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(ranks + 2), 0.0)
    return out


def rank_metrics(ranks: np.ndarray, ks: list[int]) -> dict[str, float]:
    """Means over users of ``per_user``."""
    return {k: float(v.mean()) if len(v) else float("nan") for k, v in per_user(ranks, ks).items()}


def sampled_ranks(scores: Tensor, targets: Tensor, exclude: Tensor, sample_ids: Tensor,
                  num_negatives: int, seed: int) -> Tensor:
    """0-based rank of each target among ``num_negatives`` random items (not excluded, not
    the target), drawn from a generator seeded by (seed, sample id): the same negatives for a
    user whatever the batch, rank or model, as papers with sampled metrics do."""
    ranks = torch.empty(len(targets), dtype=torch.int64)
    for row, (target, sample_id) in enumerate(zip(targets.tolist(), sample_ids.tolist())):
        keys = torch.rand(scores.shape[1], generator=torch.Generator().manual_seed(
            seed * 1_000_003 + sample_id))
        keys[exclude[row]] = float("inf")
        keys[target] = float("inf")
        negatives = keys.topk(num_negatives, largest=False).indices
        negatives = negatives[keys[negatives].isfinite()]  # fewer candidates than asked for
        ranks[row] = int((scores[row, negatives] >= scores[row, target]).sum())
    return ranks


def top_k_items(scores: Tensor, exclude: Tensor, k: int) -> Tensor:
    """[V] bool: the items in any row's top K (for catalogue coverage)."""
    masked = scores.float().masked_fill(exclude, float("-inf"))
    covered = torch.zeros(scores.shape[1], dtype=torch.bool)
    covered[masked.topk(k, dim=1).indices.flatten()] = True
    return covered


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the chance a positive outscores a negative, ties half."""
    return ResampledAUC(scores, labels)(np.arange(len(scores)))


class ResampledAUC:
    """The AUC of fixed scores and labels over any resample of their rows (a row drawn twice
    counts twice). The scores are ranked once, so a resample costs weighted counts and a
    cumulative sum instead of a sort: a bootstrap draws thousands."""

    def __init__(self, scores: np.ndarray, labels: np.ndarray):
        self.labels = np.asarray(labels).astype(bool)
        _, self.tie_group = np.unique(scores, return_inverse=True)  # ascending; ties share one
        self.groups = int(self.tie_group.max(initial=-1)) + 1

    def __call__(self, rows: np.ndarray) -> float:
        times = np.bincount(rows, minlength=len(self.labels))
        pos = np.bincount(self.tie_group, weights=times * self.labels, minlength=self.groups)
        neg = np.bincount(self.tie_group, weights=times * ~self.labels, minlength=self.groups)
        positives, negatives = pos.sum(), neg.sum()
        if positives == 0 or negatives == 0:
            return float("nan")
        below = np.cumsum(neg) - neg  # negatives scored lower than each group
        return float((pos * (below + neg / 2)).sum() / (positives * negatives))


def log_loss(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(probs, eps, 1 - eps)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: |mean prediction − positive rate| per equal-width
    probability bin, weighted by the bin's share of predictions."""
    which = np.minimum((probs * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.sum() * abs(probs[in_bin].mean() - labels[in_bin].mean())
    return float(total / max(len(probs), 1))
