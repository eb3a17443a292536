"""The typed schema of ``foundation export`` (``configs/export.yaml``): a leaf module, so the
config registry reads it without loading the exporter."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING


@dataclass
class ExportConfig:
    run_dir: str = MISSING
    checkpoint: str = "auto"  # auto (best with early stopping, else latest) | latest | best | step-N
    output: str = MISSING
    precisions: list[str] = field(default_factory=lambda: ["fp32", "fp16", "int8"])
    ann: bool = True  # a faiss HNSW index over the item vectors (ann/items.faiss)
    member_embeddings: str | None = None  # a split: its members' embeddings for a store
    parity_split: str = "val"
    parity_batches: int = 2  # per rank
    batch_size: int = 256
    max_abs_diff: float = 1e-4  # parity: largest score difference allowed (fp32)
    min_top10_agreement: float = 0.99  # parity: share of members with identical top-10
    overwrite: bool = False
