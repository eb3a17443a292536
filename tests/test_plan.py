"""`foundation plan`: TorchRec's planner on the meta device, and the bytes each rank holds."""

from __future__ import annotations

import re

from conftest import foundation

from foundation.distributed.engine import EngineConfig, EngineName, sharding_stage
from foundation.distributed.planning import GIB, dense_bytes, optimizer_bytes
from foundation.distributed.sharding import SparseOptimizer

LARGE = ["tables.items.rows=100000000", "tables.items.dim=128", "world_size=64",
         "device_memory_gb=80"]


def rank_rows(printed: str) -> dict[str, list[float]]:
    """The printed bytes-per-rank table: ranks → [tables, optimizer, dense, scoring,
    activations, total] in GiB."""
    rows = {}
    for line in printed.splitlines():
        found = re.match(r"\s*ranks (\d+(?:-\d+)?)\s+([\d.,\s]+?)\s+[\d.,]+%$", line)
        if found:
            rows[found.group(1)] = [float(v.replace(",", "")) for v in found.group(2).split()]
    return rows


def test_a_100m_item_table_on_64_devices_is_planned_row_wise_with_its_bytes_per_rank():
    out = foundation("plan", *LARGE)
    assert "items_table: row_wise" in out and "64 shards of 1,562,500 × 128" in out
    rows = rank_rows(out)
    assert list(rows) == ["0-63"]  # every rank holds the same
    tables, optimizer, dense, scoring, activations, total = rows["0-63"]
    assert abs(tables - 100_000_000 * 128 * 4 / 64 / GIB) < 1e-3  # a 64th of the fp32 rows
    assert abs(optimizer - 100_000_000 * 4 / 64 / GIB) < 1e-3  # row-wise Adagrad: one per row
    assert dense > 0 and scoring > 0 and activations > 0
    assert abs(total - (tables + optimizer + dense + scoring + activations)) < 5e-3


def test_a_catalogue_that_cannot_fit_is_refused_with_the_numbers():
    result = foundation("plan", "tables.items.rows=10000000000", "world_size=8", check=False)
    assert result.returncode == 2
    assert "the tables do not fit: 4,805.6 GiB" in result.stderr + result.stdout
    # The tables fit, but every rank would score every rank's positions against its slice.
    result = foundation("plan", *LARGE, "loss=full_softmax", check=False)
    printed = result.stderr + result.stdout
    assert result.returncode == 2 and "does not fit" in printed, printed
    assert "the largest part is scoring" in printed


def test_dense_state_follows_the_zero_stage_and_tables_their_optimizer():
    params, world = 1000, 4
    # fp32 weights, gradients and AdamW's two moments: 16 bytes a parameter, split by stage
    assert [dense_bytes(params, stage, world) for stage in range(4)] == [
        16000, 8000 + 2000, 4000 + 3000, 4000]
    # FSDP splits all of it, as ZeRO-3 does
    assert sharding_stage(EngineConfig(name=EngineName.fsdp, zero_stage=0)) == 3
    assert sharding_stage(EngineConfig(zero_stage=1)) == 1
    rows, cols = 10, 8
    assert optimizer_bytes(SparseOptimizer.rowwise_adagrad, rows, cols) == 4 * rows
    assert optimizer_bytes(SparseOptimizer.adagrad, rows, cols) == 4 * rows * cols
    assert optimizer_bytes(SparseOptimizer.adam, rows, cols) == 8 * rows * cols
    assert optimizer_bytes(SparseOptimizer.partial_rowwise_adam, rows, cols) == 4 * rows * (cols + 1)
    assert optimizer_bytes(SparseOptimizer.sgd, rows, cols) == 0


def test_the_adam_family_is_planned_for_gpus_and_refused_on_cpu_with_the_choices():
    out = foundation("plan", "sharding.optimizer=partial_rowwise_adam")
    assert "fits" in out or "items_table" in out
    result = foundation("plan", "device=cpu", "sharding.types=[table_wise]",
                        "sharding.optimizer=partial_rowwise_adam", check=False)
    assert result.returncode == 2
    assert "no fused CPU kernel" in result.stderr and "rowwise_adagrad" in result.stderr


def test_a_negative_table_warmup_is_refused_before_training():
    result = foundation("plan", "device=cpu", "sharding.types=[table_wise]",
                        "sharding.warmup_steps=-5", check=False)
    assert result.returncode == 2 and "sharding.warmup_steps=-5: must be ≥ 0" in result.stderr
