"""Softmax cross-entropy over a catalogue without the ``[tokens × items]`` logits.

``scores_logsumexp`` gives each query's log-sum-exp of ``q · item + bias`` over the items
(leaving out, per query, the item whose id it names: its own target). The logits are formed
a chunk of items at a time in the forward pass and again in the backward pass, so memory
grows with tokens × chunk, not tokens × items. On it:

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


def _chunk_scores(queries: Tensor, items: Tensor, bias: Tensor, ids: Tensor | None,
                  exclude: Tensor | None) -> Tensor:
    """A chunk's fp32 logits, left-out pairs at −inf (a fresh buffer: callers work in place)."""
    scores = torch.addmm(bias.float(), queries.float(), items.float().T)
    if ids is None:  # nothing left out per query
        return scores
    return scores.masked_fill_(ids.unsqueeze(0) == exclude.unsqueeze(1), float("-inf"))


def _chunks(queries: Tensor, items: Tensor, elements: int):
    width = max(1, elements // max(1, queries.shape[0]))
    return [slice(start, start + width) for start in range(0, items.shape[0], width)]


class _ChunkedLogSumExp(torch.autograd.Function):
    """The PyTorch implementation: chunked forward, chunked recomputing backward. When all
    the logits fit in one chunk their exponentials are kept for the backward pass instead
    (memory stays within one chunk; the backward skips a GEMM and an exp pass)."""

    @staticmethod
    def forward(ctx, queries, items, bias, ids, exclude, elements):
        ctx.elements = elements
        parts = _chunks(queries, items, ctx.elements)
        ctx.kept = len(parts) == 1
        if ctx.kept:
            lse, exps, sums = _exp_scores(_chunk_scores(queries, items, bias, ids, exclude))
            ctx.save_for_backward(queries, items, exps, sums)
            return lse
        lse = queries.new_full((queries.shape[0],), float("-inf"), dtype=torch.float32)
        for part in parts:
            scores = _chunk_scores(queries, items[part], bias[part],
                                   None if ids is None else ids[part], exclude)
            lse = torch.logaddexp(lse, scores.logsumexp(1))
        ctx.save_for_backward(queries, items, bias, ids, exclude, lse)
        return lse

    @staticmethod
    def backward(ctx, grad):
        if ctx.kept:
            queries, items, exps, sums = ctx.saved_tensors
            # softmax × grad; a row with every item left out gets nothing
            scale = torch.where(sums > 0, grad / sums, 0.0)
            return (*_weighted_grads(exps * scale.unsqueeze(1), queries, items),
                    None, None, None)
        queries, items, bias, ids, exclude, lse = ctx.saved_tensors
        dq = torch.zeros_like(queries, dtype=torch.float32)
        ditems = torch.empty_like(items, dtype=torch.float32)
        dbias = torch.empty_like(bias, dtype=torch.float32)
        shift = torch.where(lse.isfinite(), lse, 0.0).unsqueeze(1)  # an all-out row: zeros
        for part in _chunks(queries, items, ctx.elements):
            scores = _chunk_scores(queries, items[part], bias[part],
                                   None if ids is None else ids[part], exclude)
            weights = scores.sub_(shift).exp_().mul_(grad.unsqueeze(1))
            dq += weights @ items[part].float()
            ditems[part] = weights.T @ queries.float()
            dbias[part] = weights.sum(0)
        return (dq.to(queries.dtype), ditems.to(items.dtype), dbias.to(bias.dtype), None, None,
                None)


def _exp_scores(scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Log-sum-exp of each row, and the row's exponentials (shifted by its max, in place of
    ``scores``) with their sums: what the backward pass needs, in one exp pass."""
    top = scores.amax(1, keepdim=True)
    top = torch.where(top.isfinite(), top, 0.0)  # a row with every item left out stays −inf
    exps = scores.sub_(top).exp_()
    sums = exps.sum(1)
    return top.squeeze(1) + sums.log(), exps, sums


def _weighted_grads(weights: Tensor, queries: Tensor, items: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of queries, items and bias from each (query, item) logit's ``weights``."""
    return ((weights @ items.float()).to(queries.dtype),
            (weights.T @ queries.float()).to(items.dtype), weights.sum(0))


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
    bias = items.new_zeros(count) if bias is None else bias
    if resolve_kernel(kernel, queries.device) == Kernel.pytorch:
        if ids is None or exclude is None:
            ids = exclude = None
        return _ChunkedLogSumExp.apply(queries, items, bias, ids, exclude, chunk_elements)
    ids = torch.zeros(count, dtype=torch.long, device=items.device) if ids is None else ids
    if exclude is None:
        exclude = torch.full((rows,), -1, dtype=torch.long, device=queries.device)
    return _lse_triton(queries.contiguous(), items.contiguous(), bias.contiguous(),
                       ids.long().contiguous(), exclude.long().contiguous())


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
