r"""Elementwise nonlinearities: the identity rule.

Rule: :math:`R_x = R_z` element by element. For positively homogeneous
activations (ReLU, LeakyReLU, max) this is what the epsilon rule gives
(:math:`x f'(x) = f(x)`); for smooth ones (GELU, SiLU, tanh, ...) it is the
AttnLRP convention of letting relevance pass through the nonlinearity untouched
(``atan`` too: a squashing function like tanh).

Each entry also says how autograd kept the forward value: either the result
itself (the node is an Arg Node) or its input (the output is one replay away).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .base import MaybeTensor, OpSpec, RuleContext, saved


def identity_rule(ctx: RuleContext) -> Sequence[MaybeTensor]:
    r"""Identity: :math:`R_x = R_z`."""
    return (ctx.out,)


def _kept_self(node) -> tuple:
    return (saved(node, "self"),)


def _kept_result(node):
    return saved(node, "result")


def _from_result() -> OpSpec:
    return OpSpec(family="identity (elementwise)", rule=identity_rule, kept_output=_kept_result)


def _from_input(forward) -> OpSpec:
    return OpSpec(family="identity (elementwise)", rule=identity_rule, forward=forward, kept_inputs=_kept_self)


def _elu(node, x):
    return torch.ops.aten.elu(x[0], saved(node, "alpha"), saved(node, "scale"), saved(node, "input_scale"))


def _dropout(node, x):
    return x[0] * saved(node, "result1") * saved(node, "scale")


ELEMENTWISE: dict[str, OpSpec] = {
    # ReLU keeps max(x, 0): a producer's linear rule can read its own output from it (OpSpec.rectifies).
    "ReluBackward0": OpSpec(
        family="identity (elementwise)", rule=identity_rule, kept_output=_kept_result, rectifies=True, keeps_zeros=True
    ),
    "SigmoidBackward0": _from_result(),
    "TanhBackward0": _from_result(),
    "EluBackward0": _from_input(_elu),
    "EluBackward1": _from_result(),  # in-place ELU keeps its result
    "LeakyReluBackward0": _from_input(lambda n, x: F.leaky_relu(x[0], saved(n, "negative_slope"))),
    "GeluBackward0": _from_input(lambda n, x: F.gelu(x[0], approximate=saved(n, "approximate"))),
    "SiluBackward0": _from_input(lambda n, x: F.silu(x[0])),
    "HardswishBackward0": _from_input(lambda n, x: F.hardswish(x[0])),
    "HardsigmoidBackward0": _from_input(lambda n, x: F.hardsigmoid(x[0])),
    "HardtanhBackward0": _from_input(lambda n, x: F.hardtanh(x[0], saved(n, "min_val"), saved(n, "max_val"))),
    "SoftplusBackward0": _from_input(
        lambda n, x: F.softplus(x[0], saved(n, "beta"), saved(n, "threshold"))
    ),
    "MishBackward0": _from_input(lambda n, x: F.mish(x[0])),
    "AbsBackward0": _from_input(lambda n, x: x[0].abs()),
    "ExpBackward0": _from_result(),
    "LogBackward0": _from_input(lambda n, x: x[0].log()),
    "PowBackward0": _from_input(lambda n, x: x[0].pow(saved(n, "exponent"))),
    "ReciprocalBackward0": _from_result(),
    "SqrtBackward0": _from_result(),
    "RsqrtBackward0": _from_result(),
    "SinBackward0": _from_input(lambda n, x: x[0].sin()),
    "CosBackward0": _from_input(lambda n, x: x[0].cos()),
    "ErfBackward0": _from_input(lambda n, x: torch.erf(x[0])),
    "AtanBackward0": _from_input(lambda n, x: x[0].atan()),
    "LogSigmoidBackward0": _from_input(lambda n, x: F.logsigmoid(x[0])),
    "ClampBackward1": _from_input(lambda n, x: x[0].clamp(saved(n, "min"), saved(n, "max"))),
    "ClampMinBackward0": _from_input(lambda n, x: x[0].clamp(min=saved(n, "min"))),
    "ClampMaxBackward0": _from_input(lambda n, x: x[0].clamp(max=saved(n, "max"))),
    "NegBackward0": OpSpec(family="identity (elementwise)", rule=identity_rule, forward=lambda n, x: -x[0]),
    # Module backward hooks wrap a module's inputs and outputs in an identity function.
    "BackwardHookFunctionBackward": OpSpec(
        family="identity (elementwise)",
        rule=lambda ctx: list(ctx.relevance),
        forward=lambda n, x: tuple(x),
    ),
    # Dropout in training mode (DynamicLRP warns): kept elements pass their relevance on.
    "NativeDropoutBackward0": OpSpec(family="identity (elementwise)", rule=identity_rule, forward=_dropout),
}
