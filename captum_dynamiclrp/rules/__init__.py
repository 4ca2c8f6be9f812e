"""The rule table: one registry from autograd node type name to :class:`OpSpec`.

Each family lives in one module with its formula in the docstring:

=====================  ==========================================================
module                 ops
=====================  ==========================================================
``routing``            view, reshape, permute, transpose, expand, squeeze, slice,
                       select, index, gather, cat, stack, split, unbind, pad,
                       clone, to/copy, max-pool, max/min (node's own VJP)
``elementwise``        ReLU, LeakyReLU, ELU, GELU, SiLU, tanh, sigmoid, hardswish,
                       hardtanh/ReLU6, softplus, mish, neg, dropout (identity)
``arithmetic``         add, sub, sum, mean, avg-pool, adaptive avg-pool (epsilon on
                       contributions); mul, div (bilinear uniform)
``linear``             mm, addmm, bmm, mv, convolution (preset linear rule)
``normalization``      batch norm (epsilon on the affine map)
=====================  ==========================================================

``AccumulateGrad`` (leaves: inputs and parameters) is handled by the engine: a
leaf is a sink that collects relevance if it was requested.
"""

from __future__ import annotations

from typing import Mapping

from .arithmetic import ARITHMETIC
from .base import OpSpec, RuleContext, RuleSettings, needs_all_inputs, stabilize
from .elementwise import ELEMENTWISE
from .linear import LINEAR
from .normalization import NORMALIZATION
from .routing import ROUTING, vjp_rule

RULE_TABLE: Mapping[str, OpSpec] = {**ROUTING, **ELEMENTWISE, **ARITHMETIC, **LINEAR, **NORMALIZATION}

__all__ = [
    "RULE_TABLE",
    "OpSpec",
    "RuleContext",
    "RuleSettings",
    "needs_all_inputs",
    "stabilize",
    "vjp_rule",
]
