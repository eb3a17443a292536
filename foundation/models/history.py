"""A learned score offset for items already in the member's history.

Whether a member goes back to a title seen k events ago (rewatch, reorder) or moves on is a
prior a dot product cannot express: an item's vector is close to the states its own events
produce (and with content match its content is closest to itself), so without this term a
model ranks the history it was just shown near the top. ``HistoryBias`` adds
``weight[age]`` to an item's score for each of its events in the history (age 0: the
newest), learnt with the rest of the model, so the data decide how much repeats are worth.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class HistoryBias(nn.Module):
    # Adam moves a parameter by about its learning rate per step, whatever the gradient, and
    # these offsets span several logits (one for an item nobody returns to tends to -inf):
    # learnt in units of UNIT logits, they get there within a schedule made for embeddings.
    UNIT = 8.0

    def __init__(self, max_len: int):
        super().__init__()
        self.units = nn.Parameter(torch.zeros(max_len))

    @property
    def weight(self) -> Tensor:
        """The offset of an event by its age (0: the newest), in logits."""
        return self.units * self.UNIT

    def pairs(self, items: Tensor, mask: Tensor, query_rows: Tensor, query_positions: Tensor
              ) -> tuple[Tensor, Tensor, Tensor]:
        """For queries at ``(row, position)`` of the left-aligned histories ``items`` ``[B, L]``:
        every (query, item, offset) of the events at or before the query's position."""
        steps = torch.arange(items.shape[1], device=items.device)
        age = query_positions.unsqueeze(1) - steps  # [Q, L]
        query, event = torch.nonzero((age >= 0) & mask[query_rows], as_tuple=True)
        ages = age[query, event].clamp(max=len(self.weight) - 1)
        return query, items[query_rows[query], event], self.weight[ages]

    def newest(self, items: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``pairs`` for each row's newest state (the one that serves)."""
        rows = torch.arange(items.shape[0], device=items.device)
        return self.pairs(items, mask, rows, mask.sum(1) - 1)


def add_pairs(scores: Tensor, pairs: tuple[Tensor, Tensor, Tensor], column_offset: int = 0
              ) -> Tensor:
    """``scores`` ``[Q, V]`` with each pair's offset added at (query, item - column_offset)."""
    query, item, value = pairs
    return scores.index_put((query, item - column_offset), value.to(scores.dtype),
                            accumulate=True)
