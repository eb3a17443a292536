"""Member foundation model: a causal transformer over event tokens.

The model is split the way the whole framework is (ARCHITECTURE.md, "Sparse / dense split"):

* ``ItemSparseArch`` holds the item-ID table, the only table that grows with the catalogue. It
  is a TorchRec ``EmbeddingCollection`` that ``DistributedModelParallel`` shards. Every item
  lookup of a step (history, candidates, negatives) is one jagged feature of that one table.
* ``EventEncoder`` is the dense trunk: token = item + action + time-gap + hour + device +
  position, then pre-norm causal self-attention. The small categorical vocabularies live here
  as ordinary ``nn.Embedding``s so the dense engine replicates (or ZeRO-partitions) them;
  that is data-parallel sharding in effect, and it sidesteps fbgemm-gpu-cpu's dense
  sequence kernel, which pools its output on CPU (see ``distributed/sharding.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from foundation.data.schema import ACTIONS, DEVICES, NUM_GAP_BUCKETS, NUM_HOURS

ITEM_TABLE = "item_table"  # not "items": TorchRec table names must not shadow nn.ModuleDict attributes
ITEM_FEATURES = ("item", "candidate", "negative")


@dataclass
class MemberModelConfig:
    embedding_dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    ffn_multiplier: int = 4
    dropout: float = 0.1
    max_len: int = 50
    context_features: bool = True  # hour-of-day and device embeddings in each token


class ItemSparseArch(nn.Module):
    """The item table behind the features ``item``, ``candidate`` and ``negative``."""

    def __init__(self, num_items: int, dim: int, device: torch.device | None = None):
        super().__init__()
        self.embedding_collection = EmbeddingCollection(
            tables=[EmbeddingConfig(name=ITEM_TABLE, embedding_dim=dim, num_embeddings=num_items,
                                    feature_names=list(ITEM_FEATURES))],
            device=device,
        )

    def forward(self, features: KeyedJaggedTensor) -> dict[str, Tensor]:
        return {key: jt.values() for key, jt in self.embedding_collection(features).items()}


def item_features(history: Tensor, history_lengths: Tensor, candidates: Tensor | None = None,
                  candidate_lengths: Tensor | None = None, negatives: Tensor | None = None
                  ) -> KeyedJaggedTensor:
    """One KJT for every item lookup of a step; absent features get zero lengths.

    Negatives are shared by the whole batch, so they all sit in row 0.
    """
    batch = history_lengths.numel()
    empty = history_lengths.new_zeros(batch)
    candidate_lengths = empty if candidate_lengths is None else candidate_lengths
    negative_lengths = empty.clone()
    if negatives is not None and batch:
        negative_lengths[0] = negatives.numel()
    values = [history]
    if candidates is not None:
        values.append(candidates)
    if negatives is not None:
        values.append(negatives)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(ITEM_FEATURES),
        values=torch.cat(values).long(),
        lengths=torch.cat([history_lengths, candidate_lengths, negative_lengths]).long(),
    )


def pad_jagged(values: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Jagged ``[sum(lengths), ...]`` → ``[B, max(lengths), ...]`` and a validity mask.

    Padding goes to the longest row of this batch only, never to a global maximum.
    """
    batch, longest = lengths.numel(), int(lengths.max()) if lengths.numel() else 0
    rows = torch.repeat_interleave(torch.arange(batch, device=lengths.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    cols = torch.arange(values.shape[0], device=lengths.device) - starts[rows]
    padded = values.new_zeros((batch, longest, *values.shape[1:]))
    padded[rows, cols] = values
    mask = torch.zeros(batch, longest, dtype=torch.bool, device=lengths.device)
    mask[rows, cols] = True
    return padded, mask


class EventEncoder(nn.Module):
    """Event tokens → causally contextualised states ``[B, L, D]`` (state t sees events ≤ t)."""

    def __init__(self, cfg: MemberModelConfig):
        super().__init__()
        dim = cfg.embedding_dim
        self.cfg = cfg
        self.action = nn.Embedding(len(ACTIONS), dim, padding_idx=0)
        self.gap = nn.Embedding(NUM_GAP_BUCKETS, dim, padding_idx=0)
        self.position = nn.Embedding(cfg.max_len, dim)
        if cfg.context_features:
            self.hour = nn.Embedding(NUM_HOURS, dim, padding_idx=0)
            self.device = nn.Embedding(len(DEVICES), dim, padding_idx=0)
        self.input_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            dim, cfg.num_heads, dim * cfg.ffn_multiplier, cfg.dropout,
            activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.output_norm = nn.LayerNorm(dim)

    def forward(self, item_emb: Tensor, batch) -> tuple[Tensor, Tensor]:
        tokens = item_emb + self.action(batch.action) + self.gap(batch.gap)
        if self.cfg.context_features:
            tokens = tokens + self.hour(batch.hour) + self.device(batch.device)
        x, mask = pad_jagged(tokens, batch.lengths)
        # Positions count back from the newest event, so "the latest event" means the same
        # slot whatever the history length (SASRec's left padding does the same).
        recency = (mask.sum(1, keepdim=True) - 1 - torch.arange(x.shape[1], device=x.device))
        x = x + self.position(recency.clamp(0, self.cfg.max_len - 1))
        x = self.dropout(self.input_norm(x))
        longest = x.shape[1]
        causal = torch.ones(longest, longest, dtype=torch.bool, device=x.device).triu(1)
        x = self.layers(x, mask=causal, src_key_padding_mask=~mask, is_causal=True)
        return self.output_norm(x), mask


def last_states(states: Tensor, mask: Tensor) -> Tensor:
    """The state after each row's newest event: ``[B, D]``."""
    last = mask.sum(1) - 1
    return states[torch.arange(states.shape[0], device=states.device), last]
