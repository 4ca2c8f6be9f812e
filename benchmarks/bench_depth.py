"""Linearity of the graph walk and promise resolution: time per autograd node as depth doubles.

Builds transformer-style residual stacks (layer norm, attention with softmax, gated MLP,
residual adds: every promise shape) of 4, 8, 16, 32 and 64 blocks with a small width, so that
the engine's own work (graph building, pruning, ordering, promise resolution, the executor
loop) dominates the tensor arithmetic. For each depth it reports the time of a first call
(plan built) and of a cached call, the fastest of its calls over ``--repeats`` rounds (depths
interleaved, shallow stacks called more often so that every depth gets about the same timed seconds,
garbage collector off while timing; the JSON also has medians), divided by the number of autograd nodes,
and the time per node added since the previous depth (the slope, free of each call's fixed
cost). Flat columns mean O(nodes + edges).

Run: ``python benchmarks/bench_depth.py [--repeats 100] [--json out.json] [--plot out.png]``;
``--device cuda`` (or ``auto``) runs the stacks on a GPU, synchronising before and after every timed call.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import time

import torch
from torch import nn

import child_process

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


def build(depth: int, width: int, device: str = "cpu") -> dict:
    """A stack of ``depth`` blocks, its input, and the number of nodes of its autograd graph."""
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(width) for _ in range(depth)]).eval().to(device)
    x = torch.randn(1, 4, width, device=device, requires_grad=True)
    nodes = len(build_graph(model(x).sum(-1).grad_fn, (x,)).nodes)
    return {"depth": depth, "nodes": nodes, "model": model, "x": x, "engine": Engine(), "first": [], "cached": []}


def timed(call) -> float:
    """Seconds one call takes, with the cyclic garbage collector off during it.

    A collection started by the call's allocations would scan every object alive, including other
    stacks' graphs, and land on whichever call happened to cross the threshold. :func:`measure`
    collects once per round instead of before every call: a full collection scans all the stacks'
    graphs, which costs more than the shallow stacks' calls themselves.
    """
    gc.disable()
    try:
        _synchronize()
        start = time.perf_counter()
        call()
        _synchronize()
        return time.perf_counter() - start
    finally:
        gc.enable()


def _synchronize() -> None:
    """Wait for queued GPU work, so that a timed call includes its kernels (no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure(depths: list[int], width: int, repeats: int, device: str = "cpu") -> list[dict]:
    """Time first and cached calls of every depth, the depths interleaved within each of ``repeats`` rounds.

    Interleaving spreads background load over all depths alike. Within a round each depth runs
    ``max(depths) // depth`` times (at least once), so every depth gets about the same timed
    seconds: a shallow stack's call is short, and the fastest of a few such calls is the noisiest
    figure of the table, yet the slope from it to the next depth rests on it. Each depth reports the
    fastest of its calls (on a shared machine noise only ever adds time) and the median.
    """
    setups = [build(depth, width, device) for depth in depths]
    deepest = max(depths)
    counts = [max(1, deepest // setup["depth"]) for setup in setups]
    slots = max(counts)
    for _ in range(repeats):
        gc.collect()
        for slot in range(slots):
            for setup, count in zip(setups, counts):
                # ``count`` calls spread evenly over the round's slots, so that a burst of
                # background load lands on every depth alike rather than on one depth's batch.
                if slot * count // slots == (slot - 1) * count // slots and slot > 0:
                    continue
                model, x = setup["model"], setup["x"]
                out = model(x).sum(-1)
                setup["first"].append(timed(lambda: Engine().relevance(out, x)))
                out = model(x).sum(-1)
                setup["cached"].append(timed(lambda: setup["engine"].relevance(out, x)))
    rows = []
    for setup in setups:
        row = {"depth": setup["depth"], "nodes": setup["nodes"], "calls": len(setup["first"])}
        for kind in ("first", "cached"):
            fastest, median = min(setup[kind]), statistics.median(setup[kind])
            row[f"{kind}_ms"] = fastest * 1e3
            row[f"{kind}_median_ms"] = median * 1e3
            row[f"{kind}_us_per_node"] = fastest / setup["nodes"] * 1e6
        rows.append(row)
    return rows


def add_marginal(rows: list[dict]) -> None:
    """Time per node added since the previous depth: flat exactly when the cost is linear.

    Time per node also carries each call's fixed cost divided by the node count, which makes the
    shallowest stacks look dearer per node; the slope between depths does not.
    """
    for previous, row in itertools.pairwise(rows):
        added = row["nodes"] - previous["nodes"]
        for kind in ("first", "cached"):
            row[f"{kind}_us_per_added_node"] = (row[f"{kind}_ms"] - previous[f"{kind}_ms"]) / added * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, or auto")
    args = parser.parse_args(argv)
    args.device = child_process.resolve_device(parser, args.device)
    torch.set_num_threads(1)
    rows = measure(args.depths, args.width, args.repeats, args.device)
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

        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        nodes = [r["nodes"] for r in rows]
        for kind, marker, color in (("first", "o", "tab:blue"), ("cached", "s", "tab:orange")):
            label = "first call" if kind == "first" else "cached plan"
            ax.plot(nodes, [r[f"{kind}_us_per_node"] for r in rows], marker + "-", color=color,
                    label=f"{label}: per node")
            sloped = [r for r in rows if f"{kind}_us_per_added_node" in r]
            ax.plot([r["nodes"] for r in sloped], [r[f"{kind}_us_per_added_node"] for r in sloped], marker + "--",
                    color=color, alpha=0.6, label=f"{label}: per added node")
        ax.set_xscale("log")
        ax.set_xticks(nodes)
        ax.set_xticklabels([f"{n}\n({r['depth']})" for n, r in zip(nodes, rows)])
        ax.minorticks_off()
        ax.set_xlabel("autograd nodes (blocks)")
        ax.set_ylabel("time (us)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8, loc="lower left")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
