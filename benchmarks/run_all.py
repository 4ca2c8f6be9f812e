"""The whole performance suite in one command, and a verdict on every goal of the performance issue.

Runs, each in its own process and one after the other (they would slow each other down in parallel):

* ``engine``: ``bench_engine.py --repeats 5`` (MLP, ResNet-18, VGG-11 at batch 1 and 8);
* ``zoo``: ``bench_engine.py`` at the zoo's benchmark sizes (ResNet-50, ViT-B/16, GPT-2 small, an 8-layer
  Llama), batch 1 with ``--repeats 5`` and batch 8 with ``--repeats 3``;
* ``peers``: ``bench_peers.py`` against LXT at 256 and 512 tokens (``--repeats 11``, only where
  ``--lxt-python`` exists), then Zennit and IntegratedGradients(n_steps=50) at batch 1 (``--repeats 3``);
* ``depth``: ``bench_depth.py`` (4 to 64 blocks) with its plot.

Every script writes its JSON into ``--out`` (default ``benchmarks/results/``); this one then reads them back,
prints one line per goal with the worst measured ratio and whether it is met, and writes ``summary.json``.
``--parts`` reruns some parts only; the others then count with their JSON from an earlier run in ``--out``
(the summary names those files).
The goals (ratios measured in one run, never absolute times):

* ``DynamicLRP / InputXGradient`` time <= 1.5 on the first call and <= 1.2 with a cached plan;
* peak memory <= 1.3x that of ``InputXGradient``;
* faster than Zennit and LXT with the same rules (ours / peer < 1);
* ``IntegratedGradients(50) / ours`` >= 20;
* time per added autograd node flat within 20% as depth doubles (max / min <= 1.2).

Each time ratio is the ratio of two medians; where the scripts' JSON has them, the verdict lines add the
quartiles of the round-by-round ratios (``[rounds q1-q3]``, see ``ratios.py``): a miss whose rounds straddle
the limit is within this run's noise.

The issue sets the time goals at sizes where a forward takes at least ~50 ms. Smaller workloads of the
``engine`` part still count toward the verdict, but their labels carry their forward time, so that a miss
there is told apart from one at the benchmark sizes.

``--device cuda`` (or ``auto``) runs the engine, zoo and depth parts on a GPU; the peer part runs on the CPU.
``--quick`` shrinks every part to a smoke test (seconds, no memory children; its figures mean nothing; written
to ``benchmarks/results/quick/`` unless ``--out`` says otherwise). The full suite takes 25-40 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from bench_peers import DEFAULT_LXT_PYTHON

HERE = Path(__file__).resolve().parent
PARTS = ("engine", "zoo", "peers", "depth")

# Goal name -> (limit, True if the measured value must stay at or below it, False if at or above).
GOALS: dict[str, tuple[float, bool]] = {
    "time first / IxG": (1.5, True),
    "time cached / IxG": (1.2, True),
    "memory / IxG": (1.3, True),
    "ours / Zennit": (1.0, True),
    "ours / LXT": (1.0, True),
    "IG(50) / ours": (20.0, False),
    "depth: time per node, max / min": (1.2, True),  # the criterion
    "depth: time per added node, max / min": (1.2, True),  # stricter: the slope, free of fixed costs
}

FORWARD_FLOOR_MS = 50.0  # the size floor for the time goals (see the module docstring)


def commands(out: Path, parts: Iterable[str], quick: bool, device: str, lxt_python: str) -> list[tuple[str, list[str]]]:
    """The benchmark invocations of the chosen parts, as (JSON file name, argv) pairs."""
    engine, peers, depth = (str(HERE / name) for name in ("bench_engine.py", "bench_peers.py", "bench_depth.py"))
    python = sys.executable
    runs: list[tuple[str, list[str]]] = []
    if "engine" in parts:
        shrink = ["--models", "mlp", "--batch", "1", "--repeats", "1", "--no-memory"] if quick else ["--repeats", "5"]
        runs.append(("engine.json", [python, engine, *shrink, "--device", device]))
    if "zoo" in parts and not quick:
        zoo = ["--models", "resnet50", "vit_b16", "gpt2", "llama8"]
        runs.append(("zoo-b1.json", [python, engine, *zoo, "--batch", "1", "--repeats", "5", "--device", device]))
        runs.append(("zoo-b8.json", [python, engine, *zoo, "--batch", "8", "--repeats", "3", "--device", device]))
    if "peers" in parts and not quick:
        if Path(lxt_python).exists():
            runs.append(("peers-lxt.json", [python, peers, "--parts", "lxt", "--repeats", "11", "--seq", "256", "512",
                                            "--lxt-python", lxt_python]))
        runs.append(("peers-zennit-ig.json", [python, peers, "--parts", "zennit", "ig", "--batch", "1",
                                              "--repeats", "3", "--lxt-python", lxt_python]))
    if "depth" in parts:
        shrink = ["--depths", "1", "2", "4", "--width", "4", "--repeats", "1"] if quick else []
        runs.append(("depth.json", [python, depth, *shrink, "--device", device, "--plot", str(out / "depth.png")]))
    return [(name, argv + ["--json", str(out / name)]) for name, argv in runs]


def _worst(values: list[tuple[float, str, Optional[dict]]], at_most: bool) -> Optional[tuple[float, str, Optional[dict]]]:
    if not values:
        return None
    pick = max if at_most else min
    return pick(values, key=lambda v: v[0])


def _paired(row: dict, field: str, kind: str) -> Optional[dict]:
    """The round-by-round ratio (median, quartiles) of ``row[field][kind]``, if the row has it (older JSON
    files do not)."""
    return row.get(field, {}).get(kind)


def _spread(paired: Optional[dict]) -> str:
    return "" if paired is None else f" [rounds {paired['q1']:.2f}-{paired['q3']:.2f}]"


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One verdict per goal from the scripts' JSON payloads (keyed by file name).

    Each verdict holds the worst measured value and where it was measured, the limit, whether it
    is met, and every workload that misses it. Goals with no measurement are reported as not measured.
    Time ratios also carry their round-by-round quartiles (``ratios.py``) where the JSON has them: the
    worst one's as ``worst_rounds``, and each miss's in its label, so that a miss inside the run's own
    noise is told apart from a clear one.
    """
    measured: dict[str, list[tuple[float, str, Optional[dict]]]] = {goal: [] for goal in GOALS}
    for name, payload in results.items():
        if name.startswith(("engine", "zoo")):
            for row in payload["results"]:
                where = timed = f"{row['model']} b{row['batch']}"
                forward_ms = row.get("forward_nograd_ms")
                if forward_ms is not None and forward_ms < FORWARD_FLOOR_MS:
                    timed += f" (forward {forward_ms:.0f} ms < {FORWARD_FLOOR_MS:.0f})"
                for kind in ("first", "cached"):
                    paired = _paired(row, "paired_time_ratio", kind)
                    measured[f"time {kind} / IxG"].append((row["time_ratio"][kind], timed, paired))
                for kind in ("first", "cached"):
                    ratio = row["memory_ratio"][kind]
                    if ratio == ratio:  # NaN when the memory children were skipped
                        measured["memory / IxG"].append((ratio, f"{where} {kind}", None))
        elif name.startswith("peers"):
            for row in payload["results"]:
                where = f"{row['model']} b{row['batch']} {row['rules']}"
                if row["part"] == "lxt" and "input_shape" in row:  # the LXT part runs at several lengths
                    where += f" {row['input_shape'][1]} tokens"
                for kind in ("first", "cached"):
                    label = f"{where} {kind}"
                    ours_over = (row["ours_over_peer"][kind], label, _paired(row, "paired_ours_over_peer", kind))
                    if row["part"] == "zennit":
                        measured["ours / Zennit"].append(ours_over)
                    elif row["part"] == "lxt":
                        measured["ours / LXT"].append(ours_over)
                    elif row["part"] == "ig":
                        peer_over = (row["peer_over_ours"][kind], label, _paired(row, "paired_peer_over_ours", kind))
                        measured["IG(50) / ours"].append(peer_over)
        elif name.startswith("depth"):
            for kind in ("first", "cached"):
                per_node = [row[f"{kind}_us_per_node"] for row in payload if f"{kind}_us_per_node" in row]
                if len(per_node) >= 2 and min(per_node) > 0:
                    measured["depth: time per node, max / min"].append((max(per_node) / min(per_node), kind, None))
                slopes = [row[f"{kind}_us_per_added_node"] for row in payload if f"{kind}_us_per_added_node" in row]
                if len(slopes) >= 2 and min(slopes) > 0:
                    measured["depth: time per added node, max / min"].append((max(slopes) / min(slopes), kind, None))
    verdicts = []
    for goal, (limit, at_most) in GOALS.items():
        values = measured[goal]
        worst = _worst(values, at_most)
        misses = [where + _spread(paired) for value, where, paired in values if (value > limit if at_most else value < limit)]
        verdicts.append({
            "goal": goal,
            "limit": limit,
            "at_most": at_most,
            "worst": None if worst is None else worst[0],
            "worst_at": None if worst is None else worst[1],
            "worst_rounds": None if worst is None else worst[2],
            "met": None if worst is None else not misses,
            "misses": misses,
        })
    return verdicts


