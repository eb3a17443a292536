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
import torch
from conftest import FAST, REPO, foundation

from foundation.train import checkpoint

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


# A surface that counts only completions on TV: few labels, where a pretrain pays off most.
RETRIEVAL = ["recipe=finetune_retrieval", "recipe.labels.action=[complete]",
             "+recipe.labels.device=[tv]", "trainer.max_steps=20", "trainer.eval_every=0",
             "trainer.eval_batches=1"]


@pytest.fixture(scope="module")
def retrieval_runs(pretrain_run, synth_shards, tmp_path_factory):
    """The retrieval recipe from scratch and warm-started in three modes, equal steps."""
    root, warm = tmp_path_factory.mktemp("retrieval"), f"recipe.init_from={pretrain_run}"
    runs = {}
    for name, extra in (("scratch", []), ("full", [warm]), ("lora", [warm, "recipe.mode=lora"]),
                        ("freeze", [warm, "recipe.mode=freeze"])):
        runs[name] = root / name
        foundation("train", "--nproc=2", *RETRIEVAL, f"data.path={synth_shards}",
                   f"run_dir={runs[name]}", *FAST, *extra)
        foundation("eval", f"run_dir={runs[name]}", "split=test")
    return runs


def evaluation(run) -> dict:
    return json.loads((run / "eval.json").read_text())


def test_warm_started_retrieval_beats_scratch_and_popularity_also_through_the_ann_index(
        retrieval_runs):
    runs = retrieval_runs
    out = foundation("eval", "compare", str(runs["scratch"]), str(runs["full"]),
                     "--output", str(runs["full"] / "vs_scratch.json"))
    assert "compare: ndcg@10" in out
    foundation("eval", "compare", f"{runs['full']}@most_popular", str(runs["full"]),
               "--output", str(runs["full"] / "vs_popular.json"))
    for against in ("vs_scratch", "vs_popular"):
        verdict = json.loads((runs["full"] / f"{against}.json").read_text())["metrics"]["hr@10"]
        assert verdict["ci_low"] > 0, (against, verdict)
    report = evaluation(runs["full"])
    assert report["headline"] == "hr@10" and report["metrics"]["users"] >= 100
    exact, ann = report["metrics"]["hr@10"], report["metrics"]["ann_hr@10"]
    assert ann >= 0.95 * exact, report["metrics"]


def test_lora_trains_under_5_percent_of_the_parameters_and_keeps_the_gain(retrieval_runs):
    sizes = {name: json.loads((run / "summary.json").read_text())["parameters"]
             for name, run in retrieval_runs.items()}
    assert sizes["full"]["trainable"] == sizes["full"]["total"] and sizes["full"]["tables_train"]
    assert sizes["lora"]["trainable"] <= 0.05 * sizes["full"]["trainable"], sizes
    hr = {name: evaluation(run)["metrics"]["hr@10"] for name, run in retrieval_runs.items()}
    assert hr["lora"] - hr["scratch"] >= 0.8 * (hr["full"] - hr["scratch"]) > 0, hr


def test_freeze_leaves_every_pretrained_weight_bit_identical(retrieval_runs, pretrain_run,
                                                             tmp_path):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    def weights(run):
        step = checkpoint.committed_checkpoints(run)[-1]
        dcp_to_torch_save(step / "sparse", tmp_path / f"{run.name}.pt")
        tables = torch.load(tmp_path / f"{run.name}.pt", weights_only=True)["model"]
        return tables, load_file(step / "dense.safetensors")

    (tables, dense), (frozen_tables, frozen_dense) = weights(pretrain_run), weights(
        retrieval_runs["freeze"])
    assert tables.keys() == frozen_tables.keys() and len(tables) >= 2
    for key, value in tables.items():
        assert torch.equal(value, frozen_tables[key]), key
    encoder = [k for k in dense if k.startswith("encoder.")]
    assert encoder and all(torch.equal(dense[k], frozen_dense[k]) for k in encoder)
    head = frozen_dense["member_head.weight"]
    assert not torch.equal(head, torch.eye(head.shape[0]))  # the head did train


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
