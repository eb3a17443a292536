"""Collectives over rows that differ in number per rank, with gradients: the pieces of a
loss that spans ranks (the sharded full softmax, ``foundation.models.losses``)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def row_counts(rows: int) -> list[int]:
    """Every rank's number of rows (``rows`` is this rank's)."""
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world()[1])]
    dist.all_gather(counts, torch.tensor([rows]))
    return [int(c.item()) for c in counts]


def gather_rows(local: Tensor, counts: list[int]) -> Tensor:
    """Every rank's ``local`` rows, concatenated in rank order; differentiable (a row's
    gradient, summed over the ranks that used it, returns to the rank it came from)."""
    padded = local.new_zeros(max(counts), *local.shape[1:])
    padded = padded.index_put((torch.arange(len(local)),), local)
    parts = funcol.all_gather_single(padded, 0, dist.group.WORLD).chunk(len(counts))
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def other_ranks(*local: Tensor) -> tuple[Tensor, ...]:
    """Every other rank's rows of each of ``local`` (equal row counts within a rank), with
    gradients back to the ranks they came from; empty outside a process group."""
    rank, size = world()
    if size == 1:
        return tuple(t[:0] for t in local)
    counts = row_counts(len(local[0]))
    first = sum(counts[:rank])
    keep = torch.ones(sum(counts), dtype=torch.bool)
    keep[first:first + counts[rank]] = False
    return tuple(gather_rows(t, counts)[keep] for t in local)


def global_mean_weight(local_terms: int) -> float:
    """The factor that turns this rank's mean loss over ``local_terms`` terms into its share
    of the mean over every rank's terms, once data-parallel gradients are averaged over
    ranks: ``local_terms × world size / all terms`` (a collective). Ranks whose batches
    differ in size then train on the global mean, whatever the split."""
    rank, size = world()
    if size == 1:
        return 1.0
    total = torch.tensor([local_terms], dtype=torch.int64)
    dist.all_reduce(total)
    return local_terms * size / max(int(total.item()), 1)


def catalogue_slice(num_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """The items ``[start, end)`` of 1..num_items-1 (0 is padding) that ``rank`` scores: one
    contiguous, near-equal slice per rank."""
    items = num_items - 1
    if items < world_size:  # every rank decides alike: all raise, none waits for the others
        raise ValueError(f"a catalogue of {items} items cannot be split over {world_size} "
                         f"ranks: use model.item_table=replicated or fewer ranks")
    start = 1 + rank * items // world_size
    return start, 1 + (rank + 1) * items // world_size
