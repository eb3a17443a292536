"""Bytes per rank: whether a model's tables and dense state fit a cluster.

``foundation plan`` runs TorchRec's planner on the meta device (nothing is allocated: a
100M-row table plans in about a second) and adds up, for every rank, what it would hold:
its table shards and their optimizer state (from the plan), its ZeRO partition of the dense
state, the loss's scoring buffers and an estimate of the transformer's activations. A plan
that does not fit is refused with those numbers. ``foundation train`` logs the same table
for the plan it runs (``log_rank_bytes``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields

import torch
from omegaconf import DictConfig

from foundation.distributed.engine import sharding_stage
from foundation.distributed.sharding import SparseOptimizer, table_constraints, validate_sharding
from foundation.models.losses import SCORE_CHUNK, Loss

log = logging.getLogger(__name__)

GIB, MIB = 1 << 30, 1 << 20
FP32 = 4
# Dense state bytes per parameter under ZeRO: (held by every rank, split over the ranks).
# fp32 weights 4, gradients 4, AdamW's two moments 8: stage 1 splits the moments, stage 2
# the gradients too, stage 3 the weights too.
ZERO_BYTES = {0: (16, 0), 1: (8, 8), 2: (4, 12), 3: (0, 16)}


class PlanError(ValueError):
    """A plan that does not fit the devices: the message has the numbers."""


@dataclass
class RankBytes:
    tables: int = 0  # the rank's table shards (fp32)
    optimizer: int = 0  # their sparse optimizer state
    dense: int = 0  # its ZeRO partition of the dense weights, gradients and AdamW moments
    scoring: int = 0  # the loss's buffers: logits, the item rows scored, their gradients
    activations: int = 0  # the transformer's saved activations (an estimate)

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


def optimizer_bytes(optimizer: SparseOptimizer, rows: int, cols: int) -> int:
    """A table shard's optimizer state: one accumulator per row for row-wise Adagrad, one
    per weight for Adagrad, two for Adam, one per weight and one per row for partial row-wise
    Adam, none for SGD."""
    optimizer = SparseOptimizer(optimizer)
    per_weight = {SparseOptimizer.adagrad: 1, SparseOptimizer.adam: 2,
                  SparseOptimizer.partial_rowwise_adam: 1}.get(optimizer, 0)
    per_row = int(optimizer in (SparseOptimizer.rowwise_adagrad,
                                SparseOptimizer.partial_rowwise_adam))
    return FP32 * (rows * per_row + rows * cols * per_weight)


def rank_shards(plan, shapes: dict[str, tuple[int, int]], world_size: int
                ) -> list[list[tuple[str, int, int]]]:
    """Each rank's (table, rows, cols) shards under a TorchRec ``plan`` (a data-parallel
    table: whole on every rank)."""
    held: list[list[tuple[str, int, int]]] = [[] for _ in range(world_size)]
    for module_plan in plan.plan.values():
        for name, sharding in module_plan.items():
            if sharding.sharding_spec is None:
                for shards in held:
                    shards.append((name, *shapes[name]))
                continue
            for shard in sharding.sharding_spec.shards:
                held[shard.placement.rank()].append((name, *shard.shard_sizes))
    return held


def scoring_bytes(loss: Loss, queries: int, items: int, dim: int, world_size: int,
                  num_negatives: int) -> int:
    """The loss's buffers per rank for ``queries`` training positions: sampled softmax holds
    logits over in-batch targets and the shared negatives; the sharded full softmax gathers
    every rank's queries and scores them against its slice, ``SCORE_CHUNK`` items at a time.
    Each with its gradient."""
    if Loss(loss) == Loss.sampled_softmax:
        return 2 * FP32 * (queries * (queries + num_negatives) + num_negatives * dim)
    everyone, share = world_size * queries, math.ceil((items - 1) / world_size)
    return 2 * FP32 * (everyone * min(share, SCORE_CHUNK) + everyone * dim + share * dim)


def activation_bytes(model, batch_size: int) -> int:
    """Saved activations of the event encoder for one batch, fp32: per layer
    ``L·B·D·(34 + 5·heads·L/D)`` half-precision bytes (Korthikanti et al., 2022), doubled."""
    length, dim = model.max_len, model.embedding_dim
    per_layer = length * batch_size * dim * (34 + 5 * model.num_heads * length / dim)
    return int(2 * model.num_layers * per_layer)


def dense_bytes(params: int, zero_stage: int, world_size: int) -> int:
    held, split = ZERO_BYTES[zero_stage]
    return int(params * (held + split / world_size))


def rank_bytes(plan, shapes: dict[str, tuple[int, int]], *, world_size: int,
               optimizer: SparseOptimizer, dense_params: int, zero_stage: int, loss: Loss,
               model, batch_size: int, items: int, num_negatives: int) -> list[RankBytes]:
    """Every rank's ``RankBytes`` for a plan of tables of ``shapes`` (name → rows, cols)."""
    queries = batch_size * model.max_len
    shared = {"dense": dense_bytes(dense_params, zero_stage, world_size),
              "scoring": scoring_bytes(loss, queries, items, model.embedding_dim, world_size,
                                       num_negatives),
              "activations": activation_bytes(model, batch_size)}
    return [RankBytes(tables=sum(FP32 * rows * cols for _, rows, cols in shards),
                      optimizer=sum(optimizer_bytes(optimizer, rows, cols)
                                    for _, rows, cols in shards), **shared)
            for shards in rank_shards(plan, shapes, world_size)]


