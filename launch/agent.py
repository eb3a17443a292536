"""``python -m foundation.launch.agent [torchrun args] -m MODULE ...``: torchrun for one node,
as every launcher starts it (local, Slurm, Kubernetes).

Two things torchrun alone gets wrong on clusters: a multi-node job whose head address is
loopback on this (non-head) node forms a world of its own (refused here, before anything
starts), and Slurm's SIGUSR1 warning, sent to every process of the job step, would kill the
agent (its default action) while the workers are still writing their preemption checkpoint,
so the agent ignores it and lets the workers (train/preemption.py) act on it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys

from foundation.launch.config import LaunchError, check_head_address
from foundation.process import exit_without_teardown

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.run import get_args_parser, parse_min_max_nnodes, run

    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    _, max_nodes = parse_min_max_nnodes(str(args.nnodes))
    head = (args.rdzv_endpoint or "").rsplit(":", 1)[0].strip("[]") or args.master_addr
    single_machine = os.environ.get("FOUNDATION_SINGLE_MACHINE") == "1"
    if not args.standalone and head and not _is_this_machine(head):
        try:
            check_head_address(head, max_nodes, single_machine)
        except LaunchError as err:
            logging.basicConfig()
            log.error(err)
            return 2
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    # Workers must not share torchrun's rendezvous store: after an elastic restart they would
    # read the previous attempt's addresses from it and fail to connect (pytorch#135712).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # Each rank gets an equal share of the cores this job may use (not the host's).
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, len(os.sched_getaffinity(0)) // _nproc(args))))
    # A preempted worker finishes its step and writes its checkpoint before it is killed.
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
    run(args)
    return 0


def _is_this_machine(host: str) -> bool:
    """The head node naming itself: its own name may map to 127.0.1.1 (Debian's /etc/hosts)
    while every other node resolves it to the network address. A literal loopback name is
    never this machine's in that sense: no other node could reach it."""
    return host in {socket.gethostname(), socket.getfqdn()} and host != "localhost"


def _nproc(args) -> int:
    return int(args.nproc_per_node) if str(args.nproc_per_node).isdigit() else 1


if __name__ == "__main__":
    exit_without_teardown(main())
