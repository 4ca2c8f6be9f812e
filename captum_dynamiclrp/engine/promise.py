"""Promise resolver: rebuild forward operands that autograd did not keep.

Vocabulary (paper, Sec. 4.2 and Appendix C):

* **Promise** - made at an *origin* node whose rule needs operands the node does
  not keep. *Strict* promise-generating ops (add, sub, sum, mean, addmm whose
  activation operand was not saved, ...) make one whenever their rule runs;
  *dependent* ones (cat, stack, add, ... met *inside* a branch) make a nested
  promise only because a branch needs their output and they have several
  operands to recover. Nested promises form a **Promise Tree**.
* **Promise Branch** - walks from one missing operand down the producer chain,
  recording the nodes it passes (its *forward chain*), until it meets an
  **Arg Node**: a leaf, a node that kept its result (``ReluBackward0``), a node
  whose kept operands give its result by one replay (``GeluBackward0``,
  ``AddmmBackward0``), a node rotated into a kept output (rotary embeddings, solved for:
  :mod:`.rotation`), or a node an earlier branch already resolved
  (**aggregation**: several branches share one recovered value). The operand is
  then the forward chain replayed upwards from the Arg Node.
* **Pre-Promise** - the paper lets a branch "reach ahead" of the traversal
  frontier to break the residual deadlock (Fig. 2). Rebuilding forward values
  never needs relevance, so here *every* branch reaches ahead, at once, when its
  origin is traversed; relevance itself is never deferred and reaches each node
  on a branch later, in traversal order, exactly once. That is the paper's
  Pre-Promise promotion applied uniformly, and it makes the deadlock impossible.

* **Operand from the output** (not in the paper) - where a consumer kept a sum's output and
  all its operands but one are at hand without a replay, that one is ``z - b``
  (``OpSpec.operand_from_output``): one subtraction instead of replaying its producer. That is
  a pre-norm transformer's residual branch (attention or MLP output projection), whose output
  only the sum reads; the norms keep both the sum and the stream it started from.

Invariants (asserted in ``tests/test_reference_engine.py``):

1. every node's forward is replayed at most once per call (values are memoised),
   so resolution costs O(nodes + edges) in total;
2. a branch never walks into a node of an unfinished branch (branches are
   resolved depth-first and the graph is acyclic);
3. each branch ends at exactly one Arg Node or nested Promise.

The resolver *plans*: it appends value steps (read a leaf, read a kept output,
replay a forward) to the plan; the executor in :mod:`.walker` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AbstractSet, Mapping, Optional, Sequence, Union

import torch

from ..errors import UnrecoverableOperandError, UnsupportedOperationError
from ..rules.base import OpSpec
from .graph import LEAF_TYPE, AutogradGraph
from .plan import Plan, Source
from .rotation import rotation_of


def output_kept_by_consumer(
    graph: AutogradGraph, table: Mapping[str, OpSpec], consumers: Sequence[tuple[int, int]], output_nr: int = 0
) -> Optional[tuple]:
    """A consumer that kept a node's output ``output_nr`` as its operand, as ``(consumer, slot, spec)``."""
    for consumer, slot in consumers:
        if graph.edges[consumer][slot][1] != output_nr:
            continue
        spec = table.get(graph.types[consumer])
        if spec is not None and spec.kept_inputs is not None:
            if spec.kept_inputs(graph.nodes[consumer])[slot] is not None:
                return (consumer, slot, spec)
    return None


# Shape-only ops (OpSpec.reshapes) looked through when searching a kept output; O(1) per node.
MAX_RESHAPES = 3


def _through_reshapes(
    graph: AutogradGraph, table: Mapping[str, OpSpec], all_consumers: Sequence[Sequence[tuple[int, int]]], node: int
) -> list[tuple[int, int]]:
    """Consumers ``(consumer, slot)`` of ``node``'s output 0, and of chains of reshapes of it."""
    found: list[tuple[int, int]] = []
    frontier = [node]
    for _ in range(MAX_RESHAPES + 1):
        following = []
        for current in frontier:
            for consumer, slot in all_consumers[current]:
                if graph.edges[consumer][slot][1] != 0:
                    continue
                found.append((consumer, slot))
                spec = table.get(graph.types[consumer])
                if spec is not None and spec.reshapes and len(graph.nodes[consumer]._input_metadata) == 1:
                    following.append(consumer)
        if not following:
            break
        frontier = following
    return found