def format_verdicts(verdicts: list[dict[str, Any]]) -> str:
    header = f"{'goal':<40} {'limit':>8} {'worst':>7}  {'met':<5} where / misses"
    lines = [header, "-" * len(header)]
    for v in verdicts:
        limit = ("<= " if v["at_most"] else ">= ") + f"{v['limit']:g}"
        if v["worst"] is None:
            lines.append(f"{v['goal']:<40} {limit:>8} {'-':>7}  {'-':<5} not measured")
            continue
        detail = v["worst_at"] + _spread(v.get("worst_rounds")) if v["met"] else "misses: " + ", ".join(v["misses"])
        lines.append(f"{v['goal']:<40} {limit:>8} {v['worst']:>7.2f}  {'yes' if v['met'] else 'NO':<5} {detail}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the JSON files and plot (default benchmarks/results, with --quick its quick/)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny workloads, figures meaningless")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto, for every part but the peers")
    parser.add_argument("--lxt-python", default=DEFAULT_LXT_PYTHON, help="interpreter with LXT 2.1 and transformers 4.52")
    args = parser.parse_args(argv)
    if args.out is None:  # a smoke test must not mix with, or overwrite, a real run's files
        args.out = Path("benchmarks/results/quick" if args.quick else "benchmarks/results")
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    results: dict[str, Any] = {}
    runs = commands(args.out, args.parts, args.quick, args.device, args.lxt_python)
    for step, (name, command) in enumerate(runs, 1):
        print(f"\n=== [{step}/{len(runs)}, {time.perf_counter() - started:.0f} s] {' '.join(command[1:])}", flush=True)
        finished = subprocess.run(command)
        if finished.returncode != 0:
            print(f"{name}: the benchmark failed (exit status {finished.returncode}); its goals are not measured")
            continue
        results[name] = json.loads((args.out / name).read_text())

    # Parts not run this time count with their files from an earlier run in the same folder (named);
    # a part that failed this time does not fall back on an older file.
    attempted = {name for name, _ in runs}
    failed = attempted - set(results)
    every_part = {name for name, _ in commands(args.out, PARTS, False, args.device, lxt_python=sys.executable)}
    earlier = sorted(path.name for path in args.out.glob("*.json")
                     if path.name in every_part and path.name not in attempted)
    for name in earlier:
        results[name] = json.loads((args.out / name).read_text())
    verdicts = evaluate(results)
    print(f"\n=== goals ({time.perf_counter() - started:.0f} s in all; JSON and plot in {args.out}/)")
    if earlier:
        print(f"read from an earlier run: {', '.join(earlier)}")
    print(format_verdicts(verdicts))
    summary = {"commands": [command[1:] for _, command in runs], "earlier_files": earlier, "verdicts": verdicts}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
