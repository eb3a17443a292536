"""Fine-tune for search: a query and the member who typed it → the title they engage with.

The query is encoded by hashed word and character-trigram embeddings (robust to typos),
shared with the titles' text on the item side, and, where the model reads the titles' text
(``model.item_content=[text]``), by the same text tower through the same adapter, so a query
lands where the titles that say it land; the member's pretrained state adds their taste.
Scores are one dot product (query and member parts concatenated), so the catalogue can be
served from an index."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foundation.choices import BundleKind, Choice
from foundation.data.items import load_item_content
from foundation.data.text import hashed_ngrams, text_tokens
from foundation.metrics import rank_metrics, target_ranks
from foundation.models.finetune import FinetuneConfig
from foundation.models.losses import log_item_probability, sampled_softmax_loss
from foundation.models.member import (
    EventEncoder,
    ReadsItemsLikeThePretrain,
    last_states,
    sparse_features,
)
from foundation.models.towers import MiniLMTextTower, Modality, TextTowerConfig, encode_texts
from foundation.tasks import PRETRAIN_ONLY_KEYS, Task, all_concat, register_recipe, synchronised

QUERY_SLOTS = 1 << 10  # a query's evaluation id: sample_id * QUERY_SLOTS + its index


class QueryEncoder(Choice):
    """How a query's text is read: ``ngrams`` (hashed words and character trigrams) or
    ``text_tower`` (the frozen text tower the model reads titles with, through the model's
    text adapter, plus the n-grams, which keep typos and exact words matching); ``auto``
    picks ``text_tower`` when the model reads item text with a frozen tower."""

    auto = "auto"
    ngrams = "ngrams"
    text_tower = "text_tower"


@dataclass
class SearchConfig(FinetuneConfig):
    name: str = "finetune_search"
    member_state: bool = True  # false: the same model without the member (a baseline)
    query_encoder: QueryEncoder = QueryEncoder.auto
    ngram_buckets: int = 1 << 15  # rows of the hashed word / character-trigram table
    num_negatives: int = 256
    logq_correction: bool = True
    ks: list[int] = field(default_factory=lambda: [10])


def ngram_rows(texts: list[str], buckets: int) -> Tensor:
    return torch.from_numpy(hashed_ngrams(texts, buckets))


class QueryTexts:
    """Queries → the frozen text tower's vectors ``[Q, d]``; each distinct query is encoded
    once per process (searches repeat: a genre's word, a series' title)."""

    def __init__(self, cfg: TextTowerConfig):
        self.tower = MiniLMTextTower(cfg).eval()
        self.known: dict[str, Tensor] = {}

    @torch.no_grad()
    def __call__(self, queries: list[str]) -> Tensor:
        new = sorted(set(queries) - self.known.keys())
        if new:
            self.known.update(zip(new, encode_texts(self.tower, new)))
        return torch.stack([self.known[q] for q in queries]) if queries else torch.zeros(
            0, self.tower.out_dim)


class TasteWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # 1-d: ZeRO flattens no 0-d tensors

    def forward(self, states: Tensor) -> Tensor:
        return self.weight * states


class PersonalisedSearch(ReadsItemsLikeThePretrain, nn.Module):
    """A query's hashed n-grams (and, with ``reads_query_text``, its text tower vector
    through the model's text adapter), scored against each item's vector (table row, plus
    side information and content where the pretrain has them) plus its title's n-grams (same
    table as the queries, so words match words), plus a learned weight times the member's
    pretrained next-item score. Trained with in-batch + sampled negatives, logQ."""

    def __init__(self, model, recipe: SearchConfig, item_counts: Tensor,
                 title_grams: Tensor | None, token_features: tuple[str, ...],
                 attributes: nn.Module | None = None, content: nn.Module | None = None,
                 reads_query_text: bool = False):
        super().__init__()
        self.attributes, self.content = attributes, content
        self.reads_query_text = reads_query_text
        dim = model.embedding_dim
        self.recipe = recipe
        self.encoder = EventEncoder(model, token_features)
        self.text = nn.EmbeddingBag(recipe.ngram_buckets, dim, mode="mean", padding_idx=0)
        nn.init.normal_(self.text.weight, std=dim ** -0.5)
        # The weight of the member's taste: one scale on the pretrained next-item score
        # (state · item row), from zero, so training starts as the query-only model.
        self.member_head = TasteWeight() if recipe.member_state else None
        self.register_buffer("title_grams", title_grams, persistent=False)  # [V, L] or None
        self.register_buffer("log_item_prob", log_item_probability(item_counts),
                             persistent=False)

    def item_vectors(self, items: Tensor, rows: Tensor) -> Tensor:
        """Items' scoring vectors from their table ``rows``: what queries match (the row plus
        the title's n-grams) and, with the member state, the row again for the taste part."""
        vectors = self.with_item_parts(items, rows)
        matched = vectors if self.title_grams is None else vectors + self.text(
            self.title_grams[items])
        return matched if self.member_head is None else torch.cat([matched, vectors], -1)

    def query_text_part(self, query_grams: Tensor, query_text: Tensor | None) -> Tensor:
        """A query's vector from its text alone: n-grams, plus the adapted tower vector."""
        query = self.text(query_grams)
        if self.reads_query_text:
            query = query + self.content.adapters[Modality.text.value].adapt(query_text)
        return query

    def queries(self, batch, emb: dict[str, Tensor], query_grams: Tensor,
                query_text: Tensor | None = None) -> Tensor:
        """Each query's vector: its text and, with the member state, the member's taste
        (which meets only the items' table rows: through the titles' n-grams, a taste would
        memorise the training members' titles instead of generalising)."""
        query = self.query_text_part(query_grams, query_text)
        if self.member_head is None:
            return query
        emb = {**emb, "item": self.with_item_parts(batch.item, emb["item"])}
        states, mask = self.encoder(emb, batch.lengths, timestamps=batch.timestamp)
        rows = torch.repeat_interleave(torch.arange(len(batch), device=query.device),
                                       batch.query_lengths)
        return torch.cat([query, self.member_head(last_states(states, mask))[rows]], -1)

    def forward(self, batch, emb: dict[str, Tensor], query_grams: Tensor | None = None,
                negatives: Tensor | None = None, mode: str = "train",
                query_text: Tensor | None = None) -> Tensor:
        """``train``: the loss; ``queries``: the query vectors; ``items``: the scoring
        vectors of ``negatives`` (the catalogue)."""
        if mode == "items":
            return self.item_vectors(negatives, emb["negative"])
        if mode == "train":
            self.begin_content_step(torch.cat([batch.item, batch.query_items]))
        queries = self.queries(batch, emb, query_grams, query_text)
        if mode == "queries":
            return queries
        targets = batch.query_items
        return sampled_softmax_loss(
            queries, targets, self.item_vectors(targets, emb["candidate"]), negatives,
            self.item_vectors(negatives, emb["negative"]),
            log_item_prob=self.log_item_prob if self.recipe.logq_correction else None)


