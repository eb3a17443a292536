"""Shard the sparse arch with TorchRec's planner and ``DistributedModelParallel``."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from foundation.choices import Choice, choice
from foundation.distributed.env import DistEnv

if TYPE_CHECKING:  # TorchRec is imported where tables are sharded: config and CLI stay light
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner import ParameterConstraints
    from torchrec.distributed.types import ShardingPlan

# Topology() built directly is fine for our explicit world size; silence its nag.
logging.getLogger("torchrec.distributed.planner.types").setLevel(logging.ERROR)
logging.getLogger("torchrec.distributed.planner.storage_reservations").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*HeuristicalStorageReservation.*")
warnings.filterwarnings("ignore", message=".*Please use DTensor instead.*")


class ShardingType(Choice):
    table_wise = "table_wise"
    column_wise = "column_wise"
    row_wise = "row_wise"
    table_row_wise = "table_row_wise"
    data_parallel = "data_parallel"


class SparseOptimizer(Choice):
    """Fused into the backward pass (fbgemm); the Adam family only on GPU (partial row-wise
    Adam: a per-weight first moment, a per-row second moment)."""
    rowwise_adagrad = "rowwise_adagrad"
    adagrad = "adagrad"
    sgd = "sgd"
    adam = "adam"
    partial_rowwise_adam = "partial_rowwise_adam"


# Sharding types of EmbeddingCollection tables that work on each device type. On CPU,
# fbgemm-gpu-cpu 1.8's dense kernel (used by data_parallel) pools sequence embeddings, so
# data_parallel EmbeddingCollections return wrong shapes: it is refused there, with the reason.
SUPPORTED_TYPES = {
    "cpu": ("table_wise", "column_wise"),
    "cuda": ("table_wise", "column_wise", "row_wise", "table_row_wise", "data_parallel"),
}
# fbgemm's CPU kernels implement only the Adagrad family and SGD.
CPU_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")


def sparse_optimizer_class(optimizer: SparseOptimizer) -> type:
    """The optimizer class TorchRec fuses into the tables' backward."""
    from torchrec import optim as trec_optim

    return {SparseOptimizer.rowwise_adagrad: trec_optim.RowWiseAdagrad,
            SparseOptimizer.adagrad: torch.optim.Adagrad,
            SparseOptimizer.adam: torch.optim.Adam,
            SparseOptimizer.partial_rowwise_adam: trec_optim.PartialRowWiseAdam,
            SparseOptimizer.sgd: torch.optim.SGD}[optimizer]


@dataclass
class ShardingConfig:
    # Sharding types the planner may choose from for the item table, best first.
    types: list[ShardingType] = field(default_factory=lambda: [ShardingType.table_wise])
    optimizer: SparseOptimizer = SparseOptimizer.rowwise_adagrad
    lr: float = 0.1
    eps: float = 1e-8
    # The tables' learning rate rises linearly to ``lr`` over this many steps: Adagrad's
    # first steps are its largest (a new row moves by about ``lr`` per dimension at once).
    warmup_steps: int = 0


def validate_sharding(cfg: ShardingConfig, device_type: str) -> None:
    supported = SUPPORTED_TYPES.get(device_type, SUPPORTED_TYPES["cpu"])
    types = sharding_types(cfg)
    bad = [t for t in types if t not in supported]
    if bad or not types:
        hint = " (fbgemm-gpu-cpu's data_parallel sequence kernel pools on CPU)" if "data_parallel" in bad else ""
        raise ValueError(f"sharding.types={types}: {bad or 'empty'} not supported on "
                         f"{device_type}{hint}; choose from {list(supported)}")
    if cfg.warmup_steps < 0:
        raise ValueError(f"sharding.warmup_steps={cfg.warmup_steps}: must be ≥ 0 (0: the "
                         f"tables start at sharding.lr)")
    optimizer = choice(SparseOptimizer, cfg.optimizer, "sharding.optimizer").value
    if device_type == "cpu" and optimizer not in CPU_OPTIMIZERS:
        raise ValueError(f"sharding.optimizer={optimizer} has no fused CPU kernel in fbgemm; "
                         f"on CPU choose from {list(CPU_OPTIMIZERS)}")


def sharding_types(cfg: ShardingConfig) -> list[str]:
    """``cfg.types`` as the planner's strings."""
    return [choice(ShardingType, t, "sharding.types").value for t in cfg.types]


def shard_sparse_arch(module: nn.Module, cfg: ShardingConfig, env: DistEnv
                      ) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Plan and shard ``module`` (built on the meta device); embeddings train in backward."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.types import Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    validate_sharding(cfg, env.device.type)
    optimizer = SparseOptimizer(cfg.optimizer)
    kwargs = ({"lr": cfg.lr} if optimizer == SparseOptimizer.sgd
              else {"lr": cfg.lr, "eps": cfg.eps})
    apply_optimizer_in_backward(sparse_optimizer_class(optimizer), module.parameters(), kwargs)
    sharders = [EmbeddingCollectionSharder()]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=env.world_size, compute_device=env.device.type,
                          local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))),
        constraints=table_constraints(module, cfg, env.world_size))
    plan = planner.collective_plan(module, sharders, dist.GroupMember.WORLD)
    model = DistributedModelParallel(module, device=env.device, plan=plan, sharders=sharders)
    return model, plan


def set_table_lr(model: DistributedModelParallel, lr: float) -> None:
    """Every table's learning rate; the fused optimizers take it when stepped (their updates
    ran in the backward pass already, so the step only hands the rate to the kernels)."""
    for group in model.fused_optimizer.param_groups:
        group["lr"] = lr
    model.fused_optimizer.step()


def table_constraints(module: nn.Module, cfg: ShardingConfig, world_size: int
                      ) -> dict[str, ParameterConstraints]:
    """What the planner may do with each table: the configured sharding types; column
    shards no narrower than the table's width over the ranks."""
    from torchrec.distributed.planner import ParameterConstraints

    return {name: ParameterConstraints(sharding_types=sharding_types(cfg),
                                       min_partition=max(4, param.shape[1] // world_size))
            for name, param in table_parameters(module)}


def table_parameters(module: nn.Module):
    """(table name, weight) of each embedding table of ``module``."""
    for name, param in module.named_parameters():
        # "...embeddings.<table>.weight" → "<table>"
        yield name.split(".")[-2], param


def local_shard_shapes(model: DistributedModelParallel) -> dict[str, list[tuple[int, ...]]]:
    """The shapes of the table shards this rank holds, per state-dict key."""
    shapes = {}
    for key, value in model.state_dict().items():
        if hasattr(value, "local_shards"):
            shapes[key] = [tuple(s.tensor.shape) for s in value.local_shards()]
    return shapes
