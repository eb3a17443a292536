"""CLIP-style contrastive alignment: symmetric InfoNCE with negatives gathered from every
rank and a learned, clamped temperature (Radford et al., 2021)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the summed gradient of its own rows (an
    all_reduce, which gloo and nccl both run; torch's version needs all_to_all on gloo)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Every rank's rows ``[sum n_r, D]`` (padded to the largest rank's count), which of them
    are real, and where this rank's rows start. Differentiable; one rank: ``x`` itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, torch.ones(x.shape[0], dtype=torch.bool, device=x.device), 0
    sizes = [torch.zeros(1, dtype=torch.int64, device=x.device)
             for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
    valid = torch.cat([torch.arange(longest, device=x.device) < s for s in sizes])
    return _GatherWithGrad.apply(padded), valid, dist.get_rank() * longest


class InfoNCE(nn.Module):
    """Symmetric InfoNCE between matched rows of two unit-length embeddings; every other row
    of every rank is a negative. The temperature is learnt (as a log scale) and never falls
    below ``min_temperature``."""

    def __init__(self, temperature: float = 0.07, min_temperature: float = 0.01):
        super().__init__()
        if not 0 < min_temperature <= temperature:
            raise ValueError(f"need 0 < min_temperature ({min_temperature}) <= temperature "
                             f"({temperature})")
        # [1], not a scalar: DeepSpeed broadcasts parameters viewed as bytes
        self.log_scale = nn.Parameter(torch.tensor([math.log(1.0 / temperature)]))
        self.max_log_scale = math.log(1.0 / min_temperature)

    @property
    def scale(self) -> Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp().squeeze(0)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        all_a, valid, start = gather_rows(a)
        all_b, _, _ = gather_rows(b)
        if a.shape[0] == 0:  # nothing here this step; the gathers above kept ranks in step
            return (all_a.sum() + all_b.sum()) * 0.0 + self.log_scale * 0.0
        targets = torch.arange(a.shape[0], device=a.device) + start
        mask = torch.where(valid, 0.0, float("-inf"))
        a_to_b = self.scale * a @ all_b.T + mask
        b_to_a = self.scale * b @ all_a.T + mask
        return (F.cross_entropy(a_to_b, targets) + F.cross_entropy(b_to_a, targets)) / 2
