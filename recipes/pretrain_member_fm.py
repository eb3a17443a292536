"""Pretrain the member foundation model: next-item prediction over member histories."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foundation.choices import BundleKind
from foundation.data.batch import SequenceBatch
from foundation.distributed.collectives import catalogue_slice, other_ranks, world
from foundation.metrics import per_user, rank_metrics, sampled_ranks, target_ranks, top_k_items
from foundation.metrics.ann import ann_target_ranks, hnsw_index
from foundation.metrics.calibration import (
    CALIBRATION_K,
    COLD_SCALES,
    choose_cold_scale,
    reference_warm_ndcg,
)
from foundation.models.content import ContentMatch, ItemContent
from foundation.models.history import HistoryBias, add_pairs
from foundation.models.losses import (
    Loss,
    full_softmax_loss,
    log_item_probability,
    next_item_pairs,
    sampled_softmax_loss,
    sharded_softmax_loss,
)
from foundation.models.member import (
    EventEncoder,
    ItemAttributes,
    MemberModelConfig,
    last_states,
    pad_jagged,
    sharded_items,
    sparse_features,
)
from foundation.tasks import (
    Task,
    all_concat,
    all_max,
    register_recipe,
    split_last_event,
    synchronised,
)

log = logging.getLogger(__name__)


class Similarity(str, Enum):
    """How a member state scores an item: ``dot`` product, or ``cosine`` divided by
    ``recipe.temperature`` in the loss (rankings only need the item vectors normalised)."""

    dot = "dot"
    cosine = "cosine"


@dataclass
class PretrainConfig:
    name: str = "pretrain_member_fm"
    loss: Loss = Loss.sampled_softmax
    num_negatives: int = 256  # uniform negatives shared by the batch
    popularity_negatives: int = 0  # also negatives drawn by item popularity (logQ-corrected)
    in_batch_negatives: bool = True
    shared_negatives: bool = False  # every rank's in-batch targets are negatives on every rank
    logq_correction: bool = True
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    exclude_history: bool = True  # full ranking without the items already in the history
    sampled_negatives: int = 0  # also rank among N seeded random items (0: off), as some papers
    similarity: Similarity = Similarity.dot
    temperature: float = 0.07  # cosine only: logits are cosines / temperature
    # Also rank through the HNSW index the export ships: each member's top N by the index,
    # rescored exactly (0: off); reported as ann_hr@K, ann_ndcg@K next to the exact ranking.
    ann_candidates: int = 0


class NextItemModel(nn.Module):
    def __init__(self, model: MemberModelConfig, recipe: PretrainConfig, item_counts: Tensor,
                 attributes: ItemAttributes | None = None, content: ItemContent | None = None,
                 token_features: tuple[str, ...] | None = None):
        super().__init__()
        self.recipe = recipe
        self.encoder = EventEncoder(model, token_features)
        self.attributes, self.content = attributes, content
        self.id_dropout = model.id_dropout
        # Items never seen in training (no trained ID row) and dropped IDs share one vector.
        self.fallback = nn.Parameter(torch.zeros(model.embedding_dim)) if (
            content is not None or model.id_dropout > 0) else None
        self.register_buffer("seen", item_counts > 0, persistent=False)
        if model.content_match and content is None:
            raise ValueError("model.content_match=true scores items by their content: list "
                             "the modalities to read in model.item_content (e.g. [text])")
        if not 0 <= model.cold_budget < 1:
            raise ValueError(f"model.cold_budget={model.cold_budget}: the fraction of the warm "
                             "users' NDCG that new items may cost, in [0, 1) (e.g. 0.05)")
        self.match = ContentMatch(content, model.max_len) if model.content_match else None
        self.history = HistoryBias(model.max_len) if model.history_bias else None
        # A replicated item table lives here, trained by the dense engine (model.item_table).
        self.item_table = None if sharded_items(model) else nn.Embedding(
            item_counts.numel(), model.embedding_dim, padding_idx=0)
        if self.item_table is not None:
            nn.init.normal_(self.item_table.weight, std=model.embedding_dim ** -0.5)
        self.register_buffer("log_item_prob", log_item_probability(item_counts),
                             persistent=False)

    def uses_id(self, items: Tensor) -> Tensor | None:
        """Which of ``items`` use their ID row (None: all of them): not items never seen in
        training, nor, in training, a random ``id_dropout`` share of the others."""
        if self.fallback is None:
            return None
        use_id = self.seen[items]
        if self.training and self.id_dropout > 0:
            use_id = use_id & (torch.rand(items.shape, device=items.device) >= self.id_dropout)
        return use_id

    def item_vectors(self, items: Tensor, embeddings: Tensor | None,
                     use_id: Tensor | None = None) -> Tensor:
        """Items' vectors as event inputs: their table embeddings (``embeddings``, from the
        sharded table, or the replicated table's rows) or, where ``use_id`` is false, the
        fallback; plus their side information and content when the model has them."""
        vectors = embeddings if self.item_table is None else self.item_table(items)
        if use_id is not None:
            vectors = torch.where(use_id.unsqueeze(-1), vectors, self.fallback)
        if self.attributes is not None:
            vectors = vectors + self.attributes(items)
        return vectors if self.content is None else vectors + self.content(items)

    def scoring(self, vectors: Tensor) -> Tensor:
        """Member states or item vectors as they enter a score (unit length for cosine)."""
        cosine = Similarity(self.recipe.similarity) == Similarity.cosine
        return F.normalize(vectors, dim=-1) if cosine else vectors

    def scored_items(self, vectors: Tensor, items: Tensor, use_id: Tensor | None) -> Tensor:
        """Items' scoring vectors, from their input ``vectors``: with ``content_match``,
        their content part follows."""
        vectors = self.scoring(vectors)
        return vectors if self.match is None else torch.cat(
            [vectors, self.match.items(items, use_id)], -1)

    def item_scoring_vectors(self, items: Tensor, embeddings: Tensor | None) -> Tensor:
        """Items' scoring vectors from their table embeddings, with their own ID-or-fallback
        draw (the catalogue, negatives)."""
        use_id = self.uses_id(items)
        return self.scored_items(self.item_vectors(items, embeddings, use_id), items, use_id)

    def new_item_vectors(self, items: Tensor) -> Tensor:
        """Scoring vectors of items known by their content only (as serving adds them)."""
        no_id = torch.zeros_like(items, dtype=torch.bool)
        return self.scored_items(self.fallback + self.content(items), items, no_id)

    def queries(self, states: Tensor, items: Tensor, lengths: Tensor, mask: Tensor,
                temperature: float = 1.0) -> Tensor:
        """Each position's scoring vector ``[B, L, ·]`` (``temperature`` divides the learned
        part in training): with ``content_match``, its content query follows."""
        queries = self.scoring(states) / temperature
        if self.match is None:
            return queries
        return torch.cat([queries, self.match.members(pad_jagged(items, lengths)[0], mask)], -1)

    def forward(self, batch, emb: dict[str, Tensor], negatives: Tensor | None = None,
                mode: str = "train") -> Tensor:
        """``train``: the loss; ``encode``: each row's member vector; ``items``: the scoring
        vectors of ``negatives`` (the catalogue); ``tokens``: their vectors as event inputs."""
        if mode in ("items", "tokens"):
            if mode == "items":
                return self.item_scoring_vectors(negatives, emb.get("negative"))
            return self.item_vectors(negatives, emb.get("negative"), self.uses_id(negatives))
        if mode == "train" and self.content is not None:
            self.content.begin_step(batch.item)  # tuned towers encode the batch's items
        use_id = self.uses_id(batch.item)
        emb = {**emb, "item": self.item_vectors(batch.item, emb.get("item"), use_id)}
        states, mask = self.encoder(emb, batch.lengths, newest_is_target=mode == "train",
                                   timestamps=batch.timestamp)
        cosine = Similarity(self.recipe.similarity) == Similarity.cosine
        temperature = self.recipe.temperature if cosine and mode == "train" else 1.0
        queries = self.queries(states, batch.item, batch.lengths, mask, temperature)
        if mode == "encode":
            return last_states(queries, mask)
        query_index, target_index = self.training_pairs(states, mask, batch)
        offsets = None if self.history is None else self.history.pairs(
            pad_jagged(batch.item, batch.lengths)[0], mask,
            query_index // mask.shape[1], query_index % mask.shape[1])
        queries, targets = queries.flatten(0, 1)[query_index], batch.item[target_index]
        negative_vectors = self.item_scoring_vectors(negatives, emb.get("negative"))
        # A model that can score new items from their content must not learn, as negatives,
        # the items training never shows: it would learn to bury exactly the cold ones.
        absent = ~self.seen if self.fallback is not None else None
        if Loss(self.recipe.loss) == Loss.full_softmax:  # negatives: items in order
            if self.item_table is None:  # sharded: this rank's slice of the catalogue
                return sharded_softmax_loss(queries, targets, negative_vectors,
                                            int(negatives[0]), absent, offsets,
                                            kernel=self.encoder.cfg.kernel)
            return full_softmax_loss(queries, targets, negative_vectors, absent, offsets,
                                     self.encoder.cfg.kernel)
        target_vectors = self.scored_items(emb["item"][target_index], targets,
                                           None if use_id is None else use_id[target_index])
        return sampled_softmax_loss(
            queries, targets, target_vectors, negatives, negative_vectors,
            log_item_prob=self.log_item_prob if self.recipe.logq_correction else None,
            in_batch=self.recipe.in_batch_negatives, absent=absent, offsets=offsets,
            popular=self.recipe.popularity_negatives,
            shared=other_ranks(targets, target_vectors) if self.recipe.shared_negatives
            else None)

    def training_pairs(self, states: Tensor, mask: Tensor, batch) -> tuple[Tensor, Tensor]:
        """(query, target) indices of the pairs trained on: every state and the next event."""
        return next_item_pairs(states, mask, batch.lengths)

    def history_offsets(self, history) -> tuple[Tensor, Tensor, Tensor] | None:
        """The history bias of each history's newest state (None without one)."""
        if self.history is None:
            return None
        return self.history.newest(*pad_jagged(history.item, history.lengths))


