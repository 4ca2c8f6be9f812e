"""Cached promise paths: the compiled plan of one graph structure, and its bounded cache.

A :class:`Plan` is a flat list of steps in traversal order: read a leaf, read a
kept output (or a value a consumer kept), replay a forward (the resolved Promise
Branches), rebuild a sum's operand from its kept output, solve for a value rotated
into a kept output (rotary embeddings, :mod:`.rotation`), apply a rule, capture a
requested tensor's relevance. It refers to nodes by their index in the
auxiliary graph, never to nodes or tensors, so a cached plan holds no memory of
the call that made it. A later call whose graph has the same signature (node
types, edges, output shapes, requested tensors) runs the steps directly: no
pruning, no ordering, no promise search.

:class:`PlanCache` is a small LRU keyed by the full signature; a lookup compares
the whole key (dictionary equality), so a hash collision can never replay a
stale plan.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

from ..rules.base import OpSpec

# A value source: ("kept", slot, 0) - the node kept this operand; ("edge", child, k) - output k
# of node `child`, recovered earlier in the plan.
# An output source (a rule's own output value): ("consumer", consumer, slot, spec) - a consumer
# kept it as its operand; ("root",) - it is the explained output itself; ("value", node) - a
# promise rebuilt it earlier in the plan; ("rectified", consumer, spec, proven) - not the output but
# max(output, 0), kept by a ReLU consumer (RuleContext.rectified; proven: the graph guarantees that
# relevance vanishes where it is 0, RuleContext.rectified_vanishes); ("storage", consumer, slot, spec)
# - a consumer kept a view of it, whose storage is the whole output (walker.output_from_storage);
# ("routed", recipe) - rebuilt from copies consumers kept behind routing nodes with an inverse
# (promise.output_rebuilt_by_routing).
Source = Tuple[str, int, int]

LEAF, KEPT_OUTPUT, REPLAY, PROPAGATE, CAPTURE, KEPT_BY_CONSUMER, FROM_OUTPUT, UNROTATE = range(8)


@dataclass
class Plan:
    """Flat list of steps for one graph structure, plus what planning learnt about it.

    Attributes:
        steps: Tuples ``(kind, node, ...)``; see :mod:`.walker` for their meaning.
        relevant: Number of nodes on a path from the output to a requested tensor.
        total: Number of nodes in the graph.
        promises: The Promise objects made while planning (indices only).
        fallback_nodes: Type names of nodes handled by the opt-in fallback.
        releases: Step index -> recovered values to drop after that step.
        saved_schedule: When the walk reads each node's saved tensors for the last time,
            filled on first use by :func:`~.saved.saved_schedule`.
    """

    steps: list[tuple] = field(default_factory=list)
    relevant: int = 0
    total: int = 0
    promises: list[Any] = field(default_factory=list)
    fallback_nodes: list[str] = field(default_factory=list)
    releases: dict[int, list[int]] = field(default_factory=dict)
    saved_schedule: Optional[tuple] = None

    def add_leaf(self, node: int) -> None:
        self.steps.append((LEAF, node))

    def add_kept_output(self, node: int, spec: OpSpec) -> None:
        self.steps.append((KEPT_OUTPUT, node, spec))

    def add_kept_by_consumer(self, node: int, consumer: int, slot: int, spec: OpSpec) -> None:
        self.steps.append((KEPT_BY_CONSUMER, node, consumer, slot, spec))

    def add_from_output(self, chain: tuple, origin: int, spec: OpSpec, slot: int, output_source: tuple,
                        sources: tuple) -> None:
        # The operand in `slot` of `origin` rebuilt from origin's output (kept by a consumer, see
        # `output_source`) and its other operands (`sources`, one per slot, None at `slot`); `chain`:
        # the operand's producer and the producers behind it that only reshape (same value, reshaped).
        self.steps.append((FROM_OUTPUT, chain[0], origin, spec, slot, output_source, sources, chain))

    def add_unrotate(self, chain: tuple, rotation: tuple, output_recipe: tuple, replays: tuple) -> None:
        # chain[0]'s value rebuilt from the rotation's kept output (engine.rotation), the nodes below
        # it in `chain` (routing nodes with an inverse, then the node that can be replayed) by those
        # inverses; `replays` ((node, spec, sources), bottom first) recompute them all where that fails.
        self.steps.append((UNROTATE, chain[0], rotation, output_recipe, chain, replays))

    def add_replay(self, node: int, spec: OpSpec, sources: tuple) -> None:
        self.steps.append((REPLAY, node, spec, sources))

    def add_propagate(
        self,
        node: int,
        spec: OpSpec,
        sources: tuple,
        relevant: tuple,
        edges: tuple,
        output_source: Optional[tuple],
        bias_source: Optional[Source] = None,
        affine_source: Optional[tuple] = None,
    ) -> None:
        # bias_source: where the value of a bias folded into this node's rule comes from;
        # affine_source: (node, spec, sources) of a batch norm merged into it (spec.affine).
        self.steps.append((PROPAGATE, node, spec, sources, relevant, edges, output_source, bias_source, affine_source))

    def add_capture(self, node: int, output_nr: int, request: int) -> None:
        self.steps.append((CAPTURE, node, output_nr, request))

    def release_after_last_use(self) -> None:
        """Record, per step, the recovered values no later step reads, so the executor drops them.

        Keeps the memory of rebuilt operands to what is still needed (a backward pass frees
        saved tensors as it goes; this is the engine's counterpart).
        """
        last_use: dict[int, int] = {}
        for index, step in enumerate(self.steps):
            if step[0] in (PROPAGATE, REPLAY):
                merged = step[8][2] if step[0] == PROPAGATE and step[8] is not None else ()
                for source in step[3] + step[7:8] + merged:  # a folded bias, a merged batch norm's bias
                    if source is not None and source[0] == "edge":
                        last_use[source[1]] = index
                if step[0] == PROPAGATE and step[6] is not None and step[6][0] == "value":
                    last_use[step[6][1]] = index  # the node's own rebuilt output, read by its rule
            elif step[0] == FROM_OUTPUT:
                for source in step[6]:
                    if source is not None:
                        last_use[source[1]] = index
            elif step[0] == UNROTATE:  # the fallback replays read earlier values (and the chain's own)
                for _, _, sources in step[5]:
                    for source in sources:
                        if source is not None and source[0] == "edge":
                            last_use[source[1]] = index
                for node in step[4]:
                    last_use.setdefault(node, index)  # a chain node nobody reads later goes now
        produced = {step[1] for step in self.steps if step[0] in (LEAF, KEPT_OUTPUT, REPLAY, KEPT_BY_CONSUMER)}
        produced.update(node for step in self.steps if step[0] == FROM_OUTPUT for node in step[7])
        produced.update(node for step in self.steps if step[0] == UNROTATE for node in step[4])
        self.releases = {}
        for node, index in last_use.items():
            if node in produced:
                self.releases.setdefault(index, []).append(node)

    def count(self, kind: int) -> int:
        return sum(1 for step in self.steps if step[0] == kind)


class PlanCache:
    """Bounded, thread-safe LRU of plans keyed by graph signature.

    Args:
        maxsize (int): Number of plans kept; 0 disables caching.
    """

    def __init__(self, maxsize: int = 8) -> None:
        if maxsize < 0:
            raise ValueError("maxsize must be >= 0")
        self.maxsize = maxsize
        self._plans: "OrderedDict[tuple, Plan]" = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, signature: tuple) -> Optional[Plan]:
        with self._lock:
            plan = self._plans.get(signature)
            if plan is None:
                self.misses += 1
                return None
            self._plans.move_to_end(signature)
            self.hits += 1
            return plan

    def put(self, signature: tuple, plan: Plan) -> None:
        if self.maxsize == 0:
            return
        with self._lock:
            self._plans[signature] = plan
            self._plans.move_to_end(signature)
            while len(self._plans) > self.maxsize:
                self._plans.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._plans)
