"""GPU check of the dense engine (run on a CUDA machine; torchrec is not needed):
DeepSpeed ZeRO 0-3 over nccl with bf16 on the member model's event encoder with a replicated
item table and full softmax (as `model.item_table=replicated` trains it), throughput per
stage, the layout-free dense state moved between ZeRO stages, and the two attention kinds
(`model.attention=softmax|pointwise`) in bf16: throughput, learning, and the bf16 encoder's
distance from its fp32 self.

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
from foundation.models.member import EventEncoder, MemberModelConfig

ITEMS, DIM, LAYERS, HEADS, BATCH, LENGTH = 12_000, 256, 4, 4, 256, 50


def encoder_config(attention: str) -> MemberModelConfig:
    return MemberModelConfig(embedding_dim=DIM, num_layers=LAYERS, num_heads=HEADS, dropout=0.1,
                             max_len=LENGTH, attention=attention)


class NextItem(nn.Module):
    """Items (scaled by sqrt(dim)) → the framework's EventEncoder → full softmax."""

    def __init__(self, attention: str = "softmax"):
        super().__init__()
        self.items = nn.Embedding(ITEMS, DIM)
        nn.init.normal_(self.items.weight, std=DIM ** -0.5)
        self.encoder = EventEncoder(encoder_config(attention))

    def states(self, items: torch.Tensor) -> torch.Tensor:
        x = self.items(items) * DIM ** 0.5
        mask = torch.ones(items.shape, dtype=torch.bool, device=items.device)
        minutes = torch.arange(items.shape[1], device=items.device) * 60  # a play a minute
        return self.encoder.encode_padded(x, mask, timestamps=minutes.expand(items.shape))

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        states = self.states(items[:, :-1])
        # Through the module (not .weight): ZeRO-3 gathers a partitioned table in its forward.
        logits = states @ self.items(torch.arange(ITEMS, device=items.device)).T
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), items[:, 1:].flatten())


def sequences(generator: torch.Generator) -> torch.Tensor:
    """A learnable world: each next item is item + 1..3 (mod the catalogue)."""
    start = torch.randint(0, ITEMS, (BATCH, 1), generator=generator)
    steps = torch.randint(1, 4, (BATCH, LENGTH - 1), generator=generator)
    return (torch.cat([start, start + steps.cumsum(1)], 1) % ITEMS).cuda()


def train(stage: int, steps: int, state=None, attention: str = "softmax") -> dict:
    torch.manual_seed(0)
    engine = DeepSpeedDenseEngine(NextItem(attention), EngineConfig(zero_stage=stage, bf16="auto"),
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
            "bf16": bool(engine.engine.torch_autocast_enabled()),  # fp32 weights, bf16 products
            "param_dtype": str(next(engine.module.parameters()).dtype),
            "loss_first": losses[0], "loss_last": losses[-1],
            "median_step_s": steady, "tokens_per_s": BATCH * (LENGTH - 1) / steady,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def attention_check(kind: str, steps: int = 150) -> dict:
    """ZeRO-2, bf16: throughput and learning of one attention kind, then the trained bf16
    encoder against an fp32 copy of itself on a fresh batch (relative state difference)."""
    try:
        result = train(2, steps, attention=kind)
        engine = result.pop("engine")
        module = engine.module.eval()
        exact = NextItem(kind).cuda().eval()
        exact.load_state_dict({k: v.float() for k, v in module.state_dict().items()})
        batch = sequences(torch.Generator().manual_seed(2))[:, :-1]
        with torch.no_grad():
            low, high = module.states(batch).float(), exact.states(batch)
        result["bf16_vs_fp32_state_rel_diff"] = float((low - high).norm() / high.norm())
        del engine
    except Exception as err:
        result = {"error": f"{type(err).__name__}: {err}"[:2000]}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


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
    report["attention"] = {kind: attention_check(kind) for kind in ("softmax", "pointwise")}
    print(json.dumps(report, indent=1))
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
