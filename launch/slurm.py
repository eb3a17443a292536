"""Slurm: the sbatch script of a job, and the mapping of a task's SLURM_* environment to
torch's (``python -m foundation.launch.slurm MODULE ARGS``, the per-GPU mode's entry)."""

from __future__ import annotations

import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys

from foundation.launch.config import LauncherConfig, LaunchError, SlurmMode, check_head_address
from foundation.launch.torchrun import AGENT, torchrun_args

# sed reads the whole list (head would close the pipe early: SIGPIPE under pipefail).
HEAD = 'HEAD_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)'


def sbatch_script(cfg: LauncherConfig, module: str, args: list[str], log_dir: str) -> str:
    """The script ``sbatch`` gets: exactly what ``--dry-run`` prints."""
    slurm, per_node = cfg.slurm, cfg.slurm.mode == SlurmMode.per_node
    tasks = 1 if per_node else cfg.nproc
    options = [f"--job-name={cfg.job_name}", f"--nodes={cfg.nnodes}",
               f"--ntasks-per-node={tasks}", f"--gpus-per-node={cfg.nproc}",
               f"--cpus-per-task={slurm.cpus_per_gpu * (cfg.nproc if per_node else 1)}",
               f"--time={slurm.time}", f"--output={log_dir}/%j.out"]
    options += [f"--{key}={value}" for key, value in
                (("partition", slurm.partition), ("account", slurm.account), ("qos", slurm.qos),
                 ("mem", slurm.mem)) if value]
    if slurm.requeue:
        options += [f"--signal=USR1@{slurm.signal_s}", "--requeue", "--open-mode=append"]
    options += list(slurm.sbatch)
    lines = ["#!/bin/bash", "# Written by `foundation train --launcher slurm`; submitted as is.",
             *(f"#SBATCH {option}" for option in options),
             *slurm.setup,  # before strict mode: activation scripts often trip over set -u
             "set -euo pipefail",
             "# srun does not always pass --cpus-per-task on to its tasks (Slurm 22.05-23.02).",
             "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK",
             "# Node 0's address, looked up when the job runs (on the head node), not at "
             "submission.", HEAD]
    train = [module, *args]
    if per_node:
        node = [cfg.python, "-m", AGENT,
                *torchrun_args(nproc=cfg.nproc, nnodes="$SLURM_NNODES",
                               endpoint=f"$HEAD_ADDR:{cfg.master_port}", rdzv_id="$SLURM_JOB_ID",
                               max_restarts=cfg.max_restarts), "-m", *train]
    else:
        lines += ["export MASTER_ADDR=$HEAD_ADDR", f"export MASTER_PORT={cfg.master_port}"]
        node = [cfg.python, "-m", "foundation.launch.slurm", *train]
    return "\n".join([*lines, "srun --kill-on-bad-exit=1 " + _shell_join(node), ""])


def _shell_join(words: list[str]) -> str:
    """Quoted for the shell, except the job-time variables ($SLURM_NNODES, $HEAD_ADDR, ...)."""
    return " ".join(word if re.fullmatch(r"[\w.=:/-]*\$\w+[\w.=:/-]*", word)
                    else shlex.quote(word) for word in words)


def submit(script: str) -> str:
    """``sbatch`` the script (from stdin); returns the job id."""
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch is not on PATH: submit from a Slurm login node (the script "
                          "is in RUN/launch/job.sbatch; --dry-run prints it)")
    done = subprocess.run(["sbatch", "--parsable"], input=script, text=True,
                          capture_output=True, check=False)
    if done.returncode:
        raise LaunchError(f"sbatch refused the job: {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[003-004,9],cpu1`` → ``gpu003``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"not a Slurm node list: {nodelist!r}")
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def torch_environment(environ: dict[str, str]) -> dict[str, str]:
    """A per-GPU task's torch variables from Slurm's: computed in the task at run time, so
    each task gets its own rank (never a value expanded once at submission)."""
    try:
        nnodes = int(environ["SLURM_NNODES"])
        head = environ.get("MASTER_ADDR") or first_host(environ["SLURM_JOB_NODELIST"])
        torch_env = {"RANK": environ["SLURM_PROCID"], "LOCAL_RANK": environ["SLURM_LOCALID"],
                     "WORLD_SIZE": environ["SLURM_NTASKS"], "GROUP_RANK": environ["SLURM_NODEID"],
                     "LOCAL_WORLD_SIZE": str(int(environ["SLURM_NTASKS"]) // nnodes),
                     "MASTER_ADDR": head, "MASTER_PORT": environ.get("MASTER_PORT", "29500")}
    except KeyError as err:
        raise RuntimeError(f"{err.args[0]} is not set: foundation.launch.slurm runs as a task "
                           f"of a Slurm job step (srun)") from None
    if head != environ.get("SLURMD_NODENAME"):  # off the head node, loopback is a split world
        check_head_address(head, nnodes)
    return torch_env


def requeue_after_preemption() -> bool:
    """Requeue this Slurm job (its checkpoint is committed): it restarts and resumes."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        return False
    return subprocess.run(["scontrol", "requeue", job], check=False).returncode == 0


def main() -> None:
    module, *args = sys.argv[1:]
    os.environ.update(torch_environment(dict(os.environ)))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
