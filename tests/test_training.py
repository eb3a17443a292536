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
from conftest import FAST, REPO, foundation, read_reports, run_torchrun

from foundation.train import checkpoint

pytestmark = pytest.mark.slow


# The pretrain reads each title's text (frozen MiniLM + adapter), as the demo's does; every
# fine-tune below reads items the same way (its model.* settings must match the pretrain's).
MODEL = ["model.item_content=[text]"]


@pytest.fixture(scope="module")
def pretrain_run(synth_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("pretrain")
    out = foundation("train", "--nproc=2", "recipe=pretrain_member_fm", f"data.path={synth_shards}",
                     f"run_dir={run}", "trainer.max_steps=300", "trainer.eval_every=0",
                     "trainer.eval_batches=2", "trainer.final_eval_split=test", *FAST, *MODEL)
    assert "pretrain_member_fm: 300 steps" in out  # the one-line summary
    assert "eval pretrain_member_fm [test, step-300]" in out  # trainer.final_eval_split
    return run


def test_pretrained_model_beats_popularity_on_held_out_members(pretrain_run):
    """The test split, evaluated at the end of training (trainer.final_eval_split), is what
    `foundation eval` reports on the saved checkpoint."""
    at_the_end = json.loads((pretrain_run / "eval.json").read_text())
    out = foundation("eval", f"run_dir={pretrain_run}", "split=test")
    report = json.loads((pretrain_run / "eval.json").read_text())
    assert report["split"] == "test" and "hr@10" in out
    assert at_the_end["metrics"] == pytest.approx(report["metrics"], rel=1e-9)
    for name, baseline in report["baselines"].items():
        assert at_the_end["baselines"][name] == pytest.approx(baseline, rel=1e-9)
    model, popular = report["metrics"], report["baselines"]["most_popular"]
    assert model["users"] >= 250
    assert model["hr@10"] >= 2 * popular["hr@10"], report
    assert model["ndcg@10"] > popular["ndcg@10"]
    assert (pretrain_run / "config.yaml").exists()


def test_the_run_reports_its_speed_mfu_data_waiting_and_memory(pretrain_run):
    """Every log row has tokens/s, the shares waiting for data and in collectives and each
    rank's peak memory; the measured steps add FLOPs and MFU, and ``foundation report``
    prints them with the plots."""
    rows = [json.loads(line) for line in (pretrain_run / "metrics.jsonl").open()]
    train = [row for row in rows if "loss" in row]
    assert all(row["tokens_per_s"] > 0 and 0 <= row["data_wait_share"] < 1
               and 0 <= row["collective_wait_share"] < 1 and len(row["memory_mib"]) == 2
               for row in train)
    telemetry = json.loads((pretrain_run / "summary.json").read_text())["telemetry"]
    assert 0 < telemetry["mfu"] < 1 and telemetry["flops_per_token"] > 0
    assert 0 < telemetry["collective_wait_share"] < 1  # two ranks wait for each other
    assert len(telemetry["peak_memory_mib"]) == 2 and min(telemetry["peak_memory_mib"]) > 100
    out = foundation("report", str(pretrain_run))
    assert "tokens/s, MFU" in out and "data wait" in out and "peak memory per rank" in out
    assert (pretrain_run / "training.png").stat().st_size > 10_000


def test_warm_started_ranking_beats_scratch_and_popularity(pretrain_run, synth_shards, tmp_path):
    runs = {name: tmp_path / name for name in ("warm", "scratch")}
    for name, extra in (("warm", [f"recipe.init_from={pretrain_run}"]), ("scratch", [])):
        foundation("train", "--nproc=2", "recipe=finetune_ranking", f"data.path={synth_shards}",
                   f"run_dir={runs[name]}", "trainer.max_steps=150", "trainer.eval_every=0",
                   "trainer.eval_batches=1", "sharding.lr=0.01", "trainer.final_eval_split=test",
                   *FAST, *MODEL, *extra)
    warm = runs["warm"]
    assert evaluation(warm)["headline"] == "auc"
    verdicts = {name: compared(against, warm)["auc"]  # members resampled
                for name, against in (("scratch", runs["scratch"]),
                                      ("popular", f"{warm}@most_popular"))}
    # Ahead of scratch, which the content cosine also serves well, by about 0.015 AUC: the
    # world shows 60 titles per member so that 300 test members can tell (docs/recipes.md).
    assert verdicts["popular"]["ci_low"] > 0 and verdicts["scratch"]["ci_low"] > 0, verdicts


# A surface that counts only completions on TV: few labels, where a pretrain pays off most.
RETRIEVAL = ["recipe=finetune_retrieval", "recipe.labels.action=[complete]",
             "+recipe.labels.device=[tv]", "trainer.max_steps=20", "trainer.eval_every=0",
             "trainer.eval_batches=1", *MODEL]


@pytest.fixture(scope="module")
def retrieval_runs(pretrain_run, synth_shards, tmp_path_factory):
    """The retrieval recipe from scratch and warm-started in two modes, equal steps."""
    root, warm = tmp_path_factory.mktemp("retrieval"), f"recipe.init_from={pretrain_run}"
    runs = {}
    for name, extra in (("scratch", []), ("full", [warm]), ("lora", [warm, "recipe.mode=lora"])):
        runs[name] = root / name
        foundation("train", "--nproc=2", *RETRIEVAL, f"data.path={synth_shards}",
                   f"run_dir={runs[name]}", "trainer.final_eval_split=test", *FAST, *extra)
    return runs


def evaluation(run) -> dict:
    return json.loads((run / "eval.json").read_text())


def compared(a, b, resamples: int = 1000) -> dict:
    """``foundation eval compare A B``'s verdict per metric, B − A (in this process: the
    command itself is run by test_compare_finds_a_run_significantly_better_than_...)."""
    from foundation.eval.compare import run_compare

    return run_compare(str(a), str(b), resamples=resamples)


def test_warm_started_retrieval_beats_scratch_and_popularity_also_through_the_ann_index(
        retrieval_runs):
    runs = retrieval_runs
    for against in (runs["scratch"], f"{runs['full']}@most_popular"):
        verdict = compared(against, runs["full"])["hr@10"]
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


def test_freeze_leaves_every_pretrained_weight_bit_identical(pretrain_run, synth_shards,
                                                             tmp_path):
    """Measured inside the 2-rank run: each rank's table shards and frozen dense weights
    before and after training."""
    run_torchrun(["tests/workers/finetune_frozen.py", str(tmp_path / "reports"), *RETRIEVAL,
                  "trainer.max_steps=5", f"data.path={synth_shards}", f"run_dir={tmp_path / 'run'}",
                  f"recipe.init_from={pretrain_run}", "recipe.mode=freeze", *FAST])
    reports = read_reports(tmp_path / "reports")
    assert len(reports) == 2
    for report in reports:
        assert report["tables"] >= 1 and report["frozen"] >= 10, report
        assert report["tables_changed"] == [] and report["frozen_changed"] == [], report
        assert sorted(report["trained_changed"]) == ["member_head.bias", "member_head.weight"]


def test_a_lora_checkpoint_holds_its_adapters_and_head_and_points_at_its_base(
        retrieval_runs, pretrain_run):
    from safetensors.torch import load_file

    saved = checkpoint.committed_checkpoints(retrieval_runs["lora"])[-1]
    state = checkpoint.read_state(saved)
    base = checkpoint.committed_checkpoints(pretrain_run)[-1]
    assert state["base"]["checkpoint"] == str(base.resolve())
    assert state["base"]["config_hash"] == checkpoint.read_state(base)["config_hash"]
    assert not (saved / "sparse").exists()  # the frozen tables live in the base only
    keys = load_file(saved / "dense.safetensors").keys()
    assert keys and all(k.endswith((".up", ".down")) or k == "member_head.bias" for k in keys)
    full = load_file(checkpoint.committed_checkpoints(retrieval_runs["full"])[-1]
                     / "dense.safetensors")
    assert sum(v.numel() for v in load_file(saved / "dense.safetensors").values()) < 0.1 * sum(
        v.numel() for v in full.values())
    assert evaluation(retrieval_runs["lora"])["metrics"]["users"] > 0  # base + adapters load


# The n-gram table is learnt from scratch in either case: a higher dense lr for both.
SEARCH = ["recipe=finetune_search", "trainer.max_steps=60", "trainer.eval_every=0",
          "trainer.eval_batches=1", "trainer.optim.lr=0.01", *MODEL]


@pytest.fixture(scope="module")
def search_runs(pretrain_run, synth_shards, tmp_path_factory):
    """The search recipe warm-started, from scratch, and without the member state."""
    root, warm = tmp_path_factory.mktemp("search"), f"recipe.init_from={pretrain_run}"
    runs = {}
    for name, extra in (("warm", [warm]), ("scratch", []),
                        ("no_member", [warm, "recipe.member_state=false"])):
        runs[name] = root / name
        foundation("train", "--nproc=2", *SEARCH, f"data.path={synth_shards}",
                   f"run_dir={runs[name]}", "trainer.final_eval_split=test", *FAST, *extra)
    return runs


def test_warm_started_search_beats_scratch_bm25_and_the_model_without_the_member(search_runs):
    warm = search_runs["warm"]
    report = evaluation(warm)
    assert report["headline"] == "ndcg@10" and report["metrics"]["queries"] >= 500
    for name, against in (("bm25", f"{warm}@bm25"), ("scratch", search_runs["scratch"]),
                          ("no_member", search_runs["no_member"])):
        verdict = compared(against, warm)["ndcg@10"]
        assert verdict["ci_low"] > 0, (name, verdict)


def test_a_search_run_exports_a_query_tower_that_finds_what_evaluation_found(search_runs,
                                                                             tmp_path):
    """Exported on 2 ranks: the bundle serves every test search from its raw query text and
    the member's raw history, and finds the engaged title as often as evaluation did."""
    from foundation.export import load_bundle

    bundle, warm = tmp_path / "bundle", search_runs["warm"]
    foundation("export", "--nproc=2", f"run_dir={warm}", f"output={bundle}",
               "parity_split=test", "precisions=[fp32]")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["kind"] == "search" and manifest["query"]["member_state"]
    # The model reads titles' text: queries go through the bundled text tower too.
    assert manifest["query"]["text_tower"] and "query_text" in manifest["inputs"]
    parity = manifest["parity"]
    for backend in ("torch", "onnx"):
        assert parity["backends"][backend]["max_abs_diff"] <= 1e-4, parity
        assert parity["backends"][backend]["top10_identical"] >= 0.99, parity
    assert parity["ann"]["recall@10"] >= 0.95, parity
    tested = evaluation(warm)["metrics"]
    assert parity["queries"] == tested["queries"]  # every test search, served
    assert abs(parity["precisions"]["fp32"]["hr@10"] - tested["hr@10"]) < 0.005, parity
    searcher = load_bundle(bundle, backend="onnx")
    with pytest.raises(ValueError, match="pass one history per query"):
        searcher.search("comedy")
    assert len(searcher.search("comedy", [int(i) for i in searcher.item_ids[1:4]], k=5)) == 5


NOTIFICATION = ["recipe=finetune_notification", "trainer.max_steps=100", "trainer.eval_every=0",
                "trainer.eval_batches=1", "trainer.optim.lr=0.005", *MODEL]


@pytest.fixture(scope="module")
def notification_runs(pretrain_run, synth_shards, tmp_path_factory):
    root, runs = tmp_path_factory.mktemp("notification"), {}
    for name, extra in (("warm", [f"recipe.init_from={pretrain_run}"]), ("scratch", [])):
        runs[name] = root / name
        foundation("train", "--nproc=2", *NOTIFICATION, f"data.path={synth_shards}",
                   f"run_dir={runs[name]}", "trainer.final_eval_split=test", *FAST, *extra)
    return runs


def test_warm_started_uplift_policy_beats_scratch_response_only_and_random(notification_runs):
    """Judged by the generator's true uplift: the policy sending to the top 20% by predicted
    uplift, against the same recipe from scratch and the policies a team without an uplift
    model would run, each paired over the same members."""
    warm = notification_runs["warm"]
    report = evaluation(warm)
    assert report["headline"] == "qini" and report["metrics"]["sends"] >= 3000
    assert report["metrics"]["response_auc"] > 0.65
    assert report["metrics"]["response_calibration_error"] < 0.05
    for name, against in (("scratch", notification_runs["scratch"]),
                          ("response_only", f"{warm}@response_only"), ("random", f"{warm}@random")):
        verdict = compared(against, warm)["true_policy_value"]
        assert verdict["ci_low"] > 0, (name, verdict)
    assert report["metrics"]["oracle_share"] >= 0.7, report["metrics"]


def test_a_messaging_run_exports_a_candidate_scorer_that_serves_what_was_trained(
        notification_runs, tmp_path):
    """Exported on 2 ranks (the sharded tables gathered), the bundle's program scores the
    test members' candidate messages as the trained scorer does, with both backends."""
    from foundation.export import History, load_bundle

    bundle = tmp_path / "bundle"
    foundation("export", "--nproc=2", f"run_dir={notification_runs['warm']}",
               f"output={bundle}", "parity_split=test", "precisions=[fp32]")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["kind"] == "candidate_scorer" and manifest["ann"] is None
    assert manifest["outputs"]["logits"]["columns"] == ["held", "lift"]
    assert {"history_units", "candidate_units"} <= manifest["inputs"].keys()  # content read
    parity = manifest["parity"]
    assert parity["candidates"] >= 1000, parity
    for backend in ("torch", "onnx"):
        assert parity["backends"][backend]["max_abs_diff"] <= 1e-4, parity
        assert parity["backends"][backend]["top10_identical"] >= 0.99, parity
    served = {backend: load_bundle(bundle, backend=backend) for backend in ("torch", "onnx")}
    ids = served["torch"].item_ids[1:7].tolist()
    history = History(items=ids[:4], timestamps=[1_700_000_000 + 3600 * k for k in range(4)],
                      action=["play", "complete", "play", "add_to_list"])
    logits = {name: scorer.score_candidates(history, ids[4:]) for name, scorer in served.items()}
    assert logits["torch"].shape == (2, 2)
    assert abs(logits["torch"] - logits["onnx"]).max() < 1e-4
    with pytest.raises(ValueError, match="unknown catalogue id"):
        served["torch"].score_candidates(history, [-5])


def test_warm_start_from_another_model_names_the_mismatch(pretrain_run, synth_shards, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "foundation.cli", "train", "recipe=finetune_ranking",
         f"data.path={synth_shards}", f"run_dir={tmp_path / 'bad'}", "model.embedding_dim=32",
         f"recipe.init_from={pretrain_run}", *FAST, *MODEL],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 2
    assert "item_table.weight (1001, 64) vs (1001, 32)" in result.stderr
    assert "Traceback" not in result.stderr


def test_compare_finds_a_run_significantly_better_than_its_most_popular_baseline(pretrain_run):
    """The offline A/B test on a real run (two seeds of a converged run: docs/benchmarks.md);
    the run's test split was evaluated when it finished."""
    out = foundation("eval", "compare", f"{pretrain_run}@most_popular", str(pretrain_run),
                     "--output", str(pretrain_run / "compare.json"))
    assert "compare: ndcg@10" in out and "| hr@10 |" in out
    popular = json.loads((pretrain_run / "compare.json").read_text())["metrics"]
    for metric in ("hr@10", "ndcg@10"):
        assert popular[metric]["verdict"] == "B better" and popular[metric]["ci_low"] > 0
