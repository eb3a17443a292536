"""InfoNCE with negatives from every rank equals InfoNCE over the whole batch in one process.

usage: torchrun --nproc_per_node 2 tests/workers/infonce_ranks.py REPORT_DIR

Each rank holds its rows of one seeded batch (rank 1 fewer rows: uneven batches are padded
and masked) and prints nothing; it writes its loss, its rows' gradients and the one-process
reference computed over all rows to REPORT_DIR/rank{r}.json.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from foundation.models.contrastive import InfoNCE


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [5, 3][:world]
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(sum(sizes), 8, generator=g), dim=-1)
    b = F.normalize(a + 0.5 * torch.randn(sum(sizes), 8, generator=g), dim=-1)
    start = sum(sizes[:rank])
    mine = slice(start, start + sizes[rank])
    loss_fn = InfoNCE(temperature=0.1)
    local_a, local_b = a[mine].clone().requires_grad_(), b[mine].clone().requires_grad_()
    loss = loss_fn(local_a, local_b)
    loss.backward()
    full_a, full_b = a.clone().requires_grad_(), b.clone().requires_grad_()
    # The one-process reference: every row's symmetric CE, each rank's rows averaged.
    logits = 10.0 * full_a @ full_b.T
    targets = torch.arange(len(a))
    per_row = (F.cross_entropy(logits, targets, reduction="none")
               + F.cross_entropy(logits.T, targets, reduction="none")) / 2
    reference = per_row[mine].mean()
    sum(per_row[s:s + n].mean() for s, n in zip([0, sizes[0]], sizes)).backward()
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    (Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps({
        "loss": loss.item(), "reference": reference.item(),
        "grad_a": local_a.grad.tolist(), "reference_grad_a": full_a.grad[mine].tolist(),
        "grad_b": local_b.grad.tolist(), "reference_grad_b": full_b.grad[mine].tolist()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
