"""Run under torchrun by tests: train with the real Trainer, then report what each rank holds.

usage: torchrun --nproc_per_node 2 tests/workers/train_and_report.py REPORT_DIR override ...
"""

import json
import sys
from pathlib import Path

import torch

from foundation.compose import compose
from foundation.console import setup_logging
from foundation.distributed.sharding import local_shard_shapes
from foundation.train.trainer import Trainer


def main() -> None:
    report_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    setup_logging()  # as `foundation train` does: rank 0's log on stdout
    trainer = Trainer(compose("train", overrides))
    looked_up = record_item_rows(trainer.task)
    products = record_linear_dtypes(trainer.model.engine.module)
    summary = trainer.fit()
    engine = trainer.model.engine
    inner = getattr(engine, "engine", engine)  # DeepSpeed's own engine; FSDP's is the module
    # ZeRO-3 and FSDP partition the parameters: count their full sizes
    dense_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    report = {
        "rank": trainer.env.rank,
        "engine_class": type(inner).__name__,
        "engine_module": type(inner).__module__,
        "zero_stage": engine.zero_stage,
        "grad_accum": getattr(engine, "grad_accum", None) or inner.gradient_accumulation_steps(),
        "optimizer_state_numel": engine.optimizer_state_numel(),
        "dense_params": dense_params,
        "local_shards": local_shard_shapes(trainer.model.sparse),
        "plan": str(trainer.model.plan),
        "losses": [json.loads(line)["loss"] for line in (trainer.run_dir / "metrics.jsonl").open()
                   if '"loss"' in line] if trainer.env.is_main else [],
        "first_loss": summary.get("first_loss"),  # none when resumed with nothing to do
        "last_loss": summary.get("last_loss"),
        "val": summary.get("val"),
        "threads": torch.get_num_threads(),
        "items": trainer.task.num_items,
        "most_item_rows_scored": max(looked_up, default=0),  # catalogue rows a step looked up
        "sparse_optimizer": optimizer_fingerprint(trainer.model.sparse),
        "start_step": trainer.start_step,
        "table_lrs": table_learning_rates(trainer.model.sparse.fused_optimizer),
        "linear_output_dtypes": sorted(products),  # what the dense layers computed in
        "dense_param_dtypes": sorted({str(p.dtype) for p in engine.module.parameters()}),
        "autocast": inner.torch_autocast_enabled() if hasattr(inner, "torch_autocast_enabled")
        else None,
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"rank{trainer.env.rank}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


def optimizer_fingerprint(sparse) -> dict[str, float]:
    """Each state tensor of the tables' fused optimizer as one number that does not depend
    on how it is sharded: the sum of value × (row + 1) × (column + 1) over this rank's
    shards (the ranks' numbers add up to the whole tensor's; a misplaced row changes it).
    A per-row state kept per column shard (``[k·rows]``) counts as its mean over the k."""
    found, tables = {}, sparse.state_dict()
    for param, states in sparse.fused_optimizer.state_dict()["state"].items():
        rows = tables[param].size(0)
        for name, value in states.items():
            if not hasattr(value, "local_shards"):
                continue
            total, copies = 0.0, value.size(0) // rows if value.dim() == 1 else 1
            for shard in value.local_shards():
                tensor, offsets = shard.tensor.double(), shard.metadata.shard_offsets
                row = torch.arange(tensor.shape[0], dtype=torch.float64) + offsets[0]
                weight = row % rows + 1 if tensor.dim() == 1 else row + 1
                if tensor.dim() == 2:
                    weight = weight[:, None] * (
                        torch.arange(tensor.shape[1], dtype=torch.float64) + offsets[1] + 1)
                total += float((tensor * weight).sum()) / copies
            found[f"{param}/{name}"] = total
    return found


def record_item_rows(task) -> list[int]:
    """The number of catalogue rows (``negatives``) each training step looks up."""
    rows, features = [], task.features

    def recording(batch):
        kjt, extra = features(batch)
        rows.append(len(extra.get("negatives", ())))
        return kjt, extra
    task.features = recording
    return rows


def table_learning_rates(optimizer) -> list[float]:
    """The rates the fused table kernels hold now (what their next backward applies)."""
    if hasattr(optimizer, "optimizers"):  # combined: one per module, then per table group
        return sorted({lr for _, inner in optimizer.optimizers
                       for lr in table_learning_rates(inner)})
    return [round(optimizer._emb_module.get_learning_rate(), 9)]


def record_linear_dtypes(module: torch.nn.Module) -> set[str]:
    """The dtypes the dense arch's linear layers output while training."""
    seen: set[str] = set()
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.register_forward_hook(lambda _m, _i, out: seen.add(str(out.dtype)))
    return seen


if __name__ == "__main__":
    main()
