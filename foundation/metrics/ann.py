"""The approximate-nearest-neighbour index serving retrieves candidates with, and the ranks
a model's targets get through it (evaluation measures the index the export ships)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

HNSW_NEIGHBOURS, EF_CONSTRUCTION, EF_SEARCH = 32, 200, 128
MISSED = 1 << 30  # the rank of a target the index did not return


def hnsw_index(vectors: np.ndarray) -> Any:
    """A faiss HNSW inner-product index over the items' scoring ``vectors`` (row 0, the
    padding id, left out: faiss id = internal item id - 1)."""
    import faiss

    index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction, index.hnsw.efSearch = EF_CONSTRUCTION, EF_SEARCH
    index.add(np.ascontiguousarray(vectors[1:], dtype=np.float32))
    return index


def ann_target_ranks(index: Any, queries: Tensor, scores: Tensor, targets: Tensor,
                     exclude: Tensor, candidates: int) -> Tensor:
    """0-based rank of each target among the ``candidates`` items the index returns for its
    query, rescored by the model's exact ``scores`` as serving does (excluded items dropped);
    ``MISSED`` where the index did not return the target."""
    _, found = index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), candidates)
    found = torch.as_tensor(found) + 1  # faiss id -1 (fewer hits) becomes the padding id 0
    dropped = exclude.gather(1, found) & (found != targets.unsqueeze(1))
    candidate_scores = scores.gather(1, found).float().masked_fill(dropped, float("-inf"))
    target_score = scores.gather(1, targets.unsqueeze(1)).float()
    rank = (candidate_scores >= target_score).sum(1) - 1  # ties against it, as exact ranks
    return torch.where((found == targets.unsqueeze(1)).any(1), rank, MISSED)
