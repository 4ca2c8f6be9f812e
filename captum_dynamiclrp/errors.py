"""Exceptions raised by captum_dynamiclrp."""

from __future__ import annotations


class DynamicLRPError(RuntimeError):
    """Base class of every error the engine raises on purpose."""


class UnsupportedOperationError(DynamicLRPError):
    r"""An autograd node has no rule in the rule table.

    Args:
        node_type (str): Name of the autograd node type, e.g. ``"FooBackward0"``.
        module_path (str, optional): Dotted path of the module whose forward
            created the node, where it could be found.
    """

    def __init__(self, node_type: str, module_path: str | None = None) -> None:
        self.node_type = node_type
        self.module_path = module_path
        where = f" (created in module '{module_path}')" if module_path else ""
        hint = _HINTS.get(node_type, "")
        super().__init__(
            f"No LRP rule for autograd operation '{node_type}'{where}. {hint}Add one with "
            f"DynamicLRP(..., rules=Preset(overrides={{'{node_type}': my_rule}})) or "
            "opt in to the even-split fallback with fallback=True (reported as a "
            "fallback, never as covered)."
        )


# Nodes that hide a whole graph: LRP needs the operations inside.
_HINTS = {
    "CompiledFunctionBackward": "torch.compile fuses the graph into one node: explain the uncompiled "
    "module (compiled._orig_mod) instead. ",
    "DifferentiableGraphBackward": "A TorchScript graph hides its operations: explain the eager module. ",
    "CppFunction": "An opaque C++ function (e.g. a fused TorchScript graph) hides its operations: explain the "
    "eager module. ",
}


class UnrecoverableOperandError(DynamicLRPError):
    """A rule needs a forward value that neither autograd nor the Promise System can rebuild."""
