"""Build and run the torchrun command line for ``foundation train --nproc N``."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass


@dataclass
class LaunchSpec:
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    max_restarts: int = 0


def torchrun_command(spec: LaunchSpec, module: str, args: list[str]) -> list[str]:
    """``torchrun ... -m module args``: standalone on one node, rendezvous across several."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={spec.nproc}",
           f"--max-restarts={spec.max_restarts}"]
    if spec.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={spec.nnodes}", f"--node_rank={spec.node_rank}",
                f"--master_addr={spec.master_addr}", f"--master_port={spec.master_port}"]
    return cmd + ["-m", module, *args]


def run_torchrun(spec: LaunchSpec, module: str, args: list[str]) -> int:
    env = dict(os.environ)
    # Each rank gets an equal share of the cores instead of oversubscribing them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.nproc)))
    # Workers must not share torchrun's rendezvous store: after an elastic restart they would
    # read the previous attempt's addresses from it and fail to connect (pytorch#135712).
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return subprocess.call(torchrun_command(spec, module, args), env=env)
