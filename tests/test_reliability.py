"""Preemption, retention and incomplete checkpoints."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import FAST, REPO, run_torchrun, spawn, wait_for_step, worker_pids

from foundation.compose import compose
from foundation.train import checkpoint
from foundation.train.stream import EpochStream

RUN = ["recipe=pretrain_member_fm", "trainer.eval_every=0", "trainer.eval_batches=1",
       "data.batch_size=16", "model.num_layers=1", "logger.log_every=1"]


def fake_checkpoint(run_dir: Path, step: int, committed: bool) -> Path:
    path = checkpoint.checkpoint_dir(run_dir, step)
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    if committed:
        (path / checkpoint.COMMIT_MARKER).write_text("{}")
    return path


def test_incomplete_checkpoints_are_never_chosen_and_retention_keeps_the_newest(tmp_path):
    for step, done in ((2, True), (4, True), (6, True), (8, False)):
        fake_checkpoint(tmp_path, step, done)
    assert checkpoint.resolve(tmp_path).name == "step-6"  # step-8 has no commit marker
    with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
        checkpoint.resolve(tmp_path / "checkpoints" / "step-8")
    checkpoint.prune(tmp_path, keep_last=1)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step-6", "step-8"]  # the newest complete one stays; a newer partial too


@pytest.mark.slow
def test_resume_skips_a_checkpoint_killed_mid_write(synth_shards, tmp_path):
    run = tmp_path / "run"
    run_torchrun(["-m", "foundation.train", f"data.path={synth_shards}", f"run_dir={run}", *FAST,
                  *RUN, "trainer.max_steps=4"])
    partial = fake_checkpoint(run, 6, committed=False)  # as if killed while writing step 6
    (partial / "dense.safetensors").write_bytes(b"\0" * 10)
    out = run_torchrun(["-m", "foundation.train", f"data.path={synth_shards}", f"run_dir={run}",
                        *FAST, *RUN, "trainer.max_steps=5"])
    assert "resumed from" in out.stdout and "step-4 at step 4" in out.stdout


@pytest.mark.slow
def test_sigterm_commits_a_checkpoint_exits_zero_and_resumes(synth_shards, tmp_path):
    run = tmp_path / "preempted"
    args = [f"data.path={synth_shards}", f"run_dir={run}", *FAST, *RUN, "trainer.max_steps=400"]
    proc = spawn([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node=2", "-m", "foundation.train", *args])
    wait_for_step(run, 3, proc)
    pids = worker_pids(str(run))
    assert len(pids) == 2
    for pid in pids:  # as Slurm does: every task gets the signal
        os.kill(pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-4000:]
    assert "preempted, checkpoint committed" in out
    saved = checkpoint.resolve(run)
    step = checkpoint.read_state(saved)["step"]
    assert 3 <= step < 400
    resumed = run_torchrun(["-m", "foundation.train", *args[:-1], f"trainer.max_steps={step + 2}"])
    assert f"resumed from {saved} at step {step}" in resumed.stdout


@pytest.mark.slow
@pytest.mark.parametrize("victim", [min, max])  # either rank: one pid per rank
def test_a_stopped_rank_fails_the_job_within_the_collective_timeout(synth_shards, tmp_path,
                                                                     victim):
    run = tmp_path / "hung"
    args = [f"data.path={synth_shards}", f"run_dir={run}", *FAST, *RUN, "trainer.max_steps=400",
            "trainer.collective_timeout_s=10"]
    proc = spawn([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node=2", "-m", "foundation.train", *args])
    wait_for_step(run, 3, proc)
    ranks = worker_pids(str(run))
    stopped = victim(ranks)
    (survivor,) = set(ranks) - {stopped}
    os.kill(stopped, signal.SIGSTOP)
    began = time.time()
    try:
        while running(survivor) and time.time() - began < 90:
            time.sleep(0.2)
        waited = time.time() - began
    finally:  # the hung rank: a scheduler reaps it once the job failed (torchrun would wait 30 s)
        os.kill(stopped, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert waited < 60, waited  # the collective timeout (10 s) plus start-up of the error path
    assert "timed out" in err.lower() or "timeout" in err.lower()


def running(pid: int) -> bool:
    """Whether ``pid`` is alive (not exited, nor a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


EXPLODE = ["trainer.optim.lr=1e30", "trainer.optim.warmup_steps=0", "trainer.optim.grad_clip=0"]


def train_alone(synth_shards, run, *overrides) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "foundation.train", f"data.path={synth_shards}",
                           f"run_dir={run}", *FAST, *RUN, *overrides], capture_output=True,
                          text=True, timeout=300, env=env, cwd=REPO)


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(synth_shards, tmp_path):
    run = tmp_path / "nan"
    result = train_alone(synth_shards, run, *EXPLODE, "trainer.max_steps=6",
                         "trainer.checkpoint_every=1")
    assert result.returncode == 3
    assert "loss is nan at step 2" in result.stderr and "Traceback" not in result.stderr
    assert checkpoint.resolve(run).name == "step-1"  # the last good one, committed
    assert not checkpoint.checkpoint_dir(run, 2).exists()


