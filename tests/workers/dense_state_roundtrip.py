"""Run under torchrun by tests: the consolidated dense state moves between ZeRO stages and
engines exactly.

For each ``SAVED:LOADED`` pair of ZeRO stages (or ``fsdp``, the FSDP2 engine): engine A trains 3 steps; engine B (other initial
weights) loads A's consolidated weights and AdamW moments; both train 3 more identical steps.
Rank 0 writes the largest weight difference per pair to REPORT as JSON.

usage: torchrun --nproc_per_node 2 tests/workers/dense_state_roundtrip.py REPORT 2:2 3:0 2:fsdp ...
"""

import json
import sys

import torch

from foundation.distributed.engine import (
    DeepSpeedDenseEngine,
    EngineConfig,
    EngineName,
    OptimConfig,
)
from foundation.distributed.env import init_distributed
from foundation.distributed.fsdp import FsdpDenseEngine


def engine(kind: str, seed: int) -> DeepSpeedDenseEngine | FsdpDenseEngine:
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(),
                                 torch.nn.Linear(32, 1))
    fsdp = kind == "fsdp"
    cfg = EngineConfig(name=EngineName.fsdp) if fsdp else EngineConfig(zero_stage=int(kind))
    return (FsdpDenseEngine if fsdp else DeepSpeedDenseEngine)(
        module, cfg, OptimConfig(warmup_steps=2), micro_batch=4, grad_accum=1, total_steps=10,
        device=torch.device("cpu"))


def train(dense: DeepSpeedDenseEngine, batches) -> None:
    for x, y in batches:
        loss = ((dense(x) - y) ** 2).mean()
        dense.backward(loss)
        dense.step()


def main() -> None:
    report, pairs = sys.argv[1], [tuple(p.split(":")) for p in sys.argv[2:]]
    env = init_distributed(timeout_s=120)
    torch.manual_seed(100 + env.rank)
    batches = [(torch.randn(4, 8), torch.randn(4, 1)) for _ in range(6)]
    diffs = {}
    for saved, loaded in pairs:
        a, b = engine(saved, seed=0), engine(loaded, seed=1)
        train(a, batches[:3])
        b.load_full_state(a.consolidated_state_dict(), a.full_optimizer_state())
        lr_after_load = b.lr()
        train(a, batches[3:])
        train(b, batches[3:])
        wa, wb = a.consolidated_state_dict(), b.consolidated_state_dict()
        diffs[f"{saved}:{loaded}"] = {
            "weights": max((wa[k] - wb[k]).abs().max().item() for k in wa),
            "lr_matches": abs(lr_after_load - a.scheduler.lr_lambdas[0](3) * 2e-3) < 1e-12,
        }
    if env.is_main:
        with open(report, "w") as f:
            json.dump(diffs, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
