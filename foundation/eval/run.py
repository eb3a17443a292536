"""``foundation eval run_dir=RUN [split=test]``: evaluate a run's checkpoint on a split.

Works on any world size (alone, or under torchrun): the sharded tables are resharded on load.
Rank 0 writes ``RUN/eval.json`` (``{"split", "headline", "metrics", "baselines"}``: the
headline is the recipe's main metric), ``RUN/eval.md`` and,
for ranking-by-catalogue recipes, ``RUN/eval-ranks.npz`` (each user's target rank under the
model and each baseline, by sample id) and, for recipes scoring given candidates (ranking,
notification), ``RUN/eval-scores.npz`` (each candidate's score under the model and each
baseline, with its labels) for ``foundation eval compare``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from omegaconf import DictConfig

from foundation.distributed.env import DistEnv, init_distributed, seed_everything
from foundation.metrics.report import write_evaluation
from foundation.recipes import build_task
from foundation.tasks import Task, read_run_config
from foundation.train import checkpoint
from foundation.train.model import ShardedModel
from foundation.train.stream import EpochStream

log = logging.getLogger(__name__)


@dataclass
class TrainedRun:
    """A run's checkpoint loaded for inference on this process group (any world size)."""

    cfg: DictConfig  # the training config
    task: Task
    model: ShardedModel
    checkpoint: Path
    env: DistEnv

    def batches(self, split: str, batch_size: int):
        stream = EpochStream(self.cfg.data, mode=self.task.data_mode, seed=self.cfg.seed,
                             rank=self.env.rank, world_size=self.env.world_size,
                             options=self.task.loader_options())
        return stream.loader(split, batch_size=batch_size)


def load_run(run_dir: Path, which: str, env: DistEnv) -> TrainedRun:
    """Load ``run_dir``'s checkpoint ``which`` (latest | best | step-N), sharded over ``env``."""
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir}/config.yaml not found: run_dir must be a training "
                                f"run directory (the run_dir=... given to `foundation train`)")
    path = checkpoint.resolve(run_dir, which)
    train_cfg = read_run_config(run_dir)
    task = build_task(train_cfg)
    seed_everything(train_cfg.seed)
    base = checkpoint.base_of(path)  # a fine-tune's checkpoint may hold only what it trained
    model = ShardedModel(task, train_cfg, env, train=False, warm_start=base)
    if (path / "sparse").exists():  # absent: the tables were frozen, the base's are loaded
        checkpoint.load_sparse(path, model.sparse)
    if base is None:
        checkpoint.load_dense(path, model.dense_module)
    else:
        checkpoint.load_trained(path, model.dense_module)
    model.train(False)
    return TrainedRun(train_cfg, task, model, path, env)


def evaluate_run(cfg: DictConfig) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir)
    env = init_distributed()
    try:
        run = load_run(run_dir, cfg.checkpoint, env)
        task, path = run.task, run.checkpoint
        result = task.evaluate(run.model, run.batches(cfg.split, cfg.batch_size), split=cfg.split)
        return write_evaluation(run_dir, result, split=cfg.split, checkpoint=path.name,
                                recipe=task.name, headline=task.eval_metric,
                                is_main=env.is_main)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