class SearchQueryProgram(nn.Module):
    """The exported query tower: a query's n-gram rows ``[Q, G]`` (``hashed_ngrams``, padded
    with 0), where the model reads it the query's text tower vector ``[Q, d]`` and, with the
    member state, the searching member's history as event tokens (as the member encoder's
    program reads them, one row per query) → the query's scoring vector, scored against the
    catalogue's search vectors by one dot product."""

    def __init__(self, model: PersonalisedSearch):
        super().__init__()
        self.model = model
        history = ["tokens", "lengths", *(["timestamps"] if model.encoder.uses_time else [])]
        self.input_names = ["query_grams", *(["query_text"] if model.reads_query_text else []),
                            *(history if model.member_head is not None else [])]

    def forward(self, *inputs: Tensor) -> Tensor:
        given = dict(zip(self.input_names, inputs))
        grams = given["query_grams"]
        present = (grams > 0).unsqueeze(-1).to(self.model.text.weight.dtype)
        # nn.EmbeddingBag's mean over the non-padding rows, written out for the exporters
        query = ((F.embedding(grams, self.model.text.weight) * present).sum(1)
                 / present.sum(1).clamp(min=1))
        if self.model.reads_query_text:
            query = query + self.model.content.adapters[Modality.text.value].adapt(
                given["query_text"])
        if self.model.member_head is None:
            return query
        tokens = given["tokens"]
        mask = torch.arange(tokens.shape[1], device=tokens.device) < given["lengths"].unsqueeze(1)
        states = self.model.encoder.encode_padded(tokens, mask, timestamps=given.get("timestamps"))
        return torch.cat([query, self.model.member_head(last_states(states, mask))], -1)


