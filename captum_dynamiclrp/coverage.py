"""Coverage report: which autograd ops of a model have a real rule, and which module made the rest."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor, nn

from .engine.graph import LEAF_TYPE, build_graph
from .modules import buffers_restored, owning_module, parameters_tracked, run_with_module_spans, scores_of
from .presets import Preset, resolve_preset
from .rules import RULE_TABLE

COVERED, FALLBACK, UNCOVERED = "covered", "fallback", "uncovered"


@dataclass
class CoverageRow:
    """One autograd op type of the model.

    Attributes:
        op: Autograd node type name.
        count: Number of nodes of that type in the graph.
        rule: Rule family used (``"leaf"`` for inputs and parameters).
        status: ``"covered"``, ``"fallback"`` (only with ``fallback=True``; never covered) or ``"uncovered"``.
        modules: For uncovered and fallback ops, the module paths that produced them.
    """

    op: str
    count: int
    rule: str
    status: str
    modules: list[str] = field(default_factory=list)


@dataclass
class CoverageReport:
    """Op coverage of one model, as returned by :func:`coverage`."""

    rows: list[CoverageRow]

    @property
    def total(self) -> int:
        return sum(row.count for row in self.rows)

    @property
    def covered(self) -> int:
        return sum(row.count for row in self.rows if row.status == COVERED)

    @property
    def fraction(self) -> float:
        """Covered nodes / all nodes (a fallback is never covered)."""
        return self.covered / self.total if self.total else 1.0

    @property
    def uncovered(self) -> list[CoverageRow]:
        return [row for row in self.rows if row.status != COVERED]

    def to_dict(self) -> dict:
        return {
            "total_nodes": self.total,
            "covered_nodes": self.covered,
            "fraction": self.fraction,
            "ops": [row.__dict__ for row in self.rows],
        }

    def __str__(self) -> str:
        width = max([len(row.op) for row in self.rows] + [10])
        lines = [f"{'op':<{width}}  {'count':>6}  {'status':<9}  rule / modules"]
        for row in self.rows:
            detail = row.rule if row.status == COVERED else f"{row.rule}; made by: {', '.join(row.modules) or '?'}"
            lines.append(f"{row.op:<{width}}  {row.count:>6}  {row.status:<9}  {detail}")
        lines.append(f"{self.covered}/{self.total} nodes covered by a real rule ({100 * self.fraction:.2f}%)")
        return "\n".join(lines)


def coverage(
    model: Union[nn.Module, Callable[..., Any]],
    *example_inputs: Any,
    rules: Union[str, Preset, None] = None,
    fallback: bool = False,
) -> CoverageReport:
    """Run the model once and report, per autograd op type, whether a rule covers it.

    Args:
        model (nn.Module or callable): The model (or a function running it). Its output may
            be a tensor, an object with ``.logits`` or a tuple whose first tensor is the scores.
        *example_inputs: Inputs for one forward pass. Floating-point tensors are tracked;
            integer tensors (token ids) are passed as they are.
        rules (str or Preset, optional): Preset whose rule table is checked (default preset).
        fallback (bool, optional): Report ops without a rule as ``"fallback"`` (as
            ``DynamicLRP(..., fallback=True)`` would handle them) instead of ``"uncovered"``.
            Either way they are not counted as covered.

    Returns:
        CoverageReport: rows sorted by status then count; ``print(report)`` gives a table.
    """
    preset = resolve_preset(rules)
    table = {**RULE_TABLE, **preset.table_overrides()}
    inputs = tuple(
        x.detach().clone().requires_grad_(True) if isinstance(x, Tensor) and x.is_floating_point() else x
        for x in example_inputs
    )
    module = owning_module(model)

    def run() -> Any:
        return model(*inputs)

    with torch.enable_grad(), parameters_tracked(module), buffers_restored(module):
        if module is not None:
            output, spans = run_with_module_spans(module, run)
        else:
            output, spans = run(), None
        scores = scores_of(output)
        if scores.grad_fn is None:
            raise ValueError("the model output has no autograd graph: no input or parameter reaches it")
        graph = build_graph(scores.grad_fn, ())
    counts = Counter(graph.types)
    modules: dict[str, list[str]] = {}
    for node, name in zip(graph.nodes, graph.types):
        if name != LEAF_TYPE and name not in table and spans is not None:
            path = spans.path_of(node)
            if path is not None and path not in modules.setdefault(name, []):
                modules[name].append(path)
    rows = []
    for name, count in counts.items():
        if name == LEAF_TYPE:
            rows.append(CoverageRow(name, count, "leaf (input or parameter)", COVERED))
        elif name in table:
            rows.append(CoverageRow(name, count, table[name].family, COVERED))
        else:
            status = FALLBACK if fallback else UNCOVERED
            rule = "fallback (even split)" if fallback else "none"
            rows.append(CoverageRow(name, count, rule, status, modules.get(name, [])))
    order = {UNCOVERED: 0, FALLBACK: 1, COVERED: 2}
    rows.sort(key=lambda row: (order[row.status], -row.count, row.op))
    return CoverageReport(rows)


__all__: Sequence[str] = ["CoverageReport", "CoverageRow", "coverage"]
