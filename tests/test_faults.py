"""Real process kills: a rank SIGKILLed while writing a checkpoint."""

from __future__ import annotations

import pytest
from conftest import FAST, run_torchrun

from foundation.train import checkpoint

RUN = ["recipe=pretrain_member_fm", "trainer.eval_every=0", "trainer.eval_batches=1",
       "data.batch_size=16", "model.num_layers=1", "logger.log_every=1"]


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_resumes_from_the_previous_complete_one(
        synth_shards, tmp_path, monkeypatch):
    run = tmp_path / "killed"
    args = [f"data.path={synth_shards}", f"run_dir={run}", *FAST, *RUN, "trainer.max_steps=6"]
    # Checkpoints at steps 2 and 4; rank 0 is SIGKILLed in the middle of writing step 4.
    monkeypatch.setenv("FOUNDATION_TEST_KILL_AT_STEP", "4")
    killed = run_torchrun(["tests/workers/kill_during_save.py", *args,
                           "trainer.checkpoint_every=2"], check=False)
    monkeypatch.delenv("FOUNDATION_TEST_KILL_AT_STEP")
    output = killed.stdout + killed.stderr
    assert "kill_during_save: SIGKILL to rank 0" in killed.stdout, (
        f"the kill hook never fired (does checkpoint.save still write dense.safetensors with "
        f"checkpoint.save_file?)\n{output[-4000:]}")
    assert killed.returncode != 0, output[-4000:]
    assert "SIGKILL" in output or "exitcode  : -9" in output, output[-4000:]

    partial, previous = checkpoint.checkpoint_dir(run, 4), checkpoint.checkpoint_dir(run, 2)
    assert (partial / "dense.safetensors").is_file() and (partial / "sparse").is_dir()
    assert not (partial / checkpoint.COMMIT_MARKER).exists()  # written mid-way, never committed
    assert (previous / checkpoint.COMMIT_MARKER).exists()
    assert checkpoint.resolve(run) == previous

    # The same run started again (plain trainer, final checkpoint only) takes step 2, not 4.
    resumed = run_torchrun(["-m", "foundation.train", *args])
    assert f"resumed from {previous} at step 2" in resumed.stdout, resumed.stdout[-4000:]
    final = checkpoint.checkpoint_dir(run, 6)
    assert (final / checkpoint.COMMIT_MARKER).exists()
    assert checkpoint.read_state(final)["step"] == 6
    # Retention: the stale partial step-4 (older than the newest committed) is gone; the
    # committed step-2 stays (trainer.keep_last=0 keeps every committed checkpoint).
    assert not partial.exists()
    assert [p.name for p in checkpoint.committed_checkpoints(run)] == ["step-2", "step-6"]