def rank_table(per_rank: list[RankBytes], capacity: int | None = None) -> str:
    """The bytes per rank as text (GiB, or MiB for a small model), consecutive ranks with
    equal numbers on one line."""
    unit, size = ("GiB", GIB) if max(r.total for r in per_rank) >= GIB else ("MiB", MIB)
    columns = [f.name for f in fields(RankBytes)]
    header = f"{unit:>13s} " + " ".join(f"{c:>11s}" for c in [*columns, "total"])
    lines = [header + ("" if capacity is None else f" {'of device':>9s}")]
    start = 0
    for rank in range(1, len(per_rank) + 1):
        if rank < len(per_rank) and per_rank[rank] == per_rank[start]:
            continue
        row = per_rank[start]
        ranks = str(start) if rank - 1 == start else f"{start}-{rank - 1}"
        cells = " ".join(f"{getattr(row, c) / size:11.3f}" for c in columns)
        share = "" if capacity is None else f" {row.total / capacity:9.1%}"
        lines.append(f"{'ranks ' + ranks:>13s} {cells} {row.total / size:11.3f}{share}")
        start = rank
    return "\n".join(lines)


def meta_tables(tables: dict[str, tuple[int, int]]) -> torch.nn.Module:
    """An EmbeddingCollection of ``tables`` (name → rows, dim) on the meta device."""
    from torchrec.modules.embedding_configs import EmbeddingConfig
    from torchrec.modules.embedding_modules import EmbeddingCollection

    return EmbeddingCollection(tables=[
        EmbeddingConfig(num_embeddings=rows, embedding_dim=dim, name=name, feature_names=[name])
        for name, (rows, dim) in tables.items()], device=torch.device("meta"))


def dense_parameters(model) -> int:
    """The event encoder's parameters (what ZeRO partitions), counted on the meta device."""
    from foundation.models.member import EventEncoder

    with torch.device("meta"):
        return sum(p.numel() for p in EventEncoder(model).parameters())


def plan_cluster(cfg: DictConfig) -> tuple[object, list[RankBytes]]:
    """TorchRec's plan of ``cfg.tables`` over ``cfg.world_size`` devices and each rank's
    bytes; PlanError if the tables cannot be placed or a rank exceeds its memory."""
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import PlannerError

    device = str(cfg.device)
    try:
        validate_sharding(cfg.sharding, device)
    except ValueError as err:
        raise PlanError(str(err)) from None
    # named as the framework names its tables (and never "items": nn.ModuleDict has one)
    shapes = {f"{name}_table": (int(t.rows), int(t.dim)) for name, t in cfg.tables.items()}
    module = meta_tables(shapes)
    capacity = int(cfg.device_memory_gb * GIB)
    memory = {"hbm_cap": capacity} if device == "cuda" else {"ddr_cap": capacity}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=cfg.world_size, compute_device=device,
                          local_world_size=min(cfg.ranks_per_node, cfg.world_size), **memory),
        constraints=table_constraints(module, cfg.sharding, cfg.world_size))
    tables_bytes = sum(FP32 * rows * dim + optimizer_bytes(cfg.sharding.optimizer, rows, dim)
                       for rows, dim in shapes.values())
    try:
        plan = planner.plan(module, [EmbeddingCollectionSharder()])
    except PlannerError as err:
        reason = str(err).strip().splitlines()[-1].strip().split(", offset")[0]
        raise PlanError(
            f"the tables do not fit: {tables_bytes / GIB:,.1f} GiB of weights and optimizer "
            f"state over {cfg.world_size} × {cfg.device_memory_gb:g} GiB devices (TorchRec's "
            f"planner: {reason}); add ranks, larger devices, or shrink the tables") from None
    items = shapes.get("items_table", next(iter(shapes.values())))[0]
    per_rank = rank_bytes(plan, shapes, world_size=cfg.world_size,
                          optimizer=cfg.sharding.optimizer, dense_params=dense_parameters(
                              cfg.model), zero_stage=sharding_stage(cfg.engine), loss=cfg.loss,
                          model=cfg.model, batch_size=cfg.batch_size, items=items,
                          num_negatives=cfg.num_negatives)
    return plan, per_rank


