"""Dropout's cost on CPU, forward + backward, one thread: torch's against
``foundation.models.dropout`` (elementwise, and causal attention with dropout on its weights).

    python bench/dropout_speed.py [--repeats 200]

Prints one JSON line per case ({"case", "shape", "p", "torch_ms", "foundation_ms", "speedup"}).
The shapes are the member model's: a rank's tokens × the feed-forward width, and the
attention of 128 rows of 50 events (the amazon-toys preset) or 64 rows × 2 heads (the default).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from foundation.models.dropout import causal_attention, dropout


def milliseconds(step: Callable[[], None], repeats: int) -> float:
    step()  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats * 1e3


def elementwise(shape: tuple[int, ...], p: float, repeats: int) -> dict:
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    return {"case": "elementwise", "shape": list(shape), "p": p,
            "torch_ms": milliseconds(lambda: F.dropout(x, p, True).backward(grad), repeats),
            "foundation_ms": milliseconds(lambda: dropout(x, p).backward(grad), repeats)}


def attention(shape: tuple[int, ...], p: float, repeats: int) -> dict:
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape)

    def fused() -> None:
        F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True).backward(grad)

    return {"case": "causal_attention", "shape": list(shape), "p": p,
            "torch_ms": milliseconds(fused, repeats),
            "foundation_ms": milliseconds(
                lambda: causal_attention(q, k, v, p, training=True).backward(grad), repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cases = [elementwise((1850, 256), 0.1, args.repeats),
             elementwise((1500, 64), 0.35, args.repeats),
             attention((128, 1, 50, 64), 0.35, args.repeats),
             attention((64, 2, 50, 32), 0.1, args.repeats)]
    for case in cases:
        case["speedup"] = case["torch_ms"] / case["foundation_ms"]
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in case.items()}))


if __name__ == "__main__":
    main()
