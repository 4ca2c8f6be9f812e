r"""Normalisation layers: the normaliser :math:`1/\sigma` is a constant (AttnLRP).

Layer norm and group norm, :math:`z = w \odot (x - \mu(x))\,\rho + b` with
:math:`\rho = 1/\sigma` held constant, are linear in :math:`x` (the mean subtraction
stays). Epsilon on that linear map, :math:`s = R / \mathrm{stab}(z)`,
:math:`g = \rho\,w \odot s`:

.. math:: R_x = x \odot \left(g - \overline{g}\right)

with :math:`\overline{g}` the mean of :math:`g` over each normalised group.

Normalisers written out in plain ops (RMS norm's ``x * rsqrt(mean(x^2) + eps)``,
``x / sqrt(var + eps)``, ``x / x.norm()``) are handled by the product rule: a factor
computed by ``rsqrt``, ``sqrt``, ``std``, ``var`` or a vector norm is a constant
there, so all relevance goes to ``x`` (AttnLRP's identity rule for RMS norm). Where
such a statistic is reached on its own, variance, standard deviation and norms
share relevance by squares, :math:`R_{x_i} = R\, d_i^2 / \sum_j d_j^2`.

Batch normalisation: with the statistics held constant (running statistics in eval mode, the saved
batch statistics in training mode) batch norm is a per-channel affine map
:math:`z = a x + c`, :math:`a = w / \sqrt{\sigma^2 + \epsilon_{bn}}`,
:math:`c = b - \mu a`. Rule: epsilon on that map,
:math:`R_x = a x \odot R / \mathrm{stab}(z)`; the shift :math:`c` absorbs its share.
With the setting ``batch_norm="merge"`` a batch norm that alone reads a convolution's output is
merged into it instead (Zennit's canonizers do this): the convolution's rule runs on
:math:`W' = a W`, :math:`b' = a b + c` (see :mod:`.linear`) and the batch norm hands relevance on.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import UnrecoverableOperandError
from .base import (
    MaybeTensor,
    Node,
    OpSpec,
    RuleContext,
    saved,
    signed_dim,
    stabilize,
)


def _eps(node: Node) -> float:
    eps = saved(node, "eps")
    return saved(node, "epsilon") if eps is None else eps


def _mean_invstd(node: Node) -> tuple[Tensor, Tensor]:
    if saved(node, "training"):
        return saved(node, "result1"), saved(node, "result2")
    return saved(node, "running_mean"), torch.rsqrt(saved(node, "running_var") + _eps(node))


def _scale(node: Node, invstd: Tensor) -> Tensor:
    weight = saved(node, "weight")
    return invstd if weight is None else weight * invstd


def _scale_shift(node: Node, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    mean, invstd = _mean_invstd(node)
    scale = _scale(node, invstd)
    shift = -mean * scale if bias is None else bias - mean * scale
    return scale, shift


def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    return t.view(1, -1, *([1] * (x.dim() - 2))) if x.dim() > 1 else t


def _replay(node: Node, x: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The batch norm's output recomputed from ``x``, its statistics held at the forward's values."""
    if not saved(node, "training"):
        # The forward's own kernel on the running statistics: same bits, and on the CPU faster than
        # an addcmul whose first operand is broadcast.
        return torch.batch_norm(
            x, saved(node, "weight"), bias, saved(node, "running_mean"), saved(node, "running_var"),
            False, 0.0, _eps(node), False,
        )
    scale, shift = _scale_shift(node, bias)
    return torch.addcmul(_channel_view(shift, x), x, _channel_view(scale, x))  # one pass: shift + x * scale


