"""Survey of DynamicLRP's op coverage on the model zoo (``tests/zoo.py``).

For every zoo case (random weights, eval mode, float32, batch 2):

1. **Missing ops.** The forward runs on fresh leaf copies of the inputs that require grad; the
   autograd graph is walked with :func:`captum_dynamiclrp.engine.build_graph` and every node type
   that has no entry in :data:`captum_dynamiclrp.rules.RULE_TABLE` (``AccumulateGrad`` aside) is
   listed, not just the first one the engine would stop at. Each missing type is marked

   * ``relevant`` if at least one node of that type lies on a path from the output to an input
     (the engine would have to apply a rule to it), or
   * ``param-only`` if every node of that type only computes from parameters / constants (rotary
     tables, ``-exp(A_log)``, resized position tables, ...). The engine prunes those nodes from the
     relevance walk, but a Promise that must replay the branch to rebuild an operand a rule needs
     (e.g. the parameter side of an ``add``) still needs their forward, so they can matter too.

   The relevant/pruned split uses the engine's own pruning (``constant_edges`` and
   ``relevant_nodes``) with the current rule table.
2. **Calls.** ``DynamicLRP(case.forward).attribute(case.inputs, target=case.target)`` (with the
   convergence delta relative to the target score: the share of relevance absorbed by biases and
   constants), then
   ``captum_dynamiclrp.engine.relevance(out, inputs, seed)`` with the default ``fallback=False`` and
   ``seed = one_hot(target) * out``, and finally ``DynamicLRP(..., fallback=True)`` to see whether
   anything other than missing rules stands in the way (``ok`` there means: finite attributions of
   the inputs' shapes; the fallback itself is never counted as coverage).

Then, per ``-eager`` / ``-sdpa`` pair, how far apart the two attributions are (the forwards agree),
and per missing node type: the cases that produce it, the innermost module that created the first
example found, the names and values (tensor shapes / dtypes, ints, tuples) of the example node's
``_saved_*`` attributes, and the types of its ``next_functions``.

Run ``PYTHONPATH=. python benchmarks/zoo_survey.py`` (about a minute on 2 CPU cores);
``--cases gpt2-eager,mamba`` restricts the cases; ``--json PATH`` also writes everything.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch
from torch import Tensor, nn

from captum_dynamiclrp import DynamicLRP, UnsupportedOperationError
from captum_dynamiclrp.attribution import locate_module
from captum_dynamiclrp.engine import build_graph, relevance
from captum_dynamiclrp.engine.graph import LEAF_TYPE, consumer_edges, relevant_nodes
from captum_dynamiclrp.engine.walker import constant_edges
from captum_dynamiclrp.rules import RULE_TABLE
from tests.zoo import ZOO, ZooCase

# ---------------------------------------------------------------------------------------------
# Describing autograd nodes
# ---------------------------------------------------------------------------------------------


def describe_value(value: Any) -> Any:
    """A short, JSON-friendly description of a saved value."""
    if isinstance(value, Tensor):
        return f"Tensor{list(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, (list, tuple)):
        items = [describe_value(v) for v in value]
        if all(isinstance(v, (int, float, bool)) or v is None for v in value):
            return tuple(value) if isinstance(value, tuple) else list(value)
        return items
    if isinstance(value, (int, float, bool, str)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    return f"<{type(value).__name__}> {value!r}"[:120]


def saved_attributes(node: Any) -> dict[str, Any]:
    """``_saved_*`` attribute names of an autograd node, with a description of each value."""
    out: dict[str, Any] = {}
    for name in dir(node):
        if not name.startswith("_saved_"):
            continue
        try:
            out[name] = describe_value(getattr(node, name))
        except Exception as err:  # e.g. a SavedVariable freed or of an unsupported kind
            out[name] = f"<unreadable: {type(err).__name__}: {err}>"[:160]
    return out


def next_function_types(node: Any) -> list[Optional[str]]:
    return [None if child is None else f"{type(child).__name__}[{k}]" for child, k in node.next_functions]


def output_shapes(node: Any) -> list[list[int]]:
    try:
        return [list(m.shape) for m in node._input_metadata]
    except Exception:
        return []


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------


@dataclass
class MissingType:
    node_type: str
    count: int = 0
    relevant_count: int = 0
    example: Any = None  # first node found (relevant one preferred)
    example_relevant: bool = False

    @property
    def where(self) -> str:
        return "relevant" if self.relevant_count else "param-only"


@dataclass
class CaseReport:
    name: str
    description: str = ""
    nodes: int = 0
    relevant_nodes: int = 0
    missing: dict[str, MissingType] = field(default_factory=dict)
    modules: dict[str, Optional[str]] = field(default_factory=dict)
    attribute: str = ""
    engine: str = ""
    fallback: str = ""
    build_error: str = ""
    seconds: float = 0.0
    attributions: Optional[tuple[Tensor, ...]] = None


def outcome(fn) -> str:
    try:
        result = fn()
    except UnsupportedOperationError as err:
        where = f" @ {err.module_path}" if err.module_path else ""
        return f"Unsupported {err.node_type}{where}"
    except Exception as err:
        msg = str(err).splitlines()[0] if str(err) else ""
        return f"{type(err).__name__}: {msg}"[:200]
    return result


def check_attributions(attrs: Any, inputs: tuple[Tensor, ...]) -> str:
    attrs = attrs if isinstance(attrs, tuple) else (attrs,)
    if len(attrs) != len(inputs):
        return f"wrong number of attributions: {len(attrs)}"
    for a, x in zip(attrs, inputs):
        if a.shape != x.shape:
            return f"wrong shape {tuple(a.shape)} for input {tuple(x.shape)}"
        if not torch.isfinite(a).all():
            return "non-finite attributions"
    return "ok"


def survey_case(name: str, case: ZooCase) -> CaseReport:
    report = CaseReport(name=name, description=case.description)
    forward = case.forward
    leaves = tuple(x.detach().clone().requires_grad_(True) for x in case.inputs)

    # --- every node type without a rule, relevant or pruned -------------------------------------
    with torch.enable_grad():
        out = forward(*leaves)
    graph = build_graph(out.grad_fn, leaves)
    consumers = consumer_edges(graph)
    cut = constant_edges(graph, RULE_TABLE, consumers)
    reach = relevant_nodes(graph, consumers, cut)
    report.nodes = len(graph.nodes)
    report.relevant_nodes = sum(reach)
    missing_types = set(graph.types) - set(RULE_TABLE) - {LEAF_TYPE}
    for i, (node, node_type) in enumerate(zip(graph.nodes, graph.types)):
        if node_type not in missing_types:
            continue
        entry = report.missing.setdefault(node_type, MissingType(node_type))
        entry.count += 1
        on_path = bool(reach[i])
        entry.relevant_count += on_path
        if entry.example is None or (on_path and not entry.example_relevant):
            entry.example = node
            entry.example_relevant = on_path

    # --- which module created each missing type ------------------------------------------------
    module = forward if isinstance(forward, nn.Module) else None
    if module is not None:
        for node_type in sorted(report.missing):
            report.modules[node_type] = locate_module(module, lambda: forward(*leaves), node_type)

    # --- the three calls ---------------------------------------------------------------------------
    def attribute() -> str:
        attrs, delta = DynamicLRP(forward).attribute(case.inputs, target=case.target, return_convergence_delta=True)
        result = check_attributions(attrs, case.inputs)
        report.attributions = attrs if isinstance(attrs, tuple) else (attrs,)
        with torch.no_grad():
            selected = forward(*case.inputs)[:, case.target].abs().clamp_min(1e-12)
        return f"{result} (|delta| / |f_target| max {float((delta.abs() / selected).max()):.2e})"

    def engine() -> str:
        fresh = tuple(x.detach().clone().requires_grad_(True) for x in case.inputs)
        with torch.enable_grad():
            scores = forward(*fresh)
        seed = torch.zeros_like(scores)
        seed[:, case.target] = 1.0
        return check_attributions(relevance(scores, fresh, seed * scores.detach()), case.inputs)

    def with_fallback() -> str:
        lrp = DynamicLRP(forward, fallback=True)
        result = check_attributions(lrp.attribute(case.inputs, target=case.target), case.inputs)
        used = sorted(set(lrp.last_fallback_ops))
        return f"{result} (fallback on {', '.join(used)})" if used else result

    report.attribute = outcome(attribute)
    report.engine = outcome(engine)
    report.fallback = outcome(with_fallback)
    return report


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def print_case_table(reports: list[CaseReport]) -> None:
    print("=" * 100)
    print("Case -> missing autograd node types ('*' = on a relevance path; others only touch parameters)")
    print("=" * 100)
    width = max(len(r.name) for r in reports)
    for r in reports:
        if r.build_error:
            print(f"{r.name:<{width}}  BUILD FAILED: {r.build_error}")
            continue
        missing = sorted(r.missing.values(), key=lambda m: (not m.relevant_count, m.node_type))
        names = ", ".join(f"{m.node_type}{'*' if m.relevant_count else ''}" for m in missing) or "(none)"
        print(f"{r.name:<{width}}  {names}")
    print()
    print("=" * 100)
    print("Calls: DynamicLRP.attribute | engine.relevance | DynamicLRP(fallback=True)")
    print("=" * 100)
    for r in reports:
        if r.build_error:
            continue
        print(f"{r.name:<{width}}  nodes {r.nodes:5d} (relevant {r.relevant_nodes:5d})  {r.seconds:5.1f}s")
        print(f"{'':<{width}}    attribute: {r.attribute}")
        print(f"{'':<{width}}    relevance: {r.engine}")
        print(f"{'':<{width}}    fallback : {r.fallback}")
    print()


def compare_attention_variants(reports: list[CaseReport]) -> dict[str, Optional[float]]:
    """Per ``<name>-eager`` / ``<name>-sdpa`` pair: max |R_eager - R_sdpa| / max |R_eager| (same weights, inputs)."""
    by_name = {r.name: r for r in reports}
    out: dict[str, Optional[float]] = {}
    for name, r in by_name.items():
        if not name.endswith("-eager"):
            continue
        base = name[: -len("-eager")]
        other = by_name.get(base + "-sdpa")
        if other is None:
            continue
        if r.attributions is None or other.attributions is None:
            out[base] = None
            continue
        diff = max(float((a - b).abs().max()) for a, b in zip(r.attributions, other.attributions))
        scale = max(float(a.abs().max()) for a in r.attributions)
        out[base] = diff / scale if scale > 0 else diff
    return out


def print_variant_comparison(comparison: dict[str, Optional[float]]) -> None:
    print("=" * 100)
    print("eager vs sdpa: max |R_eager - R_sdpa| / max |R_eager| (same weights and inputs; forward agrees to ~1e-6)")
    print("=" * 100)
    for base, value in comparison.items():
        print(f"{base:<20} {'n/a (a call failed)' if value is None else f'{value:.2e}'}")
    print()


def collect_types(reports: list[CaseReport]) -> dict[str, dict[str, Any]]:
    types: dict[str, dict[str, Any]] = {}
    for r in reports:
        for node_type, m in r.missing.items():
            info = types.setdefault(node_type, {"cases_relevant": [], "cases_param_only": [], "example": None,
                                                "example_case": None, "example_relevant": False, "modules": {}})
            (info["cases_relevant"] if m.relevant_count else info["cases_param_only"]).append(r.name)
            info["modules"][r.name] = r.modules.get(node_type)
            if info["example"] is None or (m.example_relevant and not info["example_relevant"]):
                info["example"] = m.example
                info["example_case"] = r.name
                info["example_relevant"] = m.example_relevant
    for info in types.values():
        node = info.pop("example")
        info["saved"] = saved_attributes(node)
        info["next_functions"] = next_function_types(node)
        info["output_shapes"] = output_shapes(node)
    return types


def print_type_details(types: dict[str, dict[str, Any]]) -> None:
    print("=" * 100)
    print(f"Missing node types: {len(types)} "
          f"({sum(1 for t in types.values() if t['cases_relevant'])} on a relevance path)")
    print("=" * 100)
    order = sorted(types, key=lambda t: (not types[t]["cases_relevant"], t))
    for node_type in order:
        info = types[node_type]
        print(f"{node_type}")
        if info["cases_relevant"]:
            print(f"    relevant in : {', '.join(info['cases_relevant'])}")
        if info["cases_param_only"]:
            print(f"    param-only in: {', '.join(info['cases_param_only'])}")
        modules = sorted({m for m in info["modules"].values() if m})
        if modules:
            print(f"    modules     : {'; '.join(modules[:6])}{' ...' if len(modules) > 6 else ''}")
        print(f"    example from: {info['example_case']}"
              f" ({'relevant' if info['example_relevant'] else 'param-only'} node)")
        print(f"    outputs     : {info['output_shapes']}")
        print(f"    next_functions: {info['next_functions']}")
        if info["saved"]:
            for name, value in info["saved"].items():
                print(f"      {name} = {value}")
        else:
            print("      (no _saved_ attributes)")
        print()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="", help="comma-separated zoo keys (default: all)")
    parser.add_argument("--json", default="", help="also write the survey to this JSON file")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:
        pass
    if args.threads:
        torch.set_num_threads(args.threads)

    names = [n for n in args.cases.split(",") if n] or list(ZOO)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(ZOO)}")

    reports: list[CaseReport] = []
    for name in names:
        start = time.perf_counter()
        try:
            case = ZOO[name]()
        except Exception as err:
            reports.append(CaseReport(name=name, build_error=f"{type(err).__name__}: {err}"[:300]))
            continue
        try:
            report = survey_case(name, case)
        except Exception as err:
            traceback.print_exc()
            report = CaseReport(name=name, build_error=f"survey failed: {type(err).__name__}: {err}"[:300])
        report.seconds = time.perf_counter() - start
        reports.append(report)
        print(f"[{report.seconds:5.1f}s] {name}: {len(report.missing)} missing type(s)", file=sys.stderr, flush=True)

    print_case_table(reports)
    comparison = compare_attention_variants(reports)
    print_variant_comparison(comparison)
    types = collect_types(reports)
    print_type_details(types)

    if args.json:
        payload = {
            "torch": torch.__version__,
            "cases": {
                r.name: {
                    "description": r.description,
                    "build_error": r.build_error,
                    "nodes": r.nodes,
                    "relevant_nodes": r.relevant_nodes,
                    "missing": {t: {"count": m.count, "relevant_count": m.relevant_count,
                                    "module": r.modules.get(t)} for t, m in sorted(r.missing.items())},
                    "attribute": r.attribute,
                    "relevance": r.engine,
                    "fallback": r.fallback,
                    "seconds": round(r.seconds, 2),
                }
                for r in reports
            },
            "eager_vs_sdpa": comparison,
            "missing_types": types,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
