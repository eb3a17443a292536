"""Item media: images (jpg, png) and audio (wav, flac) decoded with size limits.

Media stay encoded in the item shards (their original bytes, so shards stay small) and are
decoded by these functions only, never by a pickle-capable decoder. Every limit is checked
before the pixels or samples are materialised, so a hostile or broken file costs little.
"""

from __future__ import annotations

import io
from enum import Enum
from pathlib import Path

import numpy as np

MAX_IMAGE_BYTES = 16 << 20
MAX_AUDIO_BYTES = 32 << 20
MAX_IMAGE_PIXELS = 4096 * 4096  # decompression bombs are refused from the header
MAX_AUDIO_SECONDS = 600.0


class MediaKind(str, Enum):
    image = "image"
    audio = "audio"


# Suffix → (kind, the entry name in an item shard).
MEDIA_FILES: dict[str, tuple[MediaKind, str]] = {
    ".jpg": (MediaKind.image, "jpg"), ".jpeg": (MediaKind.image, "jpg"),
    ".png": (MediaKind.image, "png"),
    ".wav": (MediaKind.audio, "wav"), ".flac": (MediaKind.audio, "flac"),
}
IMAGE_FORMATS = {"JPEG", "PNG"}
AUDIO_FORMATS = {"WAV", "FLAC"}
MEDIA_ENTRIES = frozenset(entry for _, entry in MEDIA_FILES.values())


class MediaError(ValueError):
    """A media file that cannot be used: the message names the limit or the problem."""


def decode_image(data: bytes, size: int | None = None) -> np.ndarray:
    """JPEG/PNG bytes → uint8 RGB ``[H, W, 3]`` (resized to ``size × size`` if given)."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_IMAGE_BYTES:
        raise MediaError(f"image of {len(data)} bytes exceeds the {MAX_IMAGE_BYTES}-byte limit")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in IMAGE_FORMATS:
                raise MediaError(f"image format {image.format} is not one of "
                                 f"{sorted(IMAGE_FORMATS)}")
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise MediaError(f"image of {width}×{height} pixels exceeds the "
                                 f"{MAX_IMAGE_PIXELS}-pixel limit")
            rgb = image.convert("RGB")
            if size is not None:
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise MediaError(f"not a readable image: {err}") from None


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """WAV/FLAC bytes → (mono float32 samples in [-1, 1], sample rate)."""
    import soundfile

    if len(data) > MAX_AUDIO_BYTES:
        raise MediaError(f"audio of {len(data)} bytes exceeds the {MAX_AUDIO_BYTES}-byte limit")
    try:
        info = soundfile.info(io.BytesIO(data))
        if info.format not in AUDIO_FORMATS:
            raise MediaError(f"audio format {info.format} is not one of {sorted(AUDIO_FORMATS)}")
        if info.duration > MAX_AUDIO_SECONDS or info.frames == 0:
            raise MediaError(f"audio of {info.duration:.1f} s is outside (0, "
                             f"{MAX_AUDIO_SECONDS:.0f}] s")
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise MediaError(f"not a readable audio file: {err}") from None
    return samples.mean(axis=1), int(rate)


# What the towers see (numpy only, shared by training and the serving predictor).
IMAGE_MEAN, IMAGE_STD = 0.5, 0.25


def prepare_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` → normalised float32 ``[3, size, size]``."""
    from PIL import Image

    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size),
                                                         Image.Resampling.BILINEAR))
    pixels = image.astype(np.float32).transpose(2, 0, 1) / 255.0
    return (pixels - IMAGE_MEAN) / IMAGE_STD


def prepare_audio(samples: np.ndarray, rate: int, target_rate: int, length: int) -> np.ndarray:
    """Mono samples → float32 ``[length]`` at ``target_rate`` (linear-interpolation
    resampling, then cut or zero-padded)."""
    samples = np.asarray(samples, dtype=np.float32)
    if rate != target_rate:
        count = max(1, int(round(len(samples) * target_rate / rate)))
        samples = np.interp(np.linspace(0, len(samples) - 1, count), np.arange(len(samples)),
                            samples).astype(np.float32)
    out = np.zeros(length, dtype=np.float32)
    out[:min(length, len(samples))] = samples[:length]
    return out


def check_media(entry: str, data: bytes) -> None:
    """Decode once to check (the writer stores only media that decode within the limits)."""
    if entry in ("jpg", "png"):
        decode_image(data)
    else:
        decode_audio(data)


def media_file(path: Path) -> tuple[int, MediaKind, str]:
    """``ITEM_ID.ext`` → (raw item id, kind, shard entry); MediaError for any other name."""
    found = MEDIA_FILES.get(path.suffix.lower())
    stem = path.stem
    if found is None or not stem.lstrip("-").isdigit():
        raise MediaError(f"{path.name}: media files are named ITEM_ID.ext with ext one of "
                         f"{sorted(MEDIA_FILES)}")
    return int(stem), *found
