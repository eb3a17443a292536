"""Resuming continues the same run: model, optimizer states, LR schedule, RNG and data position.

A 2-rank run checkpoints at step 6 (in the background) and finishes at step 12; a second run
resumes from its step-6 checkpoint and must reproduce steps 7-12 exactly (same losses, same
final weights).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import psutil
import pytest
import torch
from conftest import (
    FAST,
    REPO,
    communicate_or_dump_stacks,
    rank_of,
    run_torchrun,
    spawn,
    wait_for_step,
    worker_pids,
)
from safetensors.torch import load_file

from foundation.data.loader import build_loader
from foundation.train.ledger import SampleLedger

pytestmark = pytest.mark.slow

RUN = ["recipe=pretrain_member_fm", "trainer.max_steps=12", "trainer.eval_every=0",
       "trainer.eval_batches=1", "data.batch_size=16", "model.num_layers=1", "logger.log_every=1",
       "data.shuffle_buffer=50"]


def train(synth_shards, run_dir, *overrides):
    run_torchrun(["-m", "foundation.train", f"data.path={synth_shards}", f"run_dir={run_dir}",
                  *FAST, *RUN, *overrides])


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_reproduces_the_uninterrupted_run(synth_shards, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    # The uninterrupted run writes step 6 in the background while it trains on: what it
    # wrote must still be exactly step 6.
    train(synth_shards, full, "trainer.checkpoint_every=6", "data.num_workers=1",
          "trainer.async_checkpoint=true")
    step6 = full / "checkpoints" / "step-6"
    assert (step6 / "COMMITTED").exists()
    train(synth_shards, resumed, f"trainer.resume={step6}", "data.num_workers=1")
    expected, got = losses(full), losses(resumed)
    assert sorted(got) == list(range(7, 13))  # it started after step 6
    for step in range(7, 13):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), (step, got, expected)
    a = load_file(str(full / "checkpoints/step-12/dense.safetensors"))
    b = load_file(str(resumed / "checkpoints/step-12/dense.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_auto_resume_continues_and_a_finished_run_has_nothing_to_do(synth_shards, tmp_path):
    run = tmp_path / "run"
    train(synth_shards, run, "trainer.max_steps=4")
    out = run_torchrun(["-m", "foundation.train", f"data.path={synth_shards}", f"run_dir={run}",
                        *FAST, *RUN, "trainer.max_steps=6"])
    assert "resumed from" in out.stdout and "step-4" in out.stdout
    assert "the config differs from the checkpoint's: trainer.max_steps: 4 → 6" in out.stdout
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]
    out = run_torchrun(["-m", "foundation.train", f"data.path={synth_shards}", f"run_dir={run}",
                        *FAST, *RUN, "trainer.max_steps=6"])
    assert "nothing to do" in out.stdout


def evals_at(run_dir, step):
    """The validation rows logged at ``step``, in the order they were written."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return [r for r in rows if r.get("split") == "val" and r["step"] == step]


def assert_same_metrics(a: dict, b: dict) -> None:
    names = [k for k in a if k.startswith(("hr@", "ndcg@", "mrr"))]
    assert names, a
    for name in names:
        assert b[name] == pytest.approx(a[name], abs=1e-9), (name, a, b)