def batch_norm_rule(ctx: RuleContext) -> list[MaybeTensor]:
    r"""Epsilon on the affine map: :math:`R_x = a x \odot R / \mathrm{stab}(a x + c)`."""
    x = ctx.inputs[0]
    # A ReLU's max(z, 0) stands for z only where the planner proved that exact: checking it
    # when run costs more than recomputing z (one elementwise pass).
    s = ctx.proven_rectified_ratio()
    if s is None:
        # z: kept by a consumer, rebuilt by a promise (residual branch), or else recomputed here.
        z = ctx.output if ctx.output is not None else _replay(ctx.node, x, ctx.inputs[2])
        s = ctx.ratio(z)
        del z  # free a recomputed output before the products
    scale = _channel_view(_scale(ctx.node, _mean_invstd(ctx.node)[1]), x)
    return [s.mul_(x).mul_(scale), None, None]


def _affine_constants(node: Node, inputs: list) -> tuple[Tensor, Tensor]:
    """``(a, c)`` of the map :math:`z = a x + c`, 1-d; ``inputs[2]`` is the bias (``OpSpec.affine``)."""
    return _scale_shift(node, inputs[2])


def _affine_needs(node: Node) -> Optional[tuple[int, ...]]:
    # A batch norm with a weight but an untracked bias: its shift is unknown.
    if saved(node, "weight") is not None and node.next_functions[2][0] is None:
        return None
    return (2,)


def _forward(node: Node, inputs: list) -> Tensor:
    if inputs[2] is None and saved(node, "weight") is not None:
        raise UnrecoverableOperandError(
            f"{type(node).__name__}: the batch-norm bias does not require grad, so its output cannot "
            "be replayed; let parameters require grad during the forward (DynamicLRP does this for you)."
        )
    return _replay(node, inputs[0], inputs[2])


def _spec() -> OpSpec:
    return OpSpec(
        family="epsilon (batch norm as affine map)",
        rule=batch_norm_rule,
        needs=lambda node, relevant: (0, 2),
        forward=_forward,
        kept_inputs=lambda node: (saved(node, "input"), saved(node, "weight"), None),
        uses_output=True,
        scales_operands=True,
        affine=_affine_constants,
        affine_needs=_affine_needs,
    )


def _unknown_bias(node: Node, inputs: list) -> bool:
    return inputs[2] is None and saved(node, "weight") is not None


def _layer_norm_parts(node: Node, inputs: list) -> tuple[Tensor, Tensor, tuple]:
    """(rho * w broadcast to x, z, normalised dims) of a native layer norm."""
    x, bias = inputs[0], inputs[2]
    dims = tuple(range(x.dim() - len(saved(node, "normalized_shape")), x.dim()))
    mean, rstd = saved(node, "result1"), saved(node, "result2")
    weight = saved(node, "weight")
    gain = rstd if weight is None else rstd * weight
    z = (x - mean) * gain
    if bias is not None:
        z = z + bias
    return gain, z, dims


def layer_norm_rule(ctx: RuleContext) -> list[MaybeTensor]:
    r"""Constant normaliser: :math:`R_x = x \odot (g - \overline{g})`, :math:`g = \rho w \odot R / \mathrm{stab}(z)`."""
    x = ctx.inputs[0]
    gain, z, dims = _layer_norm_parts(ctx.node, ctx.inputs)
    g = ctx.ratio(z).mul_(gain)
    del z
    return [x.to(ctx.dtype) * (g - g.mean(dims, keepdim=True)), None, None]


def _layer_norm_forward(node: Node, inputs: list) -> Tensor:
    # Layer norm keeps its bias, so the replay never misses it.
    return _layer_norm_parts(node, inputs)[1]


def _group_norm_parts(node: Node, inputs: list) -> tuple[Tensor, Tensor, int]:
    x, bias = inputs[0], inputs[2]
    n, c, groups = saved(node, "N"), saved(node, "C"), saved(node, "group")
    grouped = x.reshape(n, groups, -1)
    mean, rstd = saved(node, "result1").unsqueeze(-1), saved(node, "result2").unsqueeze(-1)
    centered = ((grouped - mean) * rstd).reshape(x.shape)
    channel = (1, c) + (1,) * (x.dim() - 2)
    weight = saved(node, "weight")
    z = centered if weight is None else centered * weight.view(channel)
    if bias is not None:
        z = z + bias.view(channel)
    gain = rstd.expand(n, groups, grouped.shape[-1]).reshape(x.shape)
    if weight is not None:
        gain = gain * weight.view(channel)
    return gain, z, groups


