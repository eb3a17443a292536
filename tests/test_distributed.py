"""Two ranks under torchrun: TorchRec really shards the item table per the plan, the dense arch
really is a DeepSpeed engine at the configured ZeRO stage, and every stage trains."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import FAST, REPO, read_reports, run_torchrun

pytestmark = pytest.mark.slow

STEPS = ["trainer.max_steps=40", "trainer.eval_every=0", "trainer.eval_batches=2",
         "data.batch_size=32", "model.num_layers=1", "logger.log_every=5"]


def train_two_ranks(tmp_path, synth_shards, *overrides):
    reports = tmp_path / "reports"
    result = run_torchrun(["tests/workers/train_and_report.py", str(reports),
                           f"data.path={synth_shards}", f"run_dir={tmp_path / 'run'}", *FAST,
                           *STEPS, *overrides])
    (tmp_path / "output.log").write_text(result.stdout + result.stderr)
    ranks = read_reports(reports)
    assert [r["rank"] for r in ranks] == [0, 1]
    return ranks


@pytest.mark.parametrize(("stage", "grad_accum"), [(0, 1), (2, 2), (3, 1)])
def test_zero_stage_is_real_and_trains(tmp_path, synth_shards, stage, grad_accum):
    ranks = train_two_ranks(tmp_path, synth_shards, f"engine.zero_stage={stage}",
                            f"trainer.grad_accum={grad_accum}")
    for r in ranks:
        assert r["engine_module"].startswith("deepspeed") and r["engine_class"] == "DeepSpeedEngine"
        assert r["zero_stage"] == stage
        assert r["grad_accum"] == grad_accum
    states = [r["optimizer_state_numel"] for r in ranks]
    total_params = ranks[0]["dense_params"]
    # AdamW keeps two moments per parameter: all of them on each rank at stage 0,
    # about half of them on each rank once ZeRO partitions the optimizer state.
    if stage == 0:
        assert states == [2 * total_params] * 2
    else:
        for held in states:
            assert 0.4 * total_params * 2 <= held <= 0.6 * total_params * 2 + 64
        assert abs(sum(states) - 2 * total_params) <= 64 * 2
    losses = ranks[0]["losses"]
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp"])
def test_bf16_mixed_precision_trains_the_sharded_model(tmp_path, synth_shards, engine):
    """engine.bf16=on (what `auto` means on a GPU), on CPU ranks: TorchRec's fp32 rows enter a
    dense arch that multiplies in bf16 (DeepSpeed's torch.autocast; FSDP's bf16 parameters)
    and keeps fp32 weights to step, and the sharded full softmax learns."""
    ranks = train_two_ranks(tmp_path, synth_shards, f"engine.name={engine}", "engine.bf16=on",
                            "sharding=column_wise", "recipe.loss=full_softmax")
    for r in ranks:
        assert r["linear_output_dtypes"] == ["torch.bfloat16"], r["linear_output_dtypes"]
        assert r["dense_param_dtypes"] == ["torch.float32"]
        assert r["autocast"] is (True if engine == "deepspeed" else None)
    losses = ranks[0]["losses"]
    assert losses[-1] < losses[0] - 0.3, losses


def test_the_tables_learning_rate_warms_up_in_their_fused_kernels(tmp_path, synth_shards):
    """sharding.warmup_steps: after 40 of 80 warm-up steps every table's fused kernel, on
    both ranks, applies half of sharding.lr, and the run still learns."""
    ranks = train_two_ranks(tmp_path, synth_shards, "sharding.lr=0.2",
                            "sharding.warmup_steps=80")
    for r in ranks:
        assert r["table_lrs"] == [pytest.approx(0.1)], r["table_lrs"]
    losses = ranks[0]["losses"]
    assert losses[-1] < losses[0] - 0.3, losses


def test_table_wise_item_table_lives_on_one_rank(tmp_path, synth_shards):
    ranks = train_two_ranks(tmp_path, synth_shards, "sharding=table_wise", "trainer.max_steps=5")
    key = next(k for k in ranks[0]["local_shards"] if "item_table" in k)
    held = [r["local_shards"][key] for r in ranks]
    assert sorted(len(h) for h in held) == [0, 1]  # one rank holds the whole table, one nothing
    whole = next(h for h in held if h)[0]
    assert whole[1] == 64 and "table_wise" in ranks[0]["plan"]


def test_column_wise_item_table_is_split_across_ranks(tmp_path, synth_shards):
    ranks = train_two_ranks(tmp_path, synth_shards, "sharding=column_wise", "trainer.max_steps=5")
    # Its step-5 checkpoint, resumed by one rank: the tables' optimizer state reshards whole.
    one = tmp_path / "one"
    run_torchrun(["tests/workers/train_and_report.py", str(one), f"data.path={synth_shards}",
                  f"run_dir={tmp_path / 'run'}", *FAST, *STEPS, "sharding=column_wise",
                  "trainer.max_steps=5"], nproc=1)
    (alone,) = read_reports(one)
    assert alone["start_step"] == 5 and alone["sparse_optimizer"]
    for key, value in alone["sparse_optimizer"].items():
        saved = sum(r["sparse_optimizer"][key] for r in ranks)
        assert value == pytest.approx(saved, rel=1e-6) and saved != 0, key
    key = next(k for k in ranks[0]["local_shards"] if "item_table" in k)
    shards = [r["local_shards"][key] for r in ranks]
    assert [len(s) for s in shards] == [1, 1]
    (rows0, cols0), (rows1, cols1) = shards[0][0], shards[1][0]
    assert rows0 == rows1 and cols0 + cols1 == 64 and cols0 == cols1  # each rank: half the columns
    assert "column_wise" in ranks[0]["plan"]
    # The run logs what `foundation plan` prints, for the plan it runs: half the rows' bytes.
    printed = (tmp_path / "output.log").read_text()
    assert "bytes per rank" in printed and "item_table: column_wise" in printed
    held = sum(rows * cols for shard in ranks[0]["local_shards"].values() for rows, cols in shard)
    per_rank = re.search(r"^\s+MiB .*\n\s+ranks 0-1\s+([\d.]+)", printed, re.MULTILINE)
    assert per_rank and abs(float(per_rank.group(1)) - held * 4 / 2 ** 20) < 1e-3, printed


def test_the_sharded_full_softmax_equals_the_single_process_one(tmp_path):
    """Loss and gradients (queries, catalogue rows, history offsets) of the 2-rank exact
    softmax, each rank holding half the catalogue, against one process holding all of it;
    without offsets, through the fused log-sum-exp kernel."""
    run_torchrun(["tests/workers/sharded_softmax.py", str(tmp_path)])
    ranks = read_reports(tmp_path)
    assert [r["slice"] for r in ranks] == [[1, 51], [51, 101]]
    for r in ranks:
        assert r["rows_held"] < r["catalogue"] and r["other_ranks_exact"], r
        for diff in ("loss_diff", "queries_grad_diff", "shard_grad_diff", "offsets_grad_diff",
                     "fused_loss_diff", "fused_queries_grad_diff", "fused_shard_grad_diff"):
            assert r[diff] <= 1e-5, (diff, r)


@pytest.mark.parametrize("stage", [0, 2])
def test_batches_of_any_size_train_on_the_global_mean(tmp_path, stage):
    """data.tokens_per_batch's weighting: the same 12 rows split 6/6 or 1/11 over two ranks
    give a DeepSpeed engine (ZeRO 0 and 2) the gradients of one process's mean over all of
    them, within fp32 rounding."""
    run_torchrun(["tests/workers/token_weighting.py", str(tmp_path), str(stage)])
    for rank in read_reports(tmp_path):
        for split in ("even", "uneven"):
            assert rank[split]["zero_stage"] == stage
            assert rank[split]["max_grad_diff"] <= 1e-6, (split, rank)


def test_full_softmax_on_a_sharded_table_never_looks_up_the_whole_catalogue(tmp_path,
                                                                           synth_shards):
    ranks = train_two_ranks(tmp_path, synth_shards, "sharding=column_wise",
                            "recipe.loss=full_softmax")
    key = next(k for k in ranks[0]["local_shards"] if "item_table" in k)
    catalogue = ranks[0]["items"] - 1  # id 0 is padding
    for r in ranks:  # half the columns held; half the rows scored, at every step
        assert r["local_shards"][key][0][1] == 32
        assert r["most_item_rows_scored"] <= catalogue // 2 + 1, r
    assert sum(r["most_item_rows_scored"] for r in ranks) == catalogue
    losses = ranks[0]["losses"]
    assert losses[-1] < losses[0] - 0.3, losses


def test_the_consolidated_dense_state_continues_exactly_on_any_zero_stage_and_engine(tmp_path):
    """What a resharded (or other-engine) resume loads: weights + AdamW moments + step,
    gathered from ZeRO's or FSDP's shards and re-sharded, so training continues as if never
    interrupted: deepspeed → fsdp → deepspeed included."""
    report = tmp_path / "roundtrip.json"
    pairs = ["0:0", "2:2", "3:3", "2:3", "3:0", "2:fsdp", "fsdp:fsdp", "fsdp:2", "fsdp:3"]
    run_torchrun(["tests/workers/dense_state_roundtrip.py", str(report), *pairs])
    diffs = json.loads(report.read_text())
    assert sorted(diffs) == sorted(pairs)
    for pair, diff in diffs.items():
        assert diff["weights"] <= 1e-6, (pair, diff)
        assert diff["lr_matches"], (pair, diff)


def test_a_cpu_rank_flushes_subnormal_floats():
    """A softmax gradient is mostly subnormal floats, ~10x slower to multiply on x86
    (docs/speed.md): joining the group on CPU flushes them to zero."""
    code = ("import torch; from foundation.distributed.env import init_distributed; "
            "tiny = torch.full((8,), 1e-39); before = float((tiny * 2)[0]); init_distributed(); "
            "print(before > 0, float((tiny * 2)[0]) == 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    assert out.split() == ["True", "True"], out
