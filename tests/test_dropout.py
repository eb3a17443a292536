"""Dropout with cheap masks: the drop rate asked for, unbiased, decided by torch's seed, the
gradient through the same mask; the attention's dropout stays causal."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from foundation.models.dropout import Dropout, causal_attention, dropout, with_fast_dropout
from foundation.models.member import EventEncoder, MemberModelConfig


def test_the_drop_rate_is_p_and_the_output_unbiased():
    x = torch.ones(400_000)
    for p in (0.1, 0.35, 0.5):
        y = dropout(x, p)
        assert abs((y == 0).float().mean().item() - p) < 0.005, p
        assert abs(y.mean().item() - 1.0) < 0.01, p
        assert set(y.unique().tolist()) <= {0.0, float(y.max())}  # one scale for kept values


def test_masks_follow_torch_seed_and_the_gradient_uses_the_same_mask():
    x = torch.randn(64, 48, requires_grad=True)
    torch.manual_seed(3)
    first = dropout(x, 0.3)
    torch.manual_seed(3)
    again = dropout(x, 0.3)
    assert torch.equal(first, again)
    assert not torch.equal(first, dropout(x, 0.3))  # the next draw differs
    first.sum().backward()
    kept = first != 0
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.7), atol=1e-4)
    assert (x.grad[~kept] == 0).all()


def test_eval_and_zero_p_are_the_identity():
    x = torch.randn(8, 5)
    assert dropout(x, 0.0) is x and dropout(x, 0.5, training=False) is x
    module = Dropout(0.5).eval()
    assert module(x) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))


def test_attention_is_causal_and_equals_sdpa_without_dropout():
    q, k, v = (torch.randn(3, 2, 7, 8) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(causal_attention(q, k, v, 0.3, training=False), expected, atol=1e-6)
    torch.manual_seed(0)
    mixed = causal_attention(q, k, v, 0.3, training=True)
    later = v.clone()
    later[:, :, 4:] += 10.0  # keys after position 3 change
    torch.manual_seed(0)
    assert torch.allclose(causal_attention(q, k, later, 0.3, training=True)[:, :, :4],
                          mixed[:, :, :4], atol=1e-6)
    assert not torch.allclose(mixed, expected, atol=1e-3)  # weights were dropped


def test_the_member_model_uses_it_everywhere():
    encoder = EventEncoder(MemberModelConfig(dropout=0.2))
    dropouts = [m for m in encoder.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(type(m) is Dropout and m.p == 0.2 for m in dropouts)
    built = with_fast_dropout(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.4)))
    assert type(built[1]) is Dropout and built[1].p == 0.4
