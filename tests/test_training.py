"""Learning, not just running: the paved path end to end through the `foundation` command.

Pretrain on 2 ranks under torchrun, evaluate on held-out members in one process (the 2-rank
checkpoint reshards on load), then fine-tune ranking warm-started from the pretrain run and
from scratch with equal steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import FAST, REPO, foundation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pretrain_run(synth_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("pretrain")
    out = foundation("train", "--nproc=2", "recipe=pretrain_member_fm", f"data.path={synth_shards}",
                     f"run_dir={run}", "trainer.max_steps=300", "trainer.eval_every=0",
                     "trainer.eval_batches=2", *FAST)
    assert "pretrain_member_fm: 300 steps" in out  # the one-line summary
    return run


def test_pretrained_model_beats_popularity_on_held_out_members(pretrain_run):
    out = foundation("eval", f"run_dir={pretrain_run}", "split=test")
    report = json.loads((pretrain_run / "eval.json").read_text())
    assert report["split"] == "test" and "hr@10" in out
    model, popular = report["metrics"], report["baselines"]["most_popular"]
    assert model["users"] >= 250
    assert model["hr@10"] >= 2 * popular["hr@10"], report
    assert model["ndcg@10"] > popular["ndcg@10"]
    metrics = [json.loads(line) for line in (pretrain_run / "metrics.jsonl").open()]
    assert any("events_per_s" in m for m in metrics) and (pretrain_run / "config.yaml").exists()


def test_warm_started_ranking_beats_scratch(pretrain_run, synth_shards, tmp_path):
    aucs = {}
    for name, extra in (("warm", [f"recipe.init_from={pretrain_run}"]), ("scratch", [])):
        run = tmp_path / name
        foundation("train", "--nproc=2", "recipe=finetune_ranking", f"data.path={synth_shards}",
                   f"run_dir={run}", "trainer.max_steps=150", "trainer.eval_every=0",
                   "trainer.eval_batches=1", "sharding.lr=0.01", *FAST, *extra)
        foundation("eval", f"run_dir={run}", "split=test")
        aucs[name] = json.loads((run / "eval.json").read_text())["metrics"]["auc"]
    assert aucs["warm"] > aucs["scratch"] + 0.005, aucs


def test_warm_start_from_another_model_names_the_mismatch(pretrain_run, synth_shards, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "foundation.cli", "train", "recipe=finetune_ranking",
         f"data.path={synth_shards}", f"run_dir={tmp_path / 'bad'}", "model.embedding_dim=32",
         f"recipe.init_from={pretrain_run}", *FAST],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 2
    assert "item_table.weight (1001, 64) vs (1001, 32)" in result.stderr
    assert "Traceback" not in result.stderr


def test_compare_finds_a_run_significantly_better_than_its_most_popular_baseline(pretrain_run):
    """The offline A/B test on a real run (two seeds of a converged run: docs/benchmarks.md)."""
    foundation("eval", f"run_dir={pretrain_run}", "split=test")
    out = foundation("eval", "compare", f"{pretrain_run}@most_popular", str(pretrain_run),
                     "--output", str(pretrain_run / "compare.json"))
    assert "compare: ndcg@10" in out and "| hr@10 |" in out
    popular = json.loads((pretrain_run / "compare.json").read_text())["metrics"]
    for metric in ("hr@10", "ndcg@10"):
        assert popular[metric]["verdict"] == "B better" and popular[metric]["ci_low"] > 0
