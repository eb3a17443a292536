"""Member foundation model: a causal transformer over event tokens.

The model is split the way the whole framework is (ARCHITECTURE.md, "Sparse / dense split"):

* ``SparseArch`` holds every categorical table as one TorchRec ``EmbeddingCollection``, which
  ``DistributedModelParallel`` shards: the item table (behind three features: history
  ``item``s, ranking ``candidate``s and sampled ``negative``s, so one lookup per step fetches
  them all) and one table per event feature of the dataset's schema (data/schema.py: by
  default action, time-gap bucket, hour, device).
* ``EventEncoder`` is the dense trunk: token = item + the event features (context ones such
  as hour and device only with ``context_features``) + recency position, then causal
  layers: pre-norm softmax self-attention (SASRec) or HSTU's pointwise attention with
  relative position and time biases (``model.attention``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from torchrec import KeyedJaggedTensor

from foundation.choices import choice
from foundation.data.schema import EventSchema, default_features
from foundation.kernels.dispatch import Kernel
from foundation.kernels.hstu import hstu_attention, time_bucket
from foundation.kernels.jagged import offsets_from_lengths, pad_jagged, row_index
from foundation.models.dropout import Dropout, causal_attention, with_fast_dropout
from foundation.models.towers import Modality, TextTowerConfig

# Table names must not shadow nn.ModuleDict attributes (a table named "items" breaks TorchRec).
ITEM_TABLE = "item_table"
ITEM_FEATURES = ("item", "candidate", "negative")
# The default schema's features (models built without a dataset: tests, benchmarks).
DEFAULT_SCHEMA = EventSchema(default_features())


class ItemPlacement(str, Enum):
    """Where the item table lives (``model.item_table``; see MemberModelConfig)."""

    sharded = "sharded"
    replicated = "replicated"


class Attention(str, Enum):
    """The trunk's layers (``model.attention``; see MemberModelConfig)."""

    softmax = "softmax"
    pointwise = "pointwise"

# Relative time between two events, in log2-minute buckets: up to 2^31 minutes apart.
RELATIVE_TIME_BUCKETS = 32


@dataclass
class MemberModelConfig:
    embedding_dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    ffn_multiplier: int = 4
    dropout: float = 0.1
    max_len: int = 50
    context_features: bool = True  # hour-of-day and device embeddings in each token
    side_features: bool = True  # item attributes of the dataset (when it has them) in each item
    # sharded: the item table is a TorchRec table, sharded by the planner and trained by its
    # fused sparse optimizer (catalogues of any size). replicated: every rank holds the whole
    # table in the dense module, trained by the engine's AdamW with gradients averaged over
    # ranks (TorchRec's data_parallel placement, which fbgemm's CPU kernels cannot run for
    # sequence tables): for catalogues that fit one device, where Adam learns items faster.
    item_table: ItemPlacement = ItemPlacement.sharded
    # The item embedding's weight in each event token, against the event attributes and the
    # position (SASRec and the Transformer scale by sqrt(embedding_dim)).
    item_scale: float = 1.0
    # softmax: causal softmax self-attention + feed-forward (SASRec). pointwise: HSTU layers
    # (Zhai et al., 2024): SiLU attention weights without softmax normalisation, so how much
    # of the history matters is learnt too, plus learned relative position and time biases.
    attention: Attention = Attention.softmax
    # Pointwise attention runs on jagged rows (values + offsets, no padding) through this
    # implementation (foundation.kernels): pytorch, triton (CUDA), or auto (triton on CUDA).
    kernel: Kernel = Kernel.auto
    # Item content added to every item's embedding (data/items.py, models/content.py): each
    # modality's frozen tower vectors, cached per run, through a trained adapter.
    item_content: list[Modality] = field(default_factory=list)
    text_tower: TextTowerConfig = field(default_factory=TextTowerConfig)
    # A pretrain_item_encoder run: its towers encode the image and audio content.
    item_encoder: str | None = None
    # In training, an item's ID embedding is replaced by a shared fallback with this
    # probability, so the model learns to score from content alone (cold start). With
    # content or id_dropout, items never seen in training always use the fallback.
    id_dropout: float = 0.0
    # Also score items by how close their frozen content vectors are to the recent
    # history's (models/content.py ContentMatch): sharper than the adapters, and what a
    # cold item mostly competes on. Needs item_content.
    content_match: bool = False
    # With content_match on a build with cold_val_items, each validation weights the items
    # scored without an ID (cold) by the multiple of their learned weight (0.71 … 4) that
    # serves the users with a cold target best while the others keep at least
    # 1 - cold_budget of their best NDCG@10 (or of cold_reference's: a run on the same build,
    # e.g. the ID-only incumbent): how much of the warm ranking new titles may cost.
    cold_budget: float = 0.05
    cold_reference: str | None = None
    # A learned score offset for items already in the history, by how recently they were
    # seen (models/history.py): how much repeats are worth, which a dot product cannot say.
    history_bias: bool = False


