"""Process-group set-up: backend, device and DeepSpeed accelerator chosen from the hardware."""

from __future__ import annotations

import atexit
import os
import random
import time
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(timeout_s: float = 600.0) -> DistEnv:
    """Join (or create) the process group: nccl + CUDA on GPUs, gloo + CPU elsewhere.

    Run alone, this still creates a one-rank group so TorchRec and DeepSpeed take the same
    code path as under torchrun.
    """
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    # DeepSpeed reads this when first imported; set it before any import of deepspeed.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if "RANK" not in os.environ:  # a plain `python -m foundation.train`
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        # A softmax gradient over many items is mostly subnormal floats, which x86 multiplies
        # about 10x slower; flushed to zero, only values below 1.2e-38 change. (Per thread:
        # threads started later inherit it.)
        torch.set_flush_denormal(True)
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
        atexit.register(_leave_process_group)
    # DeepSpeed creates its own groups with new_group() and no timeout, which would give them
    # torch's 30-minute default: a hung rank must fail those collectives in time too.
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def _leave_process_group() -> None:
    """At exit: let gloo's worker threads retire their last collectives, then leave the group.

    A worker thread drops a finished collective's tensors after waking the caller, and that
    needs the GIL; if the interpreter is already finalising, the thread is killed mid-way and
    the process aborts ("terminate called without an active exception") though the run is
    done. Sleeping hands the GIL over while it can still be taken.
    """
    time.sleep(0.05)
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed every generator; ranks differ only where they must (dropout, sampling)."""
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
