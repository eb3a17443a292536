"""The offline A/B test on hand-made rank files: paired, bootstrapped, with clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from foundation.cli import main
from foundation.eval.compare import ScoredSide, compare, compare_scored, load_side
from foundation.tasks import ROW_SLOTS


def evaluated(run, ranks, *, split="test", sample_ids=None, popular=None):
    run.mkdir(parents=True, exist_ok=True)
    ids = np.arange(len(ranks)) if sample_ids is None else np.asarray(sample_ids)
    extra = {} if popular is None else {"most_popular": np.asarray(popular)}
    np.savez(run / "eval-ranks.npz", split=np.array(split), sample_id=ids,
             model=np.asarray(ranks), **extra)
    return run


def test_identical_runs_differ_by_nothing(tmp_path):
    ranks = np.random.default_rng(0).integers(0, 50, 400)
    a, b = evaluated(tmp_path / "a", ranks), evaluated(tmp_path / "b", ranks[::-1],
                                                       sample_ids=np.arange(400)[::-1])
    result = compare(load_side(str(a)), load_side(str(b)), resamples=200)
    for r in result.values():  # paired by sample id, whatever the order on disk
        assert r["diff"] == 0 and r["ci_low"] == r["ci_high"] == 0
        assert r["verdict"] == "no significant difference"


def test_a_real_improvement_is_significant_and_noise_is_not(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.integers(0, 30, 2000)
    better = np.maximum(base - 10, 0)  # every user's target moves up ten places
    noisy = base + rng.integers(-2, 3, 2000).clip(-base)  # jitter around the same quality
    a = load_side(str(evaluated(tmp_path / "a", base, popular=better)))
    assert compare(a, load_side(str(evaluated(tmp_path / "b", better))))["hr@10"]["verdict"] == "B better"
    assert compare(load_side(str(tmp_path / "b")), a)["ndcg@10"]["verdict"] == "B worse"
    noise = compare(a, load_side(str(evaluated(tmp_path / "c", noisy))))
    assert noise["mrr"]["ci_low"] < 0 < noise["mrr"]["ci_high"]
    # A baseline of a run is a side too.
    assert compare(a, load_side(f"{tmp_path / 'a'}@most_popular"))["hr@10"]["verdict"] == "B better"


def test_mismatched_or_missing_evaluations_fail_clearly(tmp_path, capsys):
    a = evaluated(tmp_path / "a", [1, 2, 3])
    b = evaluated(tmp_path / "b", [1, 2, 3], split="val")
    c = evaluated(tmp_path / "c", [1, 2], sample_ids=[0, 7])
    with pytest.raises(ValueError, match="evaluated on 'test'.*on 'val'"):
        compare(load_side(str(a)), load_side(str(b)))
    with pytest.raises(ValueError, match="2 in common|1 in common"):
        compare(load_side(str(a)), load_side(str(c)))
    with pytest.raises(KeyError, match="no scorer 'most_popular'.*\\['model'\\]"):
        load_side(f"{a}@most_popular")
    assert main(["eval", "compare", str(a), str(tmp_path / "nowhere")]) == 2
    assert "evaluate the run first" in capsys.readouterr().err


def scored(run, scores, *, members, extra=None):
    """An uplift recipe's eval-scores.npz: candidate ids sample_id * ROW_SLOTS + index."""
    run.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    n = len(scores)
    sample = np.repeat(np.arange(members), n // members)
    row_id = sample * ROW_SLOTS + np.tile(np.arange(n // members), members)
    uplift = np.linspace(-0.05, 0.4, n)
    sent = rng.random(n) < 0.5
    outcome = rng.random(n) < 0.2 + sent * uplift
    np.savez(run / "eval-scores.npz", split=np.array("test"), kind=np.array("uplift"),
             headline=np.array("qini"), budget=np.array(0.2), row_id=row_id, sent=sent,
             outcome=outcome, uplift=uplift, score_model=np.asarray(scores), **(extra or {}))
    return run


def test_scored_runs_are_compared_by_resampling_members(tmp_path, capsys):
    n, members = 2000, 200
    good = np.linspace(0, 1, n)  # ordered as the true uplift
    a = scored(tmp_path / "a", np.random.default_rng(0).random(n), members=members,
               extra={"score_oracle": good})
    b = scored(tmp_path / "b", good, members=members)
    result = compare_scored(load_side(str(a)), load_side(str(b)), resamples=300)
    assert result["true_policy_value"]["ci_low"] > 0 and result["qini"]["verdict"] == "B better"
    same = compare_scored(load_side(f"{a}@oracle"), load_side(str(b)), resamples=100)
    assert all(r["diff"] == 0 and r["ci_low"] == r["ci_high"] == 0 for r in same.values())
    # Through the command: the headline is the recipe's, and ranks and scores do not mix.
    assert main(["eval", "compare", str(a), str(b)]) == 0
    assert "candidates (members resampled)" in capsys.readouterr().out
    ranked = evaluated(tmp_path / "r", [1, 2, 3])
    assert main(["eval", "compare", str(ranked), str(b)]) == 2
    assert "different kinds of recipe" in capsys.readouterr().err


def test_a_resamples_metrics_are_those_of_the_rows_drawn(tmp_path):
    """The shortcuts a bootstrap takes (AUC from scores ranked once, uplift curves over rows
    put best first by counting) give each resample the metrics of its drawn rows."""
    from foundation.metrics import auc
    from foundation.metrics.uplift import uplift_metrics

    rng = np.random.default_rng(1)
    n = 600
    side = load_side(str(scored(tmp_path / "u", rng.random(n), members=60)))
    labels = rng.random(n) < 0.3
    binary = ScoredSide("b", side.row_ids, np.round(side.scores, 1), "test", "binary", "auc",
                        {"label": labels})  # rounded: ties
    for _ in range(5):
        rows = rng.integers(0, n, n)
        c = {k: v[rows] for k, v in side.columns.items() if v.ndim}
        assert side.metrics(rows) == pytest.approx(uplift_metrics(
            side.scores[rows], c["sent"], c["outcome"], 0.2, c["uplift"]), rel=1e-12)
        assert binary.metrics(rows)["auc"] == pytest.approx(
            auc(binary.scores[rows], labels[rows]), abs=1e-12)
