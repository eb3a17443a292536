"""Preemption: SIGTERM (schedulers, torchrun) and SIGUSR1 (Slurm's warning signal) ask the
run to checkpoint at the next step boundary and exit cleanly."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self) -> None:
        self.signal: int | None = None
        self.slurm_warning = False  # some rank got SIGUSR1 (known on every rank)
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002
        self.signal = signum

    def requested(self, world_size: int) -> bool:
        """True on every rank as soon as any rank got a signal (ranks must stop together)."""
        flags = torch.tensor([self.signal is not None, self.signal == signal.SIGUSR1],
                             dtype=torch.int32)
        if world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.slurm_warning = bool(flags[1].item())
        return bool(flags[0].item())


def requeue_on_preemption(cfg) -> bool:
    """After Slurm's warning (SIGUSR1) was answered with a committed checkpoint: requeue the
    job (``launcher.slurm.requeue``); it restarts and resumes from that checkpoint."""
    if cfg.launcher.name != "slurm" or not cfg.launcher.slurm.requeue:
        return False
    from foundation.launch.slurm import requeue_after_preemption

    return requeue_after_preemption()
