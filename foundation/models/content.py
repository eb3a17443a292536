"""Item content in the member model: frozen tower vectors, adapted into the model's space.

Each modality of ``model.item_content`` is encoded once per run by its frozen tower, every
rank encoding a slice of the catalogue, and cached in ``RUN/content/<modality>.safetensors``
(reused while the tower and the item shards are the same). ``ItemContent`` adds each item's
adapted content vector to its embedding wherever the item appears: history tokens and
scoring vectors alike, so an item no member has played yet still has a meaningful vector.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from foundation.checksum import sha256
from foundation.data.items import load_item_content
from foundation.distributed.collectives import world
from foundation.models.dropout import Dropout
from foundation.models.encoders import load_item_encoder
from foundation.models.towers import (
    EncoderSide,
    ItemTower,
    MiniLMTextTower,
    Modality,
    TextTowerConfig,
    VectorTower,
    encode_texts,
    length_batches,
    pool_tokens,
)

log = logging.getLogger(__name__)
CACHE_DIR = "content"


ENCODED_BY_ENCODER = (Modality.image, Modality.audio)  # towers of a pretrain_item_encoder run
ENCODE_BATCH = 256  # items per forward of an image or audio tower


def build_tower(modality: Modality, manifest: dict[str, Any], text: TextTowerConfig,
                item_encoder: str | None = None) -> ItemTower:
    if modality == Modality.text:
        return MiniLMTextTower(text).eval()
    if modality in ENCODED_BY_ENCODER:
        encoder, fingerprint = load_item_encoder(_encoder_run(modality, item_encoder))
        if modality.value not in encoder.towers:
            raise ValueError(f"model.item_encoder={item_encoder} has no {modality.value} tower "
                             f"(its pairs: {[f'{a.value}:{b.value}' for a, b in encoder.pairs]})")
        return EncoderSide(encoder, modality.value, fingerprint)
    return VectorTower(int(manifest["items"]["content"]["vectors"]["dim"]))


def _encoder_run(modality: Modality, item_encoder: str | None) -> str:
    if not item_encoder:
        raise ValueError(f"model.item_content lists {modality.value!r}, whose tower comes from "
                         f"an item encoder run: pass model.item_encoder=RUN (a "
                         f"pretrain_item_encoder run)")
    return item_encoder


def _fingerprint(modality: Modality, manifest: dict[str, Any], text: TextTowerConfig,
                 item_encoder: str | None) -> str:
    """What the cached vectors depend on: the tower and the item shards (known without
    loading the tower's weights, so a cache hit costs no model load)."""
    if modality == Modality.text:
        tower = MiniLMTextTower.fingerprint_of(text)
    elif modality in ENCODED_BY_ENCODER:
        from foundation.train.checkpoint import resolve  # torch.distributed.checkpoint: heavy

        weights = resolve(_encoder_run(modality, item_encoder)) / "dense.safetensors"
        tower = f"encoder-{sha256(weights)[:16]}-{modality.value}"
    else:
        tower = f"vectors-{manifest['items']['content']['vectors']['dim']}"
    shards = [s["sha256"] for s in manifest["items"]["shards"]]
    return hashlib.sha256(json.dumps([tower, shards]).encode()).hexdigest()[:16]


def _agree(flag: bool) -> bool:
    """Whether every rank has ``flag`` (the decision to skip a collective must be shared)."""
    value = torch.tensor([int(flag)])
    if world()[1] > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def content_vectors(modality: Modality, data_path: str, manifest: dict[str, Any],
                    num_items: int, text: TextTowerConfig, cache_dir: Path | None,
                    item_encoder: str | None = None, reuse_from: Path | None = None
                    ) -> tuple[Tensor, Tensor]:
    """``[V, d]`` vectors of every item (zeros where it has no such content) and the ``[V]``
    mask of items that have it; collective when distributed. Image and audio go through
    the towers of the item encoder run ``item_encoder``. Cached in ``cache_dir``; a cache in
    ``reuse_from`` (a warm start's source run) with the same fingerprint is used and copied."""
    if not manifest.get("items") or modality.value not in manifest["items"]["content"]:
        raise ValueError(f"model.item_content lists {modality.value!r}, but {data_path} has no "
                         f"item {modality.value}: build the shards with its source "
                         f"(source.item_text_path, item_vectors_path or item_media_dir) or "
                         f"drop it from model.item_content")
    key = _fingerprint(modality, manifest, text, item_encoder)
    cache, reused = (None if d is None else d / f"{modality.value}.safetensors"
                     for d in (cache_dir, reuse_from))
    found = next((p for p in (cache, reused) if p is not None and _cached(p) == key), None)
    rank, size = world()
    if _agree(found is not None):
        from safetensors.torch import load_file

        saved = load_file(str(found))
        vectors, has = saved["vectors"], saved["has"].bool()
        if found != cache and cache is not None and rank == 0:
            _save_cache(cache, vectors, has, key)
        return vectors, has
    tower = build_tower(modality, manifest, text, item_encoder)
    ids, values = load_item_content(data_path, manifest, modality.value)
    mine = np.arange(rank, len(ids), size)  # each rank encodes a slice of the catalogue
    vectors = torch.zeros(num_items, tower.out_dim)
    if modality == Modality.text:
        encoded = encode_texts(tower, [values[i] for i in mine], progress=rank == 0)
    elif modality in ENCODED_BY_ENCODER:
        encoded = _encode_batches(tower, [values[i] for i in mine])
    else:
        encoded = tower(np.stack([values[i] for i in mine])) if len(mine) else None
    if len(mine):
        vectors[torch.as_tensor(ids[mine])] = encoded
    if size > 1:
        dist.all_reduce(vectors)  # slices are disjoint: the sum is the whole catalogue
    has = torch.zeros(num_items, dtype=torch.bool)
    has[torch.as_tensor(ids)] = True
    if cache is not None and rank == 0:
        _save_cache(cache, vectors, has, key)
    log.info("encoded %d items' %s with %s", len(ids), modality.value, tower.fingerprint)
    return vectors, has


def _save_cache(cache: Path, vectors: Tensor, has: Tensor, key: str) -> None:
    from safetensors.torch import save_file

    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    save_file({"vectors": vectors, "has": has.to(torch.uint8)}, str(tmp),
              metadata={"fingerprint": key})
    tmp.replace(cache)


def source_cache(source: str) -> Path:
    """The content cache of a warm start's source (a run dir or one of its checkpoints)."""
    from foundation.train.checkpoint import resolve  # torch.distributed.checkpoint: heavy

    return resolve(source).parent.parent / CACHE_DIR


@torch.no_grad()
def _encode_batches(tower: ItemTower, values: list) -> Tensor:
    parts = [tower(values[start:start + ENCODE_BATCH])
             for start in range(0, len(values), ENCODE_BATCH)]
    return torch.cat(parts) if parts else torch.zeros(0, tower.out_dim)


def _cached(path: Path) -> str | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("fingerprint")


class ContentAdapter(nn.Module):
    """One modality's frozen vectors → the model's item space: ``W (x - b)``, with ``b``
    starting at the catalogue's mean (tower vectors share a large common direction)."""

    def __init__(self, vectors: Tensor, has: Tensor, dim: int, dropout: float):
        super().__init__()
        self.register_buffer("vectors", vectors, persistent=False)  # data, not weights
        self.register_buffer("has", has, persistent=False)
        self.center = nn.Parameter(vectors[has].mean(0) if has.any() else vectors[0] * 0)
        self.project = nn.Linear(vectors.shape[1], dim, bias=False)
        spread = (vectors[has] - self.center.detach()).norm(dim=1).mean().clamp_min(1e-6)
        # outputs at the scale of an ID row (N(0, 1/dim) per coordinate)
        nn.init.normal_(self.project.weight, std=dim ** -0.5 / float(spread))
        self.dropout = Dropout(dropout)

    def forward(self, items: Tensor) -> Tensor:
        return self.adapt(self.tower_vectors(items)) * self.has[items].unsqueeze(-1)

    def adapt(self, vectors: Tensor) -> Tensor:
        """Tower vectors ``[..., d]`` (an item's, or a search query's through the same
        tower) → the model's item space."""
        return self.project(self.dropout(vectors - self.center))

    def tower_vectors(self, items: Tensor) -> Tensor:
        return self.vectors[items]

    def begin_step(self, items: Tensor) -> None:
        """A training step reads ``items`` (its batch): a frozen tower has nothing to do."""


class TunedTextAdapter(ContentAdapter):
    """The text modality with the tower's top layers trained with the member model.

    The frozen layers below run once per run: their token states for the whole catalogue
    are kept (``tokens``, item i's at ``offsets[i]:offsets[i+1]``). Each training step runs
    the trained layers on its batch's items, with gradients; every other item scores with
    the catalogue's vectors from the last refresh (every ``refresh_every`` steps, and before
    any evaluation), as a dense retrieval model refreshes its index. ``vectors`` holds that
    catalogue; ContentMatch keeps the frozen tower's own (built before training moves them).
    """

    def __init__(self, vectors: Tensor, has: Tensor, dim: int, dropout: float,
                 tower: MiniLMTextTower, tokens: Tensor, offsets: Tensor):
        super().__init__(vectors.clone(), has, dim, dropout)
        self.layers = nn.ModuleList(tower.layers[tower.first_trainable:])
        self.register_buffer("tokens", tokens, persistent=False)  # data, not weights
        self.register_buffer("offsets", offsets, persistent=False)
        self.refresh_every = tower.cfg.refresh_every
        self.steps_since_refresh = 1  # the trained layers may differ from the loaded vectors
        self.fresh: tuple[Tensor, Tensor] | None = None  # this step's items and vectors

    def encode(self, items: Tensor) -> Tensor:
        """The trained layers on ``items``' kept token states → their text vectors."""
        starts, lengths = self.offsets[items], self.offsets[items + 1] - self.offsets[items]
        rows = torch.repeat_interleave(torch.arange(len(items), device=items.device), lengths)
        within = torch.arange(int(lengths.sum()), device=items.device) - (
            torch.cumsum(lengths, 0) - lengths)[rows]
        x = self.tokens.new_zeros(len(items), int(lengths.max()), self.tokens.shape[1])
        keep = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        x[rows, within] = self.tokens[starts[rows] + within]
        keep[rows, within] = True
        return pool_tokens(self.layers, x, keep)

    def begin_step(self, items: Tensor) -> None:
        texts = torch.unique(items[self.has[items]])
        self.fresh = (texts, self.encode(texts)) if len(texts) else None
        self.steps_since_refresh += 1
        if self.steps_since_refresh > self.refresh_every:
            self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Every item with text through the trained layers as they are now."""
        texts = self.has.nonzero().squeeze(1)
        for start in range(0, len(texts), ENCODE_BATCH):
            chunk = texts[start:start + ENCODE_BATCH]
            self.vectors[chunk] = self.encode(chunk)
        self.steps_since_refresh = 0

    def tower_vectors(self, items: Tensor) -> Tensor:
        if not self.training:
            self.fresh = None
            if self.steps_since_refresh:
                self.refresh()
        if self.fresh is None:
            return self.vectors[items]
        texts, vectors = self.fresh  # this step's items carry gradients to the layers
        return self.vectors.index_put((texts,), vectors)[items]


def lower_token_states(tower: MiniLMTextTower, ids: np.ndarray, texts: list[str],
                       num_items: int) -> tuple[Tensor, Tensor]:
    """The frozen layers' token states of the texts of items ``ids``, concatenated
    ``[tokens, d]``, and the ``[num_items + 1]`` offsets of each item's (none without text)."""
    states: dict[int, Tensor] = {}
    with torch.no_grad():
        for chunk in length_batches(texts, tower.cfg.batch_size, "text tower, frozen layers",
                                    progress=world()[0] == 0):
            tokens, keep = tower.tokenize([texts[i] for i in chunk])
            lower = tower.lower(tokens, keep)
            for row, i in enumerate(chunk):
                states[int(ids[i])] = lower[row, keep[row]]
    lengths = torch.tensor([len(states[i]) if i in states else 0 for i in range(num_items)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
    kept = [states[i] for i in range(num_items) if i in states]
    return (torch.cat(kept) if kept else torch.zeros(0, tower.out_dim)), offsets


class ItemContent(nn.Module):
    """The sum of every modality's adapted content vector, per item."""

    def __init__(self, adapters: dict[str, ContentAdapter]):
        super().__init__()
        self.adapters = nn.ModuleDict(adapters)

    def forward(self, items: Tensor) -> Tensor:
        return sum(adapter(items) for adapter in self.adapters.values())

    def begin_step(self, items: Tensor) -> None:
        """A training step's items: tuned towers encode them afresh (with gradients)."""
        for adapter in self.adapters.values():
            adapter.begin_step(items)


def unit_content(content: ItemContent) -> tuple[Tensor, dict[str, Tensor]]:
    """Every item's frozen content vectors, centred and unit length per modality (zeros where
    an item lacks one), concatenated so that a dot product is the modalities' summed cosine
    over √modalities (the range of one cosine); and each modality's centre."""
    units, centers = [], {}
    for name, adapter in content.adapters.items():
        has = adapter.has
        centers[name] = adapter.vectors[has].mean(0) if has.any() else adapter.vectors[0] * 0
        units.append(F.normalize(adapter.vectors - centers[name], dim=-1) * has.unsqueeze(-1))
    return torch.cat(units, -1) / len(units) ** 0.5, centers


class ContentMatch(nn.Module):
    """A content-only score beside the learned one: how close an item's frozen content
    vectors are to those of the member's recent history, recency-weighted.

    The adapters' projection into the model's space blurs what the towers say sharply (two
    titles of one product line); this score keeps the towers' own geometry (a learned
    metric on it overfits: on Amazon Scientific it halved the cold items' NDCG). Items
    scored without their ID row (never seen in training, or dropped by ``id_dropout``) have
    their own learned weight, so a cold item competes on content calibrated against items
    with IDs. Scoring stays one dot product: members gain ``q``, items ``scale · unit``.
    """

    def __init__(self, content: ItemContent, max_len: int, decay: float = 0.6):
        super().__init__()
        unit, self.centers = unit_content(content)  # centres: export's new items' unit vectors
        self.register_buffer("unit", unit, persistent=False)
        # Positive weights learnt in log space, as CLIP's temperature: an optimiser step
        # moves them by a ratio, not by an amount (a few hundred steps span any scale).
        self.log_recency = nn.Parameter(torch.arange(max_len, dtype=torch.float32)
                                        * math.log(decay))
        self.log_item_weight = nn.Parameter(torch.zeros(2))  # [scored without ID, with ID]
        # Outside training, items without an ID are weighted by this multiple of their
        # learned weight, fitted on validation's cold targets (PretrainMemberFM.evaluate):
        # training never shows a cold item as a target, so nothing else calibrates it.
        self.register_buffer("log_cold_scale", torch.zeros(()))

    @property
    def recency(self) -> Tensor:
        """The weight of an event by its age (0: the newest)."""
        return self.log_recency.exp()

    @property
    def learned_item_weight(self) -> Tensor:
        return self.log_item_weight.exp()

    @property
    def serving_item_weight(self) -> Tensor:
        """The item weights outside training: the no-ID one times the calibrated scale."""
        return (self.log_item_weight + F.pad(self.log_cold_scale.reshape(1), (0, 1))).exp()

    def items(self, items: Tensor, use_id: Tensor) -> Tensor:
        """Items' content part of their scoring vectors."""
        weight = self.learned_item_weight if self.training else self.serving_item_weight
        return self.unit[items] * weight[use_id.long()].unsqueeze(-1)

    def members(self, items: Tensor, mask: Tensor) -> Tensor:
        """Left-aligned histories ``[B, L]`` → each position's content query ``[B, L, C]``,
        from the events up to it."""
        steps = torch.arange(mask.shape[1], device=mask.device)
        distance = steps.unsqueeze(1) - steps.unsqueeze(0)  # query t - event s
        weights = self.recency[distance.clamp(0, len(self.recency) - 1)] * (distance >= 0)
        return torch.einsum("ts,bsc->btc", weights, self.unit[items] * mask.unsqueeze(-1))
