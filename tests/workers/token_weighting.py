"""Run under torchrun by tests: ranks whose batches differ in size, each loss weighted by
``global_mean_weight``, give a DeepSpeed engine the gradients of one process's mean over
every rank's rows — the same for an even and a very uneven split of the same rows.

Each rank writes REPORT_DIR/rank<r>.json: per split, the largest difference between the
engine's full (gathered) gradients and the single-process reference, and its ZeRO stage.

usage: torchrun --nproc_per_node 2 tests/workers/token_weighting.py REPORT_DIR ZERO_STAGE
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_grad
from torch import nn

from foundation.distributed.collectives import global_mean_weight
from foundation.distributed.engine import DeepSpeedDenseEngine, EngineConfig, OptimConfig
from foundation.distributed.env import init_distributed, seed_everything

ITEMS, DIM = 40, 8
SPLITS = {"even": [6, 6], "uneven": [1, 11]}  # rows per rank, in order


def next_item_model() -> nn.Module:
    seed_everything(0)  # the same initial weights for every split and the reference
    return nn.Sequential(nn.Embedding(ITEMS, DIM), nn.Linear(DIM, ITEMS))


def mean_loss(model: nn.Module, rows: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Each event predicts the next; the mean over the rows' pairs, and how many pairs."""
    inputs = torch.cat([row[:-1] for row in rows])
    targets = torch.cat([row[1:] for row in rows])
    return F.cross_entropy(model(inputs), targets), len(targets)


def main() -> None:
    report_dir, stage = Path(sys.argv[1]), int(sys.argv[2])
    env = init_distributed(timeout_s=120)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, ITEMS, (int(n),), generator=g)
            for n in torch.randint(2, 30, (12,), generator=g)]
    reference = next_item_model()
    mean_loss(reference, rows)[0].backward()
    report = {}
    for name, counts in SPLITS.items():
        first = sum(counts[:env.rank])
        engine = DeepSpeedDenseEngine(next_item_model(), EngineConfig(zero_stage=stage),
                                      OptimConfig(), micro_batch=1, grad_accum=1,
                                      total_steps=10, device=env.device)
        loss, terms = mean_loss(engine.module, rows[first:first + counts[env.rank]])
        engine.backward(loss * global_mean_weight(terms))
        gaps = [(safe_get_full_grad(p) - r.grad).abs().max().item()
                for p, r in zip(engine.module.parameters(), reference.parameters())]
        report[name] = {"max_grad_diff": max(gaps), "zero_stage": engine.zero_stage}
    (report_dir / f"rank{env.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
