"""Dropout whose random masks are cheap on CPU.

torch's CPU dropout draws one Bernoulli sample per element (about 10 ns each: on the member
model's small layers, more than the layer's own arithmetic). Here a mask comes from raw 64-bit
words of numpy's PCG64, four 16-bit draws per word, seeded from torch's default generator:
``torch.manual_seed`` and the RNG state a checkpoint keeps decide the masks, as with torch's
own dropout. The drop probability is ``p`` rounded to a multiple of 1/65536, and kept values
are scaled by the inverse of the keep probability actually used, so outputs stay unbiased.
Other devices use torch's dropout (its GPU generator is fast).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

_DRAWS = 1 << 16  # 16-bit draws: p is exact to 1/65536


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype) -> Tensor:
    """A CPU tensor of ``shape``: 0 with probability ``p``, else ``1 / (1 - p)``."""
    count = math.prod(shape)
    seed = int(torch.randint(0, 2**62, (1,)))  # torch's generator decides, so seeding holds
    words = np.random.PCG64(seed).random_raw((count + 3) // 4)
    draws = torch.from_numpy(words.view(np.int16)[:count]).view(shape)  # uniform in int16
    dropped = round(p * _DRAWS)
    return (draws >= dropped - _DRAWS // 2).to(dtype).mul_(_DRAWS / (_DRAWS - dropped))


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)``, with ``keep_mask`` on CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training=True)
    return x * keep_mask(x.shape, p, x.dtype)


class Dropout(nn.Dropout):
    """``nn.Dropout`` through ``dropout`` (same config, no state, identity in eval)."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


def with_fast_dropout(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.Dropout`` inside replaced by ``Dropout`` of the same ``p``
    (for modules torch builds, such as ``nn.TransformerEncoderLayer``)."""
    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p))
    return module


def causal_attention(q: Tensor, k: Tensor, v: Tensor, p: float, training: bool) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, dropout_p, is_causal=True)`` with the
    attention weights' dropout from ``keep_mask`` on CPU (torch's fused CPU attention has no
    dropout: it falls back to its reference path with Bernoulli draws)."""
    if not training or p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p if training else 0.0,
                                              is_causal=True)
    length = q.shape[-2]
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu_(1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    return dropout(weights, p) @ v
