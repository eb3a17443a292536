"""Peak memory of the catalogue cross-entropy: fused (chunked) against F.cross_entropy on
materialised logits, forward and backward, each measured in a fresh process.

    python bench/fused_ce_memory.py --tokens 8192 --items 100000 --dim 64

Prints one JSON line per variant ({"variant", "peak_mib", "loss"}) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys

log = logging.getLogger("fused_ce_memory")


def measure(variant: str, tokens: int, items: int, dim: int, chunk_elements: int) -> dict:
    """In this process: the peak resident memory the loss's forward and backward add."""
    import torch

    from foundation.kernels import catalogue_cross_entropy
    from foundation.kernels.softmax import materialised_cross_entropy
    from foundation.telemetry import peak_resident_mib

    torch.manual_seed(0)
    queries = torch.randn(tokens, dim, requires_grad=True)
    catalogue = torch.randn(items, dim, requires_grad=True)
    target = torch.randint(0, items, (tokens,))
    # Warm up the code paths on a tiny problem, so the baseline includes their allocations.
    small = torch.randn(4, dim, requires_grad=True)
    catalogue_cross_entropy(small, small, small, kernel="pytorch").backward()
    materialised_cross_entropy(small, small, torch.arange(4)).backward()
    base = peak_resident_mib()
    if variant == "fused":
        loss = catalogue_cross_entropy(queries, catalogue[target], catalogue, target_ids=target,
                                       item_ids=torch.arange(items), kernel="pytorch",
                                       chunk_elements=chunk_elements)
    else:
        loss = materialised_cross_entropy(queries, catalogue, target)
    loss.backward()
    return {"variant": variant, "peak_mib": round(peak_resident_mib() - base, 1), "loss": loss.item()}


def compare(tokens: int, items: int, dim: int, chunk_elements: int) -> dict[str, dict]:
    """Both variants, each in its own process (a process's peak never goes down)."""
    results = {}
    for variant in ("materialised", "fused"):
        out = subprocess.run(
            [sys.executable, __file__, "--variant", variant, "--tokens", str(tokens),
             "--items", str(items), "--dim", str(dim), "--chunk-elements", str(chunk_elements)],
            check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk-elements", type=int, default=1 << 24)
    parser.add_argument("--variant", choices=["materialised", "fused"],
                        help="measure one variant in this process (used by the comparison)")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.tokens, args.items, args.dim,
                                 args.chunk_elements)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = compare(args.tokens, args.items, args.dim, args.chunk_elements)
    for row in results.values():
        print(json.dumps(row))
    ratio = results["fused"]["peak_mib"] / results["materialised"]["peak_mib"]
    log.info("fused cross-entropy at %d tokens × %d items × %d: %.0f MiB vs %.0f MiB "
             "materialised (%.1f%%), loss %.6f vs %.6f", args.tokens, args.items, args.dim,
             results["fused"]["peak_mib"], results["materialised"]["peak_mib"], 100 * ratio,
             results["fused"]["loss"], results["materialised"]["loss"])


if __name__ == "__main__":
    main()
