"""GPU check of the dense engine (run on a CUDA machine; torchrec is not needed):
DeepSpeed ZeRO 0-3 over nccl with bf16 on a next-item transformer (a replicated item table
with full softmax, as `model.item_table=replicated` trains it), throughput per stage, and the
layout-free dense state moved between ZeRO stages.

    python bench/gpu_engine_check.py OUT.json   # one GPU, world size 1 (nccl)
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from foundation.distributed.engine import DeepSpeedDenseEngine, EngineConfig, OptimConfig

ITEMS, DIM, LAYERS, HEADS, BATCH, LENGTH = 12_000, 256, 4, 4, 256, 50


class NextItem(nn.Module):
    def __init__(self):
        super().__init__()
        self.items = nn.Embedding(ITEMS, DIM)
        self.position = nn.Embedding(LENGTH, DIM)
        layer = nn.TransformerEncoderLayer(DIM, HEADS, 4 * DIM, 0.1, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.layers = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(DIM)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        length = items.shape[1] - 1
        x = self.items(items[:, :-1]) + self.position(torch.arange(length, device=items.device))
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        states = self.norm(self.layers(x, mask=causal, is_causal=True))
        # Through the module (not .weight): ZeRO-3 gathers a partitioned table in its forward.
        logits = states @ self.items(torch.arange(ITEMS, device=items.device)).T
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), items[:, 1:].flatten())


def sequences(generator: torch.Generator) -> torch.Tensor:
    """A learnable world: each next item is item + 1..3 (mod the catalogue)."""
    start = torch.randint(0, ITEMS, (BATCH, 1), generator=generator)
    steps = torch.randint(1, 4, (BATCH, LENGTH - 1), generator=generator)
    return (torch.cat([start, start + steps.cumsum(1)], 1) % ITEMS).cuda()


def train(stage: int, steps: int, state=None) -> dict:
    torch.manual_seed(0)
    engine = DeepSpeedDenseEngine(NextItem(), EngineConfig(zero_stage=stage, bf16="auto"),
                                  OptimConfig(lr=1e-3), micro_batch=BATCH, grad_accum=1,
                                  total_steps=1000, device=torch.device("cuda"))
    if state is not None:
        engine.load_full_state(*state)
    generator = torch.Generator().manual_seed(1)
    losses, times = [], []
    for _ in range(steps):
        batch = sequences(generator)
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    steady = sorted(times[5:])[len(times[5:]) // 2]
    return {"engine": engine, "zero_stage": engine.zero_stage,
            "bf16": bool(engine.engine.bfloat16_enabled()),
            "param_dtype": str(next(engine.module.parameters()).dtype),
            "loss_first": losses[0], "loss_last": losses[-1],
            "median_step_s": steady, "tokens_per_s": BATCH * (LENGTH - 1) / steady,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def main(out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29512", RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("nccl")
    torch.cuda.set_device(0)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "backend": dist.get_backend(), "stages": {}}
    for stage in (0, 1, 2, 3):
        try:
            result = train(stage, 40)
            engine = result.pop("engine")
            if stage == 2:  # the layout-free dense state: ZeRO-2 → ZeRO-3 continues training
                weights = {k: v.float().cpu() for k, v in engine.module.state_dict().items()}
                moved = (weights, engine.full_optimizer_state())
            report["stages"][stage] = result
            del engine
        except Exception as err:  # one stage failing must not hide the others
            report["stages"][stage] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        resumed = train(3, 10, state=moved)
        resumed.pop("engine")
        report["zero2_to_zero3"] = {"loss_before_move": report["stages"][2]["loss_last"],
                                    "first_loss_after_move": resumed["loss_first"],
                                    "loss_after_10_steps": resumed["loss_last"]}
    except Exception as err:
        report["zero2_to_zero3"] = {"error": f"{type(err).__name__}: {err}"[:2000]}
    print(json.dumps(report, indent=1))
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
