"""Triton kernels of jagged HSTU attention (``kernels/hstu.py`` defines the op).

One program per (block of a row's queries, row, head) in the forward and the query-gradient
kernel, per (block of a row's keys, row, head) in the key/value-gradient kernel. Weights are
recomputed blockwise in the backward pass, never stored: memory is O(tokens), not
O(tokens × longest row). Accumulation is fp32 whatever the input dtype; the bias gradients
are summed with atomics into fp32 buffers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from foundation.kernels.hstu import SECONDS_PER_BUCKET_UNIT

BLOCK = 32


@triton.jit
def _time_bucket(gap, buckets: tl.constexpr, unit: tl.constexpr):
    """``floor(log2(1 + gap / unit))`` on int64 gaps, clamped: a float estimate corrected by
    one exact integer comparison each side (matches ``time_bucket``)."""
    gap = tl.maximum(gap, 0)
    estimate = tl.floor(tl.log2(1.0 + gap.to(tl.float32) / unit)).to(tl.int64)
    bucket = tl.minimum(tl.maximum(estimate, 0), buckets - 1)
    one = tl.full(bucket.shape, 1, tl.int64)
    bucket = tl.where(gap < unit * ((one << bucket) - 1), bucket - 1, bucket)
    above = (gap >= unit * ((one << (bucket + 1)) - 1)) & (bucket < buckets - 1)
    return tl.where(above, bucket + 1, bucket)


@triton.jit
def _scores(q, k, rows, cols, length, tq, tk, PB, TB, head, heads, scale, positions,
            buckets: tl.constexpr, unit: tl.constexpr):
    """Pre-activation scores of a (query block, key block) tile, where each pair may attend,
    and each pair's bias-table rows."""
    distance = rows[:, None] - cols[None, :]
    valid = (distance >= 0) & (rows[:, None] < length) & (cols[None, :] < length)
    pos = tl.minimum(tl.maximum(distance, 0), positions - 1)
    bucket = _time_bucket(tq[:, None] - tk[None, :], buckets, unit)
    s = tl.dot(q, tl.trans(k)) * scale
    s += tl.load(PB + pos * heads + head, mask=valid, other=0.0).to(tl.float32)
    s += tl.load(TB + bucket * heads + head, mask=valid, other=0.0).to(tl.float32)
    return s, valid, pos, bucket


@triton.jit
def _load_block(X, start, index, length, head, heads, dims, head_dim):
    ok = (index[:, None] < length) & (dims[None, :] < head_dim)
    return tl.load(X + ((start + index[:, None]) * heads + head) * head_dim + dims[None, :],
                   mask=ok, other=0.0)


@triton.jit
def _store_block(X, value, start, index, length, head, heads, dims, head_dim):
    ok = (index[:, None] < length) & (dims[None, :] < head_dim)
    tl.store(X + ((start + index[:, None]) * heads + head) * head_dim + dims[None, :],
             value.to(X.dtype.element_ty), mask=ok)


@triton.jit
def _program(Offsets):
    """This program's block, head, and its row's first event and length."""
    block, row, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(Offsets + row)
    return block, head, start, tl.load(Offsets + row + 1) - start


@triton.jit
def _keys(K, V, Times, start, cols, length, head, heads, dims, head_dim):
    """A block of a row's keys, values and their timestamps."""
    k = _load_block(K, start, cols, length, head, heads, dims, head_dim)
    v = _load_block(V, start, cols, length, head, heads, dims, head_dim)
    return k, v, tl.load(Times + start + cols, mask=cols < length, other=0)


