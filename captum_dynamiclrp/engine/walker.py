"""Graph walker, part 2: the traversal that plans, and the executor that runs a plan.

Traversal (paper, Alg. 2): Kahn's algorithm from the output over the pruned
graph. A node becomes ready once every relevant consumer has propagated to it;
ready nodes sit on a stack, so the walk goes depth-first (the paper's
heuristic) while never visiting a node before all its relevance has arrived.
Each node is visited once, each edge looked at once: O(nodes + edges).

At each visited node the planner asks the rule which operands it reads; the
:class:`~.promise.PromiseResolver` plans how to get the missing ones. The
result is a :class:`~.plan.Plan`, which :func:`execute` runs.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..errors import DynamicLRPError, UnsupportedOperationError
from ..rules.base import OpSpec, RuleContext, RuleSettings
from .graph import LEAF_TYPE, AutogradGraph, consumer_edges, relevant_nodes
from .plan import CAPTURE, KEPT_BY_CONSUMER, KEPT_OUTPUT, LEAF, PROPAGATE, REPLAY, Plan
from .promise import PromiseResolver, output_kept_by_consumer


class NotConnectedError(DynamicLRPError):
    """The output does not depend on any requested tensor."""


def build_plan(graph: AutogradGraph, table: Mapping[str, OpSpec], fallback: Optional[OpSpec] = None) -> Plan:
    """Traverse the pruned graph in Kahn order (depth-first among ready nodes) and plan every step."""
    consumers = consumer_edges(graph)
    cut = constant_edges(graph, table, consumers)
    reach = relevant_nodes(graph, consumers, cut)
    if not reach[0]:
        raise NotConnectedError(
            "The output does not depend on any of the requested inputs (no autograd path connects "
            "them); check that the inputs are used by the model and that the forward does not "
            "detach them."
        )
    edges, types, nodes = graph.edges, graph.types, graph.nodes
    pending = [0] * len(nodes)
    for i, node_edges in enumerate(edges):
        if reach[i]:
            for slot, (child, _) in enumerate(node_edges):
                if child >= 0 and reach[child] and (i, slot) not in cut:
                    pending[child] += 1
    sinks: dict[int, list[tuple[int, int]]] = {}
    for node, output_nr, request in graph.sinks:
        sinks.setdefault(node, []).append((output_nr, request))

    plan = Plan(relevant=sum(reach), total=len(nodes))
    resolver = PromiseResolver(graph, table, plan, consumers)
    ready = [0]
    while ready:
        i = ready.pop()
        for output_nr, request in sinks.get(i, ()):
            plan.add_capture(i, output_nr, request)
        relevant = tuple(
            child >= 0 and reach[child] and (i, slot) not in cut for slot, (child, _) in enumerate(edges[i])
        )
        if types[i] != LEAF_TYPE and any(relevant):
            spec = table.get(types[i])
            if spec is None:
                if fallback is None:
                    raise UnsupportedOperationError(types[i])
                spec = fallback
                plan.fallback_nodes.append(types[i])
            output_source = None
            if spec.uses_output:
                found = output_kept_by_consumer(graph, table, consumers[i])
                output_source = ("consumer",) + found if found else (("root",) if i == 0 else None)
            needs = spec.needs_given_output if (output_source and spec.needs_given_output) else spec.needs
            sources = resolver.input_sources(i, needs(nodes[i], relevant))
            plan.add_propagate(i, spec, tuple(sources), relevant, edges[i], output_source)
        # Depth-first heuristic: push in reverse so the first operand is explored first.
        for slot in range(len(edges[i]) - 1, -1, -1):
            child = edges[i][slot][0]
            if relevant[slot]:
                pending[child] -= 1
                if pending[child] == 0:
                    ready.append(child)
    plan.promises = resolver.promises
    plan.release_after_last_use()
    return plan


def constant_edges(
    graph: AutogradGraph, table: Mapping[str, OpSpec], consumers: list[list[tuple[int, int]]]
) -> set[tuple[int, int]]:
    """Edges ``(consumer, slot)`` that carry no relevance: operands a rule treats as constants.

    A ``constant`` spec (CP-LRP's softmax) cuts every edge into it; a spec's
    ``constant_slots`` (a product's normaliser factor) cuts single slots.
    """
    cut: set[tuple[int, int]] = set()
    for i, (node, name) in enumerate(zip(graph.nodes, graph.types)):
        spec = table.get(name)
        if spec is None:
            continue
        if spec.constant:
            cut.update(consumers[i])
        if spec.constant_slots is not None:
            cut.update((i, slot) for slot, flag in enumerate(spec.constant_slots(node)) if flag)
    return cut


def _as_tuple(value) -> tuple:
    return (value,) if isinstance(value, Tensor) else tuple(value)


def _fetch(sources: Sequence, node, spec: OpSpec, values: dict) -> list:
    kept = None
    out = []
    for source in sources:
        if source is None:
            out.append(None)
        elif source[0] == "edge":
            out.append(values[source[1]][source[2]])
        else:
            if kept is None:
                kept = spec.kept_inputs(node)
            out.append(kept[source[1]])
    return out


def _propagate(step: tuple, nodes: list, relevance: dict, values: dict, root: tuple, settings: RuleSettings,
               dtype: torch.dtype) -> None:
    """Apply one node's rule and add what it hands each operand to that operand's relevance."""
    _, i, spec, sources, relevant, edges, output_source = step
    arrived = relevance.pop(i, None)
    if arrived is None:  # nothing reached this node (all of it went elsewhere)
        return
    node = nodes[i]
    output = None
    if output_source is not None:
        if output_source[0] == "root":
            root_output, seed_output_nr = root
            output = root_output if seed_output_nr == 0 else None
        else:
            _, consumer, slot, consumer_spec = output_source
            output = consumer_spec.kept_inputs(nodes[consumer])[slot]
    ctx = RuleContext(node, arrived, relevant, _fetch(sources, node, spec, values), settings, output)
    for slot, r in enumerate(spec.rule(ctx)):
        if r is None or not relevant[slot]:
            continue
        child, k = edges[slot]
        if r.dtype != dtype:
            r = r.to(dtype)
        slots = relevance.get(child)
        if slots is None:
            slots = relevance[child] = [None] * len(nodes[child]._input_metadata)
        slots[k] = r if slots[k] is None else slots[k] + r


def execute(
    plan: Plan,
    graph: AutogradGraph,
    seed: Tensor,
    root_output: Tensor,
    seed_output_nr: int,
    num_requests: int,
    settings: RuleSettings,
) -> list[Optional[Tensor]]:
    """Run a plan: recover values, apply rules in traversal order, collect relevance at the sinks.

    ``root_output`` is the (detached) explained tensor, output ``seed_output_nr`` of the root node.
    Recovered values are dropped after their last use.
    """
    nodes = graph.nodes
    dtype = seed.dtype
    root = (root_output, seed_output_nr)
    values: dict[int, tuple] = {}
    relevance: dict[int, list] = {0: [None] * len(nodes[0]._input_metadata)}
    relevance[0][seed_output_nr] = seed
    results: list[Optional[Tensor]] = [None] * num_requests
    releases = plan.releases
    for index, step in enumerate(plan.steps):
        kind, i = step[0], step[1]
        if kind == PROPAGATE:
            _propagate(step, nodes, relevance, values, root, settings, dtype)
        elif kind == REPLAY:
            _, _, spec, sources = step
            with torch.no_grad():
                values[i] = _as_tuple(spec.forward(nodes[i], _fetch(sources, nodes[i], spec, values)))
        elif kind == KEPT_OUTPUT:
            values[i] = _as_tuple(step[2].kept_output(nodes[i]))
        elif kind == LEAF:
            values[i] = (nodes[i].variable,)
        elif kind == KEPT_BY_CONSUMER:
            _, _, consumer, slot, consumer_spec = step
            values[i] = (consumer_spec.kept_inputs(nodes[consumer])[slot],)
        elif kind == CAPTURE:
            slots = relevance.get(i)
            results[step[3]] = None if slots is None else slots[step[2]]
        for node in releases.get(index, ()):
            del values[node]
    return results
