"""Softmax cross-entropy over a catalogue without the ``[tokens × items]`` logits.

``scores_logsumexp`` gives each query's log-sum-exp of ``q · item + bias`` over the items
(leaving out, per query, the item whose id it names: its own target). The logits are formed
a tile at a time in the forward pass and again in the backward pass, so memory grows with
the tile, not with tokens × items. On it:

- full softmax: items = the catalogue, the target's logit added back by
  ``catalogue_cross_entropy``;
- sampled softmax with logQ: items = the sampled candidates, ``bias = −log Q``;
- sharded softmax: each rank's slice of the catalogue gives a partial log-sum-exp, combined
  across ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from foundation.kernels.dispatch import Kernel, resolve_kernel

CHUNK_ELEMENTS = 1 << 24  # logits held at once by the PyTorch path (64 MiB in fp32)
BLOCK_ELEMENTS = 1 << 18  # logits of a row block on CPU: cache-sized (1 MiB), never in memory
MIN_BLOCK_ROWS = 32  # fewer rows make a block's matrix products slow (matrix × vector-like)


def _tiles(rows: int, items: int, elements: int, device: torch.device
           ) -> list[tuple[slice, slice]]:
    """(query rows, items) tiles of at most ``elements`` logits, each formed and dropped in
    turn: blocks of rows against every item where ``MIN_BLOCK_ROWS`` rows fit (on CPU blocks
    small enough to stay in cache: most of the speed there), else every row against a chunk
    of items (large catalogues)."""
    if items == 0:
        return []
    if MIN_BLOCK_ROWS * items <= elements:
        block = min(elements, BLOCK_ELEMENTS) if device.type == "cpu" else elements
        height = max(MIN_BLOCK_ROWS, block // items)
        return [(slice(start, start + height), slice(None)) for start in range(0, rows, height)]
    width = max(1, elements // max(1, rows))
    return [(slice(None), slice(start, start + width)) for start in range(0, items, width)]


def _tile_scores(queries: Tensor, items: Tensor, bias: Tensor, ids: Tensor | None,
                 exclude: Tensor | None, rows: slice, cols: slice) -> Tensor:
    """A tile's fp32 logits, left-out pairs at −inf (a fresh buffer: callers work in place);
    the product in the operands' dtype (bf16 under mixed precision)."""
    if queries.dtype == torch.float32:
        scores = torch.addmm(bias[cols], queries[rows], items[cols].T)
    else:
        scores = torch.mm(queries[rows], items[cols].T).float().add_(bias[cols])
    if ids is None:  # nothing left out per query
        return scores
    return scores.masked_fill_(ids[cols].unsqueeze(0) == exclude[rows].unsqueeze(1),
                               float("-inf"))


class _TiledLogSumExp(torch.autograd.Function):
    """The PyTorch implementation: the logits a tile at a time (``_tiles``) in the forward
    pass, and again in the backward pass (recomputing a cache-resident tile is cheaper than
    keeping them all: at [tokens × items] they would go to memory and back). Products in the
    queries' and items' dtype, exponentials and sums in fp32."""

    @staticmethod
    def forward(ctx, queries, items, bias, ids, exclude, elements):
        ctx.elements = elements
        lse = queries.new_full((queries.shape[0],), float("-inf"), dtype=torch.float32)
        for rows, cols in _tiles(len(queries), len(items), elements, queries.device):
            scores = _tile_scores(queries, items, bias, ids, exclude, rows, cols)
            lse[rows] = torch.logaddexp(lse[rows], scores.logsumexp(1))
        ctx.save_for_backward(queries, items, bias, ids, exclude, lse)
        return lse

    @staticmethod
    def backward(ctx, grad):
        queries, items, bias, ids, exclude, lse = ctx.saved_tensors
        # each query's softmax over the items: the upstream ``grad`` scales the small
        # operands (rows of queries, and dq at the end), never the tile
        dq = torch.zeros_like(queries, dtype=torch.float32)
        ditems = torch.zeros_like(items, dtype=torch.float32)
        dbias = torch.zeros_like(bias) if ctx.needs_input_grad[2] else None
        shift = torch.where(lse.isfinite(), lse, 0.0).unsqueeze(1)  # an all-out row: zeros
        weighted = queries * grad.unsqueeze(1).to(queries.dtype)
        for rows, cols in _tiles(len(queries), len(items), ctx.elements, queries.device):
            probs = _tile_scores(queries, items, bias, ids, exclude, rows, cols)
            probs = probs.sub_(shift[rows]).exp_()
            if dbias is not None:
                dbias[cols].addmv_(probs.T, grad[rows])
            if queries.dtype == torch.float32:
                dq[rows].addmm_(probs, items[cols])
                ditems[cols].addmm_(probs.T, weighted[rows])
            else:  # bf16 products, accumulated in fp32
                probs = probs.to(queries.dtype)
                dq[rows] += probs @ items[cols]
                ditems[cols] += probs.T @ weighted[rows]
        dq.mul_(grad.unsqueeze(1))
        return (dq.to(queries.dtype), ditems.to(items.dtype), dbias, None, None, None)


