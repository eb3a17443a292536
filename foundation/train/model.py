"""A task's model, placed: the sparse arch sharded by DMP, the dense arch under its engine."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor

from foundation.distributed.engine import DeepSpeedDenseEngine
from foundation.distributed.env import DistEnv
from foundation.distributed.sharding import shard_sparse_arch
from foundation.models.member import sparse_features
from foundation.tasks import Task
from foundation.train import checkpoint


class ShardedModel:
    def __init__(self, task: Task, cfg: DictConfig, env: DistEnv, *, train: bool,
                 total_steps: int = 1, warm_start: Path | None = None):
        self.task, self.env, self.world_size = task, env, env.world_size
        self.sparse, self.plan = shard_sparse_arch(task.build_sparse(torch.device("meta")),
                                                   cfg.sharding, env)
        dense = task.build_dense()
        if warm_start is not None:
            # Before the engine wraps the module: ZeRO then partitions the loaded weights.
            checkpoint.load_sparse(warm_start, self.sparse)
            checkpoint.load_dense(warm_start, dense, prefixes=task.transfer_prefixes)
        self.engine = None
        if train:
            self.engine = DeepSpeedDenseEngine(
                dense, cfg.engine, cfg.trainer.optim, micro_batch=cfg.data.batch_size,
                grad_accum=cfg.trainer.grad_accum, total_steps=total_steps, device=env.device)
            self.dense = self.engine
        else:
            self.dense = dense.to(env.device).eval()

    @property
    def dense_module(self) -> torch.nn.Module:
        return self.engine.module if self.engine is not None else self.dense

    def embed(self, features) -> dict[str, Tensor]:
        return self.sparse(features.to(self.env.device))

    def train(self, mode: bool = True) -> None:
        self.sparse.train(mode)
        self.dense_module.train(mode)

    @torch.no_grad()
    def catalogue(self, chunk: int = 65536) -> Tensor:
        """Every item's embedding ``[V, D]``, looked up through the sharded table."""
        parts = []
        for start in range(0, self.task.num_items, chunk):
            ids = torch.arange(start, min(start + chunk, self.task.num_items))
            kjt = sparse_features(negatives=ids, event_keys=tuple(self.task.schema.sizes))
            parts.append(self.embed(kjt)["negative"])
        return torch.cat(parts)