def output_kept_through_reshapes(
    graph: AutogradGraph, table: Mapping[str, OpSpec], all_consumers: Sequence[Sequence[tuple[int, int]]], node: int
) -> Optional[tuple]:
    """A consumer that kept ``node``'s output 0, or a reshape of it, as its operand: ``(consumer, slot, spec)``.

    The kept value may have a reshaped shape; the reader reshapes it back (same elements, same order).
    """
    for consumer, slot in _through_reshapes(graph, table, all_consumers, node):
        spec = table.get(graph.types[consumer])
        if spec is not None and spec.kept_inputs is not None:
            if spec.kept_inputs(graph.nodes[consumer])[slot] is not None:
                return (consumer, slot, spec)
    return None


MAX_VIEWS = 6  # longest chain of views looked through (GPT-2's q: view, split, view, transpose)
MAX_VIEW_READERS = 16  # readers examined in all, so that the search stays O(1) per node
MAX_ROUTING = 8  # routing nodes inverted on one path (a repeated GQA value: 7)


def output_viewed_by_consumer(
    graph: AutogradGraph, table: Mapping[str, OpSpec], all_consumers: Sequence[Sequence[tuple[int, int]]], node: int
) -> Optional[tuple]:
    """A consumer that kept a view of ``node``'s output 0, reached through views (``OpSpec.view``) only: ``(consumer, slot, spec)``.

    For ops whose output is a fresh contiguous tensor (``OpSpec.fresh_output``) the kept view's
    storage is that whole output; the executor rebuilds it from there (:func:`~.walker.output_from_storage`)
    after checking that nothing wrote to it. A q/k/v projection split, reshaped and transposed
    into fused attention is the case this is for.
    """
    frontier: list[tuple[int, Optional[int]]] = [(node, 0)]  # (node, output read; None: any)
    examined = 0
    for _ in range(MAX_VIEWS + 1):
        following: list[tuple[int, Optional[int]]] = []
        for current, output_nr in frontier:
            for consumer, slot in all_consumers[current]:
                examined += 1
                if examined > MAX_VIEW_READERS:
                    return None
                if output_nr is not None and graph.edges[consumer][slot][1] != output_nr:
                    continue
                spec = table.get(graph.types[consumer])
                if spec is None:
                    continue
                if spec.kept_inputs is not None and spec.kept_inputs(graph.nodes[consumer])[slot] is not None:
                    return (consumer, slot, spec)
                if spec.view:  # its outputs share the storage: look further
                    following.append((consumer, None))
        if not following:
            return None
        frontier = following
    return None


def output_rebuilt_by_routing(
    graph: AutogradGraph, table: Mapping[str, OpSpec], all_consumers: Sequence[Sequence[tuple[int, int]]], node: int
) -> Optional[tuple]:
    """How to rebuild ``node``'s output 0 from values consumers kept behind invertible routing nodes.

    Returns a recipe, ``("kept", consumer, slot, spec)`` (a consumer kept the value) or
    ``("invert", routing_node, spec, parts)`` (the value is the operand of a node with an
    ``OpSpec.inverse``, rebuilt from its outputs, one recipe per output in ``parts``), or ``None``.
    Every output of a split must be found. Looks at most ``MAX_ROUTING`` nodes deep and at
    ``MAX_VIEW_READERS`` readers in all: O(1) per node. Exact: the rebuilt value has the forward's
    bits (clones and cats copy, the rest are views). That is q, k and v projected together, split,
    transposed and made contiguous for attention, which keeps the copies, grouped-query keys
    and values repeated per head (view, transpose, unsqueeze, expand, copy, view), and keys and
    values appended to a key/value cache (a ``cat`` with the untracked past, empty or not).
    """
    return _routing_recipe(graph, table, all_consumers, node, 0, 0, [MAX_VIEW_READERS])


