"""Shared fixtures: one small synthetic world per session, and a torchrun runner."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Triton kernels run in its CPU interpreter here. Triton reads this when a kernel (its own
# library's included) is defined, so it must be set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# Small enough for a 2-core CI machine, large enough that learning is measurable.
TEST_WORLD = ["world.members=3000", "world.items=1000", "world.seed=0"]
FAST = ["logger=jsonl", "logger.progress=false", "data.num_workers=0"]
# The processes that start ranks: torchrun, a cluster's agent, and the CLI that is its own agent.
AGENTS = ("torch.distributed.run", "foundation.launch.agent", "foundation.cli")


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> Path:
    from foundation.compose import compose
    from foundation.data.commands import run_synth

    out = tmp_path_factory.mktemp("synth")
    run_synth(compose("data_synth", [f"output={out}", *TEST_WORLD]))
    return out


def foundation(*args: str, timeout: int = 600, check: bool = True
               ) -> subprocess.CompletedProcess | str:
    """``foundation ARGS`` in a subprocess; its stdout (``check``) or the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "foundation.cli", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if not check:
        return result
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout


def run_torchrun(args: list[str], nproc: int = 2, timeout: int = 600,
                 check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N args``; fails the test with the output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert result.returncode == 0 or not check, f"{' '.join(cmd)}\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return result


def spawn(cmd: list[str]) -> subprocess.Popen:
    """Start a command in the background (for tests that signal or kill its processes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def read_reports(report_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(report_dir.glob("rank*.json"))]


def worker_pids(marker: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in map(int, found):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except FileNotFoundError:
            continue
        parent = _parent_cmdline(pid)
        if "-m foundation.train" in cmdline and any(agent in parent for agent in AGENTS):
            pids.append(pid)  # a rank: its parent is torchrun (not a DataLoader worker)
    return pids


def rank_of(pid: int) -> int:
    """The torchrun rank a worker process runs as (its RANK environment variable)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK="))[5:])


def _parent_cmdline(pid: int) -> str:
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        return Path(f"/proc/{ppid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, IndexError, ValueError):
        return ""


def communicate_or_dump_stacks(proc: subprocess.Popen, marker: str, timeout: float
                               ) -> tuple[str, str]:
    """``proc.communicate(timeout)``; past it, every rank prints its threads' stacks
    (SIGUSR2: foundation/train/__main__.py) before the job is killed, and the test fails
    showing where it hung."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        ranks = worker_pids(marker)
        for sig in (signal.SIGUSR2, signal.SIGKILL):
            for pid in ranks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(3)
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"hung for {timeout}s; the ranks' stacks:\n{err[-12000:]}") from None


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step
                                    for line in metrics.open()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{run_dir} never reached step {step}")
