r"""Batch normalisation.

With the statistics held constant (running statistics in eval mode, the saved
batch statistics in training mode) batch norm is a per-channel affine map
:math:`z = a x + c`, :math:`a = w / \sqrt{\sigma^2 + \epsilon_{bn}}`,
:math:`c = b - \mu a`. Rule: epsilon on that map,
:math:`R_x = a x \odot R / \mathrm{stab}(z)`; the shift :math:`c` absorbs its share.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import UnrecoverableOperandError
from .base import MaybeTensor, Node, OpSpec, RuleContext, saved, stabilize


def _scale_shift(node: Node, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    eps = saved(node, "eps")
    if eps is None:
        eps = saved(node, "epsilon")
    if saved(node, "training"):
        mean, invstd = saved(node, "result1"), saved(node, "result2")
    else:
        mean, invstd = saved(node, "running_mean"), torch.rsqrt(saved(node, "running_var") + eps)
    weight = saved(node, "weight")
    scale = invstd if weight is None else weight * invstd
    shift = -mean * scale if bias is None else bias - mean * scale
    return scale, shift


def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    return t.view(1, -1, *([1] * (x.dim() - 2))) if x.dim() > 1 else t


def _affine(node: Node, inputs: list) -> tuple[Tensor, Tensor]:
    x, bias = inputs[0], inputs[2]
    scale, shift = _scale_shift(node, bias)
    scale = _channel_view(scale, x)
    return scale, x * scale + _channel_view(shift, x)


def batch_norm_rule(ctx: RuleContext) -> list[MaybeTensor]:
    r"""Epsilon on the affine map: :math:`R_x = a x \odot R / \mathrm{stab}(a x + c)`."""
    x = ctx.inputs[0]
    scale, z = _affine(ctx.node, ctx.inputs)
    s = ctx.out / stabilize(z.to(ctx.dtype), ctx.settings.epsilon)
    return [(x * scale).to(ctx.dtype) * s, None, None]


def _forward(node: Node, inputs: list) -> Tensor:
    if inputs[2] is None and saved(node, "weight") is not None:
        raise UnrecoverableOperandError(
            f"{type(node).__name__}: the batch-norm bias does not require grad, so its output cannot "
            "be replayed; let parameters require grad during the forward (DynamicLRP does this for you)."
        )
    return _affine(node, inputs)[1]


def _spec() -> OpSpec:
    return OpSpec(
        family="epsilon (batch norm as affine map)",
        rule=batch_norm_rule,
        needs=lambda node, relevant: (0, 2),
        forward=_forward,
        kept_inputs=lambda node: (saved(node, "input"), saved(node, "weight"), None),
    )


NORMALIZATION: dict[str, OpSpec] = {
    "NativeBatchNormBackward0": _spec(),
    "CudnnBatchNormBackward0": _spec(),
    "MiopenBatchNormBackward0": _spec(),
}
