"""The rule table: one registry from autograd node type name to :class:`OpSpec`.

Each family lives in one module with its formula in the docstring:

=====================  ==========================================================
module                 ops
=====================  ==========================================================
``routing``            view, reshape, permute, transpose, expand, squeeze, slice,
                       select, index, gather, cat, stack, split, unbind, pad,
                       clone, to/copy, flip, roll, max-pool, max/min/amax, topk,
                       sort, index_select, masked_fill, where, tril/triu, repeat,
                       unfold, nearest upsampling, embedding, scatter, index_put
                       (node's own VJP); maximum, minimum, fmax, fmin (winner
                       takes all, ties halved); logsumexp (softmax weights)
``elementwise``        ReLU, LeakyReLU, ELU, GELU, SiLU, tanh, sigmoid, hardswish,
                       hardtanh/ReLU6, softplus, mish, abs, exp, log, pow, sin,
                       cos, erf, atan, clamp, neg, dropout (identity)
``arithmetic``         add, sub, sum, mean, cumsum, avg-pool, adaptive avg-pool,
                       linear interpolation, index_add, scatter_add (epsilon on
                       contributions); mul, div, GLU, weight norm (bilinear uniform),
                       cumprod (uniform over each output's factors)
``linear``             mm, addmm, bmm, baddbmm, mv, convolution (preset linear rule;
                       bilinear uniform between two activations)
``normalization``      batch norm (epsilon on the affine map), layer norm, group
                       norm (constant normaliser); rsqrt, sqrt, var, std, norms of
                       activations are constants (RMS norm = identity)
``attention``          softmax, log-softmax (AttnLRP Deep Taylor), fused scaled
                       dot-product attention on every backend
=====================  ==========================================================

``AccumulateGrad`` (leaves: inputs and parameters) is handled by the engine: a
leaf is a sink that collects relevance if it was requested.
"""

from __future__ import annotations

from typing import Mapping

from .arithmetic import ARITHMETIC
from .attention import ATTENTION, CP_LRP_OVERRIDES
from .base import OpSpec, RuleContext, RuleSettings, needs_all_inputs, stabilize
from .elementwise import ELEMENTWISE
from .linear import LINEAR
from .normalization import NORMALIZATION
from .routing import ROUTING, vjp_rule

RULE_TABLE: Mapping[str, OpSpec] = {**ROUTING, **ELEMENTWISE, **ARITHMETIC, **LINEAR, **NORMALIZATION, **ATTENTION}

__all__ = [
    "CP_LRP_OVERRIDES",
    "RULE_TABLE",
    "OpSpec",
    "RuleContext",
    "RuleSettings",
    "needs_all_inputs",
    "stabilize",
    "vjp_rule",
]