@torch.library.custom_op("foundation::scores_logsumexp", mutates_args=())
def _lse_triton(queries: Tensor, items: Tensor, bias: Tensor, ids: Tensor,
                exclude: Tensor) -> Tensor:
    from foundation.kernels import softmax_triton
    return softmax_triton.forward(queries, items, bias, ids, exclude)


@_lse_triton.register_fake
def _(queries, items, bias, ids, exclude):
    return queries.new_empty(queries.shape[0], dtype=torch.float32)


@torch.library.custom_op("foundation::scores_logsumexp_backward", mutates_args=())
def _lse_triton_backward(grad: Tensor, lse: Tensor, queries: Tensor, items: Tensor,
                         bias: Tensor, ids: Tensor, exclude: Tensor
                         ) -> tuple[Tensor, Tensor, Tensor]:
    from foundation.kernels import softmax_triton
    return softmax_triton.backward(grad, lse, queries, items, bias, ids, exclude)


@_lse_triton_backward.register_fake
def _(grad, lse, queries, items, bias, ids, exclude):
    return torch.empty_like(queries), torch.empty_like(items), torch.empty_like(bias)


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, output)


def _backward(ctx, grad: Tensor):
    queries, items, bias, ids, exclude, lse = ctx.saved_tensors
    dq, ditems, dbias = _lse_triton_backward(grad.contiguous(), lse, queries, items, bias, ids,
                                             exclude)
    return dq, ditems, dbias, None, None


_lse_triton.register_autograd(_backward, setup_context=_setup)


def scores_logsumexp(queries: Tensor, items: Tensor, bias: Tensor | None = None,
                     ids: Tensor | None = None, exclude: Tensor | None = None,
                     kernel: Kernel | str = Kernel.auto,
                     chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """``logsumexp_j(queries[n] · items[j] + bias[j])`` over the items ``j`` with
    ``ids[j] != exclude[n]`` (fp32, ``[N]``; −inf where every item is left out). ``bias``
    ``[C]`` (e.g. −log Q; −inf leaves an item out for every query), ``ids`` ``[C]`` and
    ``exclude`` ``[N]`` (e.g. item ids and each query's target) default to none.
    ``chunk_elements``: logits the PyTorch path forms at once."""
    count, rows = items.shape[0], queries.shape[0]
    dtype = product_dtype(queries, items)
    queries, items = queries.to(dtype), items.to(dtype)
    bias = items.new_zeros(count, dtype=torch.float32) if bias is None else bias.float()
    if resolve_kernel(kernel, queries.device) == Kernel.pytorch:
        if ids is None or exclude is None:
            ids = exclude = None
        with torch.autocast(queries.device.type, enabled=False):  # dtypes chosen above
            return _TiledLogSumExp.apply(queries, items, bias, ids, exclude, chunk_elements)
    ids = torch.zeros(count, dtype=torch.long, device=items.device) if ids is None else ids
    if exclude is None:
        exclude = torch.full((rows,), -1, dtype=torch.long, device=queries.device)
    return _lse_triton(queries.contiguous(), items.contiguous(), bias.contiguous(),
                       ids.long().contiguous(), exclude.long().contiguous())


def product_dtype(queries: Tensor, items: Tensor) -> torch.dtype:
    """The dtype of the logits' matrix products: autocast's where it is on (mixed precision),
    else the wider of the operands' (a bf16 trunk's queries against fp32 table rows)."""
    device = queries.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(queries.dtype, items.dtype)


def catalogue_cross_entropy(queries: Tensor, targets: Tensor, items: Tensor,
                            target_ids: Tensor | None = None, item_ids: Tensor | None = None,
                            target_bias: Tensor | None = None, item_bias: Tensor | None = None,
                            kernel: Kernel | str = Kernel.auto,
                            chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """Mean cross-entropy of each query's target against the items, never materialising the
    logits. ``targets`` ``[N, D]``: each query's target vector (its logit is
    ``q · target + target_bias``); an item whose id equals the query's target id is left out
    of the normaliser, so with ``items`` = the catalogue this is exactly full softmax, and with
    sampled ``items`` and ``bias = −log Q`` it is sampled softmax with logQ correction and
    accidental hits removed."""
    positive = (queries * targets).sum(-1).float()
    if target_bias is not None:
        positive = positive + target_bias
    others = scores_logsumexp(queries, items, item_bias, item_ids, target_ids, kernel,
                              chunk_elements)
    return (torch.logaddexp(positive, others) - positive).mean()


def materialised_cross_entropy(queries: Tensor, catalogue: Tensor, target_index: Tensor) -> Tensor:
    """``F.cross_entropy`` on the full ``[N × items]`` logits: what the fused op replaces."""
    return F.cross_entropy(queries @ catalogue.T, target_index)
