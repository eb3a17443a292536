"""Launchers: what each one submits (golden files), the checks before anything starts, Slurm's
environment and preemption, and Accelerate training exactly as torchrun does."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FAST, REPO, foundation, spawn, wait_for_step

from foundation.cli import main as cli
from foundation.launch.config import LaunchError, check_global_batch, resolves_to_loopback
from foundation.launch.slurm import first_host, torch_environment
from foundation.train import checkpoint

GOLDEN = REPO / "tests" / "golden" / "launch"
JOB = ["recipe=pretrain_member_fm", "data.path=/shared/data/toys", "run_dir=/shared/runs/fm"]
RUN = ["recipe=pretrain_member_fm", "trainer.eval_every=0", "trainer.eval_batches=1",
       "data.batch_size=16", "model.num_layers=1", "logger.log_every=1"]


def dry_run(capsys, *args: str) -> str:
    assert cli(["train", *args, "--dry-run", *JOB]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("launcher", ["slurm", "k8s", "accelerate"])
@pytest.mark.parametrize("nnodes", [1, 4])
def test_a_dry_run_prints_exactly_the_golden_submission(capsys, launcher, nnodes):
    printed = dry_run(capsys, "--launcher", launcher, "--nnodes", str(nnodes), "--nproc", "8",
                      "--master-addr", "10.0.0.1")
    golden = GOLDEN / f"{launcher}_{nnodes}x8.txt"
    if os.environ.get("FOUNDATION_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(printed)
    assert printed == golden.read_text(), "rerun with FOUNDATION_UPDATE_GOLDEN=1 if intended"
    assert not Path("/shared/runs/fm").exists()  # nothing written, nothing submitted


def test_slurm_scripts_resolve_the_head_and_ranks_when_the_job_runs(capsys):
    per_node = dry_run(capsys, "--launcher", "slurm", "--nnodes", "4", "--nproc", "8")
    srun = per_node.splitlines()[-1]
    # Values that differ per node are never expanded at submission (accelerate#2816): the
    # rendezvous assigns node ranks, and the head is looked up on the head node at run time.
    assert "node_rank" not in per_node and "SLURM_NODEID" not in per_node
    assert "--rdzv_backend=c10d --rdzv_endpoint=$HEAD_ADDR:29500 --rdzv_id=$SLURM_JOB_ID" in srun
    assert "--nnodes=$SLURM_NNODES" in srun and "--nproc_per_node=8" in srun
    assert "#SBATCH --signal=USR1@120" in per_node and "#SBATCH --requeue" in per_node
    per_gpu = dry_run(capsys, "--launcher", "slurm", "--nnodes", "4", "--nproc", "8",
                      "launcher.slurm.mode=per_gpu")
    assert "#SBATCH --ntasks-per-node=8" in per_gpu
    assert "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK" in per_gpu
    setup = dry_run(capsys, "--launcher", "slurm", "launcher.slurm.setup=[conda activate fm]")
    assert setup.index("conda activate fm") < setup.index("set -euo pipefail")
    assert per_gpu.splitlines()[-1].startswith(
        "srun --kill-on-bad-exit=1 python -m foundation.launch.slurm foundation.train")


def test_the_accelerate_config_points_at_the_runs_own_deepspeed_config(capsys):
    printed = dry_run(capsys, "--launcher", "accelerate", "--nproc", "8", "engine.zero_stage=3",
                      "trainer.grad_accum=4")
    config = yaml.safe_load(printed.split("# ---- ")[1].split("\n", 1)[1])
    engine = json.loads(printed.split("# ---- ")[2].split("\n", 1)[1])
    assert config["deepspeed_config"] == {
        "deepspeed_config_file": "/shared/runs/fm/launch/deepspeed.json",
        "deepspeed_multinode_launcher": "standard"}  # no DeepSpeed key twice
    assert engine["zero_optimization"]["stage"] == 3
    assert engine["gradient_accumulation_steps"] == 4
    assert engine["train_micro_batch_size_per_gpu"] == 64
    # FSDP shards the dense arch itself: Accelerate only starts the processes.
    printed = dry_run(capsys, "--launcher", "accelerate", "--nproc", "8", "engine=fsdp")
    config = yaml.safe_load(printed.split("# ---- ")[1].split("\n", 1)[1])
    assert config["distributed_type"] == "MULTI_GPU" and "deepspeed_config" not in config
    assert "deepspeed.json" not in printed


def test_submitting_without_the_clusters_command_says_where_the_job_is(capsys, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch, no kubectl here
    for launcher in ("slurm", "k8s"):
        run = tmp_path / launcher
        assert cli(["train", "--launcher", launcher, "recipe=pretrain_member_fm",
                    "data.path=/shared/data", f"run_dir={run}"]) == 2
        written = next((run / "launch").iterdir())
        assert "is not on PATH" in capsys.readouterr().err and written.stat().st_size > 0


@pytest.mark.parametrize(("procid", "localid", "nodeid", "rank"),
                         [("0", "0", "0", "0"), ("5", "1", "1", "5"), ("7", "3", "1", "7")])
def test_slurm_task_environments_map_to_torch_ranks(procid, localid, nodeid, rank):
    env = {"SLURM_PROCID": procid, "SLURM_LOCALID": localid, "SLURM_NODEID": nodeid,
           "SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[003-004]",
           "SLURMD_NODENAME": f"gpu00{3 + int(nodeid)}"}
    mapped = torch_environment(env)
    assert mapped == {"RANK": rank, "LOCAL_RANK": localid, "WORLD_SIZE": "8",
                      "GROUP_RANK": nodeid, "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu003",
                      "MASTER_PORT": "29500"}
    assert torch_environment({**env, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "6000"})[
        "MASTER_ADDR"] == "10.1.2.3"
    with pytest.raises(RuntimeError, match="SLURM_PROCID is not set"):
        torch_environment({k: v for k, v in env.items() if k != "SLURM_PROCID"})


def test_each_run_gets_its_own_kubernetes_job_name():
    from foundation.launch.config import LauncherConfig
    from foundation.launch.k8s import job_name

    cfg = LauncherConfig()
    assert job_name(cfg, "/runs/sweep/0") == "foundation-sweep-0"
    assert job_name(cfg, "/runs/sweep/1") == "foundation-sweep-1"
    name = job_name(cfg, "/Runs/My_Experiment." + "x" * 80)
    assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name)


def test_flags_may_follow_overrides_and_their_values_stay_put():
    from foundation.cli import _overrides_last

    assert _overrides_last(["train", "~a.b", "--nproc", "2", "c=d", "--dry-run"]) == [
        "train", "--nproc", "2", "--dry-run", "~a.b", "c=d"]
    assert _overrides_last(["demo", "--dir", "a=b", "--nproc", "2"]) == [
        "demo", "--dir", "a=b", "--nproc", "2"]


def test_the_head_node_naming_itself_is_not_a_loopback_head():
    from foundation.launch.agent import _is_this_machine

    assert _is_this_machine(socket.gethostname())  # /etc/hosts may map it to 127.0.1.1
    assert not _is_this_machine("localhost") and not _is_this_machine("10.0.0.1")


def test_first_host_of_slurm_node_lists():
    assert first_host("gpu[003-004,9],cpu1") == "gpu003"
    assert first_host("node7") == "node7"
    assert first_host("a-b[10,12]") == "a-b10"


def test_a_loopback_head_is_refused_for_more_than_one_node(capsys):
    assert resolves_to_loopback("localhost") and resolves_to_loopback("127.0.0.1")
    assert not resolves_to_loopback("10.0.0.1")
    for launcher in ("local", "accelerate"):
        assert cli(["train", "--launcher", launcher, "--nnodes", "2", "--master-addr",
                    "localhost", "--dry-run", *JOB]) == 2
    assert "resolves to loopback here: each node would form its own world" in capsys.readouterr().err
    # Every "node" on this machine (tests, a workstation): said explicitly, it is allowed.
    printed = dry_run(capsys, "--nnodes", "2", "launcher.single_machine=true")
    assert "--rdzv_endpoint=127.0.0.1:29500" in printed
    # A Slurm task off the head node whose head name resolves to loopback there.
    env = {"SLURM_PROCID": "4", "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_NTASKS": "8",
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURMD_NODENAME": "n2",
           "MASTER_ADDR": "localhost"}
    with pytest.raises(LaunchError, match="loopback"):
        torch_environment(env)


def test_the_agent_refuses_a_loopback_rendezvous_before_starting_workers(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "foundation.launch.agent", "--nnodes=2", "--nproc_per_node=1",
         "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:29999", "-m", "foundation.train",
         f"run_dir={tmp_path}"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2 and "loopback" in done.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_global_batch_that_differs_from_its_parts_is_refused(capsys):
    with pytest.raises(LaunchError, match=r"set trainer.grad_accum=2"):
        check_global_batch(4096, micro_batch=64, grad_accum=1, world_size=32)
    check_global_batch(4096, micro_batch=64, grad_accum=2, world_size=32)
    check_global_batch(0, micro_batch=64, grad_accum=1, world_size=32)  # not promised
    assert cli(["train", "--launcher", "slurm", "--nnodes", "4", "--nproc", "8",
                "launcher.global_batch_size=1000", "--dry-run", *JOB]) == 2
    err = capsys.readouterr().err
    assert "64 × trainer.grad_accum=1 × 32 ranks = 2048" in err
    printed = dry_run(capsys, "--launcher", "slurm", "--nnodes", "4", "--nproc", "8",
                      "launcher.global_batch_size=4096", "trainer.grad_accum=2")
    assert "launcher.global_batch_size=4096" in printed


@pytest.mark.slow
def test_slurms_warning_signal_checkpoints_and_requeues_the_job(synth_shards, tmp_path):
    """As Slurm does with --signal=USR1: every process of the step gets it, the agent too."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # the cluster's command, recorded (there is no Slurm here)
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    run = tmp_path / "run"
    os.environ.update(SLURM_JOB_ID="4242", PATH=f"{bin_dir}:{os.environ['PATH']}")
    try:
        proc = spawn([sys.executable, "-m", "foundation.launch.agent", "--standalone",
                      "--nproc_per_node=2", "-m", "foundation.train", "launcher=slurm",
                      f"data.path={synth_shards}", f"run_dir={run}", *FAST, *RUN,
                      "trainer.max_steps=400"])
    finally:
        del os.environ["SLURM_JOB_ID"]
        os.environ["PATH"] = os.environ["PATH"].split(":", 1)[1]
    wait_for_step(run, 3, proc)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                           text=True).stdout.split()
    assert len(ranks) == 2
    for pid in [proc.pid, *map(int, ranks)]:
        os.kill(pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-4000:]
    assert "requeued the Slurm job" in out
    assert calls.read_text().split() == ["requeue", "4242"]
    assert 3 <= checkpoint.read_state(checkpoint.resolve(run))["step"] < 400