@pytest.mark.slow
def test_nan_loss_can_skip_the_step_and_count_it(synth_shards, tmp_path):
    run = tmp_path / "skip"
    result = train_alone(synth_shards, run, *EXPLODE, "trainer.max_steps=4", "trainer.on_nan=skip")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open() if '"loss"' in line]
    assert rows[-1]["step"] == 4 and rows[-1]["skipped_steps"] == 3


def corrupt_copy(shards: Path, dest: Path, split: str, bad_per_shard: dict[int, int]) -> Path:
    """A copy of ``shards`` whose ``split`` shards get unreadable samples appended."""
    shutil.copytree(shards, dest)
    entries = json.loads((dest / "manifest.json").read_text())["splits"][split]["shards"]
    for index, count in bad_per_shard.items():
        with tarfile.open(dest / entries[index]["path"], "a") as tar:
            for n in range(count):
                info = tarfile.TarInfo(f"bad{index}-{n}.meta.json")  # no seq.npz, broken json
                info.size = 1
                tar.addfile(info, io.BytesIO(b"{"))
    return dest


@pytest.mark.slow
def test_skipped_corrupt_data_is_counted_as_a_training_metric(synth_shards, tmp_path):
    shards = corrupt_copy(synth_shards, tmp_path / "shards", "train", {0: 2, 5: 1})
    cfg = compose("train", [f"data.path={shards}", "run_dir=unused", *FAST, *RUN,
                            "data.on_error=skip"])
    # One epoch on one rank: the run ends on the epoch's last batch, which carries its tail.
    stream = EpochStream(cfg.data, mode="sequence", seed=cfg.seed, rank=0, world_size=1)
    with pytest.warns(UserWarning, match="skipping unreadable data"):
        steps = sum(1 for _ in stream.loader("train", shuffle=True))
    run = tmp_path / "run"
    result = train_alone(shards, run, "data.on_error=skip", f"trainer.max_steps={steps}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open() if '"loss"' in line]
    assert rows[-1]["step"] == steps and rows[-1]["epoch"] == 0
    assert rows[-1]["skipped_data"] == 3
    assert "skipping unreadable data" in result.stderr and "bad0-0" in result.stderr


@pytest.mark.slow
def test_early_stopping_keeps_the_best_checkpoint_and_finishes_the_run(synth_shards, tmp_path):
    run = tmp_path / "early"
    frozen = ["trainer.optim.lr=0", "sharding.lr=0"]  # validation cannot improve
    result = train_alone(synth_shards, run, *frozen, "trainer.max_steps=40",
                         "trainer.eval_every=2", "trainer.patience=2", "trainer.keep_last=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped early at step 6" in result.stdout and "at step 2, is checkpoint=best" in result.stdout
    assert json.loads((run / checkpoint.BEST).read_text())["step"] == 2
    assert checkpoint.resolve(run, "best").name == "step-2"  # kept despite keep_last=1
    assert checkpoint.resolve(run).name == "step-6"
    assert checkpoint.resolve(run, "auto").name == "step-2"  # eval's and export's default
    again = train_alone(synth_shards, run, *frozen, "trainer.max_steps=40",
                        "trainer.eval_every=2", "trainer.patience=2")
    assert "nothing to do" in again.stdout


@pytest.mark.slow
def test_the_final_validation_can_be_the_best(synth_shards, tmp_path):
    run = tmp_path / "final"  # no validation before the last step: the last one is the best
    result = train_alone(synth_shards, run, "trainer.max_steps=4", "trainer.eval_every=10",
                         "trainer.patience=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / checkpoint.BEST).read_text())["step"] == 4
    assert checkpoint.resolve(run, "best").name == "step-4"
    plain = tmp_path / "no_patience"  # without early stopping (no best.json): the newest
    for step in (2, 10):
        (plain / f"checkpoints/step-{step}").mkdir(parents=True)
        (plain / f"checkpoints/step-{step}" / checkpoint.COMMIT_MARKER).touch()
    assert checkpoint.resolve(plain, "auto").name == "step-10"


def test_a_process_ending_without_teardown_loses_nothing(tmp_path):
    """The entry points skip the interpreter's teardown (foundation/process.py): first a
    background write still finishes, exit handlers run, buffered output reaches the pipe,
    and the exit code is the command's."""
    script = f"""
import atexit, pathlib, threading, time
from foundation.process import exit_without_teardown
out = pathlib.Path({str(tmp_path)!r})
atexit.register(lambda: (out / "handler").write_text("ran"))
threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread").write_text("done"))).start()
print("buffered", end="")
exit_without_teardown(3)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 3, result.stderr
    assert result.stdout == "buffered"
    assert (tmp_path / "handler").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "done"
