"""Run under torchrun by tests: the sharded full softmax against the single-process one.

Every rank draws the same queries, targets, catalogue, left-out items and history offsets
(one seed), uneven rows per rank. Each computes the sharded loss on its own rows against its
own slice of the catalogue, a chunk at a time, and backpropagates; the reference is the single-process full
softmax of every rank's rows over the whole catalogue (the sum of the ranks' losses, as
the ranks' backward passes add up). Each rank writes REPORT_DIR/rank<r>.json: the largest
differences of its loss and of the gradients of its queries, slice and offsets, and how many
catalogue rows it held.

usage: torchrun --nproc_per_node 2 tests/workers/sharded_softmax.py REPORT_DIR
"""

import json
import sys
from pathlib import Path

import torch

from foundation.distributed.collectives import catalogue_slice, other_ranks
from foundation.distributed.env import init_distributed
from foundation.models.losses import full_softmax_loss, sharded_softmax_loss

ITEMS, DIM, OFFSETS = 101, 16, 300
CHUNK = 16  # items scored at once: several chunks per slice, the last one short


def fused_against_reference(rank, world, counts, catalogue, queries, targets, absent) -> dict:
    """Without history offsets each slice's log-sum-exp is the fused kernel's (here the
    PyTorch path, several chunks per slice): the same comparison, loss and gradients."""
    first, count = sum(counts[:rank]), counts[rank]
    ref_catalogue, ref_queries = (t.clone().requires_grad_() for t in (catalogue, queries))
    sum(full_softmax_loss(ref_queries[sum(counts[:r]):sum(counts[:r + 1])],
                          targets[sum(counts[:r]):sum(counts[:r + 1])], ref_catalogue, absent)
        for r in range(world)).backward()
    start, end = catalogue_slice(ITEMS, rank, world)
    shard, own = (t.clone().requires_grad_() for t in (catalogue[start - 1:end - 1],
                                                       queries[first:first + count]))
    loss = sharded_softmax_loss(own, targets[first:first + count], shard, start, absent,
                                chunk=CHUNK, kernel="pytorch")
    loss.backward()
    reference = full_softmax_loss(queries[first:first + count], targets[first:first + count],
                                  catalogue, absent)
    return {"fused_loss_diff": (loss - reference).abs().item(),
            "fused_queries_grad_diff": float((own.grad - ref_queries.grad[first:first + count])
                                             .abs().max()),
            "fused_shard_grad_diff": float((shard.grad - ref_catalogue.grad[start - 1:end - 1])
                                           .abs().max())}


def main() -> None:
    report_dir = Path(sys.argv[1])
    env = init_distributed(timeout_s=120)
    rank, world = env.rank, env.world_size
    g = torch.Generator().manual_seed(0)
    counts = [37 + 13 * r for r in range(world)]  # uneven: ranks' batches differ
    catalogue = torch.randn(ITEMS - 1, DIM, generator=g)
    queries = torch.randn(sum(counts), DIM, generator=g)
    targets = torch.randint(1, ITEMS, (sum(counts),), generator=g)
    absent = torch.zeros(ITEMS, dtype=torch.bool)
    absent[torch.randint(1, ITEMS, (10,), generator=g)] = True
    absent[targets] = False  # a left-out item is never a target
    pairs = (torch.randint(0, sum(counts), (OFFSETS,), generator=g),
             torch.randint(1, ITEMS, (OFFSETS,), generator=g), torch.randn(OFFSETS, generator=g))

    def rows_of(r: int) -> tuple[slice, torch.Tensor]:
        first = sum(counts[:r])
        return slice(first, first + counts[r]), (pairs[0] >= first) & (pairs[0] < first + counts[r])

    ref_catalogue, ref_queries, ref_values = (t.clone().requires_grad_() for t in
                                              (catalogue, queries, pairs[2]))
    reference = []
    for r in range(world):
        rows, mine = rows_of(r)
        reference.append(full_softmax_loss(ref_queries[rows], targets[rows], ref_catalogue, absent,
                                           (pairs[0][mine] - rows.start, pairs[1][mine],
                                            ref_values[mine])))
    sum(reference).backward()

    rows, mine = rows_of(rank)
    start, end = catalogue_slice(ITEMS, rank, world)
    shard, own_queries, values = (t.clone().requires_grad_() for t in
                                  (catalogue[start - 1:end - 1], queries[rows], pairs[2][mine]))
    loss = sharded_softmax_loss(own_queries, targets[rows], shard, start, absent,
                                (pairs[0][mine] - rows.start, pairs[1][mine], values),
                                chunk=CHUNK)
    loss.backward()
    fused = fused_against_reference(rank, world, counts, catalogue, queries, targets, absent)
    report = {**fused,
        "rank": rank,
        "loss": loss.item(), "loss_diff": (loss - reference[rank]).abs().item(),
        "queries_grad_diff": float((own_queries.grad - ref_queries.grad[rows]).abs().max()),
        "shard_grad_diff": float((shard.grad - ref_catalogue.grad[start - 1:end - 1]).abs().max()),
        "offsets_grad_diff": float((values.grad - ref_values.grad[mine]).abs().max()),
        "rows_held": len(shard), "catalogue": ITEMS - 1, "slice": [start, end],
        # shared negatives: every other rank's rows, in rank order
        "other_ranks_exact": torch.equal(other_ranks(queries[rows])[0],
                                         torch.cat([queries[:rows.start], queries[rows.stop:]])),
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.barrier()  # neither rank tears the group down under the other
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
