"""The operation-level LRP engine.

Use :func:`relevance` on any output tensor and its autograd graph::

    from captum_dynamiclrp.engine import relevance
    R_x, R_h = relevance(scores, inputs=(x, hidden), seed=one_hot * scores)

or keep an :class:`Engine` to reuse resolved promise paths across calls.

Pipeline per call: :func:`~.graph.build_graph` (auxiliary graph, signature) ->
plan cache lookup -> on a miss :func:`~.walker.build_plan` (prune, Kahn order,
rules, Promise resolution) -> :func:`~.walker.execute`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import DynamicLRPError
from ..rules import RULE_TABLE
from ..rules.arithmetic import product_uniform_rule
from ..rules.base import OpSpec, RuleSettings
from .graph import AutogradGraph, build_graph
from .plan import Plan, PlanCache
from .promise import Promise, PromiseBranch
from .saved import SavedTensorStore
from .walker import NotConnectedError, build_plan, execute

FALLBACK_SPEC = OpSpec(family="fallback (even split, NOT covered)", rule=product_uniform_rule, fallback=True)


@dataclass
class RunInfo:
    """What the last call did: the plan it ran and whether it came from the cache."""

    plan: Plan
    cached: bool


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Relevance is accumulated in float64 for float64 models and in float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Engine:
    r"""Operation-level LRP over autograd graphs, with cached promise paths.

    Args:
        settings (RuleSettings, optional): Epsilon, linear rule, gamma, attention and batch-norm rule.
        overrides (Mapping[str, OpSpec], optional): Rule table entries that replace or
            extend the built-in table, keyed by autograd node type name.
        fallback (bool, optional): If True, node types without a rule split relevance
            evenly over their relevant inputs instead of raising
            :class:`~captum_dynamiclrp.errors.UnsupportedOperationError`. Such nodes are
            listed in ``last_run.plan.fallback_nodes`` and are never counted as covered.
            Default: False.
        cache_size (int, optional): Number of plans kept (0 disables the cache). Default: 8.
    """

    def __init__(
        self,
        settings: Optional[RuleSettings] = None,
        overrides: Optional[Mapping[str, OpSpec]] = None,
        fallback: bool = False,
        cache_size: int = 8,
    ) -> None:
        self.settings = settings or RuleSettings()
        if self.settings.batch_norm not in ("epsilon", "merge"):
            raise ValueError(f"unknown batch_norm rule {self.settings.batch_norm!r}; use 'epsilon' or 'merge'")
        self.table: dict[str, OpSpec] = {**RULE_TABLE, **(overrides or {})}
        self.fallback = FALLBACK_SPEC if fallback else None
        self.cache = PlanCache(cache_size)
        self.last_run: Optional[RunInfo] = None

    def clear_cache(self) -> None:
        """Forget every cached plan."""
        self.cache.clear()

    def relevance(
        self,
        output: Tensor,
        inputs: Union[Tensor, Sequence[Tensor]],
        seed: Union[Tensor, list[Tensor], None] = None,
        saved: Optional[SavedTensorStore] = None,
    ) -> tuple[Tensor, ...]:
        r"""Propagate relevance from ``output`` to ``inputs``.

        Args:
            output (Tensor): A tensor with an autograd graph (``output.grad_fn``).
            inputs (Tensor or sequence of Tensor): Tensors whose relevance is wanted:
                leaves that require grad, or intermediate tensors of the same graph.
            seed (Tensor, optional): Relevance at the output, of the output's shape.
                Default: the output itself (explains the sum of all outputs). To explain
                one logit per row, pass ``one_hot * output``. A one-element list hands the
                seed over: the engine empties the list, so that the walk holds the only
                reference and frees the seed after the first step (a caller's reference would
                keep it, as large as the output, alive through the whole walk).
            saved (SavedTensorStore, optional): The store the forward pass was recorded in
                (:meth:`SavedTensorStore.recording`); the walk then frees each node's saved
                tensors after their last use, as a backward pass does. Default: None (the
                graph keeps them until it is dropped).

        Returns:
            tuple of Tensor: Relevance of each input, of its shape, in float32 (float64
            for float64 outputs). An input the output does not reach gets zeros.

        Note:
            Walking the graph leaves an entry in ``output.grad_fn.metadata`` (see
            :class:`~.graph.DeferredRelease`): it frees the graph one node at a time when
            the output is dropped, which a graph tens of thousands of nodes deep needs.
        """
        requests = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        if not requests:
            raise ValueError("relevance() needs at least one input tensor")
        for t in requests:
            if not isinstance(t, Tensor):
                raise TypeError(f"inputs must be tensors, got {type(t).__name__}")
            if t.grad_fn is None and not t.requires_grad:
                raise ValueError(
                    "An input does not require grad, so the autograd graph cannot reach it; "
                    "call x.requires_grad_() before the forward pass."
                )
        dtype = accumulation_dtype(output.dtype)
        if isinstance(seed, list):
            if len(seed) != 1 or not isinstance(seed[0], Tensor):
                raise TypeError("a seed handed over as a list must hold exactly one tensor")
            seed = seed.pop()
        seed = output.detach() if seed is None else seed.detach()
        if seed.shape != output.shape:
            raise ValueError(f"seed shape {tuple(seed.shape)} differs from output shape {tuple(output.shape)}")
        seed = seed.to(dtype)
        if output.grad_fn is None:
            return self._trivial(output, requests, seed)

        graph = build_graph(output.grad_fn, requests)
        plan = self.cache.get(graph.signature)
        cached = plan is not None
        if plan is None:
            plan = build_plan(graph, self.table, self.fallback, merge_affine=self.settings.batch_norm == "merge")
            self.cache.put(graph.signature, plan)
        self.last_run = RunInfo(plan=plan, cached=cached)
        seed_box = [seed]
        del seed  # execute() takes the seed out of the box: the walk alone holds it
        with torch.no_grad():
            results = execute(
                plan, graph, seed_box, output.detach(), output.output_nr, len(requests), self.settings, saved
            )
        return tuple(
            torch.zeros(t.shape, dtype=dtype, device=t.device) if r is None else r
            for t, r in zip(requests, results)
        )

    @staticmethod
    def _trivial(output: Tensor, requests: tuple, seed: Tensor) -> tuple[Tensor, ...]:
        # The output is itself a leaf: it is its own (only possible) relevant input.
        hits = [t is output for t in requests]
        if not any(hits):
            raise NotConnectedError("The output has no autograd graph and is none of the requested inputs.")
        return tuple(seed.clone() if hit else torch.zeros_like(seed) for hit in hits)


def relevance(
    output: Tensor,
    inputs: Union[Tensor, Sequence[Tensor]],
    seed: Optional[Tensor] = None,
    settings: Optional[RuleSettings] = None,
    overrides: Optional[Mapping[str, OpSpec]] = None,
    fallback: bool = False,
) -> tuple[Tensor, ...]:
    """One-off :meth:`Engine.relevance` (no plan cache kept between calls).

    See :class:`Engine` for the arguments.
    """
    engine = Engine(settings=settings, overrides=overrides, fallback=fallback, cache_size=0)
    return engine.relevance(output, inputs, seed)


__all__ = [
    "AutogradGraph",
    "DynamicLRPError",
    "Engine",
    "NotConnectedError",
    "Plan",
    "PlanCache",
    "Promise",
    "PromiseBranch",
    "RunInfo",
    "SavedTensorStore",
    "accumulation_dtype",
    "build_graph",
    "relevance",
]
