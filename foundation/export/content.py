"""Item content in the bundle: what serving needs to embed a title it has never seen.

A new item's scoring vector is what the model gives an item without a trained ID row: the
shared fallback plus each modality's adapted content vector. The bundle holds the fallback,
each adapter (``embeddings/content_<modality>.safetensors``: ``center`` and ``project``) and
each tower as programs (``towers/<modality>.pt2``, ``.onnx``): for text with its tokenizer
(``towers/text_tokenizer.json``), for image and audio the item encoder's tower and head
(pixels or waveforms in, what ``foundation.data.media.prepare_*`` makes of a file);
``Predictor.add_items`` runs them. A model with ``content_match`` also scores by content
similarity to the history; ``embeddings/content_match.safetensors`` holds what that needs.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file
from torch import Tensor, nn

from foundation.data.items import iter_items
from foundation.export.programs import export_program
from foundation.models.content import TunedTextAdapter
from foundation.models.encoders import load_item_encoder
from foundation.models.member import MemberModelConfig
from foundation.models.towers import MiniLMTextTower, Modality

TEXT_STEM = "towers/text"
FALLBACK = "embeddings/fallback.safetensors"
MATCH = "embeddings/content_match.safetensors"
PARITY_ITEMS = 64  # items whose content the gate serves through the bundled towers


class TextTowerProgram(nn.Module):
    """Token ids ``[B, L]`` and their mask (1 = token) → text vectors ``[B, d]``."""

    input_names = ["ids", "mask"]

    def __init__(self, tower: MiniLMTextTower):
        super().__init__()
        self.tower = tower

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.tower.encode_tokens(ids, mask > 0)


class EncoderSideProgram(nn.Module):
    """Prepared pixels ``[B, 3, S, S]`` or waveforms ``[B, T]`` → the item encoder's unit
    vectors for that side."""

    input_names = ["prepared"]

    def __init__(self, encoder: nn.Module, side: str):
        super().__init__()
        self.tower, self.head = encoder.towers[side], encoder.heads[side]

    def forward(self, prepared: Tensor) -> Tensor:
        return torch.nn.functional.normalize(self.head(self.tower.encode(prepared)), dim=-1)


def write_content(dense: nn.Module, model: MemberModelConfig, root: Path
                  ) -> dict[str, Any] | None:
    """The fallback, the adapters and the towers of a model with item content (else None)."""
    content = getattr(dense, "content", None)
    if content is None:
        return None
    modalities = {}
    for name, adapter in content.adapters.items():
        rel = f"embeddings/content_{name}.safetensors"
        save_file({"center": adapter.center.detach().numpy(),
                   "project": adapter.project.weight.detach().numpy()}, str(root / rel))
        modalities[name] = {"adapter": rel, "dim": int(adapter.vectors.shape[1])}
        if Modality(name) == Modality.text:
            modalities[name].update(write_text_tower(model, root, adapter))
            if isinstance(adapter, TunedTextAdapter) and dense.match is not None:
                # content match scores by the frozen tower's vectors: new items need both
                frozen = write_text_tower(model, root, None, f"{TEXT_STEM}_match")
                modalities[name]["match_program"] = frozen["program"]
        elif Modality(name) in (Modality.image, Modality.audio):
            modalities[name].update(_write_encoder_tower(model, name, root))
    save_file({"weight": dense.fallback.detach().numpy()}, str(root / FALLBACK))
    return {"modalities": modalities, "fallback": FALLBACK,
            "meaning": "new item vector = fallback + sum over modalities of "
                       "project @ (tower(content) - center)",
            "match": _write_match(dense, root)}


def _write_match(dense: nn.Module, root: Path) -> dict[str, Any] | None:
    """The content-match score's data (models/content.py ContentMatch), if the model has it."""
    match = getattr(dense, "match", None)
    if match is None:
        return None
    arrays = {"units": match.unit, "seen": dense.seen.to(torch.uint8),
              "recency": match.recency, "item_weight": match.serving_item_weight,
              **{f"center_{name}": center for name, center in match.centers.items()}}
    save_file({k: v.detach().contiguous().numpy() for k, v in arrays.items()},
              str(root / MATCH))
    return {"file": MATCH, "modalities": list(match.centers),
            "meaning": "scores gain q · u: an item's u = item_weight[seen] · units (a new "
                       "item: item_weight[0] · concat over modalities of unit(tower(content) - "
                       "center) / sqrt(#modalities)); a member's q = sum over its newest events of "
                       "recency[age] · units[item]"}


