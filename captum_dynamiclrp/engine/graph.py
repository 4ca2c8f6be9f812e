"""Graph walker, part 1: the auxiliary graph over autograd nodes.

:func:`build_graph` walks ``output.grad_fn`` and its ``next_functions`` with an
explicit stack (no recursion, so 100k-node graphs are fine) and records, per node,
its type, its input edges ``(child index, child output number)`` aligned with
``next_functions`` (``-1`` for an operand autograd does not track), and the shape
of each forward output. Nodes are numbered in discovery order, which is
deterministic for a given graph structure: the tuple of types, edges, shapes
and requested tensors is the graph's *signature*, the key of the plan cache.

:func:`relevant_nodes` then marks the nodes that lie on a path from the output to
a requested tensor (reverse reachability from the sinks); every other node is
pruned and does no work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, Any, Sequence

from torch import Tensor

Node = Any

LEAF_TYPE = "AccumulateGrad"


@dataclass
class AutogradGraph:
    """Auxiliary graph of one forward pass.

    Attributes:
        nodes: Autograd nodes; index 0 is the output's ``grad_fn``.
        types: Type name of each node.
        edges: Per node, per input slot: ``(child index or -1, child output number)``.
        sinks: ``(node index, output number, request index)`` for every requested tensor found.
        signature: Hashable structure key (types, edges, shapes, sinks).
    """

    nodes: list[Node]
    types: list[str]
    edges: list[tuple[tuple[int, int], ...]]
    sinks: list[tuple[int, int, int]]
    signature: tuple


def build_graph(root: Node, requests: Sequence[Tensor]) -> AutogradGraph:
    """Walk the autograd graph below ``root`` iteratively and locate the requested tensors.

    Args:
        root: ``output.grad_fn``.
        requests: Tensors whose relevance is wanted: leaves that require grad
            (found as ``AccumulateGrad`` nodes) or intermediate tensors (found as
            their ``grad_fn`` and ``output_nr``).
    """
    leaf_requests: dict[int, int] = {}
    inner_requests: dict[Node, list[tuple[int, int]]] = {}
    for i, t in enumerate(requests):
        if t.grad_fn is None:
            leaf_requests[id(t)] = i
        else:
            inner_requests.setdefault(t.grad_fn, []).append((t.output_nr, i))

    nodes: list[Node] = [root]
    index: dict[Node, int] = {root: 0}
    edges: list[tuple[tuple[int, int], ...]] = [()]
    stack = [0]
    while stack:
        i = stack.pop()
        node_edges = []
        for child, k in nodes[i].next_functions:
            if child is None:
                node_edges.append((-1, k))
                continue
            j = index.get(child)
            if j is None:
                j = len(nodes)
                index[child] = j
                nodes.append(child)
                edges.append(())
                stack.append(j)
            node_edges.append((j, k))
        edges[i] = tuple(node_edges)

    types = [type(n).__name__ for n in nodes]
    sinks: list[tuple[int, int, int]] = []
    for i, (node, name) in enumerate(zip(nodes, types)):
        if name == LEAF_TYPE:
            r = leaf_requests.get(id(node.variable))
            if r is not None:
                sinks.append((i, 0, r))
        elif node in inner_requests:
            sinks.extend((i, k, r) for k, r in inner_requests[node])

    shapes = tuple(tuple(tuple(m.shape) for m in n._input_metadata) for n in nodes)
    signature = (tuple(types), tuple(edges), shapes, tuple(sinks))
    return AutogradGraph(nodes=nodes, types=types, edges=edges, sinks=sinks, signature=signature)


def consumer_edges(graph: AutogradGraph) -> list[list[tuple[int, int]]]:
    """For each node, the ``(consumer index, input slot)`` pairs that read one of its outputs."""
    consumers: list[list[tuple[int, int]]] = [[] for _ in graph.nodes]
    for i, node_edges in enumerate(graph.edges):
        for slot, (child, _) in enumerate(node_edges):
            if child >= 0:
                consumers[child].append((i, slot))
    return consumers


def relevant_nodes(
    graph: AutogradGraph, consumers: list[list[tuple[int, int]]], cut: AbstractSet[tuple[int, int]]
) -> list[bool]:
    """Mark nodes on a path from the root to a sink, in O(n + m).

    A node is relevant if the root reaches it and it reaches a sink, both without crossing
    an edge in ``cut`` (``(consumer, slot)`` pairs whose operand a rule treats as a
    constant: a normaliser statistic, attention probabilities under CP-LRP).
    """
    reaches_sink = [False] * len(graph.nodes)
    frontier = []
    for node, _, _ in graph.sinks:
        if not reaches_sink[node]:
            reaches_sink[node] = True
            frontier.append(node)
    while frontier:
        node = frontier.pop()
        for consumer, slot in consumers[node]:
            if not reaches_sink[consumer] and (consumer, slot) not in cut:
                reaches_sink[consumer] = True
                frontier.append(consumer)
    reach = [False] * len(graph.nodes)
    if reaches_sink[0]:
        reach[0] = True
        frontier = [0]
    while frontier:
        node = frontier.pop()
        for slot, (child, _) in enumerate(graph.edges[node]):
            if child >= 0 and reaches_sink[child] and not reach[child] and (node, slot) not in cut:
                reach[child] = True
                frontier.append(child)
    return reach
