"""Item encoder pretraining: a tower per modality, aligned by CLIP-style InfoNCE.

``recipe.pairs`` names what is aligned, ``A:B`` with A and B among ``text``, ``image``,
``audio``, ``vectors`` (each through its tower, data/items.py shards) and ``behaviour`` (the
item's row in the sharded item table of the member model in ``recipe.behaviour_from``,
loaded frozen: content learns to predict how members treat an item). Matched rows are one
item's two sides; every other item on every rank is a negative (models/contrastive.py). The
towers, projection heads and temperature train under the engine like any recipe's dense
arch, streaming the item shards (data/item_loader.py), with checkpoints, resume and logging
from the shared trainer. Validation retrieves each held-out item's other side among all
held-out items: recall@k against chance (k / items).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from foundation.data.batch import ItemBatch
from foundation.data.items import iter_items
from foundation.models.encoders import (
    TOKENIZER_FILE,
    ItemEncoderConfig,
    Side,
    build_item_encoder,
    parse_pairs,
    train_tokenizer,
)
from foundation.models.member import SparseArch, sparse_features
from foundation.tasks import Task, all_concat, read_run_config, register_recipe, synchronised


@register_recipe
class PretrainItemEncoder(Task):
    name = "pretrain_item_encoder"
    config_class = ItemEncoderConfig
    summary = "item encoders: towers per modality aligned by CLIP-style InfoNCE"
    data_mode = "items"
    eval_metric = "recall@1"
    new_keys = unused_keys = ("",)  # a warm start (behaviour_from) brings the item table only

    def __init__(self, cfg, manifest, item_counts):
        super().__init__(cfg, manifest, item_counts)
        self.pairs = parse_pairs(list(self.recipe.pairs))
        self.sides = sorted({s for pair in self.pairs for s in pair}, key=list(Side).index)
        self.content_sides = tuple(s.value for s in self.sides if s != Side.behaviour)
        have = set((manifest.get("items") or {}).get("content", {}))
        missing = [s for s in self.content_sides if s not in have]
        if missing:
            raise ValueError(f"recipe.pairs reads {missing} item content, which "
                             f"{cfg.data.path} does not have (it has {sorted(have)})")
        self.behaviour = Side.behaviour in self.sides
        if self.behaviour and not self.recipe.behaviour_from:
            raise ValueError("recipe.pairs aligns with behaviour: pass recipe.behaviour_from="
                             "RUN (a pretrain_member_fm run on the same data)")

    def loader_options(self):
        return {"modalities": self.content_sides, "val_fraction": self.recipe.val_fraction}

    def init_from(self) -> str | None:
        return self.recipe.behaviour_from if self.behaviour else None

    @functools.cached_property
    def behaviour_dim(self) -> int | None:
        """The member model's embedding size (its item table's width)."""
        if not self.behaviour:
            return None
        member = read_run_config(Path(self.recipe.behaviour_from))
        if member.model.item_table != "sharded":
            raise ValueError(f"recipe.behaviour_from={self.recipe.behaviour_from} keeps its "
                             f"item table replicated; align with a model.item_table=sharded run")
        return int(member.model.embedding_dim)

    def build_sparse(self, device: torch.device) -> nn.Module:
        dim = self.behaviour_dim or self.cfg.model.embedding_dim
        return SparseArch(self.num_items, dim, self.schema.sizes, device,
                          with_items=self.behaviour)

    def build_dense(self) -> nn.Module:
        tokenizer = self.tokenizer() if Side.text.value in self.content_sides else None
        return build_item_encoder(self.recipe, self.manifest, tokenizer, self.behaviour_dim)

    def tokenizer(self) -> str:
        """The text tower's WordPiece vocabulary, learnt once per run from the catalogue's
        text by rank 0 and kept in the run dir (so a resumed run reads the same one)."""
        path = Path(self.cfg.run_dir) / TOKENIZER_FILE
        if not path.exists() and (not dist.is_initialized() or dist.get_rank() == 0):
            texts = [i["text"] for i in iter_items(self.cfg.data.path, self.manifest, ("text",))
                     if "text" in i]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(train_tokenizer(texts, self.recipe.text.vocab_size))
            tmp.replace(path)
        if dist.is_initialized():
            dist.barrier()
        return path.read_text()

    def features(self, batch: ItemBatch):
        kjt = sparse_features(negatives=batch.item if self.behaviour else None,
                              with_items=self.behaviour, event_keys=tuple(self.schema.sizes))
        return kjt, {}

    @torch.no_grad()
    def evaluate(self, model, batches, split=None, calibrate=False):
        """Each held-out item's sides embedded, then for every pair: how often an item's
        other side is among the k nearest of all held-out items' (both directions)."""
        module = model.dense_module
        parts: dict[str, list[np.ndarray]] = {}
        for batch, real in synchronised(batches, model.world_size):
            emb = model.embed(self.features(batch)[0])
            for side in self.sides:
                rows = module.rows(batch, side)
                vectors = module.embed(side, batch, emb, rows)
                if real:
                    parts.setdefault(f"{side.value}/items", []).append(
                        batch.item[rows].numpy().astype(np.float64))
                    parts.setdefault(f"{side.value}/vectors", []).append(
                        vectors.float().cpu().numpy().ravel())
        dim, world = self.recipe.dim, model.world_size
        found = {side: (all_concat(parts.get(f"{side.value}/items", []), world).astype(np.int64),
                        all_concat(parts.get(f"{side.value}/vectors", []), world).reshape(-1, dim))
                 for side in self.sides}
        metrics, chance = {}, {}
        for a, b in self.pairs:
            recalls, items = _pair_recall(found[a], found[b], self.recipe.ks)
            metrics.update({f"{a.value}:{b.value}/{k}": v for k, v in recalls.items()})
            chance = {f"recall@{k}": min(1.0, k / max(items, 1)) for k in self.recipe.ks}
            metrics[f"{a.value}:{b.value}/items"] = items
        for k in self.recipe.ks:
            metrics[f"recall@{k}"] = float(np.mean([metrics[f"{a.value}:{b.value}/recall@{k}"]
                                                    for a, b in self.pairs]))
        metrics["temperature"] = float(1.0 / module.loss.scale.item())
        return {"metrics": metrics, "baselines": {"chance": chance}}


def _pair_recall(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
                 ks: list[int]) -> tuple[dict[str, float], int]:
    """Recall@k of retrieving each item's b-side from its a-side among all items having both,
    averaged with the reverse direction."""
    common = np.intersect1d(a[0], b[0])
    if not len(common):
        return {f"recall@{k}": 0.0 for k in ks}, 0
    va = a[1][_index(a[0], common)]
    vb = b[1][_index(b[0], common)]
    similarity = va @ vb.T
    recalls = {}
    for k in ks:
        hits = []
        for sim in (similarity, similarity.T):
            target = np.diag(sim)[:, None]
            hits.append(((sim > target).sum(1) < k).mean())
        recalls[f"recall@{k}"] = float(np.mean(hits))
    return recalls, len(common)


def _index(items: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Rows of ``items`` holding each of ``wanted`` (all present)."""
    order = np.argsort(items, kind="stable")
    return order[np.searchsorted(items[order], wanted)]