def sharded_items(cfg: MemberModelConfig) -> bool:
    """Whether the item table is a sharded TorchRec table (else replicated in the dense module)."""
    return choice(ItemPlacement, cfg.item_table, "model.item_table") == ItemPlacement.sharded


class SparseArch(nn.Module):
    """All categorical tables of the member model in one EmbeddingCollection (the item table
    only when it is sharded: ``with_items``)."""

    def __init__(self, num_items: int, dim: int, event_sizes: dict[str, int] | None = None,
                 device: torch.device | None = None, with_items: bool = True):
        super().__init__()
        # TorchRec is imported by the sparse parts only: the dense trunk (EventEncoder) loads
        # where TorchRec and fbgemm cannot (GPU checks, serving-side tools). Its first import
        # builds tensors (tensordict), which must not land on a caller's meta device.
        with torch.device("cpu"):
            from torchrec import EmbeddingCollection, EmbeddingConfig

        tables = [EmbeddingConfig(name=ITEM_TABLE, embedding_dim=dim, num_embeddings=num_items,
                                  feature_names=list(ITEM_FEATURES))] if with_items else []
        sizes = event_sizes if event_sizes is not None else DEFAULT_SCHEMA.sizes
        tables += [EmbeddingConfig(name=f"{key}_table", embedding_dim=dim, num_embeddings=size,
                                   feature_names=[key]) for key, size in sizes.items()]
        self.embedding_collection = EmbeddingCollection(tables=tables, device=device)

    def forward(self, features: KeyedJaggedTensor) -> dict[str, Tensor]:
        return {key: jt.values() for key, jt in self.embedding_collection(features).items()}


def sparse_features(batch=None, *, candidates: Tensor | None = None,
                    candidate_lengths: Tensor | None = None,
                    negatives: Tensor | None = None, with_items: bool = True,
                    event_keys: tuple[str, ...] = tuple(DEFAULT_SCHEMA.sizes)
                    ) -> KeyedJaggedTensor:
    """One KJT for every lookup of a step: the batch's events, candidates and negatives.

    Absent parts get zero lengths. Negatives are shared by the whole batch, so they all sit
    in row 0. Without a batch (a catalogue lookup) there is one empty row, and the event
    features (``event_keys``: the collection's, which every lookup must name) are empty. Without
    ``with_items`` (a replicated item table) only the event features are looked up.
    """
    from torchrec import KeyedJaggedTensor  # sparse parts only (see SparseArch)

    lengths = batch.lengths if batch is not None else torch.zeros(1, dtype=torch.long)
    empty, zeros = lengths.new_zeros(0), lengths.new_zeros(lengths.numel())
    negative_lengths = zeros.clone()
    if negatives is not None:
        negative_lengths[0] = negatives.numel()
    parts = {
        "item": (batch.item if batch is not None else empty, lengths),
        "candidate": (candidates if candidates is not None else empty,
                      candidate_lengths if candidate_lengths is not None else zeros),
        "negative": (negatives if negatives is not None else empty, negative_lengths),
    }
    events = batch.events if batch is not None else {k: empty for k in event_keys}
    parts.update({key: (values, lengths) for key, values in events.items()})
    keys = (ITEM_FEATURES if with_items else ()) + tuple(events)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(keys),
        values=torch.cat([parts[k][0].long() for k in keys]),
        lengths=torch.cat([parts[k][1].long() for k in keys]))


