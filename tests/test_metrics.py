"""Metrics are exact on hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from foundation.metrics import (
    auc,
    calibration_error,
    log_loss,
    rank_metrics,
    sampled_ranks,
    target_ranks,
    top_k_items,
)
from foundation.metrics.uplift import (
    auuc,
    policy_value,
    qini_coefficient,
    qini_curve,
    true_policy_value,
    uplift_metrics,
)


def test_ranks_hr_ndcg_mrr_by_hand():
    scores = torch.tensor([[0.0, 0.9, 0.5, 0.1, 0.7],
                           [0.0, 0.2, 0.3, 0.8, 0.1]])
    targets = torch.tensor([2, 3])
    exclude = torch.zeros(2, 5, dtype=torch.bool)
    exclude[:, 0] = True
    exclude[0, 1] = True  # item 1 is in row 0's history: removed from its candidates
    ranks = target_ranks(scores, targets, exclude)
    assert ranks.tolist() == [1, 0]  # row 0: only 0.7 beats 0.5 once 0.9 is excluded
    m = rank_metrics(ranks.numpy(), [1, 2])
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


def test_calibration_error_by_hand():
    probs = np.array([0.05, 0.15, 0.85, 0.95])
    labels = np.array([0, 0, 1, 0])
    # bins: [0.0,0.1): 0.05 vs 0 | [0.1,0.2): 0.15 vs 0 | [0.8,0.9): 0.85 vs 1 | [0.9,1]: 0.95 vs 0
    assert math.isclose(calibration_error(probs, labels), (0.05 + 0.15 + 0.15 + 0.95) / 4)
    assert calibration_error(np.array([0.25, 0.25]), np.array([0, 1])) == 0.25


def test_sampled_ranks_use_per_user_seeded_negatives_never_the_excluded():
    scores = torch.arange(50, dtype=torch.float32).repeat(2, 1)  # item i scores i
    exclude = torch.zeros(2, 50, dtype=torch.bool)
    exclude[:, 0] = True
    exclude[0, 40:] = True  # row 0: every item above 39 is excluded
    targets = torch.tensor([30, 30])
    # All candidates drawn: row 0 has 1..39 minus 30 (31..39 beat it), row 1 also 40..49.
    everything = sampled_ranks(scores, targets, exclude, torch.tensor([7, 8]), 48, seed=0)
    assert everything.tolist() == [9, 19]
    # 5 draws: the same user and seed draw the same negatives in any batch; another user not.
    first = sampled_ranks(scores, targets, exclude, torch.tensor([7, 7]), 5, seed=0)
    assert first[0] <= first[1] and torch.equal(
        first, sampled_ranks(scores, targets, exclude, torch.tensor([7, 7]), 5, seed=0))
    draws = {int(sampled_ranks(scores[1:], targets[1:], exclude[1:], torch.tensor([u]), 5,
                               seed=0)) for u in range(30)}
    assert len(draws) > 1  # users get different negatives


def test_top_k_items_marks_the_union_of_top_lists():
    scores = torch.tensor([[0.0, 3.0, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
    exclude = torch.zeros(2, 4, dtype=torch.bool)
    exclude[:, 0] = True
    exclude[0, 1] = True
    assert top_k_items(scores, exclude, 1).tolist() == [False, False, True, True]


def test_uplift_metrics_by_hand():
    # Four candidates, two per arm; scores put the persuadable (sent, played) first.
    scores = np.array([0.9, 0.8, 0.2, 0.1])
    sent = np.array([1, 0, 1, 0])
    outcome = np.array([1, 0, 0, 1])
    # top 1: 1 played of 1 sent, no held out → 1; top 2: 1 − 0 × 1/1 = 1;
    # top 3: 1 − 0 × 2/1 = 1; top 4: 1 − 1 × 2/2 = 0.
    assert qini_curve(scores, sent, outcome).tolist() == [1, 1, 1, 0]
    assert math.isclose(qini_coefficient(scores, sent, outcome), (1 + 1 + 1 + 0) / 4 / 4)
    assert qini_coefficient(-scores, sent, outcome) < 0  # the reverse order is worse than random
    # Rate differences at k = 1..4: 1, 1 − 0, 0.5 − 0, 0.5 − 0.5, weighted k/N.
    assert math.isclose(auuc(scores, sent, outcome), (1 * .25 + 1 * .5 + .5 * .75 + 0) / 4)
    assert math.isclose(policy_value(scores, sent, outcome, budget=0.5), 1 / 4)
    truth = np.array([0.3, -0.1, 0.0, 0.2])
    assert math.isclose(true_policy_value(scores, truth, 0.5), 0.2 / 4)
    assert math.isclose(true_policy_value(truth, truth, 0.5), 0.5 / 4)  # the oracle
    both = uplift_metrics(scores, sent, outcome, 0.5, truth)
    assert math.isclose(both["oracle_share"], 0.4)
    with pytest.raises(ValueError, match="fraction in \\(0, 1\\]"):
        policy_value(scores, sent, outcome, budget=20)


def test_the_auc_of_a_resample_equals_the_auc_of_the_rows_drawn():
    """``ResampledAUC`` (a bootstrap's: scores ranked once, rows reweighted) against every
    positive-negative pair of the drawn rows counted out, a tie counting half."""
    from foundation.metrics import ResampledAUC

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 40, 500) / 8.0  # many ties
    labels = rng.random(500) < 0.3
    resampled = ResampledAUC(scores, labels)
    for _ in range(20):
        rows = rng.integers(0, 500, 500)
        pos, neg = scores[rows][labels[rows]], scores[rows][~labels[rows]]
        pairs = pos[:, None] - neg[None, :]
        expected = ((pairs > 0).sum() + (pairs == 0).sum() / 2) / pairs.size
        assert resampled(rows) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(ResampledAUC(scores, np.zeros(500))(np.arange(500)))
