"""Metrics are exact on hand-computed cases."""

import math

import numpy as np
import torch

from foundation.eval.metrics import auc, log_loss, means, ranking_sums, target_ranks


def test_ranks_hr_ndcg_mrr_by_hand():
    scores = torch.tensor([[0.0, 0.9, 0.5, 0.1, 0.7],
                           [0.0, 0.2, 0.3, 0.8, 0.1]])
    targets = torch.tensor([2, 3])
    exclude = torch.zeros(2, 5, dtype=torch.bool)
    exclude[:, 0] = True
    exclude[0, 1] = True  # item 1 is in row 0's history: removed from its candidates
    ranks = target_ranks(scores, targets, exclude)
    assert ranks.tolist() == [1, 0]  # row 0: only 0.7 beats 0.5 once 0.9 is excluded
    m = means(ranking_sums(ranks, [1, 2]))
    assert m["hr@1"] == 0.5 and m["hr@2"] == 1.0
    assert math.isclose(m["ndcg@2"], (1 / math.log2(3) + 1) / 2)
    assert math.isclose(m["mrr"], (1 / 2 + 1) / 2)


def test_ties_count_against_the_target():
    scores = torch.tensor([[1.0, 1.0, 1.0]])
    assert target_ranks(scores, torch.tensor([1])).tolist() == [2]


def test_auc_and_log_loss_by_hand():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1])
    assert auc(scores, labels) == 0.75  # 3 of 4 positive-negative pairs ordered correctly
    assert auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    probs = np.array([0.9, 0.2])
    assert math.isclose(log_loss(probs, np.array([1, 0])), -(math.log(0.9) + math.log(0.8)) / 2)
