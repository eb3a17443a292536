"""``python -m foundation.train recipe=<name> [overrides]``, alone or under torchrun."""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys

import torch.distributed as dist

from foundation.compose import ConfigError, compose
from foundation.console import setup_logging
from foundation.process import exit_without_teardown

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    # `kill -USR2 PID` prints every thread's stack to the rank's stderr: where a hung job is
    # (SIGTERM and SIGUSR1 ask for a checkpoint and a clean exit: train/preemption.py).
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    setup_logging()
    try:
        cfg = compose("train", sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        log.error(f"config: {err}")
        return 2
    from foundation.train.checkpoint import CheckpointError
    from foundation.train.trainer import Trainer

    try:
        Trainer(cfg).fit()
        if dist.is_initialized():
            dist.barrier()  # no rank tears the group down while another still talks on it
    except (CheckpointError, FileNotFoundError) as err:
        log.error(err)
        return 2
    except ConfigError as err:  # settings that compose but do not fit the recipe
        log.error(f"config: {err}")
        return 2
    except FloatingPointError as err:  # trainer.on_nan=stop
        log.error(err)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())
