"""How a ``foundation`` process ends once its work is done.

A process that has loaded torch, TorchRec and DeepSpeed spends about 2 s in the interpreter's
own teardown (freeing every module and the native libraries' operator registrations) after
its last line has run, and every rank of a job pays it while the launcher waits. None of it
is needed once what an ordinary exit does first has run: non-daemon threads joined (a
checkpoint written in the background), the exit handlers (logging, wandb, the process group,
DataLoader workers) and the standard streams flushed. So the entry points end here.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn


def exit_without_teardown(code: int | None) -> NoReturn:
    """Exit with ``code`` as ``sys.exit`` would, skipping only the interpreter's teardown.
    Call it from the main thread of an entry point, never from library code."""
    threading._shutdown()  # what exit does first: join non-daemon threads
    atexit._run_exitfuncs()
    for stream in {sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__}:
        with contextlib.suppress(AttributeError, OSError, ValueError):  # gone, closed, a pipe shut
            stream.flush()
    os._exit(0 if code is None else code)
