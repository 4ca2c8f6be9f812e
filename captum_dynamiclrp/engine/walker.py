"""Graph walker, part 2: the traversal that plans, and the executor that runs a plan.

Traversal (paper, Alg. 2): Kahn's algorithm from the output over the pruned
graph. A node becomes ready once every relevant consumer has propagated to it;
ready nodes sit on a stack, so the walk goes depth-first (the paper's
heuristic) while never visiting a node before all its relevance has arrived.
Each node is visited once, each edge looked at once: O(nodes + edges).

At each visited node the planner asks the rule which operands it reads; the
:class:`~.promise.PromiseResolver` plans how to get the missing ones. The
result is a :class:`~.plan.Plan`, which :func:`execute` runs.

Bias folding (:func:`bias_folds`): a linear map whose bias PyTorch added by a
separate sum (``mm`` + ``add`` instead of one ``addmm``, depending on memory
layout) gets that bias in its own rule, and the sum passes relevance on
unchanged, so both spellings of one layer give the same relevance.

Batch-norm merging (:func:`affine_merges`, setting ``batch_norm="merge"``): a convolution whose
output only a batch norm reads gets that batch norm's per-channel scale and shift in its own rule
(``RuleContext.affine``), with the batch norm's output as its own, and the batch norm passes
relevance on unchanged.
"""

from __future__ import annotations

from typing import AbstractSet, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..errors import DynamicLRPError, UnsupportedOperationError
from ..rules import RULE_TABLE
from ..rules.base import FOLDED_BIAS_SUM, MERGED_AFFINE, OpSpec, RuleContext, RuleSettings
from .graph import LEAF_TYPE, AutogradGraph, consumer_edges, relevant_nodes
from .plan import CAPTURE, FROM_OUTPUT, KEPT_BY_CONSUMER, KEPT_OUTPUT, LEAF, PROPAGATE, REPLAY, UNROTATE, Plan
from .promise import (
    PromiseResolver,
    output_kept_through_reshapes,
    output_rebuilt_by_routing,
    output_rectified_by_consumer,
    output_viewed_by_consumer,
    relevance_vanishes_where_rectified,
)
from .rotation import rotation_constants, unrotate
from .saved import SavedTensorStore, saved_schedule


class NotConnectedError(DynamicLRPError):
    """The output does not depend on any requested tensor."""


def build_plan(graph: AutogradGraph, table: Mapping[str, OpSpec], fallback: Optional[OpSpec] = None,
               merge_affine: bool = False) -> Plan:
    """Traverse the pruned graph in Kahn order (depth-first among ready nodes) and plan every step.

    ``merge_affine``: merge batch norms into the convolutions before them (:func:`affine_merges`).
    """
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
    folds = bias_folds(graph, table, consumers, reach, cut)
    folded_sums = {sum_node for sum_node, _ in folds.values()}
    merges = affine_merges(graph, table, consumers, reach, cut) if merge_affine else {}
    merged_affines = set(merges.values())
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
        relevant = _relevant_slots(graph, reach, cut, i)
        if types[i] != LEAF_TYPE and any(relevant):
            spec = FOLDED_BIAS_SUM if i in folded_sums else MERGED_AFFINE if i in merged_affines else table.get(types[i])
            if spec is None:
                if fallback is None:
                    raise UnsupportedOperationError(types[i])
                spec = fallback
                plan.fallback_nodes.append(types[i])
            output_source = None
            if spec.uses_output:  # a merged map's output is that of the batch norm after it
                output_source = _output_source(graph, table, consumers, resolver, merges.get(i, i), spec, folded_sums)
            # "rectified" and "storage" may decline when read: the rule then recomputes its output.
            exact_output = output_source is not None and output_source[0] not in ("rectified", "storage")
            needs = spec.needs_given_output if (exact_output and spec.needs_given_output) else spec.needs
            sources = resolver.input_sources(i, needs(nodes[i], relevant), output_source)
            bias_source = None
            if i in folds:  # the folded bias is an operand of the sum: recover it from there
                sum_node, bias_slot = folds[i]
                bias_source = resolver.input_sources(sum_node, (bias_slot,))[bias_slot]
                assert bias_source is not None and bias_source[0] == "edge", "a folded bias is a tracked operand"
            affine_source = None
            if i in merges:  # the merged batch norm's constants: its saved statistics and its bias
                affine = merges[i]
                affine_spec = table[types[affine]]
                needs = affine_spec.affine_needs(nodes[affine]) if affine_spec.affine_needs else ()
                affine_source = (affine, affine_spec, tuple(resolver.input_sources(affine, needs)))
            plan.add_propagate(i, spec, tuple(sources), relevant, edges[i], output_source, bias_source, affine_source)
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


