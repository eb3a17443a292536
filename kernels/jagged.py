"""Jagged layouts: a batch of variable-length rows as ``values [sum(lengths), ...]`` and
``offsets [B + 1]`` (row b is ``values[offsets[b]:offsets[b + 1]]``)."""

from __future__ import annotations

import torch
from torch import Tensor


def offsets_from_lengths(lengths: Tensor) -> Tensor:
    return torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0))


def row_index(lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Each value's row and its position within the row."""
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    return rows, torch.arange(rows.numel(), device=lengths.device) - starts[rows]


def pad_jagged(values: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Jagged ``[sum(lengths), ...]`` → ``[B, max(lengths), ...]`` and a validity mask.

    Padding goes to the longest row of this batch only, never to a global maximum.
    """
    batch, longest = lengths.numel(), int(lengths.max()) if lengths.numel() else 0
    rows, cols = row_index(lengths)
    padded = values.new_zeros((batch, longest, *values.shape[1:]))
    padded[rows, cols] = values
    mask = torch.zeros(batch, longest, dtype=torch.bool, device=lengths.device)
    mask[rows, cols] = True
    return padded, mask