def test_a_checkpoint_moves_2_to_1_to_2_ranks_mid_epoch_each_sample_once_same_eval(
        synth_shards, tmp_path):
    """2 ranks → 1 → 2 within epoch 0 (2400 members, 128 a step on 2 ranks): each reload
    evaluates as the saved model did, and the ledger shows every training member of the
    epoch trained on exactly once across the three layouts."""
    run = tmp_path / "run"
    common = ["trainer.eval_batches=0",  # every val member on any world size
              "data.batch_size=64", "trainer.sample_ledger=true"]
    train(synth_shards, run, "trainer.max_steps=5", *common)
    cmd = ["-m", "foundation.train", f"data.path={synth_shards}", f"run_dir={run}", *FAST, *RUN,
           *common]
    refused = run_torchrun([*cmd, "trainer.max_steps=10", "trainer.reshard=refuse"], nproc=1,
                           check=False)
    assert refused.returncode != 0
    assert "saved by 2 ranks × 0 loader workers; this run has 1 × 0" in refused.stderr
    assert "trainer.reshard=restart_epoch" in refused.stderr
    assert "CheckpointMismatch" not in refused.stderr  # a message, not our traceback

    one = run_torchrun([*cmd, "trainer.max_steps=10"], nproc=1)
    assert "continues epoch 0 without its 640 consumed samples" in one.stdout
    saved, reloaded = evals_at(run, 5)  # the 2-rank run's final eval, then the 1-rank reload's
    assert reloaded["resharded_from"] == 2
    assert_same_metrics(saved, reloaded)

    two = run_torchrun([*cmd, "trainer.max_steps=24"], nproc=2)
    assert "continues epoch 0 without its 960 consumed samples" in two.stdout
    saved, reloaded = evals_at(run, 10)
    assert reloaded["resharded_from"] == 1
    assert_same_metrics(saved, reloaded)
    assert sorted(losses(run)) == list(range(1, 25))  # it trained on after each reload
    ledger = SampleLedger.read(run)
    epoch0 = Counter(i for entries in ledger.values() for e in entries if e["epoch"] == 0
                     for i in e["ids"])
    assert set(epoch0.values()) == {1}  # none twice
    assert set(epoch0) == training_ids(synth_shards)  # none lost
    assert any(e["epoch"] == 1 for entries in ledger.values() for e in entries)


# 24 steps of 2 × 64 members: all of epoch 0 (2400 members) and the start of epoch 1.
KILLED = ["trainer.checkpoint_every=4", "data.num_workers=1", "trainer.max_steps=24",
          "data.batch_size=64", "trainer.sample_ledger=true"]


@pytest.fixture(scope="module")
def uninterrupted(synth_shards, tmp_path_factory):
    full = tmp_path_factory.mktemp("uninterrupted")
    train(synth_shards, full, *KILLED)
    return full


