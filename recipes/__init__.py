"""Recipes: one thin task module per job; ``RECIPES`` maps recipe names to task classes."""

from foundation.recipes.finetune_ranking import FinetuneRanking
from foundation.recipes.pretrain_item_encoder import PretrainItemEncoder
from foundation.recipes.pretrain_member_fm import PretrainMemberFM

RECIPES = {task.name: task for task in (PretrainMemberFM, FinetuneRanking, PretrainItemEncoder)}
