"""Triton kernels of ``scores_logsumexp`` (``kernels/softmax.py`` defines the op).

Forward: one program per block of queries streams the items with an online log-sum-exp.
Backward: one program per block of queries accumulates the query gradient, one per block of
items the item and bias gradients; both recompute their tile of logits from the saved
log-sum-exp. Left-out and out-of-range pairs score ``NO_ITEM`` (finite, so a block with none
in range never makes NaN) and get zero weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 32
NO_ITEM: tl.constexpr = -1.0e30


@triton.jit
def _tile(Q, C, Bias, Ids, Excl, rows, cols, n_rows, n_cols, dim, dims,
          BLOCK_D: tl.constexpr):
    """A tile's logits, which pairs count, and the loaded query and item blocks."""
    dim_ok = dims[None, :] < dim
    q = tl.load(Q + rows[:, None] * dim + dims[None, :], mask=(rows[:, None] < n_rows) & dim_ok,
                other=0.0)
    c = tl.load(C + cols[:, None] * dim + dims[None, :], mask=(cols[:, None] < n_cols) & dim_ok,
                other=0.0)
    bias = tl.load(Bias + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    ids = tl.load(Ids + cols, mask=cols < n_cols, other=-1)
    excl = tl.load(Excl + rows, mask=rows < n_rows, other=-1)
    s = tl.dot(q, tl.trans(c)) + bias[None, :]
    valid = (rows[:, None] < n_rows) & (cols[None, :] < n_cols) & (ids[None, :] != excl[:, None])
    valid = valid & (s > NO_ITEM)  # a bias of −inf leaves the item out
    return tl.where(valid, s, NO_ITEM), valid, q, c


@triton.jit
def _forward_kernel(Q, C, Bias, Ids, Excl, Lse, n_rows, n_cols, dim,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    best = tl.full([BLOCK_M], NO_ITEM, dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for first in range(0, n_cols, BLOCK_N):
        cols = first + tl.arange(0, BLOCK_N)
        s, valid, _, _ = _tile(Q, C, Bias, Ids, Excl, rows, cols, n_rows, n_cols, dim, dims,
                               BLOCK_D)
        new_best = tl.maximum(best, tl.max(s, axis=1))
        total = total * tl.exp(best - new_best) + tl.sum(
            tl.where(valid, tl.exp(s - new_best[:, None]), 0.0), axis=1)
        best = new_best
    lse = tl.where(total > 0, best + tl.log(tl.maximum(total, 1e-30)), float("-inf"))
    tl.store(Lse + rows, lse, mask=rows < n_rows)


@triton.jit
def _weights(s, valid, Lse, Grad, rows, n_rows):
    lse = tl.load(Lse + rows, mask=rows < n_rows, other=0.0)
    grad = tl.load(Grad + rows, mask=rows < n_rows, other=0.0)
    return tl.where(valid, tl.exp(s - lse[:, None]) * grad[:, None], 0.0)


@triton.jit
def _query_grad_kernel(Q, C, Bias, Ids, Excl, Lse, Grad, DQ, n_rows, n_cols, dim,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for first in range(0, n_cols, BLOCK_N):
        cols = first + tl.arange(0, BLOCK_N)
        s, valid, _, c = _tile(Q, C, Bias, Ids, Excl, rows, cols, n_rows, n_cols, dim, dims,
                               BLOCK_D)
        dq += tl.dot(_weights(s, valid, Lse, Grad, rows, n_rows).to(c.dtype), c)
    tl.store(DQ + rows[:, None] * dim + dims[None, :], dq.to(DQ.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (dims[None, :] < dim))


@triton.jit
def _item_grad_kernel(Q, C, Bias, Ids, Excl, Lse, Grad, DC, DBias, n_rows, n_cols, dim,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_N], dtype=tl.float32)
    for first in range(0, n_rows, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        s, valid, q, _ = _tile(Q, C, Bias, Ids, Excl, rows, cols, n_rows, n_cols, dim, dims,
                               BLOCK_D)
        weights = _weights(s, valid, Lse, Grad, rows, n_rows)
        dc += tl.dot(tl.trans(weights).to(q.dtype), q)
        dbias += tl.sum(weights, axis=0)
    tl.store(DC + cols[:, None] * dim + dims[None, :], dc.to(DC.dtype.element_ty),
             mask=(cols[:, None] < n_cols) & (dims[None, :] < dim))
    tl.store(DBias + cols, dbias.to(DBias.dtype.element_ty), mask=cols < n_cols)


def _meta(queries: Tensor, items: Tensor) -> dict:
    return dict(n_rows=queries.shape[0], n_cols=items.shape[0], dim=queries.shape[1],
                BLOCK_M=BLOCK, BLOCK_N=BLOCK,
                BLOCK_D=max(16, triton.next_power_of_2(queries.shape[1])))


def forward(queries: Tensor, items: Tensor, bias: Tensor, ids: Tensor, exclude: Tensor) -> Tensor:
    lse = torch.full((queries.shape[0],), float("-inf"), dtype=torch.float32,
                     device=queries.device)
    if queries.shape[0] and items.shape[0]:
        grid = (triton.cdiv(queries.shape[0], BLOCK),)
        _forward_kernel[grid](queries, items, bias, ids, exclude, lse, **_meta(queries, items))
    return lse


def backward(grad: Tensor, lse: Tensor, queries: Tensor, items: Tensor, bias: Tensor,
             ids: Tensor, exclude: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dq, ditems, dbias = torch.zeros_like(queries), torch.zeros_like(items), torch.zeros_like(bias)
    if queries.shape[0] and items.shape[0]:
        common = (queries, items, bias, ids, exclude, lse, grad.float())
        meta = _meta(queries, items)
        _query_grad_kernel[(triton.cdiv(queries.shape[0], BLOCK),)](*common, dq, **meta)
        _item_grad_kernel[(triton.cdiv(items.shape[0], BLOCK),)](*common, ditems, dbias, **meta)
    return dq, ditems, dbias
