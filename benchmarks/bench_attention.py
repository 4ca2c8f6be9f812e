"""The fused-attention rule against the fused attention backward it stands in for, one layer.

One causal self-attention layer shaped like the Llama of ``bench_peers.py`` (8 query heads, 4
key/value heads, head dim 64, batch 1), float32. Two calls, interleaved repeat by repeat after
warm-up calls of each:

* ``rule``: ``captum_dynamiclrp.engine.relevance`` from the output of
  ``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)`` to q, k and v (the
  AttnLRP rule of ``rules/attention.py``; the graph is one node, so this is the rule's own cost);
* ``backward``: ``torch.autograd.grad`` of the same output with the same seed (the fused backward).

Prints the medians and rule / backward per ``--seq`` length.
Run: ``python benchmarks/bench_attention.py [--seq 256 512] [--repeats 30]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F

from captum_dynamiclrp.engine import relevance


def measure(seq: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of the rule and of the backward at ``seq`` tokens."""
    torch.manual_seed(0)
    q = torch.randn(1, 8, seq, 64, requires_grad=True)
    k = torch.randn(1, 4, seq, 64, requires_grad=True)
    v = torch.randn(1, 4, seq, 64, requires_grad=True)
    seed = torch.randn(1, 8, seq, 64)

    def output() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def rule() -> float:
        out = output()
        start = time.perf_counter()
        relevance(out, (q, k, v), seed)
        return time.perf_counter() - start

    def backward() -> float:
        out = output()
        start = time.perf_counter()
        torch.autograd.grad(out, (q, k, v), seed)
        return time.perf_counter() - start

    for _ in range(3):
        rule()
        backward()
    times: dict[str, list[float]] = {"rule": [], "backward": []}
    for _ in range(repeats):
        times["rule"].append(rule())
        times["backward"].append(backward())
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[256, 512], help="tokens (default: 256 512)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls of each (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{'tokens':>6} {'rule ms':>9} {'backward ms':>12} {'rule / backward':>16}")
    for seq in args.seq:
        ms = measure(seq, args.repeats)
        print(f"{seq:>6} {ms['rule']:>9.2f} {ms['backward']:>12.2f} {ms['rule'] / ms['backward']:>16.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
