"""Fine-tune for ranking: will the member engage with this candidate title, given the history?"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foundation.metrics import auc, calibration_error, log_loss
from foundation.models.finetune import FinetuneConfig
from foundation.models.member import EventEncoder, MemberModelConfig, last_states
from foundation.tasks import PRETRAIN_ONLY_KEYS, Task, all_concat, register_recipe, synchronised


@dataclass
class RankingConfig(FinetuneConfig):
    name: str = "finetune_ranking"
    mlp_hidden: int = 128


class TargetAwareRanker(nn.Module):
    """Candidate-aware attention over the encoded history (DIN-style), then an MLP."""

    def __init__(self, model: MemberModelConfig, recipe: RankingConfig,
                 token_features: tuple[str, ...] | None = None):
        super().__init__()
        dim = model.embedding_dim
        self.encoder = EventEncoder(model, token_features)
        self.head = nn.Sequential(nn.Linear(4 * dim + 2, recipe.mlp_hidden), nn.GELU(),
                                  nn.Dropout(model.dropout), nn.Linear(recipe.mlp_hidden, 1))

    def forward(self, batch, emb: dict[str, Tensor], mode: str = "train") -> Tensor:
        states, mask = self.encoder(emb, batch.lengths, timestamps=batch.timestamp)
        rows = torch.repeat_interleave(torch.arange(len(batch), device=states.device),
                                       batch.candidate_lengths)
        cand = emb["candidate"]
        attn = torch.einsum("kd,kld->kl", cand, states[rows]) / cand.shape[-1] ** 0.5
        attn = attn.masked_fill(~mask[rows], float("-inf")).softmax(-1)
        pooled = torch.einsum("kl,kld->kd", attn, states[rows])
        last = last_states(states, mask)[rows]
        # The pretrained next-item score (last · candidate) is the strongest single signal;
        # an MLP over concatenations cannot form dot products by itself, so hand them over.
        scores = torch.stack([(last * cand).sum(-1), (pooled * cand).sum(-1)], -1)
        features = torch.cat([pooled * cand, last * cand, cand, last, scores], -1)
        logits = self.head(features).squeeze(-1)
        if mode == "train":
            return F.binary_cross_entropy_with_logits(logits, batch.labels.float())
        return logits

@register_recipe
class FinetuneRanking(Task):
    name = "finetune_ranking"
    config_class = RankingConfig
    summary = "ranking fine-tune: target-aware engagement classifier, warm-started from pretraining"
    data_mode = "ranking"
    eval_metric = "auc"
    new_keys = ("head.",)  # the ranker's MLP; the event encoder comes from the pretrain run
    unused_keys = PRETRAIN_ONLY_KEYS

    def __init__(self, cfg, manifest, item_counts):
        super().__init__(cfg, manifest, item_counts)
        if not self.sharded_items:
            raise ValueError("finetune_ranking needs model.item_table=sharded (its candidates "
                             "are looked up in the sharded item table); pretrain with it too")

    def build_dense(self) -> nn.Module:
        return TargetAwareRanker(self.cfg.model, self.recipe, self.token_features)

    @torch.no_grad()
    def evaluate(self, model, batches, split=None, calibrate=False):
        """AUC and log loss over every impression of the split, next to a popularity scorer."""
        logits, labels, popular = [], [], []
        for batch, real in synchronised(batches, model.world_size):
            kjt, _ = self.features(batch)
            out = model.dense(batch, model.embed(kjt), mode="eval")
            if real:
                logits.append(out.double().numpy())
                labels.append(batch.labels.double().numpy())
                popular.append(self.item_counts[batch.candidates].double().numpy())
        logits, labels, popular = (all_concat(x, model.world_size) for x in (logits, labels, popular))
        probs = 1 / (1 + np.exp(-logits))
        metrics = {"auc": auc(logits, labels), "log_loss": log_loss(probs, labels),
                   "calibration_error": calibration_error(probs, labels),
                   "impressions": float(len(labels)), "positive_rate": float(labels.mean())}
        return {"metrics": metrics, "baselines": {"most_popular": {"auc": auc(popular, labels)}}}
