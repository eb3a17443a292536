"""Run under torchrun by tests: fine-tune with the real Trainer and report, per rank, whether
the weights its mode freezes are bit-identical after training to what they were before.

usage: torchrun --nproc_per_node 2 tests/workers/finetune_frozen.py REPORT_DIR override ...
"""

import json
import sys
from pathlib import Path

import torch

from foundation.compose import compose
from foundation.train.trainer import Trainer


def local_tables(trainer: Trainer) -> dict[str, torch.Tensor]:
    """This rank's shards of every sharded table."""
    return {f"{key}/{i}": shard.tensor.detach().clone()
            for key, value in trainer.model.sparse.state_dict().items()
            for i, shard in enumerate(value.local_shards())}


def main() -> None:
    report_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    trainer = Trainer(compose("train", overrides))
    module = trainer.model.engine.module
    tables = local_tables(trainer)
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer.fit()
    after = dict(module.named_parameters())
    report = {
        "rank": trainer.env.rank,
        "tables": len(tables),
        "tables_changed": [k for k, v in local_tables(trainer).items()
                           if not torch.equal(v, tables[k])],
        "frozen": len(frozen),
        "frozen_changed": [n for n, v in frozen.items() if not torch.equal(after[n], v)],
        "trained_changed": [n for n, v in trained.items() if not torch.equal(after[n], v)],
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"rank{trainer.env.rank}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
