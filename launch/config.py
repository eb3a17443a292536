"""How a training job is started (``launcher=local|slurm|k8s|accelerate``), and the checks
that run before any process does.

A leaf like the other component schemas: ``foundation.config`` puts ``LauncherConfig`` in the
train config, so the run's config.yaml records how it was launched.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

from foundation.choices import Choice


class LauncherName(Choice):
    local = "local"  # torchrun on this machine (each node of a multi-node job runs it)
    slurm = "slurm"  # an sbatch script
    k8s = "k8s"  # a Kubeflow PyTorchJob manifest
    accelerate = "accelerate"  # `accelerate launch` with a generated config


class SlurmMode(Choice):
    per_node = "per_node"  # one task per node running torchrun, c10d rendezvous on the head
    per_gpu = "per_gpu"  # one task per GPU; SLURM_PROCID / SLURM_LOCALID → RANK / LOCAL_RANK


@dataclass
class SlurmConfig:
    mode: SlurmMode = SlurmMode.per_node
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = "24:00:00"
    cpus_per_gpu: int = 8
    mem: str = ""  # e.g. 512G ("": the partition's default)
    requeue: bool = True  # a preempted job checkpoints (SIGUSR1) and requeues itself
    signal_s: int = 120  # SIGUSR1 this many seconds before the time limit
    setup: list[str] = field(default_factory=list)  # shell lines first (module load, venv)
    sbatch: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. --exclusive


@dataclass
class K8sConfig:
    image: str = "foundation:latest"
    namespace: str = "default"
    min_nodes: int = 0  # elastic lower bound on worker pods (0: nnodes)
    rdzv_port: int = 29400
    volume_claim: str = ""  # a PersistentVolumeClaim holding data and runs ("": none)
    mount_path: str = "/mnt/foundation"
    shm_gb: int = 64  # /dev/shm for loader workers (a pod's default 64 MB is too small)
    grace_s: int = 300  # a deleted pod's time to write its preemption checkpoint


@dataclass
class AccelerateConfig:
    mixed_precision: str = "no"  # DeepSpeed's own bf16 setting decides; see engine.bf16


@dataclass
class LauncherConfig:
    name: LauncherName = LauncherName.local
    nnodes: int = 1
    nproc: int = 1  # processes (GPUs) per node
    node_rank: int = 0  # local launcher: this machine's node
    master_addr: str = "127.0.0.1"  # local/accelerate: node 0's address (slurm/k8s find it)
    master_port: int = 29500
    max_restarts: int = 0  # torchrun restarts the workers this often after a failure
    job_name: str = "foundation"  # Slurm job name; prefixes the PyTorchJob's; rendezvous id
    python: str = "python"  # the interpreter on the cluster's nodes (slurm, k8s)
    global_batch_size: int = 0  # checked = batch_size × grad_accum × world size (0: not checked)
    single_machine: bool = False  # every "node" is on this machine: a loopback head is fine
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    k8s: K8sConfig = field(default_factory=K8sConfig)
    accelerate: AccelerateConfig = field(default_factory=AccelerateConfig)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc


class LaunchError(ValueError):
    """A job that would start wrong: the message names the setting and the fix."""


def check_global_batch(global_batch: int, micro_batch: int, grad_accum: int,
                       world_size: int) -> None:
    """Refuse a global batch that differs from micro-batch × accumulation × world size."""
    actual = micro_batch * grad_accum * world_size
    if global_batch and global_batch != actual:
        fix = (f"trainer.grad_accum={global_batch // (micro_batch * world_size)}"
               if global_batch % (micro_batch * world_size) == 0 else
               f"data.batch_size and trainer.grad_accum with a product of "
               f"{global_batch / world_size:g}")
        raise LaunchError(
            f"launcher.global_batch_size={global_batch}, but data.batch_size={micro_batch} × "
            f"trainer.grad_accum={grad_accum} × {world_size} ranks = {actual} sequences per "
            f"step: set {fix}, or launcher.global_batch_size={actual}")


def check_run_batch(cfg, world_size: int) -> None:
    """``check_global_batch`` for a composed train config (token-budget batches have no
    fixed sequence count, so nothing to check)."""
    if not cfg.data.tokens_per_batch:
        check_global_batch(cfg.launcher.global_batch_size, cfg.data.batch_size,
                           cfg.trainer.grad_accum, world_size)


def check_head_address(address: str, nnodes: int, single_machine: bool = False) -> None:
    """Refuse a multi-node job whose head address is this machine's loopback: every node
    would rendezvous with itself and form its own world (the job hangs or trains apart)."""
    if nnodes > 1 and not single_machine and resolves_to_loopback(address):
        raise LaunchError(
            f"{nnodes} nodes with head address {address!r}, which resolves to loopback here: "
            f"each node would form its own world. Give the head node's network address "
            f"(--master-addr), or launcher.single_machine=true when every node runs on this "
            f"machine")


def resolves_to_loopback(address: str) -> bool:
    try:
        infos = socket.getaddrinfo(address, None)
    except socket.gaierror:
        return False  # unresolvable here: the rendezvous reports it, naming the address
    return any(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)
