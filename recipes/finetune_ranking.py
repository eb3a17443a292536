"""Fine-tune for ranking: will the member engage with this candidate title, given the history?"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from foundation.metrics import auc, calibration_error, log_loss
from foundation.models.candidates import TargetAwareScorer
from foundation.models.content import ItemContent
from foundation.models.finetune import FinetuneConfig
from foundation.models.member import ItemAttributes, MemberModelConfig
from foundation.tasks import CandidateTask, register_recipe


@dataclass
class RankingConfig(FinetuneConfig):
    name: str = "finetune_ranking"
    mlp_hidden: int = 128


class TargetAwareRanker(TargetAwareScorer):
    """One engagement logit per impression."""

    def __init__(self, model: MemberModelConfig, recipe: RankingConfig,
                 token_features: tuple[str, ...] | None = None,
                 attributes: ItemAttributes | None = None, content: ItemContent | None = None):
        super().__init__(model, recipe.mlp_hidden, 1, token_features, attributes, content)

    def forward(self, batch, emb: dict[str, Tensor], mode: str = "train") -> Tensor:
        logits = self.logits(batch, emb).squeeze(-1)
        if mode == "train":
            return F.binary_cross_entropy_with_logits(logits, batch.labels.float())
        return logits


@register_recipe
class FinetuneRanking(CandidateTask):
    name = "finetune_ranking"
    config_class = RankingConfig
    summary = "ranking fine-tune: target-aware engagement classifier, warm-started from pretraining"
    data_mode = "ranking"
    eval_metric = "auc"
    output_names = ("engage",)
    output_meaning = "P(engage) = sigmoid(engage)"

    def build_dense(self) -> nn.Module:
        return TargetAwareRanker(self.cfg.model, self.recipe, self.token_features, *self.item_parts())

    def evaluate(self, model, batches, split=None, calibrate=False):
        """AUC and log loss over every impression of the split, next to a popularity scorer."""
        data = self.candidate_columns(model, batches, lambda batch, out: {
            "logit": out, "label": batch.labels, "popular": self.item_counts[batch.candidates]})
        logits, labels, popular = data["logit"], data["label"], data["popular"]
        probs = 1 / (1 + np.exp(-logits))
        metrics = {"auc": auc(logits, labels), "log_loss": log_loss(probs, labels),
                   "calibration_error": calibration_error(probs, labels),
                   "impressions": float(len(labels)), "positive_rate": float(labels.mean())}
        scores = {"row_id": data["row_id"].astype(np.int64), "label": labels, "kind": np.array("binary"),
                  "score_model": logits, "score_most_popular": popular}
        return {"metrics": metrics, "baselines": {"most_popular": {"auc": auc(popular, labels)}},
                "scores": scores}
