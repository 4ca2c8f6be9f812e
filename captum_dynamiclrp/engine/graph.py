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

Walking ``next_functions`` gives every node a Python wrapper, and in recent PyTorch
(seen with 2.14) such a wrapper owns its node (PyObject preservation, as for
tensors): freeing the graph then goes through one Python deallocation per node,
recursively, bypassing autograd's iterative deleter, and a graph tens of thousands
of nodes deep overflows the C stack when the output is dropped (a plain walk over
``next_functions`` followed by ``torch.autograd.grad`` crashes the same way).
:func:`build_graph` therefore hands the wrappers to a :class:`DeferredRelease` kept
in the root node's ``metadata``, which frees the nodes one at a time, consumers
first, once the root dies.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import AbstractSet, Any, Callable, ClassVar, Optional, Sequence

from torch import Tensor

Node = Any

LEAF_TYPE = "AccumulateGrad"

# Key, in a node's ``metadata`` dict, of the list of DeferredReleases that start when it dies.
RELEASE_KEY = "captum_dynamiclrp.deferred_release"


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
    defer_release(nodes, edges)
    return AutogradGraph(nodes=nodes, types=types, edges=edges, sinks=sinks, signature=signature)


class DeferredRelease:
    r"""Holds the Python wrappers of graph nodes and frees them in a safe order.

    Once Python has wrapped a node, the wrapper owns it, and dropping the last
    reference to a deep chain of wrapped nodes frees it recursively (one C-level
    deallocation per node) instead of through autograd's iterative deleter. An
    instance holds the wrappers below some nodes (its *tops*) and sits in their
    ``metadata``; once every top is dead, :meth:`release` drops the wrappers top-down,
    each only when nothing else holds it, so that each drop frees exactly one node:
    its consumers are gone and its producers are still held.

    A node something else still holds (a tensor the caller kept, a wrapper of their
    own, a node of another graph) is left alone: a new instance with it as a top
    takes what is below it and finishes when it dies; until then those nodes use
    memory, never the stack. Each wrapper has one holder at most (``_held``): a later
    walk over the same nodes leaves them to it, so releases never wait on each other.

    Args:
        nodes (list): Wrapper of each node of the graph, ``None`` where not held here (the
            tops, as holding them would be a reference cycle through their metadata, and
            nodes another instance holds).
        edges (list): Per node, its input edges ``(child index or -1, output number)``.
        tops (list of int): Indices of the nodes whose death starts the release.
    """

    __slots__ = ("nodes", "edges", "tops")

    # Bound to the class, not looked up as globals: a release may run at interpreter shutdown.
    key: ClassVar[str] = RELEASE_KEY
    _held: ClassVar[set[int]] = set()  # id() of every wrapper some instance holds
    _held_lock: ClassVar[threading.Lock] = threading.Lock()
    _local: ClassVar[threading.local] = threading.local()  # .queue: releases waiting in this thread

    def __init__(
        self, nodes: list[Optional[Node]], edges: list[tuple[tuple[int, int], ...]], tops: list[int]
    ) -> None:
        self.nodes = nodes
        self.edges = edges
        self.tops = tops

    def attach(self, top: Node) -> None:
        """Start this release when ``top`` dies (with every other top)."""
        top.metadata.setdefault(self.key, []).append(self)

    def release(self) -> None:
        """Free the held nodes one at a time, consumers first (see the class docstring).

        A release started by a node that another release frees waits for that one to
        finish, so releases never nest, whatever the number of instances.
        """
        if self.nodes is None:
            return
        local = self._local
        queue = getattr(local, "queue", None)
        if queue is not None:
            queue.append(self)
            return
        local.queue = queue = [self]
        try:
            while queue:
                queue.pop()._run()
        finally:
            local.queue = None

    def _run(self, _getrefcount: Callable[[Any], int] = sys.getrefcount) -> None:
        nodes, edges, tops = self.nodes, self.edges, self.tops
        if nodes is None:
            return
        self.nodes = self.edges = self.tops = None
        held = self._held
        box = [object()]
        # A wrapper held by `nodes` and the local `wrapper` only; one more is a holder elsewhere.
        limit = _getrefcount(box[0]) + 1
        ready = [child for top in tops for child, _ in edges[top] if child >= 0]
        push, pop = ready.append, ready.pop
        try:
            while ready:
                i = pop()
                wrapper = nodes[i]
                # Skip one not held here (already freed, or another instance's) or still held
                # elsewhere: by a consumer not freed yet (it comes back here when that one
                # goes) or from outside (see _hand_over).
                if wrapper is None or _getrefcount(wrapper) > limit:
                    continue
                held.discard(id(wrapper))
                nodes[i] = wrapper = None  # frees this node only: its producers are still held
                for child, _ in edges[i]:
                    if child >= 0:
                        push(child)
            if any(wrapper is not None for wrapper in nodes):
                self._hand_over(nodes, edges)
        except BaseException:
            # Interrupted: drop the rest unordered, but never leave an id claimed for a
            # wrapper that no longer exists (a new one may get the same id).
            held.difference_update(id(wrapper) for wrapper in nodes if wrapper is not None)
            raise

    def _hand_over(self, nodes: list[Optional[Node]], edges: list[tuple[tuple[int, int], ...]]) -> None:
        # What is left hangs below nodes held from outside: those with no consumer left here.
        consumed = [False] * len(nodes)
        for i, wrapper in enumerate(nodes):
            if wrapper is not None:
                for child, _ in edges[i]:
                    if child >= 0:
                        consumed[child] = True
        tops = [i for i, wrapper in enumerate(nodes) if wrapper is not None and not consumed[i]]
        survivors = [nodes[i] for i in tops]
        for i in tops:
            self._held.discard(id(nodes[i]))
            nodes[i] = None
        rest = type(self)(nodes, edges, tops)
        for wrapper in survivors:
            rest.attach(wrapper)

    def __del__(self) -> None:
        self.release()


def defer_release(nodes: list[Node], edges: list[tuple[tuple[int, int], ...]]) -> None:
    """Make the root (``nodes[0]``) free the nodes below it one at a time when it dies.

    Nodes a :class:`DeferredRelease` already holds (from an earlier walk over them) are
    left to it.
    """
    if len(nodes) < 2 or not isinstance(getattr(nodes[0], "metadata", None), dict):
        return
    held = DeferredRelease._held
    below = nodes[1:]  # never the root: it would hold itself through its metadata
    ids = list(map(id, below))
    with DeferredRelease._held_lock:
        if held.isdisjoint(ids):  # the usual case: nodes no earlier walk holds
            mine: list[Optional[Node]] = [None, *below]
        else:
            mine = [None] + [None if key in held else w for key, w in zip(ids, below)]
            ids = [id(w) for w in mine if w is not None]
        held.update(ids)
    if ids:
        DeferredRelease(mine, edges, [0]).attach(nodes[0])


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
