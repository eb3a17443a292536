"""Item towers trained from scratch, one per modality, behind the ``ItemTower`` interface.

Each tower splits into ``prepare`` (raw content → a tensor batch, on the CPU: resizing,
resampling, tokenising) and ``encode`` (that tensor → vectors ``[B, out_dim]``, the part that
trains and exports), and ``forward(raw) = encode(prepare(raw))``.

* ``ImageTower``: a small CNN (conv–BN–ReLU blocks, stride 2, global average pool).
* ``AudioTower``: a log-mel spectrogram (``torch.stft`` and a mel filterbank built here:
  torchaudio's wheels do not match torch 2.13) and a small CNN over it.
* ``TextTransformerTower``: a WordPiece tokenizer trained on the catalogue's own text
  (``tokenizers``) and a small transformer encoder with mean pooling.
* ``VectorProjection``: an MLP over vectors an upstream service computed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from foundation.models.towers import ItemTower

IMAGE_MEAN, IMAGE_STD = 0.5, 0.25


def _conv_stack(in_channels: int, channels: Sequence[int], conv: type[nn.Module],
                norm: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for out in channels:
        layers += [conv(in_channels, out, 3, stride=2, padding=1, bias=False), norm(out),
                   nn.ReLU(inplace=True)]
        in_channels = out
    return nn.Sequential(*layers)


@dataclass
class ImageTowerConfig:
    size: int = 32  # images are resized to size × size
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    dim: int = 128


class ImageTower(ItemTower):
    """RGB images (uint8 ``[H, W, 3]`` arrays) → vectors."""

    def __init__(self, cfg: ImageTowerConfig):
        super().__init__()
        self.cfg, self.out_dim = cfg, cfg.dim
        self.body = _conv_stack(3, cfg.channels, nn.Conv2d, nn.BatchNorm2d)
        self.head = nn.Linear(cfg.channels[-1], cfg.dim)

    def prepare(self, images: Sequence[np.ndarray]) -> Tensor:
        from PIL import Image

        size = self.cfg.size
        resized = [a if a.shape[:2] == (size, size) else
                   np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BILINEAR))
                   for a in images]
        pixels = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255.0
        return (pixels - IMAGE_MEAN) / IMAGE_STD

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


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Linear-interpolation resampling (enough for a small tower's input)."""
    if rate == target:
        return samples
    length = max(1, int(round(len(samples) * target / rate)))
    return np.interp(np.linspace(0, len(samples) - 1, length), np.arange(len(samples)),
                     samples).astype(np.float32)


class AudioTower(ItemTower):
    """Audio clips (``(samples, rate)`` pairs) → vectors."""

    def __init__(self, cfg: AudioTowerConfig):
        super().__init__()
        self.cfg, self.out_dim = cfg, cfg.dim
        self.register_buffer("filters", mel_filterbank(cfg.n_fft, cfg.n_mels, cfg.sample_rate),
                             persistent=False)
        self.input_norm = nn.BatchNorm2d(1)
        self.body = _conv_stack(1, cfg.channels, nn.Conv2d, nn.BatchNorm2d)
        self.head = nn.Linear(cfg.channels[-1], cfg.dim)

    def prepare(self, clips: Sequence[tuple[np.ndarray, int]]) -> Tensor:
        length = int(self.cfg.sample_rate * self.cfg.seconds)
        waves = np.zeros((len(clips), length), dtype=np.float32)
        for row, (samples, rate) in enumerate(clips):
            wave = resample(np.asarray(samples, dtype=np.float32), int(rate),
                            self.cfg.sample_rate)[:length]
            waves[row, :len(wave)] = wave
        return torch.from_numpy(waves)

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
    """A lower-casing WordPiece tokenizer learnt from ``texts``, as its JSON."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]"],
                                        show_progress=False)
    tokenizer.train_from_iterator(list(texts), trainer)
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


__all__ = ["AudioTower", "AudioTowerConfig", "ImageTower", "ImageTowerConfig",
           "TextTransformerConfig", "TextTransformerTower", "VectorProjection", "log_mel",
           "mel_filterbank", "train_tokenizer"]