class EventEncoder(nn.Module):
    """Event tokens → causally contextualised states ``[B, L, D]`` (state t sees events ≤ t)."""

    def __init__(self, cfg: MemberModelConfig, token_features: tuple[str, ...] | None = None):
        super().__init__()
        dim = cfg.embedding_dim
        self.cfg = cfg
        # The embeddings summed into each event's token: the item and the schema's features.
        self.token_features = tuple(token_features or (
            "item", *DEFAULT_SCHEMA.token_features(cfg.context_features)))
        self.position = nn.Embedding(cfg.max_len, dim)
        # Small, so the items (not their slots) dominate the first tokens the model sees.
        nn.init.normal_(self.position.weight, std=0.02)
        self.input_norm = nn.LayerNorm(dim)
        self.dropout = Dropout(cfg.dropout)
        self.pointwise = choice(Attention, cfg.attention, "model.attention") == Attention.pointwise
        if self.pointwise:
            self.layers = nn.ModuleList(PointwiseAttention(cfg) for _ in range(cfg.num_layers))
        else:
            layer = nn.TransformerEncoderLayer(
                dim, cfg.num_heads, dim * cfg.ffn_multiplier, cfg.dropout,
                activation="gelu", batch_first=True, norm_first=True)
            self.layers = with_fast_dropout(
                nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False))
        self.output_norm = nn.LayerNorm(dim)

    def forward(self, emb: dict[str, Tensor], lengths: Tensor, newest_is_target: bool = False,
                timestamps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``emb``: the sparse arch's per-event embeddings; ``lengths``: events per row;
        ``timestamps``: each event's unix seconds, jagged like ``emb`` (read by pointwise
        attention's time bias when ``uses_time``).

        ``newest_is_target``: each row's newest event is only a prediction target (next-item
        training), so positions count back from the event before it, as when serving.
        """
        tokens = sum(emb[key] * self.token_scale(key) for key in self.token_features)
        if self.pointwise and timestamps is None:
            raise ValueError("pointwise attention needs the events' timestamps")
        states = self.encode_jagged(tokens, lengths, int(newest_is_target), timestamps)
        return pad_jagged(states, lengths)

    def encode_jagged(self, tokens: Tensor, lengths: Tensor, skip_newest: int,
                      timestamps: Tensor | None = None) -> Tensor:
        """The layers on jagged tokens ``[sum(lengths), D]`` → states, jagged alike (what
        ``encode_padded`` computes, without padding: projections, feed-forward and dropout
        touch real events only; softmax attention alone pads, to the batch's longest row)."""
        rows, cols = row_index(lengths)
        recency = (lengths - 1 - skip_newest)[rows] - cols  # as in encode_padded
        x = tokens + self.position(recency.clamp(0, self.cfg.max_len - 1))
        x = self.dropout(self.input_norm(x))
        longest = int(lengths.max()) if lengths.numel() else 0
        if self.pointwise:
            offsets = offsets_from_lengths(lengths)
            for layer in self.layers:
                x = layer.jagged(x, offsets, timestamps, longest)
        else:
            for layer in self.layers.layers:
                x = softmax_layer_jagged(layer, x, rows, cols, lengths.numel(), longest)
        return self.output_norm(x)

    @property
    def uses_time(self) -> bool:
        """Whether the encoder reads event timestamps (pointwise attention's time bias)."""
        return self.pointwise

    def token_scale(self, feature: str) -> float:
        return self.cfg.item_scale if feature == "item" else 1.0

    def encode_padded(self, x: Tensor, mask: Tensor, skip_newest: int = 0,
                      timestamps: Tensor | None = None) -> Tensor:
        """Tokens ``[B, L, D]`` (rows left-aligned, ``mask`` true on events) → states;
        ``timestamps`` ``[B, L]`` when ``uses_time``."""
        # Positions count back from the newest input event, so "the latest event" means the
        # same slot whatever the history length (SASRec's left padding does the same), and
        # the state that predicts at serving time (recency 0) is the one trained to predict.
        newest = mask.sum(1, keepdim=True) - 1 - skip_newest
        recency = newest - torch.arange(x.shape[1], device=x.device)
        x = x + self.position(recency.clamp(0, self.cfg.max_len - 1))
        x = self.dropout(self.input_norm(x))
        if self.pointwise:
            if timestamps is None:
                raise ValueError("pointwise attention needs the events' timestamps")
            return self.output_norm(self._pointwise(x, mask, timestamps))
        longest = x.shape[1]
        causal = torch.ones(longest, longest, dtype=torch.bool, device=x.device).triu(1)
        x = self.layers(x, mask=causal, src_key_padding_mask=~mask, is_causal=True)
        return self.output_norm(x)

    def _pointwise(self, x: Tensor, mask: Tensor, timestamps: Tensor) -> Tensor:
        steps = torch.arange(x.shape[1], device=x.device)
        distance = steps.unsqueeze(1) - steps.unsqueeze(0)  # query i - key j
        attend = (distance >= 0).unsqueeze(0) & mask.unsqueeze(1)  # causal, real keys only
        distance = distance.clamp(0, self.cfg.max_len - 1)
        elapsed = time_bucket(timestamps.unsqueeze(2) - timestamps.unsqueeze(1),
                              RELATIVE_TIME_BUCKETS)
        for layer in self.layers:
            x = layer(x, attend, distance, elapsed)
        return x


def softmax_layer_jagged(layer: nn.TransformerEncoderLayer, x: Tensor, rows: Tensor,
                         cols: Tensor, batch: int, longest: int) -> Tensor:
    """A pre-norm causal ``TransformerEncoderLayer`` on jagged tokens ``x`` ``[T, D]`` (token
    i at ``rows[i], cols[i]``), with the layer's own weights: only the attention itself runs
    on rows padded to ``longest``. Rows are left-aligned, so a causal mask alone keeps every
    real query off the padding."""
    attention = layer.self_attn
    heads, dim = attention.num_heads, x.shape[1]
    qkv = F.linear(layer.norm1(x), attention.in_proj_weight, attention.in_proj_bias)
    padded = qkv.new_zeros(batch, longest, 3 * dim).index_put((rows, cols), qkv)
    q, k, v = padded.view(batch, longest, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    mixed = causal_attention(q, k, v, attention.dropout, layer.training)
    mixed = mixed.transpose(1, 2).reshape(batch, longest, dim)[rows, cols]
    x = x + layer.dropout1(attention.out_proj(mixed))
    hidden = layer.dropout(layer.activation(layer.linear1(layer.norm2(x))))
    return x + layer.dropout2(layer.linear2(hidden))


class PointwiseAttention(nn.Module):
    """One HSTU layer (Zhai et al., 2024, "Actions Speak Louder than Words"): one projection
    gives U, V, Q, K (SiLU); weights ``SiLU(QKᵀ/√d + position bias + time bias) / max_len``
    (no softmax: a history's weights need not sum to one, so intensity is kept); output
    ``W · LayerNorm(AV) ⊙ U``, residual. Dividing by the fixed ``max_len`` (not the batch's
    longest row) keeps a member's state independent of how the batch was padded."""

    def __init__(self, cfg: MemberModelConfig):
        super().__init__()
        dim, self.heads, self.max_len = cfg.embedding_dim, cfg.num_heads, cfg.max_len
        if dim % self.heads:
            raise ValueError(f"model.embedding_dim={dim} is not divisible by "
                             f"model.num_heads={self.heads}")
        self.norm = nn.LayerNorm(dim)
        self.uvqk = nn.Linear(dim, 4 * dim)
        self.mix_norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = Dropout(cfg.dropout)
        self.position_bias = nn.Embedding(cfg.max_len, self.heads)  # by distance i - j
        self.time_bias = nn.Embedding(RELATIVE_TIME_BUCKETS, self.heads)
        self.kernel = choice(Kernel, cfg.kernel, "model.kernel")
        nn.init.zeros_(self.position_bias.weight)
        nn.init.zeros_(self.time_bias.weight)

    def forward(self, x: Tensor, attend: Tensor, distance: Tensor, elapsed: Tensor) -> Tensor:
        """``x`` ``[B, L, D]``; ``attend`` ``[B, L, L]`` (query, key) allowed; ``distance``
        ``[L, L]`` and ``elapsed`` ``[B, L, L]`` bucket ids for the biases."""
        batch, length, dim = x.shape
        u, v, q, k = F.silu(self.uvqk(self.norm(x))).chunk(4, dim=-1)
        q, k, v = (t.reshape(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        bias = (self.position_bias(distance).permute(2, 0, 1).unsqueeze(0)
                + self.time_bias(elapsed).permute(0, 3, 1, 2))
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
        weights = F.silu(scores) * attend.unsqueeze(1) / self.max_len
        mixed = (weights @ v).transpose(1, 2).reshape(batch, length, dim)
        return x + self.dropout(self.out(self.mix_norm(mixed) * u))

    def jagged(self, x: Tensor, offsets: Tensor, timestamps: Tensor, longest: int) -> Tensor:
        """``forward`` on jagged rows: ``x`` ``[T, D]``, ``offsets`` ``[B + 1]``,
        ``timestamps`` ``[T]``; the attention runs through ``foundation.kernels``."""
        tokens, dim = x.shape
        u, v, q, k = F.silu(self.uvqk(self.norm(x))).chunk(4, dim=-1)
        q, k, v = (t.reshape(tokens, self.heads, -1) for t in (q, k, v))
        mixed = hstu_attention(q, k, v, offsets, timestamps, self.position_bias.weight,
                               self.time_bias.weight, self.max_len, longest, self.kernel)
        return x + self.dropout(self.out(self.mix_norm(mixed.reshape(tokens, dim)) * u))


class ReadsItemsLikeThePretrain:
    """A downstream model that reads items as the pretrained member model does: the table row
    plus ``self.attributes`` (side information) and ``self.content`` (content adapters),
    under the next-item model's module names, so a warm start loads them."""

    attributes: nn.Module | None
    content: nn.Module | None

    def with_item_parts(self, items: Tensor, rows: Tensor) -> Tensor:
        """Items' vectors from their table ``rows``, plus side information and content."""
        if self.attributes is not None:
            rows = rows + self.attributes(items)
        return rows if self.content is None else rows + self.content(items)

    def begin_content_step(self, items: Tensor) -> None:
        """Tuned content towers encode a training step's items (frozen ones do nothing)."""
        if self.training and self.content is not None:
            self.content.begin_step(items)


class ItemAttributes(nn.Module):
    """Item side information: the mean embedding of each item's attribute ids (categories,
    brand, ...), added to the item's own embedding wherever the item appears. Items sharing
    attributes share what is learnt about them: the lever for tail and new items.

    ``values``/``offsets``: the attribute ids of item i are ``values[offsets[i]:offsets[i+1]]``.
    """

    def __init__(self, values: Tensor, offsets: Tensor, num_attributes: int, dim: int):
        super().__init__()
        self.register_buffer("values", values.long(), persistent=False)  # data, not weights
        self.register_buffer("offsets", offsets.long(), persistent=False)
        self.table = nn.EmbeddingBag(num_attributes, dim, mode="mean", padding_idx=0)
        nn.init.normal_(self.table.weight, std=dim ** -0.5)  # the scale of an item's own row

    def forward(self, items: Tensor) -> Tensor:
        starts = self.offsets[items]
        lengths = self.offsets[items + 1] - starts
        bags = torch.cumsum(lengths, 0) - lengths
        within = torch.arange(int(lengths.sum()), device=items.device)
        flat = within + torch.repeat_interleave(starts - bags, lengths)
        return self.table(self.values[flat], bags)  # an item without attributes: zeros


def last_states(states: Tensor, mask: Tensor) -> Tensor:
    """The state after each row's newest event: ``[B, D]``."""
    last = mask.sum(1) - 1
    return states[torch.arange(states.shape[0], device=states.device), last]
