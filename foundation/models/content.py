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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from foundation.data.items import load_item_content
from foundation.models.towers import (
    ItemTower,
    MiniLMTextTower,
    Modality,
    TextTowerConfig,
    VectorTower,
    encode_texts,
)

log = logging.getLogger(__name__)
CACHE_DIR = "content"


def build_tower(modality: Modality, manifest: dict[str, Any], text: TextTowerConfig
                ) -> ItemTower:
    if modality == Modality.text:
        return MiniLMTextTower(text).eval()
    return VectorTower(int(manifest["items"]["content"]["vectors"]["dim"]))


def _fingerprint(modality: Modality, manifest: dict[str, Any], text: TextTowerConfig) -> str:
    """What the cached vectors depend on: the tower and the item shards (known without
    loading the tower's weights, so a cache hit costs no model load)."""
    tower = (MiniLMTextTower.fingerprint_of(text) if modality == Modality.text
             else f"vectors-{manifest['items']['content']['vectors']['dim']}")
    shards = [s["sha256"] for s in manifest["items"]["shards"]]
    return hashlib.sha256(json.dumps([tower, shards]).encode()).hexdigest()[:16]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(flag: bool) -> bool:
    """Whether every rank has ``flag`` (the decision to skip a collective must be shared)."""
    value = torch.tensor([int(flag)])
    if _world()[1] > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def content_vectors(modality: Modality, data_path: str, manifest: dict[str, Any],
                    num_items: int, text: TextTowerConfig, cache_dir: Path | None
                    ) -> tuple[Tensor, Tensor]:
    """``[V, d]`` vectors of every item (zeros where it has no such content) and the ``[V]``
    mask of items that have it; collective when distributed."""
    if not manifest.get("items") or modality.value not in manifest["items"]["content"]:
        raise ValueError(f"model.item_content lists {modality.value!r}, but {data_path} has no "
                         f"item {modality.value}: build the shards with "
                         f"source.item_{modality.value}_path=... or drop it from "
                         f"model.item_content")
    key = _fingerprint(modality, manifest, text)
    cache = cache_dir / f"{modality.value}.safetensors" if cache_dir is not None else None
    from safetensors.torch import load_file, save_file

    if _agree(cache is not None and _cached(cache) == key):
        saved = load_file(str(cache))
        return saved["vectors"], saved["has"].bool()
    tower = build_tower(modality, manifest, text)
    rank, world = _world()
    ids, values = load_item_content(data_path, manifest, modality.value)
    mine = np.arange(rank, len(ids), world)  # each rank encodes a slice of the catalogue
    vectors = torch.zeros(num_items, tower.out_dim)
    if modality == Modality.text:
        encoded = encode_texts(tower, [values[i] for i in mine], progress=rank == 0)
    else:
        encoded = tower(np.stack([values[i] for i in mine])) if len(mine) else None
    if len(mine):
        vectors[torch.as_tensor(ids[mine])] = encoded
    if world > 1:
        dist.all_reduce(vectors)  # slices are disjoint: the sum is the whole catalogue
    has = torch.zeros(num_items, dtype=torch.bool)
    has[torch.as_tensor(ids)] = True
    if cache is not None and rank == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        save_file({"vectors": vectors, "has": has.to(torch.uint8)}, str(tmp),
                  metadata={"fingerprint": key})
        tmp.replace(cache)
    log.info("encoded %d items' %s with %s", len(ids), modality.value, tower.fingerprint)
    return vectors, has


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
        self.dropout = nn.Dropout(dropout)

    def forward(self, items: Tensor) -> Tensor:
        out = self.project(self.dropout(self.vectors[items] - self.center))
        return out * self.has[items].unsqueeze(-1)


class ItemContent(nn.Module):
    """The sum of every modality's adapted content vector, per item."""

    def __init__(self, adapters: dict[str, ContentAdapter]):
        super().__init__()
        self.adapters = nn.ModuleDict(adapters)

    def forward(self, items: Tensor) -> Tensor:
        return sum(adapter(items) for adapter in self.adapters.values())
