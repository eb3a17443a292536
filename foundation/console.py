"""What the commands tell their user: the ``foundation`` loggers, rank 0 only.

Messages go through ``logging`` (``log = logging.getLogger(__name__)`` in each module):
progress and results (INFO) to stdout, problems (WARNING and above) to stderr. Under
torchrun every rank runs the same code; only rank 0's INFO reaches the console, while any
rank's warnings do, tagged with the rank.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "foundation"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _RankZeroInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or _rank() == 0


class _Problem(logging.Formatter):
    """``error: …`` / ``warning: …``, as command-line tools say it."""

    def __init__(self, tag: str):
        super().__init__()
        self.tag = tag

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.tag}{record.levelname.lower()}: {super().format(record)}"


class _Console(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` / ``sys.stderr`` is at the time (tests swap them)."""

    def __init__(self, stream: str):
        super().__init__()
        self.stream_name = stream

    @property
    def stream(self):
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one: ours is looked up
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Console handlers for the ``foundation`` loggers (idempotent; libraries keep theirs)."""
    root = logging.getLogger(ROOT)
    if any(getattr(h, "foundation_console", False) for h in root.handlers):
        return
    rank = _rank()
    info = _Console("stdout")
    info.addFilter(lambda record: record.levelno < logging.WARNING)
    info.setFormatter(logging.Formatter("%(message)s"))
    problems = _Console("stderr")
    problems.setLevel(logging.WARNING)
    tag = f"[rank {rank}] " if "RANK" in os.environ else ""
    problems.setFormatter(_Problem(tag))
    for handler in (info, problems):
        handler.addFilter(_RankZeroInfo())
        handler.foundation_console = True
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False  # some libraries give the root logger a handler of its own
