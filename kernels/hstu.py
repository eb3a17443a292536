"""HSTU pointwise attention over jagged sequences (Zhai et al., 2024).

For each head, query event i of a row attends to the row's events j ≤ i with weight
``SiLU(q_i·k_j / √d + position_bias[min(i − j, P − 1)] + time_bias[bucket(t_i − t_j)]) /
max_len`` (no softmax, so a history's weights need not sum to one), and returns
``Σ_j weight · v_j``. Dividing by the fixed ``max_len`` keeps a member's output independent
of the batch around it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from foundation.kernels.dispatch import Kernel, resolve_kernel
from foundation.kernels.jagged import pad_jagged

SECONDS_PER_BUCKET_UNIT = 60  # bucket b holds gaps of 60·(2^b − 1) ≤ seconds < 60·(2^(b+1) − 1)


def time_bucket(seconds: Tensor, buckets: int) -> Tensor:
    """Seconds between two events → ``floor(log2(1 + minutes))`` in ``0..buckets − 1``,
    computed on integers (exact, so the kernels and this reference agree at every edge);
    negative gaps fall in bucket 0."""
    powers = 2 ** torch.arange(1, buckets, device=seconds.device, dtype=torch.int64)
    edges = SECONDS_PER_BUCKET_UNIT * (powers - 1)
    return torch.bucketize(seconds.clamp(min=0).long(), edges, right=True)


def hstu_attention_reference(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor,
                             timestamps: Tensor, position_bias: Tensor, time_bias: Tensor,
                             max_len: int) -> Tensor:
    """Padded PyTorch reference: ``q, k, v`` ``[T, H, d]`` jagged by ``offsets`` ``[B + 1]``;
    ``timestamps`` ``[T]`` seconds; ``position_bias`` ``[P, H]``; ``time_bias``
    ``[buckets, H]``. Returns ``[T, H, d]``. Memory grows with B × longest²."""
    lengths = offsets.diff()
    (qp, mask), kp, vp = pad_jagged(q, lengths), pad_jagged(k, lengths)[0], pad_jagged(v, lengths)[0]
    times = pad_jagged(timestamps, lengths)[0]
    steps = torch.arange(qp.shape[1], device=q.device)
    distance = steps.unsqueeze(1) - steps.unsqueeze(0)  # query i − key j
    attend = (distance >= 0) & mask.unsqueeze(1) & mask.unsqueeze(2)  # [B, i, j]
    bias = (position_bias[distance.clamp(0, position_bias.shape[0] - 1)].unsqueeze(0)
            + time_bias[time_bucket(times.unsqueeze(2) - times.unsqueeze(1), time_bias.shape[0])])
    scores = torch.einsum("bihd,bjhd->bhij", qp, kp) * q.shape[-1] ** -0.5 + bias.permute(0, 3, 1, 2)
    weights = F.silu(scores) * attend.unsqueeze(1) / max_len
    return torch.einsum("bhij,bjhd->bihd", weights, vp)[mask]


@torch.library.custom_op("foundation::hstu_attention", mutates_args=())
def _hstu_triton(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, timestamps: Tensor,
                 position_bias: Tensor, time_bias: Tensor, max_len: int,
                 max_seq_len: int) -> Tensor:
    from foundation.kernels import hstu_triton
    return hstu_triton.forward(q, k, v, offsets, timestamps, position_bias, time_bias,
                               max_len, max_seq_len)


@_hstu_triton.register_fake
def _(q, k, v, offsets, timestamps, position_bias, time_bias, max_len, max_seq_len):
    return torch.empty_like(q)


@torch.library.custom_op("foundation::hstu_attention_backward", mutates_args=())
def _hstu_triton_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, offsets: Tensor,
                          timestamps: Tensor, position_bias: Tensor, time_bias: Tensor,
                          max_len: int, max_seq_len: int
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from foundation.kernels import hstu_triton
    return hstu_triton.backward(grad, q, k, v, offsets, timestamps, position_bias, time_bias,
                                max_len, max_seq_len)


@_hstu_triton_backward.register_fake
def _(grad, q, k, v, offsets, timestamps, position_bias, time_bias, max_len, max_seq_len):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(position_bias), torch.empty_like(time_bias))


def _setup(ctx, inputs, output) -> None:
    *tensors, ctx.max_len, ctx.max_seq_len = inputs
    ctx.save_for_backward(*tensors)


def _backward(ctx, grad: Tensor):
    q, k, v, offsets, timestamps, position_bias, time_bias = ctx.saved_tensors
    dq, dk, dv, dpos, dtime = _hstu_triton_backward(
        grad.contiguous(), q, k, v, offsets, timestamps, position_bias, time_bias,
        ctx.max_len, ctx.max_seq_len)
    return dq, dk, dv, None, None, dpos, dtime, None, None


_hstu_triton.register_autograd(_backward, setup_context=_setup)


def hstu_attention(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, timestamps: Tensor,
                   position_bias: Tensor, time_bias: Tensor, max_len: int,
                   max_seq_len: int | None = None, kernel: Kernel | str = Kernel.auto) -> Tensor:
    """Jagged HSTU attention (module docstring); ``max_seq_len``: the longest row (read from
    ``offsets`` when not given, which synchronises with the device)."""
    if resolve_kernel(kernel, q.device) == Kernel.pytorch:
        return hstu_attention_reference(q, k, v, offsets, timestamps, position_bias, time_bias,
                                        max_len)
    if max_seq_len is None:
        max_seq_len = int(offsets.diff().max()) if offsets.numel() > 1 else 0
    return _hstu_triton(q.contiguous(), k.contiguous(), v.contiguous(), offsets,
                        timestamps.long(), position_bias.contiguous(), time_bias.contiguous(),
                        max_len, max_seq_len)