@register_recipe
class FinetuneSearch(Task):
    name = "finetune_search"
    config_class = SearchConfig
    summary = ("search fine-tune: query text (n-grams, the text tower) + the pretrained "
               "member state → title, against BM25")
    data_mode = "search"
    eval_metric = "ndcg@10"
    export_kind = BundleKind.search
    new_keys = ("text.", "member_head.")
    unused_keys = PRETRAIN_ONLY_KEYS

    def __init__(self, cfg, manifest, item_counts):
        super().__init__(cfg, manifest, item_counts)
        if not self.sharded_items:
            raise ValueError("finetune_search scores titles through the sharded item table: "
                             "use model.item_table=sharded (and pretrain with it)")
        if not manifest.get("totals", {}).get("searches"):
            raise ValueError(f"{cfg.data.path} has no search sessions: build it with "
                             f"source.searches_path=... (columns member_id, item_id, "
                             f"timestamp, query); the synthetic world writes them")
        self.titles = self._title_texts()
        self.query_texts = QueryTexts(cfg.model.text_tower) if self._reads_query_text() else None

    def _reads_query_text(self) -> bool:
        """Whether queries go through the text tower (``recipe.query_encoder``)."""
        wanted, tower = self.recipe.query_encoder, self.cfg.model.text_tower
        reads_text = Modality.text.value in self.cfg.model.item_content
        if wanted == QueryEncoder.ngrams:
            return False
        if wanted == QueryEncoder.auto:
            return reads_text and not tower.trainable_layers
        if not reads_text:
            raise ValueError("recipe.query_encoder=text_tower reads queries with the model's "
                             "text tower: add model.item_content=[text] (and pretrain with "
                             "it), or use recipe.query_encoder=ngrams")
        if tower.trainable_layers:
            raise ValueError("recipe.query_encoder=text_tower reads queries with the frozen "
                             "text tower, but model.text_tower.trainable_layers="
                             f"{tower.trainable_layers} tunes the titles' one: use "
                             "trainable_layers=0 or recipe.query_encoder=ngrams")
        return True

    def query_inputs(self, queries: list[str]) -> dict[str, Tensor]:
        """The dense inputs a batch of query texts makes: n-gram rows and tower vectors."""
        inputs = {"query_grams": ngram_rows(queries, self.recipe.ngram_buckets)}
        if self.query_texts is not None:
            inputs["query_text"] = self.query_texts(queries)
        return inputs

    def _title_texts(self) -> list[str] | None:
        """Each item's text by internal id (None where the data has no item text)."""
        if "text" not in (self.manifest.get("items") or {}).get("content", {}):
            return None
        ids, texts = load_item_content(self.cfg.data.path, self.manifest, "text")
        titles = [""] * self.num_items
        for item, text in zip(ids.tolist(), texts):
            titles[item] = text or ""
        return titles

    def build_dense(self) -> nn.Module:
        grams = None if self.titles is None else ngram_rows(self.titles,
                                                            self.recipe.ngram_buckets)
        return PersonalisedSearch(self.cfg.model, self.recipe, self.item_counts, grams,
                                  self.token_features, *self.item_parts(),
                                  reads_query_text=self.query_texts is not None)

    @torch.no_grad()
    def catalogue_vectors(self, model, mode: str = "items") -> Tensor:
        """Every item's search vector ``[V, ·]`` (what queries score against), or with
        ``mode="tokens"`` its vector as an event input; collective."""
        rows, everything = model.catalogue(), torch.arange(self.num_items)
        if mode == "tokens":
            return model.dense_module.with_item_parts(everything, rows)
        return model.dense(None, {"negative": rows}, None, everything, mode="items")

    def features(self, batch):
        negatives = torch.randint(1, self.num_items, (self.recipe.num_negatives,))
        kjt = sparse_features(batch, candidates=batch.query_items,
                              candidate_lengths=batch.query_lengths, negatives=negatives)
        return kjt, {"negatives": negatives, **self.query_inputs(batch.queries)}

    @torch.no_grad()
    def evaluate(self, model, batches, split=None, calibrate=False):
        """Each search of the split ranked over the whole catalogue by the model, by BM25 over
        the titles and by popularity: NDCG@K, HR@K, MRR of the engaged title."""
        ks = list(self.recipe.ks)
        catalogue = self.catalogue_vectors(model)
        bm25 = self._bm25()
        parts: dict[str, list] = {"sample_id": [], "model": [], "most_popular": []}
        if bm25 is not None:
            parts["bm25"] = []
        for batch, real in synchronised(batches, model.world_size):
            kjt = sparse_features(batch)
            queries = model.dense(batch, model.embed(kjt), mode="queries",
                                  **self.query_inputs(batch.queries))
            if not real:
                continue
            scores, targets = queries @ catalogue.T, batch.query_items
            padding = torch.zeros_like(scores, dtype=torch.bool)
            padding[:, 0] = True
            parts["model"].append(target_ranks(scores, targets, padding).numpy())
            parts["most_popular"].append(target_ranks(
                self.item_counts.expand(scores.shape), targets, padding).numpy())
            if bm25 is not None:
                lexical = torch.as_tensor(np.stack([bm25(q) for q in batch.queries]))
                parts["bm25"].append(target_ranks(lexical, targets, padding).numpy())
            rows = torch.repeat_interleave(batch.sample_ids, batch.query_lengths)
            index = torch.cat([torch.arange(n) for n in batch.query_lengths.tolist()])
            parts["sample_id"].append((rows * QUERY_SLOTS + index).numpy())
        ranks = {name: all_concat(arrays, model.world_size) for name, arrays in parts.items()}
        baselines = {name: rank_metrics(ranks[name], ks) for name in ranks
                     if name not in ("sample_id", "model")}
        return {"metrics": {**rank_metrics(ranks["model"], ks),
                            "queries": float(len(ranks["model"]))},
                "baselines": baselines, "ranks": ranks}

    def _bm25(self):
        """Query → BM25 score of every item's text ``[V]`` (None without item text)."""
        if self.titles is None:
            return None
        from rank_bm25 import BM25Okapi

        index = BM25Okapi([text_tokens(t) or ["<none>"] for t in self.titles[1:]])

        def scores(query: str) -> np.ndarray:
            return np.concatenate([[-np.inf], index.get_scores(text_tokens(query))])
        return scores
