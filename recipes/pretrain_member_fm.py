"""Pretrain the member foundation model: next-item prediction over member histories."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from foundation.eval.metrics import rank_metrics, sampled_ranks, target_ranks, top_k_items
from foundation.models.losses import full_softmax_loss, next_item_pairs, sampled_softmax_loss
from foundation.models.member import (
    EventEncoder,
    ItemAttributes,
    MemberModelConfig,
    last_states,
    sharded_items,
    sparse_features,
)
from foundation.tasks import Task, all_concat, all_max, split_last_event, synchronised


@dataclass
class PretrainConfig:
    name: str = "pretrain_member_fm"
    loss: str = "sampled_softmax"  # sampled_softmax | full_softmax (small catalogues)
    num_negatives: int = 256  # uniform negatives shared by the batch
    in_batch_negatives: bool = True
    logq_correction: bool = True
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    exclude_history: bool = True  # full ranking without the items already in the history
    sampled_negatives: int = 0  # also rank among N seeded random items (0: off), as some papers


class NextItemModel(nn.Module):
    def __init__(self, model: MemberModelConfig, recipe: PretrainConfig, log_item_prob: Tensor,
                 attributes: ItemAttributes | None = None):
        super().__init__()
        self.recipe = recipe
        self.encoder = EventEncoder(model)
        self.attributes = attributes
        # A replicated item table lives here, trained by the dense engine (model.item_table).
        self.item_table = None if sharded_items(model) else nn.Embedding(
            log_item_prob.numel(), model.embedding_dim, padding_idx=0)
        if self.item_table is not None:
            nn.init.normal_(self.item_table.weight, std=model.embedding_dim ** -0.5)
        self.register_buffer("log_item_prob", log_item_prob, persistent=False)

    def item_vectors(self, items: Tensor, embeddings: Tensor | None) -> Tensor:
        """Items' table embeddings (``embeddings``, from the sharded table, or the replicated
        table's rows), plus their side information when the model has it."""
        vectors = embeddings if self.item_table is None else self.item_table(items)
        return vectors if self.attributes is None else vectors + self.attributes(items)

    def forward(self, batch, emb: dict[str, Tensor], negatives: Tensor | None = None,
                mode: str = "train") -> Tensor:
        """``train``: the loss; ``encode``: each row's last state; ``items``: the vectors of
        ``negatives`` (the catalogue, for scoring)."""
        if mode == "items":
            return self.item_vectors(negatives, emb.get("negative"))
        emb = {**emb, "item": self.item_vectors(batch.item, emb.get("item"))}
        states, mask = self.encoder(emb, batch.lengths, newest_is_target=mode == "train",
                                   timestamps=batch.timestamp)
        if mode == "encode":
            return last_states(states, mask)
        query_index, target_index = next_item_pairs(states, mask, batch.lengths)
        queries, targets = states.flatten(0, 1)[query_index], batch.item[target_index]
        negative_vectors = self.item_vectors(negatives, emb.get("negative"))
        if self.recipe.loss == "full_softmax":  # negatives: every item 1..V-1, in order
            return full_softmax_loss(queries, targets, negative_vectors)
        return sampled_softmax_loss(
            queries, targets, emb["item"][target_index], negatives, negative_vectors,
            log_item_prob=self.log_item_prob if self.recipe.logq_correction else None,
            in_batch=self.recipe.in_batch_negatives)


class PretrainMemberFM(Task):
    name = "pretrain_member_fm"
    config_class = PretrainConfig
    summary = "member foundation model: causal transformer, next-item sampled softmax"
    eval_metric = "hr@10"

    def build_dense(self) -> nn.Module:
        counts = self.item_counts + 1.0  # add-one: unseen items still have a proposal rate
        counts[0] = 0.0
        log_prob = (counts / counts.sum()).clamp_min(1e-12).log()
        found = self.item_attributes() if self.cfg.model.side_features else None
        attributes = ItemAttributes(*found, dim=self.cfg.model.embedding_dim) if found else None
        return NextItemModel(self.cfg.model, self.recipe, log_prob, attributes)

    def features(self, batch):
        if self.recipe.loss == "full_softmax":
            negatives = torch.arange(1, self.num_items)
        else:
            negatives = torch.randint(1, self.num_items, (self.recipe.num_negatives,))
        kjt = sparse_features(batch, negatives=negatives, with_items=self.sharded_items)
        return kjt, {"negatives": negatives}

    @torch.no_grad()
    def catalogue_vectors(self, model) -> Tensor:
        """Every item's scoring vector ``[V, D]`` (table row + side features); collective."""
        everything = torch.arange(self.num_items)
        looked_up = {"negative": model.catalogue()} if self.sharded_items else {}
        return model.dense(None, looked_up, everything, mode="items")

    @torch.no_grad()
    def member_vectors(self, model, history) -> Tensor:
        """Each history's member embedding ``[B, D]`` (its newest state); collective."""
        emb = model.embed(sparse_features(history, with_items=self.sharded_items))
        return model.dense(history, emb, mode="encode")

    @torch.no_grad()
    def evaluate(self, model, batches):
        """Leave-last-out full ranking over the catalogue (and, with ``sampled_negatives``,
        among that many random items), next to the most-popular baselines. Returns the
        metrics and every user's target rank (``ranks``, for paired comparisons)."""
        catalogue = self.catalogue_vectors(model)
        ks = self.recipe.ks
        baselines = self.popularity_baselines
        parts: dict[str, list] = {"sample_id": [], "model": [], **{n: [] for n in baselines}}
        if self.recipe.sampled_negatives:
            parts["model_sampled"] = []
        covered = torch.zeros(self.num_items, dtype=torch.bool)
        for batch, real in synchronised(batches, model.world_size):
            history, targets = split_last_event(batch)
            scores = self.member_vectors(model, history) @ catalogue.T
            if not real:
                continue
            exclude = self._excluded(history, scores.shape)
            parts["sample_id"].append(batch.sample_ids.numpy())
            parts["model"].append(target_ranks(scores, targets, exclude).numpy())
            for name, counts in baselines.items():
                parts[name].append(target_ranks(counts.expand_as(scores), targets, exclude).numpy())
            if self.recipe.sampled_negatives:
                parts["model_sampled"].append(sampled_ranks(
                    scores, targets, exclude, batch.sample_ids, self.recipe.sampled_negatives,
                    self.cfg.seed).numpy())
            covered |= top_k_items(scores, exclude, max(ks))
        ranks = {name: all_concat(arrays, model.world_size) for name, arrays in parts.items()}
        metrics = {**rank_metrics(ranks["model"], ks), "users": float(len(ranks["model"])),
                   f"coverage@{max(ks)}": all_max(covered, model.world_size).float().mean().item()}
        if self.recipe.sampled_negatives:
            sampled = rank_metrics(ranks["model_sampled"], ks)
            metrics.update({f"sampled_{k}": v for k, v in sampled.items()})
        return {"metrics": metrics,
                "baselines": {name: rank_metrics(ranks[name], ks) for name in baselines},
                "ranks": ranks}

    def _excluded(self, history, shape) -> Tensor:
        exclude = torch.zeros(shape, dtype=torch.bool)
        exclude[:, 0] = True  # padding id
        if self.recipe.exclude_history:
            rows = torch.repeat_interleave(torch.arange(len(history)), history.lengths)
            exclude[rows, history.item] = True
        return exclude