def _output_source(graph: AutogradGraph, table: Mapping[str, OpSpec], consumers: list, resolver: PromiseResolver,
                   i: int, spec: OpSpec, folded_sums: AbstractSet[int]) -> Optional[tuple]:
    """Where node ``i``'s output can be read instead of recomputed (see :mod:`.plan`), or ``None``."""
    found = output_kept_through_reshapes(graph, table, consumers, i)
    if found:
        return ("consumer",) + found
    if i == 0:
        return ("root",)
    if i in resolver.resolved:
        # A consumer's promise already rebuilt this output (e.g. the branch of a residual sum):
        # reuse that value instead of recomputing it.
        return ("value", i)
    if spec.fresh_output and spec.needs_given_output is None:
        viewed = output_viewed_by_consumer(graph, table, consumers, i)  # q/k/v into attention
        if viewed:
            return ("storage",) + viewed
    routed = output_rebuilt_by_routing(graph, table, consumers, i)  # copies of its parts behind splits
    if routed:
        return ("routed", routed)
    rectified = output_rectified_by_consumer(graph, table, consumers, i)
    if rectified:  # max(output, 0) from a ReLU: exact where relevance allows; proven: no check when run
        proven = relevance_vanishes_where_rectified(graph, table, consumers, i, rectified[0], folded_sums)
        return ("rectified",) + rectified + (proven,)
    return None


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


def _relevant_slots(graph: AutogradGraph, reach: list[bool], cut: AbstractSet[tuple[int, int]], i: int) -> tuple:
    """Per input slot of node ``i``: whether relevance flows into it."""
    return tuple(
        child >= 0 and reach[child] and (i, slot) not in cut for slot, (child, _) in enumerate(graph.edges[i])
    )


def bias_folds(
    graph: AutogradGraph,
    table: Mapping[str, OpSpec],
    consumers: list[list[tuple[int, int]]],
    reach: list[bool],
    cut: AbstractSet[tuple[int, int]],
) -> dict[int, tuple[int, int]]:
    """Linear maps that take over the bias a later sum adds: ``{linear node: (sum node, bias slot)}``.

    The spec's ``bias_after`` finds the pattern (O(1) per node); a bias is folded only if it
    carries no relevance (it is a constant here, like the bias of an ``addmm``) and the sum
    has its built-in rule (a rule the user gave for it is never bypassed).
    """
    folds: dict[int, tuple[int, int]] = {}
    for i, name in enumerate(graph.types):
        spec = table.get(name)
        if not reach[i] or spec is None or spec.bias_after is None:
            continue
        found = spec.bias_after(graph, consumers, i, _relevant_slots(graph, reach, cut, i))
        if found is None:
            continue
        sum_node, bias_slot = found
        sum_type = graph.types[sum_node]
        if (
            reach[sum_node]
            and not _relevant_slots(graph, reach, cut, sum_node)[bias_slot]
            and table.get(sum_type) is RULE_TABLE.get(sum_type)
        ):
            folds[i] = found
    return folds


