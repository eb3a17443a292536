"""A task's model, placed: the sparse arch sharded by DMP, the dense arch under its engine."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from foundation.distributed.engine import DeepSpeedDenseEngine, EngineName
from foundation.distributed.env import DistEnv
from foundation.distributed.fsdp import FsdpDenseEngine
from foundation.distributed.planning import log_rank_bytes
from foundation.distributed.sharding import set_table_lr, shard_sparse_arch, table_parameters
from foundation.models.finetune import FinetuneConfig, Tuning, apply_finetune
from foundation.models.member import sparse_features
from foundation.tasks import Task
from foundation.train import checkpoint

log = logging.getLogger(__name__)


class ShardedModel:
    def __init__(self, task: Task, cfg: DictConfig, env: DistEnv, *, train: bool,
                 total_steps: int = 1, warm_start: Path | None = None):
        self.task, self.env, self.world_size = task, env, env.world_size
        settings = task.finetune()
        sharding = cfg.sharding if warm_start is None or settings is None else OmegaConf.merge(
            cfg.sharding, {"lr": settings.table_lr})
        sparse = task.build_sparse(torch.device("meta"))
        shapes = {name: tuple(w.shape) for name, w in table_parameters(sparse)}
        self.sparse, self.plan = shard_sparse_arch(sparse, sharding, env)
        self.table_lr, self.table_warmup = sharding.lr, sharding.warmup_steps
        dense = task.build_dense()
        if train and env.is_main:
            log_rank_bytes(shapes, cfg, self.plan, sum(p.numel() for p in dense.parameters()),
                           task.num_items, env.world_size)
        if warm_start is not None:
            # Before the engine wraps the module: ZeRO then partitions the loaded weights.
            checkpoint.load_sparse(warm_start, self.sparse, optimizer=True)
            checkpoint.load_dense(warm_start, dense, new=task.new_keys, unused=task.unused_keys)
        self.tuning = self._finetune(task, settings, dense, train)
        self.engine = None
        if train:
            engine = {EngineName.deepspeed: DeepSpeedDenseEngine,
                      EngineName.fsdp: FsdpDenseEngine}[EngineName(cfg.engine.name)]
            self.engine = engine(
                dense, cfg.engine, cfg.trainer.optim, micro_batch=cfg.data.batch_size,
                grad_accum=cfg.trainer.grad_accum, total_steps=total_steps, device=env.device)
            self.dense = self.engine
        else:
            self.dense = dense.to(env.device).eval()

    def _finetune(self, task: Task, settings: FinetuneConfig | None, dense: torch.nn.Module,
                  train: bool) -> Tuning | None:
        """Apply the recipe's fine-tune mode (after the warm start: LoRA adapts the loaded
        weights; evaluation rebuilds the same modules before loading a checkpoint)."""
        if settings is None:
            return None
        tables = sum(math.prod(v.size()) for v in self.sparse.state_dict().values())
        tuning = apply_finetune(dense, settings, task.new_keys, tables)
        if train and self.env.is_main:
            log.info(tuning.describe())
        return tuning

    @property
    def tables_frozen(self) -> bool:
        return self.tuning is not None and not self.tuning.tables_train

    @property
    def dense_module(self) -> torch.nn.Module:
        return self.engine.module if self.engine is not None else self.dense

    def embed(self, features) -> dict[str, Tensor]:
        looked_up = self.sparse(features.to(self.env.device))
        if self.tables_frozen:  # no gradient reaches the tables: their fused optimizer idles
            return {key: value.detach() for key, value in looked_up.items()}
        return looked_up

    def schedule_tables(self, step: int) -> None:
        """The tables' learning rate for ``step`` (1-based): linear over
        ``sharding.warmup_steps``, then ``sharding.lr`` as the kernels were built with."""
        if step <= self.table_warmup:
            set_table_lr(self.sparse, self.table_lr * step / self.table_warmup)

    def train(self, mode: bool = True) -> None:
        self.sparse.train(mode)
        (self.engine if self.engine is not None else self.dense).train(mode)

    @torch.no_grad()
    def catalogue(self, chunk: int = 65536) -> Tensor:
        """Every item's embedding ``[V, D]``, looked up through the sharded table."""
        parts = []
        for start in range(0, self.task.num_items, chunk):
            ids = torch.arange(start, min(start + chunk, self.task.num_items))
            kjt = sparse_features(negatives=ids, event_keys=tuple(self.task.schema.sizes))
            parts.append(self.embed(kjt)["negative"])
        return torch.cat(parts)
