"""Shared fixtures: one small synthetic world per session, and a torchrun runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Small enough for a 2-core CI machine, large enough that learning is measurable.
TEST_WORLD = ["world.members=3000", "world.items=1000", "world.seed=0"]
FAST = ["logger=jsonl", "logger.progress=false", "data.num_workers=0"]


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> Path:
    from foundation.data.commands import run_synth

    from foundation.config import compose

    out = tmp_path_factory.mktemp("synth")
    run_synth(compose("data_synth", [f"output={out}", *TEST_WORLD]))
    return out


def run_torchrun(args: list[str], nproc: int = 2, timeout: int = 600,
                 check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N args``; fails the test with the output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert result.returncode == 0 or not check, f"{' '.join(cmd)}\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return result


def read_reports(report_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(report_dir.glob("rank*.json"))]
