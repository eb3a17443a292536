"""The ops layer (kernels/): each Triton kernel, run by Triton's CPU interpreter
(TRITON_INTERPRET=1, set by conftest.py), against its
PyTorch reference — forward and every gradient, over fixed and random jagged layouts —
plus the custom ops' fake implementations, the dispatcher, and the fused cross-entropy's
exactness and memory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foundation.kernels import (
    Kernel,
    catalogue_cross_entropy,
    hstu_attention,
    hstu_attention_reference,
    resolve_kernel,
    scores_logsumexp,
    time_bucket,
)
from foundation.kernels.jagged import offsets_from_lengths

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 64
TOLERANCE = 1e-5


def attention_inputs(lengths: list[int], heads: int, head_dim: int, seed: int = 0,
                     max_gap: int = 10**6):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator).requires_grad_()

    gaps = torch.randint(0, max_gap, (total,), generator=generator)
    timestamps = 1_700_000_000 + gaps.cumsum(0)  # non-decreasing within and across rows
    return (leaf(total, heads, head_dim), leaf(total, heads, head_dim),
            leaf(total, heads, head_dim), offsets_from_lengths(torch.tensor(lengths)),
            timestamps, leaf(MAX_LEN, heads), leaf(32, heads), MAX_LEN)


def assert_attention_matches(inputs) -> None:
    q, k, v, _, _, position_bias, time_bias, _ = inputs
    leaves = (q, k, v, position_bias, time_bias)
    expected = hstu_attention_reference(*inputs)
    actual = hstu_attention(*inputs, kernel=Kernel.triton)
    torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=TOLERANCE)
    grad = torch.randn_like(expected)
    for name, want, got in zip(("q", "k", "v", "position_bias", "time_bias"),
                               torch.autograd.grad(expected, leaves, grad),
                               torch.autograd.grad(actual, leaves, grad)):
        torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=TOLERANCE, msg=name)


@pytest.mark.parametrize("lengths", [[0, 1, 5], [1], [7, 7, 7, 7], [40, 0, 33, 1], [0, 0]])
def test_hstu_kernel_matches_the_reference_forward_and_every_gradient(lengths):
    """Empty rows, single events, equal lengths, rows longer than a block."""
    assert_attention_matches(attention_inputs(lengths, heads=2, head_dim=8))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(0, 70), min_size=1, max_size=5),
       heads=st.integers(1, 3), head_dim=st.sampled_from([4, 8, 12]),
       max_gap=st.sampled_from([1, 120, 10**7]), seed=st.integers(0, 2**16))
def test_hstu_kernel_matches_the_reference_on_random_jagged_layouts(lengths, heads, head_dim,
                                                                     max_gap, seed):
    assert_attention_matches(attention_inputs(lengths, heads, head_dim, seed, max_gap))


def test_time_buckets_agree_at_every_edge():
    """Gaps one second either side of each bucket edge, read through the time bias alone
    (q = k = 0): the kernel's float estimate plus its integer correction buckets exactly as
    the reference does."""
    edges = 60 * (2 ** torch.arange(1, 32) - 1)
    gaps = torch.cat([edges - 1, edges, torch.tensor([0, 10**12])])
    assert time_bucket(gaps, 32)[:31].tolist() == list(range(31))  # one second below edge b+1
    assert time_bucket(gaps, 32)[31:62].tolist() == list(range(1, 32))
    timestamps = torch.stack([torch.zeros_like(gaps), gaps], 1).reshape(-1)  # rows [0, gap]
    lengths = torch.full((len(gaps),), 2)
    heads = 1
    zeros = torch.zeros(len(timestamps), heads, 1)
    time_bias = torch.arange(32.0).unsqueeze(1)  # one bucket off moves the output by ≥ 1/64
    inputs = (zeros, zeros, torch.ones_like(zeros), offsets_from_lengths(lengths), timestamps,
              torch.zeros(MAX_LEN, heads), time_bias, MAX_LEN)
    torch.testing.assert_close(hstu_attention(*inputs, kernel=Kernel.triton),
                               hstu_attention_reference(*inputs), atol=TOLERANCE, rtol=0)


def test_time_bucket_is_log2_minutes():
    assert time_bucket(torch.tensor([-5, 0, 59, 60, 179, 180, 3600, 10**12]), 32).tolist() == [
        0, 0, 0, 1, 1, 2, 5, 31]


def test_fused_cross_entropy_equals_materialised_logits_for_both_kernels():
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(70, 24, generator=generator, requires_grad=True)
    catalogue = torch.randn(300, 24, generator=generator, requires_grad=True)
    target = torch.randint(0, 300, (70,), generator=generator)
    expected = F.cross_entropy(queries @ catalogue.T, target)
    want = torch.autograd.grad(expected, (queries, catalogue))
    # chunks of items, blocks of rows (32, 32, 6), one tile, and the Triton kernel
    for kernel, elements in ((Kernel.pytorch, 70 * 64), (Kernel.pytorch, 32 * 300),
                             (Kernel.pytorch, 70 * 300), (Kernel.triton, 70 * 64)):
        loss = catalogue_cross_entropy(queries, catalogue[target], catalogue, target_ids=target,
                                       item_ids=torch.arange(300), kernel=kernel,
                                       chunk_elements=elements)
        torch.testing.assert_close(loss, expected, atol=TOLERANCE, rtol=0)
        for got, ref in zip(torch.autograd.grad(loss, (queries, catalogue)), want):
            torch.testing.assert_close(got, ref, atol=TOLERANCE, rtol=0)


def test_sampled_cross_entropy_with_logq_equals_the_models_sampled_softmax():
    """Sampled candidates with −log Q as the bias and accidental hits left out: the loss the
    member model trains with (``sampled_softmax_loss`` without in-batch negatives)."""
    from foundation.models.losses import log_item_probability, sampled_softmax_loss

    generator = torch.Generator().manual_seed(1)
    items = torch.randn(50, 16, generator=generator, requires_grad=True)
    queries = torch.randn(40, 16, generator=generator, requires_grad=True)
    targets = torch.randint(1, 50, (40,), generator=generator)
    negatives = torch.randint(1, 50, (64,), generator=generator)
    log_prob = log_item_probability(torch.rand(50, generator=generator) * 100)
    expected = sampled_softmax_loss(queries, targets, items[targets], negatives, items[negatives],
                                    log_prob, in_batch=False)
    log_q = (len(negatives) / 49 * torch.ones(50)).log()
    want = torch.autograd.grad(expected, (queries, items))
    for kernel in (Kernel.pytorch, Kernel.triton):
        loss = catalogue_cross_entropy(queries, items[targets], items[negatives],
                                       target_ids=targets, item_ids=negatives,
                                       target_bias=-log_q[targets], item_bias=-log_q[negatives],
                                       kernel=kernel)
        torch.testing.assert_close(loss, expected, atol=TOLERANCE, rtol=0)
        for got, ref in zip(torch.autograd.grad(loss, (queries, items)), want):
            torch.testing.assert_close(got, ref, atol=TOLERANCE, rtol=0)


def test_scores_logsumexp_leaves_out_excluded_and_minus_infinity_items():
    generator = torch.Generator().manual_seed(2)
    queries = torch.randn(33, 8, generator=generator, requires_grad=True)
    items = torch.randn(45, 8, generator=generator, requires_grad=True)
    bias = torch.randn(45, generator=generator)
    bias[[3, 9]] = float("-inf")
    bias.requires_grad_()
    ids = torch.randint(0, 6, (45,), generator=generator)
    exclude = torch.randint(0, 6, (33,), generator=generator)
    scores = (queries @ items.T + bias).masked_fill(ids == exclude.unsqueeze(1), float("-inf"))
    expected = scores.logsumexp(1)
    weights = torch.randn(33, generator=generator)
    want = torch.autograd.grad((expected * weights).sum(), (queries, items, bias))
    for kernel in (Kernel.pytorch, Kernel.triton):
        got = scores_logsumexp(queries, items, bias, ids, exclude, kernel=kernel)
        torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
        grads = torch.autograd.grad((got * weights).sum(), (queries, items, bias))
        for name, g, w in zip(("queries", "items", "bias"), grads, want):
            torch.testing.assert_close(g, w, atol=TOLERANCE, rtol=0, msg=name)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 80), items=st.integers(0, 120), elements=st.integers(1, 6000),
       seed=st.integers(0, 1000))
def test_tiled_logsumexp_matches_the_reference_whatever_the_tiling(rows, items, elements, seed):
    """Any shape against any tile budget (blocks of rows, chunks of items, one tile, none):
    every logit in exactly one tile, so the values and every gradient match."""
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(rows, 8, generator=generator, requires_grad=True)
    catalogue = torch.randn(items, 8, generator=generator, requires_grad=True)
    bias = torch.randn(items, generator=generator, requires_grad=True)
    ids = torch.randint(0, 5, (items,), generator=generator)
    exclude = torch.randint(0, 5, (rows,), generator=generator)
    scores = (queries @ catalogue.T + bias).masked_fill(ids == exclude.unsqueeze(1),
                                                        float("-inf"))
    expected = scores.logsumexp(1)
    got = scores_logsumexp(queries, catalogue, bias, ids, exclude, kernel=Kernel.pytorch,
                           chunk_elements=elements)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
    finite = expected.isfinite()
    if not finite.any():
        return
    weights = torch.randn(rows, generator=generator)
    want = torch.autograd.grad((expected[finite] * weights[finite]).sum(),
                               (queries, catalogue, bias))
    grads = torch.autograd.grad((got[finite] * weights[finite]).sum(),
                                (queries, catalogue, bias))
    for name, g, w in zip(("queries", "items", "bias"), grads, want):  # sums in other orders
        torch.testing.assert_close(g, w, atol=TOLERANCE, rtol=TOLERANCE, msg=name)


@pytest.mark.parametrize("elements", [32 * 300, 70 * 64])  # blocks of rows; chunks of items
def test_mixed_precision_logsumexp_multiplies_in_bf16_and_sums_in_fp32(elements):
    """Under bf16 autocast (``engine.bf16=on``): a bf16 trunk's queries against fp32 table
    rows, the products in bf16, the log-sum-exp and the gradients' sums in fp32, as close to
    the fp32 result as bf16 logits allow, each gradient in its input's dtype."""
    generator = torch.Generator().manual_seed(3)
    queries = torch.randn(70, 24, generator=generator).bfloat16().requires_grad_()
    items = torch.randn(300, 24, generator=generator, requires_grad=True)
    bias = torch.randn(300, generator=generator, requires_grad=True)
    expected = (queries.float() @ items.T + bias).logsumexp(1)
    weights = torch.randn(70, generator=generator)
    want = torch.autograd.grad((expected * weights).sum(), (queries, items, bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = scores_logsumexp(queries, items, bias, kernel=Kernel.pytorch,
                               chunk_elements=elements)
    assert got.dtype == torch.float32
    # the operands rounded to bf16 (2^-8 relative, each) bound the logits' error
    assert ((got - expected).abs() <= 2 ** -7 * expected.abs()).all()
    grads = torch.autograd.grad((got * weights).sum(), (queries, items, bias))
    for name, g, w in zip(("queries", "items", "bias"), grads, want):
        assert g.dtype == w.dtype, name
        assert (g.float() - w.float()).norm() < 0.02 * w.float().norm(), name


@pytest.mark.parametrize("kernel, elements", [(Kernel.pytorch, 6), (Kernel.pytorch, 1 << 20),
                                              (Kernel.triton, 1 << 20)])
def test_a_query_with_every_item_left_out_gets_minus_infinity_and_no_gradient(kernel, elements):
    """Chunks of items, one block of rows and the Triton kernel alike: no NaN anywhere."""
    queries = torch.randn(3, 4, requires_grad=True)
    items = torch.randn(5, 4, requires_grad=True)
    lse = scores_logsumexp(queries, items, None, torch.zeros(5, dtype=torch.long),
                           torch.tensor([0, 1, 1]), kernel=kernel, chunk_elements=elements)
    assert lse[0] == float("-inf") and lse[1:].isfinite().all()
    dq, ditems = torch.autograd.grad(lse[1:].sum(), (queries, items))
    assert (dq[0] == 0).all() and dq.isfinite().all() and ditems.isfinite().all()


def test_custom_ops_fake_implementations_match_the_real_ones():
    """``opcheck``: schema, fake (meta) implementation and registered autograd agree with
    the real kernel, so torch.compile and torch.export can trace the ops."""
    q, k, v, offsets, timestamps, position_bias, time_bias, max_len = attention_inputs(
        [3, 0, 17], heads=2, head_dim=4)
    torch.library.opcheck(torch.ops.foundation.hstu_attention.default,
                          (q, k, v, offsets, timestamps, position_bias, time_bias, max_len, 17))
    queries, items = torch.randn(9, 8, requires_grad=True), torch.randn(21, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.foundation.scores_logsumexp.default,
                          (queries, items, torch.zeros(21, requires_grad=True),
                           torch.arange(21), torch.randint(0, 21, (9,))))


def test_export_and_compile_see_through_the_kernels():
    class Attention(torch.nn.Module):
        def forward(self, q, k, v, offsets, timestamps, position_bias, time_bias):
            return hstu_attention(q, k, v, offsets, timestamps, position_bias, time_bias,
                                  MAX_LEN, max_seq_len=17, kernel=Kernel.triton)

    inputs = attention_inputs([3, 0, 17], heads=2, head_dim=4)[:-1]
    program = torch.export.export(Attention(), tuple(t.detach() for t in inputs))
    targets = {str(node.target) for node in program.graph.nodes}
    assert "foundation.hstu_attention.default" in targets
    compiled = torch.compile(Attention(), backend="eager", fullgraph=True)  # no graph break
    torch.testing.assert_close(compiled(*inputs), hstu_attention_reference(*inputs, MAX_LEN),
                               atol=TOLERANCE, rtol=TOLERANCE)


def test_dispatcher_picks_and_refuses_with_the_fix(monkeypatch):
    assert resolve_kernel("auto", torch.device("cpu")) == Kernel.pytorch
    with pytest.raises(ValueError, match="choose from"):
        resolve_kernel("trtion", torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_kernel("triton", torch.device("cpu"))


def test_fused_cross_entropy_peak_memory_is_under_a_quarter_of_materialised():
    """Each variant measured in its own process (bench/fused_ce_memory.py; at 8k tokens ×
    100k items it reports the figure in docs/speed.md)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from fused_ce_memory import compare
    finally:
        sys.path.pop(0)
    results = compare(tokens=2048, items=25_000, dim=64, chunk_elements=1 << 22)
    fused, full = results["fused"], results["materialised"]
    assert abs(fused["loss"] - full["loss"]) < 1e-4 * abs(full["loss"])
    assert fused["peak_mib"] < 0.25 * full["peak_mib"], results