def run_plan(cfg: DictConfig) -> int:
    """``foundation plan``: print the plan and the bytes per rank; 2 if it does not fit."""
    capacity = int(cfg.device_memory_gb * GIB)
    try:
        plan, per_rank = plan_cluster(cfg)
    except PlanError as err:
        log.error("plan: %s", err)
        return 2
    print(describe_plan(plan))
    print(rank_table(per_rank, capacity))
    worst = max(range(len(per_rank)), key=lambda r: per_rank[r].total)
    peak = per_rank[worst].total
    summary = (f"plan: {len(cfg.tables)} table(s) over {cfg.world_size} ranks; the fullest "
               f"(rank {worst}) holds {peak / GIB:,.2f} GiB of {cfg.device_memory_gb:g} GiB")
    if peak > capacity:
        parts = {f.name: getattr(per_rank[worst], f.name) for f in fields(RankBytes)}
        largest = max(parts, key=parts.get)
        log.error("%s: does not fit (%s); the largest part is %s: %s", summary,
                  ", ".join(f"{name} {size / GIB:,.2f} GiB" for name, size in parts.items()),
                  largest, REMEDIES[largest])
        return 2
    log.info("%s: fits", summary)
    return 0


REMEDIES = {
    "tables": "add ranks or use larger devices (rows are split over the ranks)",
    "optimizer": "sharding.optimizer=rowwise_adagrad (one value per row), or add ranks",
    "dense": "engine.zero_stage=3 (weights, gradients and moments split over the ranks)",
    "scoring": "fewer positions per step (batch_size × model.max_len); with full_softmax, "
               "every rank scores every rank's positions: loss=sampled_softmax",
    "activations": "a smaller batch_size or model.max_len",
}


def describe_plan(plan) -> str:
    """One line per table: its sharding type, kernel and shards."""
    lines = []
    for module_plan in plan.plan.values():
        for name, sharding in module_plan.items():
            spec = sharding.sharding_spec
            shards = (f"{len(spec.shards)} shards of {spec.shards[0].shard_sizes[0]:,} × "
                      f"{spec.shards[0].shard_sizes[1]}" if spec else "replicated on every rank")
            lines.append(f"{name}: {sharding.sharding_type}, {sharding.compute_kernel} kernel, "
                         f"{shards}")
    return "\n".join(lines)


def log_rank_bytes(shapes: dict[str, tuple[int, int]], cfg: DictConfig, plan,
                   dense_params: int, items: int, world_size: int) -> None:
    """At the start of training: the same per-rank table for the plan the run uses."""
    per_rank = rank_bytes(plan, shapes, world_size=world_size,
                          optimizer=cfg.sharding.optimizer, dense_params=dense_params,
                          zero_stage=sharding_stage(cfg.engine),
                          loss=cfg.recipe.get("loss", Loss.sampled_softmax), model=cfg.model,
                          batch_size=cfg.data.batch_size, items=items,
                          num_negatives=cfg.recipe.get("num_negatives", 256))
    capacity = (torch.cuda.get_device_properties(0).total_memory
                if torch.cuda.is_available() else None)
    log.info("bytes per rank (%s):\n%s", describe_plan(plan).replace("\n", "; "),
             rank_table(per_rank, capacity))