def affine_merges(
    graph: AutogradGraph,
    table: Mapping[str, OpSpec],
    consumers: list[list[tuple[int, int]]],
    reach: list[bool],
    cut: AbstractSet[tuple[int, int]],
) -> dict[int, int]:
    """Convolutions that take over the batch norm reading their output: ``{linear node: batch norm node}``.

    Both must have their built-in rules (a rule the user gave is never bypassed), the linear map's
    output must have that batch norm as its only reader, relevance must flow into the map's input
    alone and into nothing of the batch norm but its input, and the batch norm's coefficients must
    be known (``OpSpec.affine_needs``). O(1) per node.
    """
    merges: dict[int, int] = {}
    captured = {node for node, _, _ in graph.sinks}  # a requested tensor's relevance is read there
    for i, name in enumerate(graph.types):
        spec = table.get(name)
        if not reach[i] or spec is None or spec.merges_affine is None or spec is not RULE_TABLE.get(name):
            continue
        if len(consumers[i]) != 1 or consumers[i][0][1] != 0 or i in captured:
            continue
        affine = consumers[i][0][0]
        affine_spec = table.get(graph.types[affine])
        if affine_spec is None or affine_spec.affine is None or affine_spec is not RULE_TABLE.get(graph.types[affine]):
            continue
        needs = affine_spec.affine_needs(graph.nodes[affine]) if affine_spec.affine_needs else ()
        if needs is None:
            continue
        if affine in captured or not spec.merges_affine(graph.nodes[i]):
            continue
        relevant, affine_relevant = _relevant_slots(graph, reach, cut, i), _relevant_slots(graph, reach, cut, affine)
        if not relevant[0] or any(relevant[1:]) or any(affine_relevant[1:]):
            continue
        merges[i] = affine
    return merges


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


def _reshaped(value: Tensor, node) -> Tensor:
    """A value kept behind reshapes of ``node``'s output 0, in that output's shape (same elements)."""
    shape = node._input_metadata[0].shape
    return value if value.shape == shape else value.reshape(shape)


def _rebuilt(recipe: tuple, nodes: list) -> Tensor:
    """The value a recipe of :func:`~.promise.output_rebuilt_by_routing` describes."""
    if recipe[0] == "kept":
        _, consumer, slot, spec = recipe
        return spec.kept_inputs(nodes[consumer])[slot]
    _, routing_node, spec, parts = recipe
    return spec.inverse(nodes[routing_node], [_rebuilt(part, nodes) for part in parts])


def _unrotated(step: tuple, nodes: list, values: dict, solved: dict) -> None:
    """Run an UNROTATE step: solve for the rotated value, or replay the chain where that declines.

    ``solved``: the call's coefficients per set of constants (see :func:`~.rotation.unrotate`).
    """
    _, _, rotation, output_recipe, chain, replays = step
    c, s = rotation_constants(nodes, rotation)
    value = None if c is None or s is None else unrotate(_rebuilt(output_recipe, nodes), c, s, rotation[5], solved)
    if value is None:
        with torch.no_grad():
            for node, spec, sources in replays:
                values[node] = _as_tuple(spec.forward(nodes[node], _fetch(sources, nodes[node], spec, values)))
        return
    values[chain[0]] = (value,)
    inverses = {node: spec.inverse for node, spec, _ in replays}
    for upper, lower in zip(chain, chain[1:]):
        values[lower] = (inverses[upper](nodes[upper], [values[upper][0]]),)


def output_from_storage(kept: Tensor, node) -> Optional[Tensor]:
    """``node``'s output 0 (a fresh contiguous tensor) rebuilt from the storage of a view ``kept`` of it.

    ``None`` unless the storage is exactly that output's size and its version counter (shared by a
    tensor and all its views) says no in-place op ever wrote to it; the caller then recomputes.
    """
    meta = node._input_metadata[0]
    shape = tuple(meta.shape)
    numel = 1
    for size in shape:
        numel *= size
    if (
        kept.dtype != meta.dtype
        or kept.device != meta.device
        or kept._version != 0
        or kept.untyped_storage().nbytes() != numel * kept.element_size()
    ):
        return None
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return kept.as_strided(shape, tuple(reversed(strides)), 0)


