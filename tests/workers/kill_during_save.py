"""Run under torchrun by tests: ``python -m foundation.train``, except that rank 0 kills itself
with SIGKILL in the middle of writing one checkpoint.

usage: FOUNDATION_TEST_KILL_AT_STEP=N torchrun --nproc_per_node 2 tests/workers/kill_during_save.py
       override ...

The kill comes right after rank 0 wrote ``step-N/dense.safetensors``: the sparse tables, the
DeepSpeed engine state and the consolidated dense weights are on disk, ``COMMITTED`` is not.
Nothing runs after it (no finally, no atexit): what is left is what a power cut or an OOM
kill leaves.
"""

import os
import signal
import sys
from pathlib import Path

from foundation.train import checkpoint
from foundation.train.__main__ import main

KILL_AT_STEP = int(os.environ["FOUNDATION_TEST_KILL_AT_STEP"])
RANK = int(os.environ.get("RANK", "0"))
_save_file = checkpoint.save_file  # the safetensors writer checkpoint.save uses


def save_file_then_die(tensors, filename, *args, **kwargs):
    _save_file(tensors, filename, *args, **kwargs)
    path = Path(filename)
    if RANK == 0 and path.name == "dense.safetensors" and path.parent.name == f"step-{KILL_AT_STEP}":
        print(f"kill_during_save: SIGKILL to rank 0 after writing {path}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


checkpoint.save_file = save_file_then_die

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