@pytest.mark.parametrize("victim", [0, 1])  # the rank that commits checkpoints, and not
def test_a_killed_rank_restarts_the_group_and_the_run_ends_as_if_uninterrupted(
        synth_shards, uninterrupted, tmp_path, victim):
    full, killed = uninterrupted, tmp_path / "killed"
    proc = spawn([sys.executable, "-m", "foundation.cli", "train", "--nproc=2", "--max-restarts=1",
                  f"data.path={synth_shards}", f"run_dir={killed}", *FAST, *RUN, *KILLED])
    wait_for_step(killed, 6, proc)
    os.kill(next(p for p in worker_pids(str(killed)) if rank_of(p) == victim), signal.SIGKILL)
    began = time.time()
    out, err = communicate_or_dump_stacks(proc, str(killed), timeout=300)
    assert proc.returncode == 0, err[-4000:]
    assert "resumed from" in out, out[-2000:]
    assert time.time() - began < 240
    # Same data and seeds as the uninterrupted run: its final weights must match ours.
    a = load_file(str(full / "checkpoints/step-24/dense.safetensors"))
    b = load_file(str(killed / "checkpoints/step-24/dense.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # What the final weights saw: every training member exactly once in epoch 0, and the
    # very batches of the uninterrupted run.
    ledger = SampleLedger.read(killed)
    assert ledger == SampleLedger.read(full)
    epoch0 = Counter(i for entries in ledger.values() for e in entries if e["epoch"] == 0
                     for i in e["ids"])
    assert set(epoch0.values()) == {1}
    assert set(epoch0) == training_ids(synth_shards)
    assert any(e["epoch"] == 1 for entries in ledger.values() for e in entries)


def test_two_nodes_on_one_machine_recover_when_a_node_dies_and_restarts(
        synth_shards, uninterrupted, tmp_path):
    """2 nodes × 1 rank through the launcher's multi-node path (two agents, c10d rendezvous
    over 127.0.0.1): node 1 dies (CLI, agent and rank), the scheduler starts it again, and the
    job ends as if uninterrupted."""
    full, run = uninterrupted, tmp_path / "nodes"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    node = [sys.executable, "-m", "foundation.cli", "train", "--nnodes=2", "--nproc=1",
            "--master-addr=127.0.0.1", f"--master-port={port}", "--max-restarts=2",
            "launcher.single_machine=true", f"data.path={synth_shards}", f"run_dir={run}", *FAST,
            *RUN, *KILLED]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def start_node(log: str) -> subprocess.Popen:  # in its own session: a node dies whole
        with (tmp_path / log).open("w") as out:
            return subprocess.Popen(node, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    head = start_node("head.log")  # the first agent hosts the rendezvous store
    time.sleep(3)
    other = start_node("node1.log")
    wait_for_step(run, 6, head)
    node1 = psutil.Process(other.pid)  # the node's CLI, agent and rank (torchrun gives its
    for process in [node1, *node1.children(recursive=True)]:  # workers sessions of their own)
        process.kill()
    other.wait()
    other = start_node("node1-again.log")  # the scheduler brings it back; it rejoins
    communicate_or_dump_stacks(head, str(run), timeout=400)
    other.wait(timeout=120)
    logs = {name: (tmp_path / name).read_text() for name in ("head.log", "node1-again.log")}
    assert head.returncode == 0 and other.returncode == 0, {k: v[-3000:] for k, v in logs.items()}
    resumed = re.findall(r"resumed from \S+ at step (\d+)", logs["head.log"])
    assert resumed and int(resumed[0]) < 24, logs["head.log"][-3000:]  # killed mid-run
    a = load_file(str(full / "checkpoints/step-24/dense.safetensors"))
    b = load_file(str(run / "checkpoints/step-24/dense.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert SampleLedger.read(run) == SampleLedger.read(full)


def test_a_run_moves_deepspeed_to_fsdp_to_deepspeed_and_ends_as_if_uninterrupted(
        synth_shards, uninterrupted, tmp_path):
    """engine=fsdp trains the member model on 2 ranks, step for step as DeepSpeed does, and a
    run's checkpoints move between the engines (consolidated dense weights and moments)."""
    full, run = uninterrupted, tmp_path / "engines"
    for engine, steps in (("deepspeed", 8), ("fsdp", 16), ("deepspeed", 24)):
        train(synth_shards, run, *KILLED, f"engine={engine}", f"trainer.max_steps={steps}")
    config = (run / "checkpoints/step-16/trainer_state.json").read_text()
    assert '"name": "fsdp"' in config  # the middle third really ran under FSDP
    moved, uninterrupted_losses = losses(run), losses(full)
    assert sorted(moved) == list(range(1, 25))
    assert all(abs(moved[s] - uninterrupted_losses[s]) <= 1e-5 for s in moved), (
        moved, uninterrupted_losses)
    a = load_file(str(full / "checkpoints/step-24/dense.safetensors"))
    b = load_file(str(run / "checkpoints/step-24/dense.safetensors"))
    # Gradients that are zero in exact arithmetic (attention's key bias) are rounding noise,
    # which differs between the engines' reductions and which Adam scales up to lr-sized
    # steps: ~4e-5 there after 16 steps, ~1e-7 everywhere else.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    final = [validation(r)[24] for r in (full, run)]
    assert final[0].keys() == final[1].keys()
    assert all(abs(final[0][k] - final[1][k]) <= 1e-6 for k in final[0]), final


def validation(run_dir) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(("hr@", "ndcg@", "mrr"))}
            for r in rows if r.get("split") == "val"}


def training_ids(shards) -> set[int]:
    loader = build_loader(shards, "train", batch_size=256, max_len=50, shuffle=False)
    return {i for batch in loader for i in batch.sample_ids.tolist()}