def _propagate(step: tuple, nodes: list, relevance: dict, values: dict, root: tuple, settings: RuleSettings,
               dtype: torch.dtype, saved: Optional[SavedTensorStore] = None, last_read: Sequence[int] = ()) -> None:
    """Apply one node's rule and add what it hands each operand to that operand's relevance.

    ``last_read``: nodes whose saved tensors no later step reads; a consumer among them that
    supplied the output is released before the rule runs, so the rule alone holds that value.
    """
    _, i, spec, sources, relevant, edges, output_source, bias_source, affine_source = step
    arrived = relevance.pop(i, None)
    if arrived is None:  # nothing reached this node (all of it went elsewhere)
        return
    node = nodes[i]
    output = rectified = None
    rectified_vanishes = False
    if output_source is not None:
        if output_source[0] == "root":
            root_output, seed_output_nr = root
            output = root_output if seed_output_nr == 0 else None
        elif output_source[0] == "value":
            output = values[output_source[1]][0]
        elif output_source[0] == "storage":
            _, consumer, slot, consumer_spec = output_source
            output = output_from_storage(consumer_spec.kept_inputs(nodes[consumer])[slot], node)
        elif output_source[0] == "routed":
            output = _rebuilt(output_source[1], nodes)
        elif output_source[0] == "rectified":
            _, consumer, consumer_spec, rectified_vanishes = output_source
            rectified = _reshaped(consumer_spec.kept_output(nodes[consumer]), node)
        else:
            _, consumer, slot, consumer_spec = output_source
            output = _reshaped(consumer_spec.kept_inputs(nodes[consumer])[slot], node)
        if saved is not None and len(output_source) > 2 and output_source[1] in last_read:
            saved.release(nodes[output_source[1]])
    bias = None if bias_source is None else values[bias_source[1]][bias_source[2]]  # always an "edge" source
    affine = None
    if affine_source is not None:  # a merged batch norm's (scale, shift)
        affine_node, affine_spec, affine_sources = affine_source
        affine = affine_spec.affine(nodes[affine_node], _fetch(affine_sources, nodes[affine_node], affine_spec, values))
    ctx = RuleContext(
        node, arrived, relevant, _fetch(sources, node, spec, values), settings, output, bias, rectified,
        rectified_vanishes, affine,
    )
    rectified = None  # the context holds it; a rule that takes it (take_rectified) frees it early
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
    seed_box: list[Tensor],
    root_output: Tensor,
    seed_output_nr: int,
    num_requests: int,
    settings: RuleSettings,
    saved: Optional[SavedTensorStore] = None,
) -> list[Optional[Tensor]]:
    """Run a plan: recover values, apply rules in traversal order, collect relevance at the sinks.

    ``seed_box`` holds the relevance at the explained output; it is taken out, so that the walk
    frees it once the root's rule has used it. ``root_output`` is the (detached) explained tensor,
    output ``seed_output_nr`` of the root node.
    Recovered values are dropped after their last use; with ``saved`` (the store the forward was
    recorded in), so are the nodes' saved tensors, after the last step that reads them.
    """
    nodes = graph.nodes
    saved_after: dict[int, list[int]] = {}
    if saved is not None:
        unread, saved_after = saved_schedule(plan, len(nodes))
        for j in unread:  # nodes the walk never reads: their saved tensors go now
            saved.release(nodes[j])
    dtype = seed_box[0].dtype
    root = (root_output, seed_output_nr)
    values: dict[int, tuple] = {}
    relevance: dict[int, list] = {0: [None] * len(nodes[0]._input_metadata)}
    relevance[0][seed_output_nr] = seed_box.pop()
    results: list[Optional[Tensor]] = [None] * num_requests
    releases = plan.releases
    solved: dict = {}  # rotary coefficients, shared by the layers' rotations (rotation.unrotate)
    for index, step in enumerate(plan.steps):
        kind, i = step[0], step[1]
        if kind == PROPAGATE:
            _propagate(step, nodes, relevance, values, root, settings, dtype, saved, saved_after.get(index, ()))
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
        elif kind == FROM_OUTPUT:
            _, _, origin, spec, slot, (_, consumer, kept_slot, consumer_spec), sources, chain = step
            output = _reshaped(consumer_spec.kept_inputs(nodes[consumer])[kept_slot], nodes[origin])
            operand = spec.operand_from_output(nodes[origin], slot, output, _fetch(sources, None, spec, values))
            for node in chain:
                values[node] = (_reshaped(operand, nodes[node]),)
        elif kind == UNROTATE:
            _unrotated(step, nodes, values, solved)
        elif kind == CAPTURE:
            slots = relevance.get(i)
            results[step[3]] = None if slots is None else slots[step[2]]
        for node in releases.get(index, ()):
            del values[node]
        if saved_after:
            for node in saved_after.get(index, ()):
                saved.release(nodes[node])
    return results
