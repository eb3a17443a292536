"""An audit trail of the data: which sample ids each rank trained on, at which step and epoch.

``trainer.sample_ledger=true`` writes ``RUN/ledger/rank{r}.jsonl``, one line per micro-batch.
Resuming from step N first drops the lines after N (work the interrupted run did and lost), so
the ledger of a finished run lists exactly what its final weights saw: exactly-once can be
checked, not just trusted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class SampleLedger:
    def __init__(self, run_dir: Path, rank: int):
        self.path = run_dir / "ledger" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, step: int, epoch: int, sample_ids: list[int]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, "ids": sample_ids}) + "\n")

    def truncate(self, step: int) -> None:
        """Keep only what steps ≤ ``step`` consumed (atomically: a crash keeps the old file)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    @staticmethod
    def read(run_dir: Path) -> dict[int, list[dict]]:
        """rank → its entries, in order."""
        return {int(p.stem.removeprefix("rank")): [json.loads(line) for line in p.open()]
                for p in sorted((run_dir / "ledger").glob("rank*.jsonl"))}
