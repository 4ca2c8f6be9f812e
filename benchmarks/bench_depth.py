"""Linearity of the graph walk and promise resolution: time per autograd node as depth doubles.

Builds transformer-style residual stacks (layer norm, attention with softmax, gated MLP,
residual adds: every promise shape) of 4, 8, 16, 32 and 64 blocks with a small width, so that
the engine's own work (graph building, pruning, ordering, promise resolution, the executor
loop) dominates the tensor arithmetic. For each depth it reports the median time of a first
call (plan built) and of a cached call, divided by the number of autograd nodes, and the time
per node added since the previous depth (the slope, free of each call's fixed cost). Flat
columns mean O(nodes + edges).

Run: ``python benchmarks/bench_depth.py [--repeats 5] [--json out.json] [--plot out.png]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch
from torch import nn

from captum_dynamiclrp.engine import Engine, build_graph


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.gate, self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(h)).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v
        h = h + attention
        return h + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def measure(depth: int, width: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(width) for _ in range(depth)]).eval()
    x = torch.randn(1, 4, width, requires_grad=True)

    def output() -> torch.Tensor:
        return model(x).sum(-1)

    nodes = len(build_graph(output().grad_fn, (x,)).nodes)
    first, cached = [], []
    for _ in range(repeats):
        out = output()
        start = time.perf_counter()
        engine = Engine()
        engine.relevance(out, x)
        first.append(time.perf_counter() - start)
        out = output()
        start = time.perf_counter()
        engine.relevance(out, x)
        cached.append(time.perf_counter() - start)
    return {
        "depth": depth,
        "nodes": nodes,
        "first_ms": statistics.median(first) * 1e3,
        "cached_ms": statistics.median(cached) * 1e3,
        "first_us_per_node": statistics.median(first) / nodes * 1e6,
        "cached_us_per_node": statistics.median(cached) / nodes * 1e6,
    }


def add_marginal(rows: list[dict]) -> None:
    """Time per node added since the previous depth: flat exactly when the cost is linear.

    Time per node also carries each call's fixed cost divided by the node count, which makes the
    shallowest stacks look dearer per node; the slope between depths does not.
    """
    for previous, row in itertools.pairwise(rows):
        added = row["nodes"] - previous["nodes"]
        for kind in ("first", "cached"):
            row[f"{kind}_us_per_added_node"] = (row[f"{kind}_ms"] - previous[f"{kind}_ms"]) / added * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(d, args.width, args.repeats) for d in args.depths]
    add_marginal(rows)
    print(f"{'depth':>6} {'nodes':>7} {'first us/node':>14} {'cached us/node':>15} {'first us/added':>15} {'cached us/added':>16}")
    for r in rows:
        added = [r.get(f"{kind}_us_per_added_node") for kind in ("first", "cached")]
        shown = [f"{a:.1f}" if a is not None else "-" for a in added]
        print(f"{r['depth']:>6} {r['nodes']:>7} {r['first_us_per_node']:>14.1f} {r['cached_us_per_node']:>15.1f}"
              f" {shown[0]:>15} {shown[1]:>16}")
    for key in ("first_us_per_node", "cached_us_per_node", "first_us_per_added_node", "cached_us_per_added_node"):
        values = [r[key] for r in rows if key in r]
        print(f"{key}: max/min over depths = {max(values) / min(values):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([r["nodes"] for r in rows], [r["first_us_per_node"] for r in rows], "o-", label="first call")
        ax.plot([r["nodes"] for r in rows], [r["cached_us_per_node"] for r in rows], "s-", label="cached plan")
        ax.set_xscale("log")
        ax.set_xlabel("autograd nodes (depth 4 to 64)")
        ax.set_ylabel("time per node (us)")
        ax.set_ylim(bottom=0)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
