"""Recipes: one thin task module per job; ``RECIPES`` maps recipe names to task classes and
``build_task`` makes a run's task (the trainer and the evaluation both start from it)."""

from pathlib import Path

import numpy as np
from foundation.data.writer import load_manifest
from foundation.recipes.finetune_ranking import FinetuneRanking
from foundation.recipes.pretrain_item_encoder import PretrainItemEncoder
from foundation.recipes.pretrain_member_fm import PretrainMemberFM
from omegaconf import DictConfig

from foundation.tasks import Task

RECIPES = {task.name: task for task in (PretrainMemberFM, FinetuneRanking, PretrainItemEncoder)}


def build_task(cfg: DictConfig) -> Task:
    """The task of ``cfg.recipe.name`` on ``cfg.data.path``'s shards."""
    manifest = load_manifest(cfg.data.path)
    counts = np.load(Path(cfg.data.path) / "item_counts.npy", allow_pickle=False)
    return RECIPES[cfg.recipe.name](cfg, manifest, counts)