def write_text_tower(model: MemberModelConfig, root: Path, adapter: nn.Module | None,
                      stem: str = TEXT_STEM) -> dict[str, Any]:
    """The text tower as programs: with a tuned adapter, its trained top layers in it."""
    tower = MiniLMTextTower(model.text_tower).eval()
    if isinstance(adapter, TunedTextAdapter):
        tower.layers[tower.first_trainable:].load_state_dict(adapter.layers.state_dict())
    ids, mask = tower.tokenize(["an example title", "a longer example title, with more words"])
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    seq = torch.export.Dim("seq", min=1, max=model.text_tower.max_tokens)
    export_program(TextTowerProgram(tower), (ids, mask.long()), ({0: batch, 1: seq},) * 2,
                   root / stem, output_name="text_vector")
    (root / f"{TEXT_STEM}_tokenizer.json").write_text(tower.tokenizer.to_str())
    return {"program": stem, "tokenizer": f"{TEXT_STEM}_tokenizer.json",
            "max_tokens": model.text_tower.max_tokens}


def _write_encoder_tower(model: MemberModelConfig, name: str, root: Path) -> dict[str, Any]:
    encoder, fingerprint = load_item_encoder(model.item_encoder)
    tower = encoder.towers[name]
    if name == Modality.image.value:
        size = tower.cfg.size
        example = torch.randn(2, 3, size, size)
        spec = {"size": size}
    else:
        example = torch.randn(2, tower.length)
        spec = {"sample_rate": tower.cfg.sample_rate, "length": tower.length}
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    stem = f"towers/{name}"
    export_program(EncoderSideProgram(encoder, name).eval(), (example,), ({0: batch},), root / stem,
                   output_name=f"{name}_vector")
    return {"program": stem, "encoder": fingerprint, **spec}


@torch.no_grad()
def write_content_parity_inputs(dense: nn.Module, data_path: str, manifest: dict[str, Any],
                                root: Path) -> None:
    """Some items' raw content (every modality the model reads) and the training model's
    vector for them as new items (fallback + adapted content): the gate adds the same content
    through the bundle's towers and compares."""
    content = getattr(dense, "content", None)
    if content is None or not set(content.adapters) & {"text", "image", "audio"}:
        return
    names = tuple(content.adapters)
    # The first items with every modality: the read stops there, not after decoding the
    # whole catalogue's media.
    complete = (i for i in iter_items(data_path, manifest, names) if all(n in i for n in names))
    picked = list(itertools.islice(complete, PARITY_ITEMS))
    items = torch.as_tensor([i["item"] for i in picked])
    vectors = dense.new_item_vectors(items)
    raw = np.load(Path(data_path) / "item_ids.npy", allow_pickle=False)
    arrays = {"raw_ids": raw[items.numpy()], "vectors": vectors.numpy()}
    if "text" in names:
        arrays["texts"] = np.array([i["text"] for i in picked])
    if "image" in names:  # flat pixels and each image's shape (sizes may differ)
        arrays["image_pixels"] = np.concatenate([i["image"].ravel() for i in picked])
        arrays["image_shapes"] = np.array([i["image"].shape for i in picked])
    if "audio" in names:
        arrays["audio_samples"] = np.concatenate([i["audio"][0] for i in picked])
        arrays["audio_lengths"] = np.array([len(i["audio"][0]) for i in picked])
        arrays["audio_rates"] = np.array([i["audio"][1] for i in picked])
    if "vectors" in names:
        arrays["item_vectors"] = np.stack([i["vectors"] for i in picked])
    np.savez(root / "content.npz", **arrays)