@pytest.mark.slow
def test_accelerate_launch_trains_exactly_as_torchrun(synth_shards, tmp_path):
    args = [f"data.path={synth_shards}", *FAST, *RUN, "trainer.max_steps=20"]
    foundation("train", "--launcher", "accelerate", "--nproc", "2", f"run_dir={tmp_path / 'a'}",
               *args)
    foundation("train", "--nproc", "2", f"run_dir={tmp_path / 't'}", *args)
    losses = [[row["loss"] for row in map(json.loads, (tmp_path / run / "metrics.jsonl").open())
               if "loss" in row] for run in "at"]
    assert len(losses[0]) == 20 and len(losses[1]) == 20
    assert max(abs(a - t) for a, t in zip(*losses, strict=True)) <= 1e-6
    written = json.loads((tmp_path / "a" / "launch" / "deepspeed.json").read_text())
    assert written["train_micro_batch_size_per_gpu"] == 16
    recorded = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert recorded["launcher"]["name"] == "accelerate"  # the run says how it was launched


@pytest.mark.slow
def test_a_two_by_two_sweep_runs_four_runs_and_the_report_lists_them(synth_shards, tmp_path):
    sweep = tmp_path / "sweep"
    foundation("train", "-m", "trainer.optim.lr=1e-3,3e-3", "model.dropout=0.1,0.3",
               f"data.path={synth_shards}", f"run_dir={sweep}", *FAST, *RUN,
               "trainer.max_steps=3")
    runs = json.loads((sweep / "sweep.json").read_text())["runs"]
    combos = [(lr, p) for lr in ("0.001", "0.003") for p in ("0.1", "0.3")]
    assert [tuple(r["overrides"].values()) for r in runs] == combos
    for run, (lr, dropout) in zip(runs, combos, strict=True):
        cfg = yaml.safe_load((sweep / run["dir"] / "config.yaml").read_text())
        assert (cfg["trainer"]["optim"]["lr"], cfg["model"]["dropout"]) == (float(lr), float(dropout))
        assert (sweep / run["dir"] / "summary.json").is_file()
    table = foundation("report", str(sweep)).splitlines()
    header = table[0].split()
    assert header[:5] == ["run", "trainer.optim.lr", "model.dropout", "steps", "hr@10"]
    rows = [line.split() for line in table[1:] if line.strip()]
    assert [(row[1], row[2], row[3]) for row in rows] == [(lr, p, "3") for lr, p in combos]


def test_a_sweep_with_a_bad_value_fails_before_any_run_starts(synth_shards, tmp_path):
    done = foundation("train", "-m", "trainer.optim.lr=1e-3,fast", f"data.path={synth_shards}",
                      f"run_dir={tmp_path / 'sweep'}", *FAST, check=False)
    assert done.returncode == 2 and "trainer.optim.lr" in done.stdout + done.stderr
    assert not (tmp_path / "sweep").exists()
    for sweep, message in (("run_dir=a,b", "run_dir cannot be swept"),
                           ("trainer.optim.lr=glob(*)", "cannot expand the sweep")):
        done = foundation("train", "-m", sweep, f"data.path={synth_shards}", check=False)
        assert done.returncode == 2 and message in done.stdout + done.stderr
