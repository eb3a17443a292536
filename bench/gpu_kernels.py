"""GPU checks of the kernels (issue 14; run where a CUDA device is lent, not in CI):

1. accuracy: Triton HSTU attention in bf16 against an fp32 reference — its forward and
   gradient errors, and the bf16 PyTorch reference's, whose errors bound them (≤ 2× forward,
   ≤ 5× backward);
2. speed: TFLOP/s of the Triton forward + backward and its speed-up over the padded PyTorch
   path, at Zipf-distributed lengths up to 4,096;
3. memory: the fused cross-entropy's peak at 32k tokens × 1M items × 256 dims, against what
   materialised logits would need.

    python bench/gpu_kernels.py OUT.json            # one CUDA device
    python bench/gpu_kernels.py OUT.json --smoke    # tiny shapes (CPU: TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import torch

from foundation.kernels import (
    Kernel,
    catalogue_cross_entropy,
    hstu_attention,
    hstu_attention_reference,
)
from foundation.kernels.jagged import offsets_from_lengths

log = logging.getLogger("gpu_kernels")


def zipf_lengths(rows: int, longest: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.minimum(rng.zipf(1.2, size=rows) * 16, longest)).long()


def attention_inputs(lengths: torch.Tensor, heads: int, dim: int, device: torch.device,
                     dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    total = int(lengths.sum())

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()

    times = (1_700_000_000 + torch.randint(0, 10**5, (total,), generator=g).cumsum(0)).to(device)
    return (leaf(total, heads, dim), leaf(total, heads, dim), leaf(total, heads, dim),
            offsets_from_lengths(lengths).to(device), times, leaf(4096, heads, scale=0.1),
            leaf(32, heads, scale=0.1), 4096)


def gradients(fn, inputs, grad):
    out = fn(*inputs)
    leaves = [inputs[i] for i in (0, 1, 2, 5, 6)]
    return out.float(), [g.float() for g in torch.autograd.grad(out, leaves, grad.to(out.dtype))]


def accuracy(device: torch.device, lengths: torch.Tensor, heads: int, dim: int) -> dict:
    """Forward and gradient errors (max |Δ| relative to the fp32 output's max) of Triton and
    PyTorch in bf16 against PyTorch in fp32."""
    exact_inputs = attention_inputs(lengths, heads, dim, device, torch.float32)
    exact, exact_grads = gradients(hstu_attention_reference, exact_inputs,
                                   grad := torch.randn_like(exact_inputs[0]))
    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = {}
    for name, kernel in (("triton", Kernel.triton), ("pytorch", Kernel.pytorch)):
        inputs = attention_inputs(lengths, heads, dim, device, low)
        out, grads = gradients(lambda *a, k=kernel: hstu_attention(*a, kernel=k), inputs, grad)
        result[name] = {
            "forward": ((out - exact).abs().max() / exact.abs().max()).item(),
            "backward": max(((g - e).abs().max() / e.abs().max().clamp_min(1e-12)).item()
                            for g, e in zip(grads, exact_grads))}
    result["forward_ratio"] = result["triton"]["forward"] / max(result["pytorch"]["forward"], 1e-12)
    result["backward_ratio"] = (result["triton"]["backward"]
                                / max(result["pytorch"]["backward"], 1e-12))
    return result


def timed(fn, repeats: int = 5) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - begin) / repeats


def speed(device: torch.device, lengths: torch.Tensor, heads: int, dim: int) -> dict:
    """Forward + backward seconds of each path and the Triton kernel's TFLOP/s (causal pairs:
    4 multiply-adds per pair and dimension forward, 8 backward)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inputs = attention_inputs(lengths, heads, dim, device, dtype)
    pairs = float((lengths * (lengths + 1) // 2).sum()) * heads
    flops = pairs * dim * 2 * (2 + 4)
    seconds = {}
    for name, kernel in (("triton", Kernel.triton), ("pytorch_padded", Kernel.pytorch)):
        def step(k=kernel):
            out = hstu_attention(*inputs, kernel=k)
            torch.autograd.grad(out, [inputs[0], inputs[1], inputs[2]], torch.ones_like(out))
        seconds[name] = timed(step)
    return {"tokens": int(lengths.sum()), "longest": int(lengths.max()), "seconds": seconds,
            "triton_tflops": flops / seconds["triton"] / 1e12,
            "speedup": seconds["pytorch_padded"] / seconds["triton"]}


def fused_memory(device: torch.device, tokens: int, items: int, dim: int) -> dict:
    """Peak memory of the fused cross-entropy's forward + backward (bf16 inputs)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    queries = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
    catalogue = torch.randn(items, dim, device=device, dtype=dtype, requires_grad=True)
    target = torch.randint(0, items, (tokens,), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    loss = catalogue_cross_entropy(queries, catalogue[target], catalogue, target_ids=target,
                                   item_ids=torch.arange(items, device=device))
    loss.backward()
    peak = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else float("nan")
    return {"tokens": tokens, "items": items, "dim": dim, "peak_gib": peak / 2**30,
            "materialised_logits_gib": tokens * items * 4 / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    heads, dim = (2, 16) if args.smoke else (4, 64)
    longest = 64 if args.smoke else 4096
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "accuracy": accuracy(device, zipf_lengths(8 if args.smoke else 64, longest),
                                   heads, dim),
              "speed": [speed(device, zipf_lengths(rows, longest, seed), heads, dim)
                        for seed, rows in enumerate([4] if args.smoke else [64, 256, 1024])]}
    report["fused_cross_entropy"] = fused_memory(
        device, *((256, 2048, 32) if args.smoke else (32_768, 1_000_000, 256)))
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    log.info(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