def _routing_recipe(graph: AutogradGraph, table: Mapping[str, OpSpec], all_consumers: Sequence[Sequence[tuple[int, int]]],
                    node: int, output_nr: int, depth: int, budget: list[int]) -> Optional[tuple]:
    # A module-level function, not a closure: a recursive closure is a reference cycle that would
    # keep the graph (and so the forward's tensors) alive until the cyclic collector runs.
    readers = [(c, slot) for c, slot in all_consumers[node] if graph.edges[c][slot][1] == output_nr]
    budget[0] -= len(readers)
    if budget[0] < 0:
        return None
    kept = output_kept_by_consumer(graph, table, readers, output_nr)
    if kept is not None:
        return ("kept",) + kept
    if depth == MAX_ROUTING:
        return None
    for consumer, _ in readers:
        spec = table.get(graph.types[consumer])
        # Inverted for its one tracked operand (the others, if any, are constants: a cat's).
        if spec is None or spec.inverse is None or sum(child >= 0 for child, _ in graph.edges[consumer]) != 1:
            continue
        parts = []
        for k in range(len(graph.nodes[consumer]._input_metadata)):
            part = _routing_recipe(graph, table, all_consumers, consumer, k, depth + 1, budget)
            if part is None:
                break
            parts.append(part)
        else:
            return ("invert", consumer, spec, tuple(parts))
    return None


def recipe_nodes(recipe: tuple) -> list[int]:
    """The nodes whose saved state a recipe of :func:`output_rebuilt_by_routing` reads."""
    if recipe[0] == "kept":
        return [recipe[1]]
    return [recipe[1]] + [node for part in recipe[3] for node in recipe_nodes(part)]


def output_rectified_by_consumer(
    graph: AutogradGraph, table: Mapping[str, OpSpec], all_consumers: Sequence[Sequence[tuple[int, int]]], node: int
) -> Optional[tuple]:
    """A ReLU (``OpSpec.rectifies``) of ``node``'s output 0, or of a reshape of it, that kept its result: ``(consumer, spec)``.

    Its result is ``max(output, 0)`` up to the reshape (applied elementwise, the two commute).
    """
    for consumer, _ in _through_reshapes(graph, table, all_consumers, node):
        spec = table.get(graph.types[consumer])
        if spec is not None and spec.rectifies and spec.kept_output is not None:
            if spec.kept_output(graph.nodes[consumer]) is not None:
                return (consumer, spec)
    return None


# How many nodes the proof below may look through past the ReLU (max pools, reshapes, ReLUs):
# keeps it O(1) per node.
MAX_ZERO_PRESERVING = 8


def relevance_vanishes_where_rectified(
    graph: AutogradGraph,
    table: Mapping[str, OpSpec],
    all_consumers: Sequence[Sequence[tuple[int, int]]],
    node: int,
    rectifier: int,
    folded_sums: AbstractSet[int],
) -> bool:
    """Whether relevance at ``node``'s output 0 is zero, by the graph's structure, wherever the
    kept result ``max(z, 0)`` of its ReLU consumer ``rectifier`` is zero.

    True when (1) all of ``node``'s output 0 reaches ``rectifier``, through reshapes only, so no
    other reader adds relevance, and (2) every reader of the ReLU's result hands it relevance of
    the form ``y * g`` (``OpSpec.scales_operands``), or passes on that property to ``y``
    (``OpSpec.keeps_zeros``: max pools, ReLUs; reshapes), looked through up to
    :data:`MAX_ZERO_PRESERVING` nodes. The explained output (node 0) and folded bias sums
    (which pass relevance on unchanged) end the proof with ``False``. Operand values the readers
    use are the ReLU's own (kept, replayed exactly, or ``z - b`` with ``y = 0`` giving exactly 0).
    """
    types = graph.types
    current = node
    for _ in range(MAX_RESHAPES + 2):
        readers = [pair for pair in all_consumers[current] if graph.edges[pair[0]][pair[1]][1] == 0]
        if len(readers) != 1:
            return False
        consumer = readers[0][0]
        if consumer == rectifier:
            break
        spec = table.get(types[consumer])
        if spec is None or not spec.reshapes:
            return False
        current = consumer
    else:
        return False
    budget = MAX_ZERO_PRESERVING
    stack = [rectifier]
    while stack:
        current = stack.pop()
        if current == 0 or not all_consumers[current]:
            return False  # the seed arrives here, or nothing does that the proof can see
        for consumer, _ in all_consumers[current]:
            spec = table.get(types[consumer])
            if spec is None or consumer in folded_sums:
                return False
            if spec.scales_operands:
                continue
            if not (spec.keeps_zeros or spec.reshapes) or budget == 0:
                return False
            budget -= 1
            stack.append(consumer)
    return True


