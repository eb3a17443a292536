"""Item towers trained from scratch, one per modality, behind the ``ItemTower`` interface.

Each tower splits into ``prepare`` (raw content → a tensor batch, on the CPU: resizing,
resampling, tokenising) and ``encode`` (that tensor → vectors ``[B, out_dim]``, the part that
trains and exports), and ``forward(raw) = encode(prepare(raw))``.

* ``ImageTower``: a small CNN (conv–GroupNorm–ReLU blocks, stride 2, global average pool),
  or the ImageNet-pretrained EfficientNet-Lite0 (``image.backbone=efficientnet_lite0``).
* ``AudioTower``: a log-mel spectrogram (``torch.stft`` and a mel filterbank built here:
  torchaudio's wheels do not match torch 2.13) and a small CNN over it.
* ``TextTransformerTower``: a WordPiece tokenizer trained on the catalogue's own text
  (``tokenizers``) and a small transformer encoder with mean pooling.
* ``VectorProjection``: an MLP over vectors an upstream service computed.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foundation.data.media import IMAGE_STD, prepare_audio, prepare_image
from foundation.models.contrastive import InfoNCE
from foundation.models.efficientnet import EfficientNetLite0
from foundation.models.towers import ItemTower

if TYPE_CHECKING:
    from foundation.data.batch import ItemBatch

def _conv_stack(in_channels: int, channels: Sequence[int]) -> nn.Sequential:
    """conv 3×3 stride 2 → GroupNorm → ReLU blocks. GroupNorm, not BatchNorm: it keeps no
    running statistics, which on several ranks would drift apart (only gradients are
    synchronised), so every rank and the exported program compute the same vectors."""
    layers: list[nn.Module] = []
    for out in channels:
        layers += [nn.Conv2d(in_channels, out, 3, stride=2, padding=1, bias=False),
                   nn.GroupNorm(min(8, out), out), nn.ReLU(inplace=True)]
        in_channels = out
    return nn.Sequential(*layers)


class ImageBackbone(str, Enum):
    cnn = "cnn"  # the small CNN above (image.channels), trained from scratch
    # ImageNet-pretrained EfficientNet-Lite0 (models/efficientnet.py), frozen but for its
    # last image.trainable_blocks blocks; give it image.size of 96 to 224 pixels
    efficientnet_lite0 = "efficientnet_lite0"


@dataclass
class ImageTowerConfig:
    size: int = 32  # images are resized to size × size
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    dim: int = 128
    backbone: ImageBackbone = ImageBackbone.cnn
    trainable_blocks: int = 0  # efficientnet_lite0: how many of its 16 blocks fine-tune


class ImageTower(ItemTower):
    """RGB images (uint8 ``[H, W, 3]`` arrays) → vectors."""

    def __init__(self, cfg: ImageTowerConfig):
        super().__init__()
        self.cfg, self.out_dim = cfg, cfg.dim
        if ImageBackbone(cfg.backbone) == ImageBackbone.efficientnet_lite0:
            # its weights expect pixels in [-1, 1]; prepare_image gives (x - 0.5) / 0.25
            self.body = EfficientNetLite0(cfg.trainable_blocks, pixel_scale=IMAGE_STD / 0.5)
            width = self.body.out_channels
        else:
            self.body, width = _conv_stack(3, cfg.channels), cfg.channels[-1]
        self.head = nn.Linear(width, cfg.dim)

    def prepare(self, images: Sequence[np.ndarray]) -> Tensor:
        return torch.from_numpy(np.stack([prepare_image(a, self.cfg.size) for a in images]))

    def encode(self, pixels: Tensor) -> Tensor:
        return self.head(self.body(pixels).mean(dim=(2, 3)))

    def forward(self, images: Sequence[np.ndarray]) -> Tensor:
        return self.encode(self.prepare(images).to(self.head.weight.device))


@dataclass
class AudioTowerConfig:
    sample_rate: int = 8000  # clips are resampled to this rate
    seconds: float = 0.5  # then cut or zero-padded to this length
    n_fft: int = 256
    hop: int = 64
    n_mels: int = 40
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    dim: int = 128


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int) -> Tensor:
    """Triangular filters ``[n_mels, n_fft // 2 + 1]`` equally spaced on the (HTK) mel scale."""
    def to_mel(hz: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    def to_hz(mel: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)

    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = to_hz(np.linspace(0.0, to_mel(np.array(sample_rate / 2)), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lower) / (centre - lower)
    falling = (upper - bins[None]) / (upper - centre)
    return torch.from_numpy(np.maximum(0.0, np.minimum(rising, falling))).float()


def log_mel(waves: Tensor, cfg: AudioTowerConfig, filters: Tensor) -> Tensor:
    """Waveforms ``[B, T]`` → log-mel spectrograms ``[B, n_mels, frames]``."""
    window = torch.hann_window(cfg.n_fft, device=waves.device)
    spectrum = torch.stft(waves, cfg.n_fft, cfg.hop, window=window, return_complex=True)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    return torch.log(filters.to(waves.device) @ power + 1e-6)


class AudioTower(ItemTower):
    """Audio clips (``(samples, rate)`` pairs) → vectors."""

    def __init__(self, cfg: AudioTowerConfig):
        super().__init__()
        self.cfg, self.out_dim = cfg, cfg.dim
        self.register_buffer("filters", mel_filterbank(cfg.n_fft, cfg.n_mels, cfg.sample_rate),
                             persistent=False)
        self.input_norm = nn.GroupNorm(1, 1)  # each spectrogram to zero mean, unit variance
        self.body = _conv_stack(1, cfg.channels)
        self.head = nn.Linear(cfg.channels[-1], cfg.dim)

    @property
    def length(self) -> int:
        return int(self.cfg.sample_rate * self.cfg.seconds)

    def prepare(self, clips: Sequence[tuple[np.ndarray, int]]) -> Tensor:
        return torch.from_numpy(np.stack([
            prepare_audio(samples, int(rate), self.cfg.sample_rate, self.length)
            for samples, rate in clips]))

    def encode(self, waves: Tensor) -> Tensor:
        spectrogram = self.input_norm(log_mel(waves, self.cfg, self.filters).unsqueeze(1))
        return self.head(self.body(spectrogram).mean(dim=(2, 3)))

    def forward(self, clips: Sequence[tuple[np.ndarray, int]]) -> Tensor:
        return self.encode(self.prepare(clips).to(self.head.weight.device))


@dataclass
class TextTransformerConfig:
    vocab_size: int = 2000  # the WordPiece vocabulary learnt from the catalogue's text
    max_tokens: int = 32
    dim: int = 128
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> str:
    """A lower-casing WordPiece tokenizer for ``texts``, as its JSON: every character (alone
    and as a ``##`` continuation), then the most frequent whole words up to ``vocab_size``;
    rarer words fall back to pieces. Built here, not by ``tokenizers``' WordPiece trainer,
    whose vocabulary varies from run to run (ties broken by hash order)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(str(text))))
    chars = sorted({c for word in words for c in word})
    vocab = ["[PAD]", "[UNK]", *chars, *(f"##{c}" for c in chars)]
    frequent = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
    vocab += frequent[:max(0, vocab_size - len(vocab))]
    tokenizer = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, splitter
    return tokenizer.to_str()


class TextTransformerTower(ItemTower):
    """Texts → vectors with a small transformer trained from scratch on its own tokenizer."""

    def __init__(self, cfg: TextTransformerConfig, tokenizer_json: str):
        super().__init__()
        from tokenizers import Tokenizer

        self.cfg, self.out_dim, self.tokenizer_json = cfg, cfg.dim, tokenizer_json
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.enable_truncation(cfg.max_tokens)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.word = nn.Embedding(self.tokenizer.get_vocab_size(), cfg.dim, padding_idx=0)
        self.position = nn.Embedding(cfg.max_tokens, cfg.dim)
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, 4 * cfg.dim, cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.fingerprint = "text-scratch-" + hashlib.sha256(tokenizer_json.encode()).hexdigest()[:12]

    def prepare(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        encoded = self.tokenizer.encode_batch([str(t) for t in texts])
        ids = torch.tensor([e.ids for e in encoded], dtype=torch.long)
        return ids, ids != 0

    def encode(self, ids: Tensor, keep: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word(ids) * math.sqrt(self.cfg.dim) + self.position(positions)
        x = self.norm(self.layers(x, src_key_padding_mask=~keep))
        weights = keep.unsqueeze(-1).to(x.dtype)
        return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def forward(self, texts: Sequence[str]) -> Tensor:
        ids, keep = self.prepare(texts)
        device = self.word.weight.device
        return self.encode(ids.to(device), keep.to(device))


class VectorProjection(ItemTower):
    """Upstream vectors ``[B, in_dim]`` → an MLP projection ``[B, dim]``."""

    def __init__(self, in_dim: int, dim: int = 128, hidden: int = 256):
        super().__init__()
        self.out_dim = dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def prepare(self, vectors: Sequence[np.ndarray]) -> Tensor:
        return torch.as_tensor(np.stack(vectors), dtype=torch.float32)

    def encode(self, vectors: Tensor) -> Tensor:
        return self.mlp(vectors)

    def forward(self, vectors: Sequence[np.ndarray]) -> Tensor:
        return self.encode(self.prepare(vectors).to(self.mlp[0].weight.device))




# -- the item encoder: towers + heads into one space ---------------------------------------

TOKENIZER_FILE = "text_tokenizer.json"  # in an encoder run's directory


class Side(str, Enum):
    text = "text"
    image = "image"
    audio = "audio"
    vectors = "vectors"
    behaviour = "behaviour"


@dataclass
class ItemEncoderConfig:
    name: str = "pretrain_item_encoder"
    # What is aligned: "A:B" pairs of text, image, audio, vectors, behaviour.
    pairs: list[str] = field(default_factory=lambda: ["image:text", "audio:text"])
    behaviour_from: str | None = None  # a pretrain_member_fm run (sharded item table)
    dim: int = 128  # the shared space every side is projected into
    temperature: float = 0.07  # initial; learnt
    min_temperature: float = 0.01  # the learnt temperature never goes below this (CLIP)
    val_fraction: float = 0.1  # items held out (by id) for validation
    ks: list[int] = field(default_factory=lambda: [1, 5])
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    audio: AudioTowerConfig = field(default_factory=AudioTowerConfig)
    text: TextTransformerConfig = field(default_factory=TextTransformerConfig)


def parse_pairs(pairs: list[str]) -> list[tuple[Side, Side]]:
    sides = [s.value for s in Side]
    parsed = []
    for pair in pairs:
        a, colon, b = str(pair).partition(":")
        if not colon or a not in sides or b not in sides or a == b:
            raise ValueError(f"recipe.pairs: {pair!r} is not A:B with two different sides "
                             f"from {sides}")
        parsed.append((Side(a), Side(b)))
    if not parsed:
        raise ValueError("recipe.pairs is empty: name at least one pair, e.g. [image:text]")
    return parsed


class ItemEncoder(nn.Module):
    """Towers and projection heads into one unit-length space, and the InfoNCE loss."""

    def __init__(self, towers: dict[str, ItemTower], behaviour_dim: int | None,
                 pairs: list[tuple[Side, Side]], recipe: ItemEncoderConfig):
        super().__init__()
        self.pairs = pairs
        self.towers = nn.ModuleDict(towers)
        widths = {side: tower.out_dim for side, tower in towers.items()}
        if behaviour_dim is not None:
            widths[Side.behaviour.value] = behaviour_dim
        self.heads = nn.ModuleDict({side: nn.Linear(width, recipe.dim)
                                    for side, width in widths.items()})
        self.loss = InfoNCE(recipe.temperature, recipe.min_temperature)

    def embed(self, side: Side, batch: ItemBatch, emb: dict[str, Tensor], rows: Tensor) -> Tensor:
        """Unit vectors ``[len(rows), dim]`` of one side of the batch's ``rows``."""
        if side == Side.behaviour:  # the member model's table stays as trained
            return F.normalize(self.heads[side.value](emb["negative"][rows].detach()), dim=-1)
        return self.content_vectors(side.value, [batch.content[side.value][i]
                                                 for i in rows.tolist()])

    def content_vectors(self, side: str, values: list) -> Tensor:
        """Raw content of one side → unit vectors in the shared space (what a member model
        reads as this side's item content, model.item_encoder)."""
        return F.normalize(self.heads[side](self.towers[side](values)), dim=-1)

    def rows(self, batch: ItemBatch, *sides: Side) -> Tensor:
        have = torch.ones(len(batch), dtype=torch.bool)
        for side in sides:
            if side != Side.behaviour:
                have &= batch.has(side.value)
        return have.nonzero().squeeze(1)

    def forward(self, batch: ItemBatch, emb: dict[str, Tensor]) -> Tensor:
        losses = []
        for a, b in self.pairs:
            rows = self.rows(batch, a, b)
            losses.append(self.loss(self.embed(a, batch, emb, rows), self.embed(b, batch, emb, rows)))
        return torch.stack(losses).mean()


def build_item_encoder(recipe: ItemEncoderConfig, manifest: dict[str, Any],
                       tokenizer_json: str | None, behaviour_dim: int | None) -> ItemEncoder:
    """The towers of every content side of ``recipe.pairs`` and their heads."""
    pairs = parse_pairs(list(recipe.pairs))
    towers: dict[str, ItemTower] = {}
    # In Side's order: a set's order differs between processes (string hashing is salted),
    # and every rank must build the same modules in the same order.
    used = {s for pair in pairs for s in pair}
    for side in [s for s in Side if s in used and s != Side.behaviour]:
        if side == Side.image:
            towers[side.value] = ImageTower(recipe.image)
        elif side == Side.audio:
            towers[side.value] = AudioTower(recipe.audio)
        elif side == Side.text:
            towers[side.value] = TextTransformerTower(recipe.text, tokenizer_json)
        else:
            dim = int(manifest["items"]["content"]["vectors"]["dim"])
            towers[side.value] = VectorProjection(dim, recipe.dim)
    return ItemEncoder(towers, behaviour_dim, pairs, recipe)


def load_item_encoder(run_dir: str | Path) -> tuple[ItemEncoder, str]:
    """A trained ``pretrain_item_encoder`` run's encoder (its newest checkpoint, eval mode)
    and a fingerprint of its weights."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from foundation.checksum import sha256
    from foundation.data.writer import load_manifest
    from foundation.train import checkpoint

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"model.item_encoder={run}: not a training run (no config.yaml)")
    saved = OmegaConf.load(run / "config.yaml")
    if saved.recipe.name != "pretrain_item_encoder":
        raise ValueError(f"model.item_encoder={run} is a {saved.recipe.name} run; pass a "
                         f"pretrain_item_encoder run")
    recipe = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ItemEncoderConfig),
                                                 saved.recipe))
    path = checkpoint.resolve(run)
    weights = load_file(str(path / "dense.safetensors"))
    behaviour = weights.get("heads.behaviour.weight")
    tokenizer = run / TOKENIZER_FILE
    encoder = build_item_encoder(recipe, load_manifest(saved.data.path),
                                 tokenizer.read_text() if tokenizer.exists() else None,
                                 behaviour.shape[1] if behaviour is not None else None)
    encoder.load_state_dict(weights)
    return encoder.eval(), f"encoder-{sha256(path / 'dense.safetensors')[:16]}"
