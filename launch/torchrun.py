"""The torchrun command line every launcher runs on a node (through ``foundation.launch.agent``)."""

from __future__ import annotations

import os
import subprocess
import sys

from foundation.launch.config import LauncherConfig

AGENT = "foundation.launch.agent"


def torchrun_args(*, nproc: int | str, nnodes: int | str, endpoint: str | None, rdzv_id: str,
                  max_restarts: int) -> list[str]:
    """One node alone: ``--standalone`` (a free port); several: c10d rendezvous at ``endpoint``,
    where node ranks are assigned as agents join (a node that restarts simply rejoins)."""
    args = [f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}"]
    if endpoint is None:
        return [*args, "--standalone"]
    return [*args, f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
            f"--rdzv_id={rdzv_id}"]


def local_command(cfg: LauncherConfig, module: str, args: list[str]) -> list[str]:
    """This machine's agent: ``python -m foundation.launch.agent ... -m module args``."""
    endpoint = None if cfg.nnodes == 1 else f"{cfg.master_addr}:{cfg.master_port}"
    return [sys.executable, "-m", AGENT,
            *torchrun_args(nproc=cfg.nproc, nnodes=cfg.nnodes, endpoint=endpoint,
                           rdzv_id=cfg.job_name, max_restarts=cfg.max_restarts),
            "-m", module, *args]


def run_local(cfg: LauncherConfig, module: str, args: list[str]) -> int:
    env = dict(os.environ)
    if cfg.single_machine:
        env["FOUNDATION_SINGLE_MACHINE"] = "1"
    return subprocess.call(local_command(cfg, module, args), env=env)
