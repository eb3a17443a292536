"""Item content in the bundle: what serving needs to embed a title it has never seen.

A new item's scoring vector is what the model gives an item without a trained ID row: the
shared fallback plus each modality's adapted content vector. The bundle holds the fallback,
each adapter (``embeddings/content_<modality>.safetensors``: ``center`` and ``project``) and,
for text, the tower as programs (``towers/text.pt2``, ``towers/text.onnx``) with its
tokenizer (``towers/text_tokenizer.json``); ``Predictor.add_items`` runs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file
from torch import Tensor, nn

from foundation.data.items import load_item_content
from foundation.export.programs import export_program
from foundation.models.member import MemberModelConfig
from foundation.models.towers import MiniLMTextTower, Modality

TEXT_STEM = "towers/text"
FALLBACK = "embeddings/fallback.safetensors"
PARITY_ITEMS = 64  # items whose content the gate serves through the bundled towers


class TextTowerProgram(nn.Module):
    """Token ids ``[B, L]`` and their mask (1 = token) → text vectors ``[B, d]``."""

    input_names = ["ids", "mask"]

    def __init__(self, tower: MiniLMTextTower):
        super().__init__()
        self.tower = tower

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.tower.encode_tokens(ids, mask > 0)


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
            modalities[name].update(_write_text_tower(model, root))
    save_file({"weight": dense.fallback.detach().numpy()}, str(root / FALLBACK))
    return {"modalities": modalities, "fallback": FALLBACK,
            "meaning": "new item vector = fallback + sum over modalities of "
                       "project @ (tower(content) - center)"}


def _write_text_tower(model: MemberModelConfig, root: Path) -> dict[str, Any]:
    tower = MiniLMTextTower(model.text_tower).eval()
    ids, mask = tower.tokenize(["an example title", "a longer example title, with more words"])
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    seq = torch.export.Dim("seq", min=1, max=model.text_tower.max_tokens)
    export_program(TextTowerProgram(tower), (ids, mask.long()), ({0: batch, 1: seq},) * 2,
                   root / TEXT_STEM, output_name="text_vector")
    (root / f"{TEXT_STEM}_tokenizer.json").write_text(tower.tokenizer.to_str())
    return {"program": TEXT_STEM, "tokenizer": f"{TEXT_STEM}_tokenizer.json",
            "max_tokens": model.text_tower.max_tokens}


@torch.no_grad()
def write_content_parity_inputs(dense: nn.Module, data_path: str, manifest: dict[str, Any],
                                root: Path) -> None:
    """Some items' raw text and the training model's vector for them as new items (fallback
    + adapted content): the gate embeds the same text through the bundle and compares."""
    content = getattr(dense, "content", None)
    if content is None or "text" not in content.adapters:
        return
    ids, texts = load_item_content(data_path, manifest, "text")
    pick = np.linspace(0, len(ids) - 1, min(PARITY_ITEMS, len(ids))).astype(np.int64)
    items = torch.as_tensor(ids[pick])
    vectors = dense.scoring(dense.fallback + content.adapters["text"](items))
    raw = np.load(Path(data_path) / "item_ids.npy", allow_pickle=False)
    np.savez(root / "content.npz", raw_ids=raw[ids[pick]], texts=np.array([texts[i] for i in pick]),
             vectors=vectors.numpy())
