"""The torchrun command line every launcher runs on a node (through ``foundation.launch.agent``)."""

from __future__ import annotations

import os
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


def agent_args(cfg: LauncherConfig, module: str, args: list[str]) -> list[str]:
    """What this machine's agent is given: torchrun's arguments, then ``-m module args``."""
    endpoint = None if cfg.nnodes == 1 else f"{cfg.master_addr}:{cfg.master_port}"
    return [*torchrun_args(nproc=cfg.nproc, nnodes=cfg.nnodes, endpoint=endpoint,
                           rdzv_id=cfg.job_name, max_restarts=cfg.max_restarts),
            "-m", module, *args]


def local_command(cfg: LauncherConfig, module: str, args: list[str]) -> list[str]:
    """This machine's agent as a command: ``python -m foundation.launch.agent ...``."""
    return [sys.executable, "-m", AGENT, *agent_args(cfg, module, args)]


def run_local(cfg: LauncherConfig, module: str, args: list[str]) -> int:
    """This process becomes the machine's agent: the job starts without a second interpreter
    importing torch first."""
    from foundation.launch.agent import main as agent_main

    if cfg.single_machine:
        os.environ["FOUNDATION_SINGLE_MACHINE"] = "1"
    return agent_main(agent_args(cfg, module, args))