COLD_GROUP = "group_cold"  # in the ranks: whether each user's target is a cold item


@register_recipe
class PretrainMemberFM(Task):
    name = "pretrain_member_fm"
    config_class = PretrainConfig
    summary = "member foundation model: causal transformer, next-item sampled softmax"
    eval_metric = "hr@10"
    export_kind = BundleKind.member_model
    token_batches = True  # a mean over next-item pairs
    model_class: ClassVar[type[NextItemModel]] = NextItemModel

    def build_dense(self) -> nn.Module:
        if self.cfg.model.cold_reference:  # a wrong run fails now, not at the first validation
            log.info("the cold-item weight keeps warm validation NDCG@10 within %.0f%% of "
                     "%s's %.4f", 100 * self.cfg.model.cold_budget,
                     self.cfg.model.cold_reference, self.reference_warm_ndcg)
        attributes, content = self.item_parts()
        return self.model_class(self.cfg.model, self.recipe, self.item_counts, attributes,
                                content, self.token_features, **self.model_options())

    def model_options(self) -> dict[str, Any]:
        """Keyword arguments of ``model_class`` beyond the next-item model's."""
        return {}

    def features(self, batch):
        if Loss(self.recipe.loss) == Loss.full_softmax:  # a sharded table: this rank's slice
            negatives = torch.arange(*catalogue_slice(self.num_items, *world()) if
                                     self.sharded_items else (1, self.num_items))
        else:
            negatives = torch.randint(1, self.num_items, (self.recipe.num_negatives,))
            if self.recipe.popularity_negatives:  # as log_item_probability smooths them
                popular = torch.multinomial(self.popularity, self.recipe.popularity_negatives,
                                            replacement=True)
                negatives = torch.cat([negatives, popular])
        kjt = sparse_features(batch, negatives=negatives, with_items=self.sharded_items)
        return kjt, {"negatives": negatives}

    @functools.cached_property
    def popularity(self) -> Tensor:
        """Items' sampling weights by popularity, add-one smoothed, padding never drawn (the
        distribution of ``log_item_probability``, which corrects for it)."""
        return log_item_probability(self.item_counts).exp().index_fill(0, torch.tensor([0]), 0.0)

    @torch.no_grad()
    def catalogue_vectors(self, model, mode: str = "items") -> Tensor:
        """Every item's scoring vector ``[V, D]`` (table row + side features + content), or
        with ``mode="tokens"`` its vector as an event input; collective."""
        everything = torch.arange(self.num_items)
        looked_up = {"negative": model.catalogue()} if self.sharded_items else {}
        return model.dense(None, looked_up, everything, mode=mode)

    @torch.no_grad()
    def member_vectors(self, model, history) -> Tensor:
        """Each history's member embedding ``[B, D]`` (its newest state); collective."""
        emb = model.embed(sparse_features(history, with_items=self.sharded_items))
        return model.dense(history, emb, mode="encode")

    @torch.no_grad()
    def evaluate(self, model, batches, split=None, calibrate=False):
        """Leave-last-out full ranking over the catalogue (and, with ``sampled_negatives``,
        among that many random items), next to the baselines: most-popular, and with item
        text ``content_knn``. Returns the metrics, every user's target rank (``ranks``, for
        paired comparisons) and, on a build with cold items, the metrics of the users whose
        target is cold and of the others (``groups``). With ``calibrate`` and cold targets
        in ``split``, a content-match model first fits its cold-item weight on them."""
        ks = self.recipe.ks
        cold = self.cold_targets(split)
        scales, width = self._cold_scales(model, calibrate and split == self.cfg.data.val_split)
        catalogue = self.catalogue_vectors(model)
        cold_part = None if width is None else (  # unseen items' content part of their vectors
            catalogue[:, -width:] * (~model.dense_module.seen).unsqueeze(-1))
        baselines = self.baseline_scorers()
        parts: dict[str, list] = {"sample_id": [], "model": [], **{n: [] for n in baselines}}
        if self.recipe.sampled_negatives:
            parts["model_sampled"] = []
        if cold is not None:
            parts[COLD_GROUP] = []
        index = hnsw_index(catalogue.numpy()) if self.recipe.ann_candidates else None
        if index is not None:
            parts["model_ann"] = []
        covered = torch.zeros(len(scales), self.num_items, dtype=torch.bool)
        for batch, real in synchronised(batches, model.world_size):
            history, targets = self.eval_targets(batch)
            members = self.member_vectors(model, history)
            scores = members @ catalogue.T
            offsets = model.dense_module.history_offsets(history)
            if offsets is not None:
                scores = add_pairs(scores, offsets)
            if not real:
                continue
            exclude = self._excluded(history, scores.shape)
            cold_scores = None if cold_part is None else members[:, -width:] @ cold_part.T
            variants = [scores] if cold_part is None else [  # each candidate cold weight
                scores + (scale - 1) * cold_scores for scale in scales]
            parts["sample_id"].append(history.sample_ids.numpy())
            parts["model"].append(np.stack(
                [target_ranks(v, targets, exclude).numpy() for v in variants], 1))
            for name, scorer in baselines.items():
                parts[name].append(target_ranks(scorer(history, scores.shape), targets,
                                                exclude).numpy())
            if self.recipe.sampled_negatives:
                parts["model_sampled"].append(np.stack([sampled_ranks(
                    v, targets, exclude, history.sample_ids, self.recipe.sampled_negatives,
                    self.cfg.seed).numpy() for v in variants], 1))
            if cold is not None:
                parts[COLD_GROUP].append(cold[targets].numpy())
            if index is not None:
                parts["model_ann"].append(ann_target_ranks(
                    index, members, scores, targets, exclude, self.recipe.ann_candidates).numpy())
            covered |= torch.stack([top_k_items(v, exclude, max(ks)) for v in variants])
        ranks = {name: all_concat(arrays, model.world_size) for name, arrays in parts.items()}
        chosen = 0 if len(scales) == 1 else self._fit_cold_scale(
            model, scales, ranks["model"], ranks[COLD_GROUP].astype(bool))
        for name in ("model", "model_sampled"):
            if name in ranks:
                ranks[name] = ranks[name][:, chosen]
        metrics = {**rank_metrics(ranks["model"], ks), "users": float(len(ranks["model"])),
                   f"coverage@{max(ks)}": all_max(covered[chosen],
                                                  model.world_size).float().mean().item()}
        if len(scales) > 1:
            metrics["cold_scale"] = float(scales[chosen])
        if self.recipe.sampled_negatives:
            sampled = rank_metrics(ranks["model_sampled"], ks)
            metrics.update({f"sampled_{k}": v for k, v in sampled.items()})
        if index is not None:  # ranked through the index serving ships
            metrics.update({f"ann_{k}": v for k, v in rank_metrics(ranks["model_ann"], ks).items()})
        result = {"metrics": metrics,
                  "baselines": {name: rank_metrics(ranks[name], ks) for name in baselines},
                  "ranks": ranks}
        if cold is not None:
            is_cold = ranks[COLD_GROUP].astype(bool)
            result["groups"] = {group: {
                "metrics": {**rank_metrics(ranks["model"][users], ks), "users": float(users.sum())},
                "baselines": {name: rank_metrics(ranks[name][users], ks) for name in baselines}}
                for group, users in (("cold", is_cold), ("warm", ~is_cold))
                if users.any()}  # validation holds no cold targets unless built with them
        return result

    def eval_targets(self, batch: SequenceBatch) -> tuple[SequenceBatch, Tensor]:
        """Each evaluated member's history and held-out target: leave-last-out."""
        return split_last_event(batch)

    def _cold_scales(self, model, calibrate: bool) -> tuple[np.ndarray, int | None]:
        """The cold-item weight multiples to try, and the width of the content part of the
        scoring vectors (None: nothing to calibrate, one variant): a content-match model
        calibrates on validation's own cold items (``cold_val_items``). Resets the scale, so
        the candidates multiply the learned weight."""
        match = model.dense_module.match
        if not calibrate or match is None or self.cold_val_items is None:
            return np.ones(1), None
        match.log_cold_scale.zero_()
        return COLD_SCALES, match.unit.shape[1]

    @functools.cached_property
    def reference_warm_ndcg(self) -> float | None:
        """``model.cold_reference``'s warm validation NDCG (None without a reference)."""
        run = self.cfg.model.cold_reference
        return reference_warm_ndcg(Path(run), self.cfg.data.path) if run else None

    def _fit_cold_scale(self, model, scales: np.ndarray, ranks: np.ndarray,
                        is_cold: np.ndarray) -> int:
        """Set the model's cold-item scale to the one ``choose_cold_scale`` picks from every
        user's target rank under each scale ``[users, scales]``; returns its index."""
        ndcg = per_user(ranks, [CALIBRATION_K])[f"ndcg@{CALIBRATION_K}"]
        chosen = choose_cold_scale(ndcg, is_cold, scales, self.cfg.model.cold_budget,
                                   self.reference_warm_ndcg)
        model.dense_module.match.log_cold_scale.fill_(float(np.log(scales[chosen])))
        return chosen

    def baseline_scorers(self) -> dict[str, Callable[[SequenceBatch, torch.Size], Tensor]]:
        """Scorers ``(history, [B, V]) → item scores`` of the baselines this data allows."""
        scorers = {name: (lambda history, shape, c=counts: c.expand(shape))
                   for name, counts in self.popularity_baselines.items()}
        text = self.frozen_text_vectors
        if text is not None:
            def content_knn(history, shape):  # the history's mean text vector's neighbours
                rows = torch.repeat_interleave(torch.arange(len(history)), history.lengths)
                mean = torch.zeros(len(history), text.shape[1]).index_add_(
                    0, rows, text[history.item])
                return mean @ text.T
            scorers["content_knn"] = content_knn
        return scorers

    def _excluded(self, history, shape) -> Tensor:
        exclude = torch.zeros(shape, dtype=torch.bool)
        exclude[:, 0] = True  # padding id
        if self.recipe.exclude_history:
            rows = torch.repeat_interleave(torch.arange(len(history)), history.lengths)
            exclude[rows, history.item] = True
        return exclude
