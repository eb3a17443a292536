"""Pretrain the member foundation model: next-item prediction over member histories."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from foundation.eval.metrics import means, ranking_sums, target_ranks
from foundation.models.losses import next_item_pairs, sampled_softmax_loss
from foundation.models.member import EventEncoder, MemberModelConfig, last_states, sparse_features
from foundation.tasks import Task, all_sum, split_last_event, synchronised


@dataclass
class PretrainConfig:
    name: str = "pretrain_member_fm"
    loss: str = "sampled_softmax"  # sampled_softmax | full_softmax (small catalogues)
    num_negatives: int = 256  # uniform negatives shared by the batch
    in_batch_negatives: bool = True
    logq_correction: bool = True
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    exclude_history: bool = True  # full ranking without the items already in the history


class NextItemModel(nn.Module):
    def __init__(self, model: MemberModelConfig, recipe: PretrainConfig, log_item_prob: Tensor):
        super().__init__()
        self.recipe = recipe
        self.encoder = EventEncoder(model)
        self.register_buffer("log_item_prob", log_item_prob, persistent=False)

    def forward(self, batch, emb: dict[str, Tensor], negatives: Tensor | None = None,
                mode: str = "train") -> Tensor:
        states, mask = self.encoder(emb, batch.lengths)
        if mode == "encode":
            return last_states(states, mask)
        query_index, target_index = next_item_pairs(states, mask, batch.lengths)
        full = self.recipe.loss == "full_softmax"
        return sampled_softmax_loss(
            states.flatten(0, 1)[query_index], batch.item[target_index], emb["item"][target_index],
            negatives, emb["negative"],
            log_item_prob=None if full or not self.recipe.logq_correction else self.log_item_prob,
            in_batch=self.recipe.in_batch_negatives and not full)


class PretrainMemberFM(Task):
    name = "pretrain_member_fm"
    config_class = PretrainConfig
    summary = "member foundation model: causal transformer, next-item sampled softmax"
    eval_metric = "hr@10"

    def build_dense(self) -> nn.Module:
        counts = self.item_counts + 1.0  # add-one: unseen items still have a proposal rate
        counts[0] = 0.0
        log_prob = (counts / counts.sum()).clamp_min(1e-12).log()
        return NextItemModel(self.cfg.model, self.recipe, log_prob)

    def features(self, batch):
        if self.recipe.loss == "full_softmax":
            negatives = torch.arange(1, self.num_items)
        else:
            negatives = torch.randint(1, self.num_items, (self.recipe.num_negatives,))
        kjt = sparse_features(batch, negatives=negatives)
        return kjt, {"negatives": negatives}

    @torch.no_grad()
    def evaluate(self, model, batches):
        """Leave-last-out full ranking over the catalogue, next to most-popular."""
        catalogue = model.catalogue()
        sums = {"model": [], "most_popular": []}
        for batch, real in synchronised(batches, model.world_size):
            history, targets = split_last_event(batch)
            emb = model.embed(sparse_features(history))
            scores = model.dense(history, emb, mode="encode") @ catalogue.T
            if not real:
                continue
            exclude = self._excluded(history, scores.shape)
            sums["model"].append(ranking_sums(target_ranks(scores, targets, exclude), self.recipe.ks))
            popular = self.item_counts.expand_as(scores)
            sums["most_popular"].append(
                ranking_sums(target_ranks(popular, targets, exclude), self.recipe.ks))
        results = {}
        for name, parts in sums.items():
            total = {k: sum(p.get(k, 0.0) for p in parts) for k in _keys(self.recipe.ks)}
            results[name] = means(all_sum(total, model.world_size))
        results["model"]["users"] = all_sum({"count": sum(p["count"] for p in sums["model"])},
                                            model.world_size)["count"]
        return {"metrics": results["model"], "baselines": {"most_popular": results["most_popular"]}}

    def _excluded(self, history, shape) -> Tensor:
        exclude = torch.zeros(shape, dtype=torch.bool)
        exclude[:, 0] = True  # padding id
        if self.recipe.exclude_history:
            rows = torch.repeat_interleave(torch.arange(len(history)), history.lengths)
            exclude[rows, history.item] = True
        return exclude


def _keys(ks: list[int]) -> list[str]:
    return ["count", "mrr"] + [f"{m}@{k}" for k in ks for m in ("hr", "ndcg")]