@dataclass
class PromiseBranch:
    """One missing operand being recovered.

    Attributes:
        promise: The promise this branch belongs to.
        start: First node of the branch (producer of the missing operand).
        forward_chain: Nodes passed on the way down, origin side first; replayed in reverse.
        arg: The Arg Node index, or the nested :class:`Promise` the branch ended in.
        aggregated: True when the branch ended at a value another branch had already recovered.
    """

    promise: "Promise"
    start: int
    forward_chain: list[int] = field(default_factory=list)
    arg: Union[int, "Promise", None] = None
    aggregated: bool = False


@dataclass
class Promise:
    """A node's request for operands it did not keep.

    Attributes:
        origin: Index of the origin node.
        kind: ``"strict"`` (made by a rule) or ``"dependent"`` (made inside a branch).
        parent: The branch this promise is nested in (Promise Tree), if any.
        branches: One branch per missing operand slot.
    """

    origin: int
    kind: str
    parent: Optional[PromiseBranch] = None
    branches: list[PromiseBranch] = field(default_factory=list)


# Dtypes in which an operand is rebuilt as a difference of the output and the other operands.
_PRECISE_ENOUGH = (torch.float32, torch.float64)


class PromiseResolver:
    """Plans the recovery of forward values for one graph.

    Args:
        graph: The auxiliary graph.
        table: Rule table (node type name to spec).
        plan: Plan receiving the value steps.
    """

    def __init__(
        self,
        graph: AutogradGraph,
        table: Mapping[str, OpSpec],
        plan: Plan,
        consumers: Sequence[Sequence[tuple[int, int]]],
    ) -> None:
        self.graph = graph
        self.consumers = consumers
        self.table = table
        self.plan = plan
        self.resolved: set[int] = set()
        self.promises: list[Promise] = []
        self.replays_per_node: dict[int, int] = {}

    # -- per-node facts ---------------------------------------------------------------------
    def _kept_inputs(self, node: int) -> tuple:
        spec = self.table.get(self.graph.types[node])
        if spec is None or spec.kept_inputs is None:
            return (None,) * len(self.graph.edges[node])
        return spec.kept_inputs(self.graph.nodes[node])

    def input_sources(self, node: int, slots, output_source: Optional[tuple] = None) -> list[Optional[Source]]:
        """Where each listed input slot's value comes from; starts promises for missing ones.

        ``output_source``: where the node's own output can be read (see :mod:`.plan`), if known. A
        ``("consumer", ...)`` source lets an op with ``OpSpec.operand_from_output`` (a sum) rebuild
        one operand from it and the others, instead of replaying that operand's producer.
        """
        kept = self._kept_inputs(node)
        sources: list[Optional[Source]] = [None] * len(self.graph.edges[node])
        missing = []
        for slot in slots:
            child, k = self.graph.edges[node][slot]
            if kept[slot] is not None:
                sources[slot] = ("kept", slot, 0)
            elif child >= 0:
                sources[slot] = ("edge", child, k)
                missing.append(child)
        rebuilt = self._slot_rebuilt_from_output(node, output_source, missing) if missing else None
        if rebuilt is not None:  # every other operand is needed, relevant or not (all tracked, distinct)
            missing = [child for slot, (child, _) in enumerate(self.graph.edges[node]) if slot != rebuilt]
        if missing:
            promise = Promise(origin=node, kind="strict")
            self.promises.append(promise)
            for child in missing:
                self._resolve_branch(PromiseBranch(promise, child))
        if rebuilt is not None:
            self._emit_from_output(node, rebuilt, output_source)
        return sources

    # -- operands rebuilt from a kept output ----------------------------------------------------
    def _at_hand(self, node: int) -> bool:
        """Whether ``node``'s value is recovered without replaying any forward."""
        if node in self.resolved or self.graph.types[node] == LEAF_TYPE:
            return True
        spec = self.table.get(self.graph.types[node])
        if spec is not None and spec.kept_output is not None and spec.kept_output(self.graph.nodes[node]) is not None:
            return True
        return self._kept_by_consumer(node) is not None

    def _slot_rebuilt_from_output(self, node: int, output_source: Optional[tuple], missing: list[int]) -> Optional[int]:
        """The one operand slot of ``node`` worth rebuilding from its kept output, if any.

        Conditions: the spec can (``operand_from_output``), a consumer kept the output, every
        operand is tracked and distinct, exactly one missing operand is not at hand (the others
        are), and it has the output's shape and dtype (a broadcast operand cannot be rebuilt so),
        which is float32 or float64: the difference carries a rounding error at the scale of the
        output, and in 16-bit formats that is too coarse for a branch much smaller than the
        stream it was added to (a replay's error is at the branch's own scale). O(1) per node.
        """
        graph = self.graph
        spec = self.table.get(graph.types[node])
        if spec is None or spec.operand_from_output is None or output_source is None or output_source[0] != "consumer":
            return None
        edges = graph.edges[node]
        children = [child for child, _ in edges]
        if min(children) < 0 or len(set(children)) != len(children):
            return None
        dear = [child for child in missing if not self._at_hand(child)]
        if len(dear) != 1:
            return None
        slot = children.index(dear[0])
        child, k = edges[slot]
        produced, output = graph.nodes[child]._input_metadata, graph.nodes[node]._input_metadata[0]
        if k != 0 or len(produced) != 1 or tuple(produced[0].shape) != tuple(output.shape):
            return None
        if produced[0].dtype != output.dtype or output.dtype not in _PRECISE_ENOUGH:
            return None
        if not all(self._at_hand(other) for other in children if other not in missing):  # missing: checked
            return None
        return slot

    def _emit_from_output(self, node: int, slot: int, output_source: tuple) -> None:
        """Plan the rebuild of ``node``'s operand ``slot``, handed on through producers that only reshape."""
        graph = self.graph
        chain = [graph.edges[node][slot][0]]
        for _ in range(MAX_RESHAPES):
            current = chain[-1]
            spec = self.table.get(graph.types[current])
            if spec is None or not spec.reshapes or len(graph.edges[current]) != 1:
                break
            below, k = graph.edges[current][0]
            if below < 0 or k != 0 or below in self.resolved or len(graph.nodes[below]._input_metadata) != 1:
                break
            chain.append(below)
        sources = tuple(None if other == slot else ("edge",) + edge for other, edge in enumerate(graph.edges[node]))
        spec = self.table[graph.types[node]]
        self.plan.add_from_output(tuple(chain), node, spec, slot, output_source, sources)
        for produced in chain:
            self._mark(produced)

    def _kept_by_consumer(self, node: int) -> Optional[tuple]:
        if len(self.graph.nodes[node]._input_metadata) != 1:
            return None
        return output_kept_by_consumer(self.graph, self.table, self.consumers[node])

    # -- resolution ---------------------------------------------------------------------------
    def _unknown_slots(self, node: int, kept: tuple) -> list[int]:
        return [
            slot
            for slot, (child, _) in enumerate(self.graph.edges[node])
            if kept[slot] is None and child >= 0 and child not in self.resolved
        ]

    def _emit_replay(self, node: int, kept: tuple) -> None:
        self.plan.add_replay(node, self.table[self.graph.types[node]], self._replay_sources(node, kept))
        self._mark(node)

    def _replay_sources(self, node: int, kept: tuple) -> tuple:
        sources: list[Optional[Source]] = []
        for slot, (child, k) in enumerate(self.graph.edges[node]):
            if kept[slot] is not None:
                sources.append(("kept", slot, 0))
            elif child >= 0:
                sources.append(("edge", child, k))
            else:
                sources.append(None)
        return tuple(sources)

    def _chain_to_replay(self, node: int) -> Optional[list[int]]:
        """``node`` and the nodes below it down to one that its kept operands and leaves (a bias)
        replay: each above that one a single-operand routing node with an inverse. ``None`` if
        there is no such chain."""
        graph = self.graph
        chain = [node]
        for _ in range(MAX_ROUTING):
            current = chain[-1]
            spec = self.table.get(graph.types[current])
            if spec is None or spec.forward is None:
                return None
            unknown = self._unknown_slots(current, self._kept_inputs(current))
            if all(graph.types[graph.edges[current][slot][0]] == LEAF_TYPE for slot in unknown):
                return chain
            if spec.inverse is None or len(graph.edges[current]) != 1 or graph.edges[current][0][1] != 0:
                return None
            below = graph.edges[current][0][0]
            if graph.types[below] == LEAF_TYPE or len(graph.nodes[below]._input_metadata) != 1:
                return None
            chain.append(below)
        return None

    def _emit_unrotate(self, node: int) -> bool:
        """Plan ``node``'s value as the solution of a rotation whose output a consumer kept
        (:mod:`.rotation`), with the nodes below it down to a replayable one; ``False`` if not."""
        rotation = rotation_of(self.graph, self.consumers, node)
        if rotation is None:
            return False
        output_recipe = output_rebuilt_by_routing(self.graph, self.table, self.consumers, rotation[0])
        chain = self._chain_to_replay(node) if output_recipe is not None else None
        if chain is None:
            return False
        bottom = chain[-1]
        unknown = self._unknown_slots(bottom, self._kept_inputs(bottom))
        for leaf in dict.fromkeys(self.graph.edges[bottom][slot][0] for slot in unknown):  # for the replay
            self.plan.add_leaf(leaf)
            self._mark(leaf)
        replays = tuple(
            (below, self.table[self.graph.types[below]], self._replay_sources(below, self._kept_inputs(below)))
            for below in reversed(chain)
        )
        self.plan.add_unrotate(tuple(chain), rotation, output_recipe, replays)
        for below in chain:
            self._mark(below)
        return True

    def _mark(self, node: int) -> None:
        assert node not in self.resolved, "invariant 1: a node's value is recovered once"
        self.resolved.add(node)
        self.replays_per_node[node] = self.replays_per_node.get(node, 0) + 1

    def _resolve_branch(self, first: PromiseBranch) -> None:
        """Walk a branch (and any nested promises) to Arg Nodes, then plan the replays upwards."""
        graph = self.graph
        # Work items: ("walk", branch, node) | ("nested", branch, node) | ("finish", branch).
        work: list[tuple] = [("walk", first, first.start)]
        first.promise.branches.append(first)
        while work:
            item = work.pop()
            kind, branch = item[0], item[1]
            if kind == "finish":
                for node in reversed(branch.forward_chain):
                    self._emit_replay(node, self._kept_inputs(node))
                continue
            node = item[2]
            if kind == "nested":
                self._emit_replay(node, self._kept_inputs(node))
                work.append(("finish", branch))
                continue
            # kind == "walk"
            if node in self.resolved:
                branch.arg, branch.aggregated = node, True
                work.append(("finish", branch))
                continue
            name = graph.types[node]
            if name == LEAF_TYPE:
                self.plan.add_leaf(node)
                self._mark(node)
                branch.arg = node
                work.append(("finish", branch))
                continue
            spec = self.table.get(name)
            if spec is None:
                raise UnsupportedOperationError(name)
            if spec.kept_output is not None and spec.kept_output(graph.nodes[node]) is not None:
                self.plan.add_kept_output(node, spec)
                self._mark(node)
                branch.arg = node
                work.append(("finish", branch))
                continue
            # A consumer that kept this node's output as its operand makes it an Arg Node too.
            found = self._kept_by_consumer(node)
            if found is not None:
                self.plan.add_kept_by_consumer(node, *found)
                self._mark(node)
                branch.arg = node
                work.append(("finish", branch))
                continue
            # Rotated into a kept output (rotary embeddings): solved for instead of replayed.
            if self._emit_unrotate(node):
                branch.arg = node
                work.append(("finish", branch))
                continue
            if spec.forward is None:
                raise UnrecoverableOperandError(f"{name} keeps no forward value and cannot be replayed")
            kept = self._kept_inputs(node)
            unknown = self._unknown_slots(node, kept)
            if not unknown:
                self._emit_replay(node, kept)
                branch.arg = node
                work.append(("finish", branch))
            elif len(unknown) == 1:
                branch.forward_chain.append(node)
                work.append(("walk", branch, graph.edges[node][unknown[0]][0]))
            else:
                nested = Promise(origin=node, kind="dependent", parent=branch)
                self.promises.append(nested)
                branch.arg = nested
                work.append(("nested", branch, node))
                children = []
                for slot in unknown:
                    child = graph.edges[node][slot][0]
                    if child not in children:
                        children.append(child)
                for child in reversed(children):
                    sub = PromiseBranch(nested, child)
                    nested.branches.insert(0, sub)
                    work.append(("walk", sub, child))