@triton.jit
def _forward_kernel(Q, K, V, Out, Offsets, Times, PB, TB, heads, head_dim, positions,
                    scale, inv_max_len, buckets: tl.constexpr, unit: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    block, head, start, length = _program(Offsets)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_block(Q, start, rows, length, head, heads, dims, head_dim)
    tq = tl.load(Times + start + rows, mask=rows < length, other=0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for first in range(0, tl.minimum((block + 1) * BLOCK_M, length), BLOCK_N):
        cols = first + tl.arange(0, BLOCK_N)
        k, v, tk = _keys(K, V, Times, start, cols, length, head, heads, dims, head_dim)
        s, valid, _, _ = _scores(q, k, rows, cols, length, tq, tk, PB, TB, head, heads, scale,
                                 positions, buckets, unit)
        w = tl.where(valid, s * tl.sigmoid(s) * inv_max_len, 0.0)
        acc += tl.dot(w.to(v.dtype), v)
    _store_block(Out, acc, start, rows, length, head, heads, dims, head_dim)


@triton.jit
def _score_grad(s, valid, do, v, inv_max_len):
    """d loss / d score of a tile, from the output gradient and the values."""
    sig = tl.sigmoid(s)
    dw = tl.dot(do, tl.trans(v))
    return tl.where(valid, dw * inv_max_len * sig * (1.0 + s * (1.0 - sig)), 0.0)


@triton.jit
def _key_grad_kernel(Q, K, V, DO, DK, DV, DPB, DTB, Offsets, Times, PB, TB, heads, head_dim,
                     positions, scale, inv_max_len, buckets: tl.constexpr, unit: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    block, head, start, length = _program(Offsets)
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k, v, tk = _keys(K, V, Times, start, cols, length, head, heads, dims, head_dim)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for first in range((block * BLOCK_N // BLOCK_M) * BLOCK_M, length, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        q = _load_block(Q, start, rows, length, head, heads, dims, head_dim)
        do = _load_block(DO, start, rows, length, head, heads, dims, head_dim)
        tq = tl.load(Times + start + rows, mask=rows < length, other=0)
        s, valid, pos, bucket = _scores(q, k, rows, cols, length, tq, tk, PB, TB, head, heads,
                                        scale, positions, buckets, unit)
        w = tl.where(valid, s * tl.sigmoid(s) * inv_max_len, 0.0)
        dv += tl.dot(tl.trans(w).to(do.dtype), do)
        ds = _score_grad(s, valid, do, v, inv_max_len)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q) * scale
        tl.atomic_add(DPB + pos * heads + head, ds, mask=valid)
        tl.atomic_add(DTB + bucket * heads + head, ds, mask=valid)
    _store_block(DK, dk, start, cols, length, head, heads, dims, head_dim)
    _store_block(DV, dv, start, cols, length, head, heads, dims, head_dim)


@triton.jit
def _query_grad_kernel(Q, K, V, DO, DQ, Offsets, Times, PB, TB, heads, head_dim, positions,
                       scale, inv_max_len, buckets: tl.constexpr, unit: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    block, head, start, length = _program(Offsets)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_block(Q, start, rows, length, head, heads, dims, head_dim)
    do = _load_block(DO, start, rows, length, head, heads, dims, head_dim)
    tq = tl.load(Times + start + rows, mask=rows < length, other=0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for first in range(0, tl.minimum((block + 1) * BLOCK_M, length), BLOCK_N):
        cols = first + tl.arange(0, BLOCK_N)
        k, v, tk = _keys(K, V, Times, start, cols, length, head, heads, dims, head_dim)
        s, valid, _, _ = _scores(q, k, rows, cols, length, tq, tk, PB, TB, head, heads, scale,
                                 positions, buckets, unit)
        ds = _score_grad(s, valid, do, v, inv_max_len)
        dq += tl.dot(ds.to(k.dtype), k) * scale
    _store_block(DQ, dq, start, rows, length, head, heads, dims, head_dim)


def _common(q: Tensor, offsets: Tensor, position_bias: Tensor, time_bias: Tensor,
            max_len: int, max_seq_len: int) -> tuple[tuple, dict]:
    _, heads, head_dim = q.shape
    grid = (triton.cdiv(max(max_seq_len, 1), BLOCK), offsets.numel() - 1, heads)
    meta = dict(heads=heads, head_dim=head_dim, positions=position_bias.shape[0],
                scale=head_dim ** -0.5, inv_max_len=1.0 / max_len, buckets=time_bias.shape[0],
                unit=SECONDS_PER_BUCKET_UNIT, BLOCK_M=BLOCK, BLOCK_N=BLOCK,
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)))
    return grid, meta


def forward(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, timestamps: Tensor,
            position_bias: Tensor, time_bias: Tensor, max_len: int, max_seq_len: int) -> Tensor:
    out = torch.empty_like(q)
    grid, meta = _common(q, offsets, position_bias, time_bias, max_len, max_seq_len)
    if q.shape[0]:
        _forward_kernel[grid](q, k, v, out, offsets, timestamps, position_bias, time_bias, **meta)
    return out


def backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, offsets: Tensor,
             timestamps: Tensor, position_bias: Tensor, time_bias: Tensor, max_len: int,
             max_seq_len: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dpos = torch.zeros(position_bias.shape, dtype=torch.float32, device=q.device)
    dtime = torch.zeros(time_bias.shape, dtype=torch.float32, device=q.device)
    grid, meta = _common(q, offsets, position_bias, time_bias, max_len, max_seq_len)
    if q.shape[0]:
        common = (offsets, timestamps, position_bias, time_bias)
        _key_grad_kernel[grid](q, k, v, grad, dk, dv, dpos, dtime, *common, **meta)
        _query_grad_kernel[grid](q, k, v, grad, dq, *common, **meta)
    return dq, dk, dv, dpos.to(position_bias.dtype), dtime.to(time_bias.dtype)