def group_norm_rule(ctx: RuleContext) -> list[MaybeTensor]:
    r"""Constant normaliser per group: :math:`R_x = x \odot (g - \overline{g})` (mean over each group)."""
    x = ctx.inputs[0]
    gain, z, groups = _group_norm_parts(ctx.node, ctx.inputs)
    g = ctx.ratio(z).mul_(gain)
    del z
    grouped = g.reshape(x.shape[0], groups, -1)
    centered = (grouped - grouped.mean(-1, keepdim=True)).reshape(x.shape)
    return [x.to(ctx.dtype) * centered, None, None]


def _group_norm_forward(node: Node, inputs: list) -> Tensor:
    if _unknown_bias(node, inputs):
        raise UnrecoverableOperandError(f"{type(node).__name__}: frozen bias, output cannot be replayed")
    return _group_norm_parts(node, inputs)[1]


def _squared_share(centered: bool):
    def rule(ctx: RuleContext) -> list[MaybeTensor]:
        r"""Statistic of squares: :math:`R_{x_i} = R\, d_i^2 / \sum_j d_j^2` with :math:`d` the (centred) input."""
        x = ctx.inputs[0].to(ctx.dtype)
        dims = _reduce_dims(ctx.node, x)
        d = x - x.mean(dims, keepdim=True) if centered else x
        share = d * d
        share = share / stabilize(share.sum(dims, keepdim=True), ctx.settings.epsilon)
        r = ctx.out
        if not saved(ctx.node, "keepdim"):
            for dim in sorted(d % x.dim() for d in dims):
                r = r.unsqueeze(dim)
        return [share * r]

    return rule


def _statistic(centered: bool, forward, kept_output=None, kept_inputs=None) -> OpSpec:
    return OpSpec(
        family="share by squares (statistics)",
        rule=_squared_share(centered),
        needs=lambda node, relevant: (0,),
        forward=forward,
        kept_output=kept_output,
        kept_inputs=kept_inputs or (lambda node: (saved(node, "self"),)),
    )


def _kept_result(node: Node):
    return saved(node, "result")


def _reduce_dims(node: Node, x: Tensor) -> list:
    dims = saved(node, "dim")
    return list(range(x.dim())) if dims is None else [signed_dim(d) for d in dims]


def _var(node: Node, inputs: list) -> Tensor:
    x = inputs[0]
    return torch.var(x, _reduce_dims(node, x), correction=saved(node, "correction"), keepdim=saved(node, "keepdim"))


NORMALIZATION: dict[str, OpSpec] = {
    "NativeBatchNormBackward0": _spec(),
    "CudnnBatchNormBackward0": _spec(),
    "MiopenBatchNormBackward0": _spec(),
    "NativeLayerNormBackward0": OpSpec(
        family="layer norm (constant normaliser, epsilon)",
        rule=layer_norm_rule,
        needs=lambda node, relevant: (0, 2),
        forward=_layer_norm_forward,
        kept_inputs=lambda node: (saved(node, "input"), saved(node, "weight"), saved(node, "bias")),
    ),
    "NativeGroupNormBackward0": OpSpec(
        family="group norm (constant normaliser, epsilon)",
        rule=group_norm_rule,
        needs=lambda node, relevant: (0, 2),
        forward=_group_norm_forward,
        kept_inputs=lambda node: (saved(node, "input"), saved(node, "weight"), None),
    ),
    "VarBackward0": _statistic(True, _var),
    "StdBackward0": _statistic(True, lambda n, x: _var(n, x).sqrt(), kept_output=_kept_result),
    "LinalgVectorNormBackward0": _statistic(False, None, kept_output=_kept_result),
    "NormBackward1": _statistic(False, None, kept_output=_kept_result),
}
