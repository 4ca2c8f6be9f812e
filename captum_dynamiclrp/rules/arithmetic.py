r"""Sums and products of activations.

Sums (add, sub, sum, mean, average pools) use the epsilon rule on signed
contributions. Every such op is linear in its operands,
:math:`z = \sum_i J_i x_i`, so with :math:`s = R / \mathrm{stab}(z)`

.. math:: R_{x_i} = x_i \odot J_i^\top s,

and :math:`J_i^\top s` is the node's own vector-Jacobian product (which also
sums over broadcast dimensions). A constant operand (a bias, a buffer) takes
its share :math:`c\,s` with it; that share is what the conservation delta shows.
Exception: the ``add`` of a bias right after a bias-free linear map (``mm`` +
``add``, PyTorch's unfused ``nn.Linear``) passes relevance on whole, the map's rule
taking the bias as its own (``linear.py``, "Bias folding").

Products (mul, div) use the bilinear uniform rule of AttnLRP: each activation
operand gets half of the relevance; with one constant operand, the activation
gets all of it.

A cumulative product :math:`y_k = \prod_{j \le k} x_j` (``cumprod`` along one dim)
is a product of :math:`k` activations at each position :math:`k` (counted from 1), and
the bilinear uniform rule generalised to :math:`k` factors splits :math:`R_{y_k}`
evenly over them:

.. math:: R_{x_j} = \sum_{k \ge j} \frac{R_{y_k}}{k},

which conserves exactly (each :math:`R_{y_k}` is handed out :math:`k` times
:math:`1/k`); :math:`y_1 = x_1` is a copy and passes its relevance on whole.

Sum ops keep no operands (``AddBackward0`` keeps only ``alpha``): they are the
*strict* promise-generating ops whose operands the Promise System recovers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UnrecoverableOperandError
from .base import (
    MaybeTensor,
    Node,
    OpSpec,
    RuleContext,
    needs_all_inputs,
    needs_relevant_inputs,
    node_vjp,
    saved,
    signed_dim,
    sum_to,
)


def contribution_epsilon_rule(ctx: RuleContext, s: Tensor) -> list[MaybeTensor]:
    r"""Epsilon on contributions: :math:`R_{x_i} = x_i \odot J_i^\top s`, :math:`s = R / \mathrm{stab}(z)`.

    Callers pass ``s = ctx.ratio(z)`` so that ``z`` is freed before the products; ``s`` is
    the rule's own, so the last product may be written into the VJP's result (one buffer less).
    """
    grads = node_vjp(ctx.node, (s,))
    del s
    operands = [k for k, (x, g, rel) in enumerate(zip(ctx.inputs, grads, ctx.relevant))
                if rel and x is not None and g is not None]
    products: list[MaybeTensor] = [None] * min(len(ctx.inputs), len(grads), len(ctx.relevant))
    for k in operands:
        x, g = ctx.inputs[k], grads[k]
        # In place only into the last one: an earlier operand's VJP may be the same tensor.
        products[k] = g.mul_(x) if k == operands[-1] and _writable_product(g, x) else x * g
    return products


def _writable_product(g: Tensor, x: Tensor) -> bool:
    """Whether ``g.mul_(x)`` gives ``x * g``: same shape and dtype, and ``g`` a dense buffer of its own
    (a VJP that broadcasts, as a sum's does, returns an expanded view)."""
    return (
        g.shape == x.shape and g.dtype == x.dtype and g.is_contiguous()
        and g.untyped_storage().nbytes() == g.numel() * g.element_size()
    )


def _known_sum(node: Node, inputs: list, sign: float) -> Tensor:
    # a + alpha*b (sign=+1) or a - alpha*b (sign=-1). An operand autograd did not track
    # (a python scalar, a buffer, an attention mask) enters as zero; see _replay_sum.
    a, b = inputs
    alpha = saved(node, "alpha")
    if b is None:
        return a
    term = b if alpha == 1 else b * alpha
    if a is None:
        return sign * term
    return a + term if sign > 0 else a - term


def _replay_sum(sign: float):
    def forward(node: Node, inputs: list) -> Tensor:
        # An untracked operand is replayed as zero. Exact for additive attention masks
        # (0 where attended; -inf or finfo.min only where the softmax output is 0, which
        # carries no relevance); approximate for other untracked constants, unless a
        # consumer kept the sum itself, which the resolver then reads instead.
        if all(x is None for x in inputs):
            raise UnrecoverableOperandError(f"{type(node).__name__}: no operand is tracked or kept")
        return _known_sum(node, inputs, sign)

    return forward


def _operand_of_sum(sign: float):
    """``a + sign * alpha * b = z`` solved for the operand in ``slot`` (see ``OpSpec.operand_from_output``)."""

    def operand(node: Node, slot: int, z: Tensor, inputs: list) -> Tensor:
        alpha = saved(node, "alpha")
        scale = sign * (1 if alpha is None else alpha)
        if slot == 0:  # a = z - sign * alpha * b
            b = inputs[1]
            return z - b if scale == 1 else z - b * scale
        difference = z - inputs[0]  # b = (z - a) / (sign * alpha)
        return difference if scale == 1 else difference.div_(scale)

    return operand


def _sum_rule(sign: float):
    def rule(ctx: RuleContext) -> list[MaybeTensor]:
        # The true sum (kept by a consumer, or the explained output; or a ReLU's max(z, 0) where
        # the planner proved that exact) lets an untracked constant absorb its share; otherwise
        # the sum of the operands we know.
        s = ctx.proven_rectified_ratio()
        if s is None:
            z = ctx.output if ctx.output is not None else _known_sum(ctx.node, ctx.inputs, sign)
            s = ctx.ratio(z)
            del z  # free the recomputed sum before the products
        return contribution_epsilon_rule(ctx, s)

    return rule


def _reduce_forward(reduce):
    def forward(node: Node, inputs: list) -> Tensor:
        dims = saved(node, "dim")
        if dims is None:
            return reduce(inputs[0])
        dims = [signed_dim(d) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))]
        return reduce(inputs[0], dims, keepdim=saved(node, "keepdim"))

    return forward


def _avg_pool(node: Node, inputs: list) -> Tensor:
    kernel = saved(node, "kernel_size")
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel)]
    kwargs = dict(
        kernel_size=kernel,
        stride=saved(node, "stride") or kernel,
        padding=saved(node, "padding"),
        ceil_mode=saved(node, "ceil_mode"),
        count_include_pad=saved(node, "count_include_pad"),
    )
    if pool is not F.avg_pool1d:
        kwargs["divisor_override"] = saved(node, "divisor_override")
    return pool(inputs[0], **kwargs)


def _adaptive_avg_pool(spatial: int):
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[spatial]

    def forward(node: Node, inputs: list) -> Tensor:
        return pool(inputs[0], tuple(node._input_metadata[0].shape[-spatial:]))

    return forward


def _reduction(forward, kept_inputs=None) -> OpSpec:
    def rule(ctx: RuleContext) -> list[MaybeTensor]:
        return contribution_epsilon_rule(ctx, ctx.ratio(forward(ctx.node, ctx.inputs)))

    return OpSpec(
        family="epsilon (signed contributions)",
        rule=rule,
        needs=needs_all_inputs,
        forward=forward,
        kept_inputs=kept_inputs,
        scales_operands=True,
    )


def _kept_self(node: Node) -> tuple:
    return (saved(node, "self"),)


# Ops whose output is a normalising statistic, and the ops that may sit between such a
# statistic and the product that applies it (broadcasts, "+ eps", a reciprocal).
NORMALISER_TYPES = frozenset(
    {"RsqrtBackward0", "SqrtBackward0", "StdBackward0", "VarBackward0", "LinalgVectorNormBackward0", "NormBackward1"}
)
_BETWEEN_NORMALISER_AND_PRODUCT = frozenset(
    {"ExpandBackward0", "ViewBackward0", "UnsqueezeBackward0", "SqueezeBackward1", "ToCopyBackward0",
     "CloneBackward0", "AddBackward0", "ReciprocalBackward0", "ClampMinBackward0", "ClampBackward1"}
)


def is_normaliser(node: Node, hops: int = 6) -> bool:
    """Whether ``node`` computes a normaliser statistic, looking through a few broadcast/eps ops (O(1))."""
    for _ in range(hops):
        if node is None:
            return False
        name = type(node).__name__
        if name in NORMALISER_TYPES:
            return True
        if name not in _BETWEEN_NORMALISER_AND_PRODUCT:
            return False
        tracked = [child for child, _ in node.next_functions if child is not None]
        if len(tracked) != 1:
            return False
        node = tracked[0]
    return False


# Elementwise ops through which a value stays "a function of the same tensor, element by element".
_ELEMENTWISE_TYPES = frozenset(
    {"TanhBackward0", "SigmoidBackward0", "ErfBackward0", "PowBackward0", "ExpBackward0", "NegBackward0",
     "MulBackward0", "DivBackward0", "AddBackward0", "SubBackward0", "ReluBackward0", "GeluBackward0",
     "SiluBackward0", "SoftplusBackward0", "HardsigmoidBackward0", "ClampBackward1", "LogSigmoidBackward0",
     "AtanBackward0"}
)


def _elementwise_root(edge: tuple, budget: int = 8) -> tuple:
    """(root node, output number, hops): the tensor an operand is an elementwise function of.

    Walks down unary elementwise ops, and sums/products whose tracked operands share one root
    (``sqrt(2/pi) * (x + 0.044715 * x**3)`` is rooted at ``x``). The walk is bounded by
    ``budget`` steps, so it costs O(1) per product node.
    """
    node, k = edge
    hops = 0
    while budget > 0 and node is not None and type(node).__name__ in _ELEMENTWISE_TYPES:
        tracked = [e for e in node.next_functions if e[0] is not None]
        if not tracked:
            break
        budget -= 1
        if len(tracked) == 1:
            node, k = tracked[0]
            hops += 1
            continue
        roots = [_elementwise_root(e, budget) for e in tracked]
        if any(r[0] is not roots[0][0] or r[1] != roots[0][1] for r in roots):
            break
        node, k = roots[0][0], roots[0][1]
        hops += 1 + max(r[2] for r in roots)
        break
    return node, k, hops


def constant_factors(node: Node) -> tuple:
    """Slots of a product that act as constant factors of the other operand.

    * a normaliser statistic next to a plain operand (RMS norm: ``x * rsqrt(var + eps)``);
    * a self-gate: both factors are elementwise functions of the same tensor and one is the
      more direct one (``x * sigmoid(x)``, GELU written out as ``0.5 x (1 + tanh(u(x)))``):
      the gate is a constant, so the activation as a whole passes relevance on unchanged
      (AttnLRP's identity rule for activations), however it is spelt.
    """
    edges = node.next_functions
    flags = [child is not None and is_normaliser(child) for child, _ in edges]
    if not any(child is not None and not flag for (child, _), flag in zip(edges, flags)):
        flags = [False] * len(edges)
    tracked = [slot for slot, (child, _) in enumerate(edges) if child is not None and not flags[slot]]
    if len(tracked) == 2:
        a, b = (_elementwise_root(edges[slot]) for slot in tracked)
        if a[0] is b[0] and a[1] == b[1] and a[2] != b[2]:
            flags[tracked[0] if a[2] > b[2] else tracked[1]] = True
    return tuple(flags)


def product_uniform_rule(ctx: RuleContext) -> list[MaybeTensor]:
    r"""Bilinear uniform (AttnLRP): :math:`R_a = R_b = R/2` for two activations, :math:`R_a = R` for one.

    A factor that is a normaliser statistic (``rsqrt(var + eps)``, ``x.norm()``, ...) or a
    self-gate (``sigmoid(x)`` in ``x * sigmoid(x)``) is a constant (see :func:`constant_factors`),
    so normalisations and activations written out in plain ops pass all relevance on. Broadcast operands collect the relevance of every element
    they were broadcast to.
    """
    relevant = ctx.relevant
    edges = ctx.node.next_functions
    share = 1.0 / max(1, sum(relevant))
    r = ctx.out if share == 1.0 else ctx.out * share
    result: list[MaybeTensor] = []
    for (child, k), rel in zip(edges, relevant):
        result.append(sum_to(r, child._input_metadata[k].shape) if rel else None)
    return result


def cumprod_uniform_rule(ctx: RuleContext) -> list[MaybeTensor]:
    r"""Cumulative product: :math:`R_{x_j} = \sum_{k \ge j} R_{y_k} / k` along the dim (positions from 1).

    Each output is the product of the first :math:`k` inputs; its relevance is split evenly
    over those :math:`k` factors (bilinear uniform for :math:`k` factors), so relevance is
    conserved exactly. Computed as a reversed cumulative sum of :math:`R_{y_k} / k`.
    """
    r = ctx.out
    if r.dim() == 0:
        return [r]
    dim = signed_dim(saved(ctx.node, "dim")) % r.dim()
    n = r.shape[dim]
    counts = torch.arange(1, n + 1, dtype=r.dtype, device=r.device).view([n] + [1] * (r.dim() - dim - 1))
    return [(r / counts).flip(dim).cumsum(dim).flip(dim)]


def _product(forward, kept_inputs) -> OpSpec:
    return OpSpec(
        family="bilinear uniform (products)",
        rule=product_uniform_rule,
        forward=forward,
        kept_inputs=kept_inputs,
        constant_slots=constant_factors,
    )


def _kept_self_other(node: Node) -> tuple:
    return (saved(node, "self"), saved(node, "other"))


def _kept_scalar_other(node: Node) -> tuple:
    return (saved(node, "self"),)


def _interpolate(mode: str, antialias: bool = False):
    def forward(node: Node, inputs: list) -> Tensor:
        return F.interpolate(
            inputs[0], size=list(saved(node, "output_size")), mode=mode, align_corners=saved(node, "align_corners"),
            antialias=antialias,
        )

    return forward


def _index_add(node: Node, inputs: list) -> Tensor:
    base, source = inputs
    if base is None:
        raise UnrecoverableOperandError("IndexAddBackward0: the base tensor is an untracked constant")
    return base.index_add(signed_dim(saved(node, "dim")), saved(node, "index"), source, alpha=saved(node, "alpha"))


def _scatter_add(node: Node, inputs: list) -> Tensor:
    base, source = inputs
    if base is None or source is None:
        raise UnrecoverableOperandError("ScatterAddBackward0: an operand is an untracked constant")
    return base.scatter_add(signed_dim(saved(node, "dim")), saved(node, "index"), source)


def _glu_rule(ctx: RuleContext) -> list[MaybeTensor]:
    r"""GLU :math:`a \odot \sigma(b)`, both halves of one input: bilinear uniform, :math:`R_a = R_b = R/2`."""
    half = ctx.out * 0.5
    return [torch.cat([half, half], dim=signed_dim(saved(ctx.node, "dim")))]


ARITHMETIC: dict[str, OpSpec] = {
    "AddBackward0": OpSpec(
        family="epsilon (signed contributions)",
        rule=_sum_rule(+1.0),
        needs=needs_all_inputs,
        forward=_replay_sum(+1.0),
        uses_output=True,
        needs_given_output=needs_relevant_inputs,
        operand_from_output=_operand_of_sum(+1.0),
        scales_operands=True,
    ),
    "SubBackward0": OpSpec(
        family="epsilon (signed contributions)",
        rule=_sum_rule(-1.0),
        needs=needs_all_inputs,
        forward=_replay_sum(-1.0),
        uses_output=True,
        needs_given_output=needs_relevant_inputs,
        operand_from_output=_operand_of_sum(-1.0),
        scales_operands=True,
    ),
    # c - alpha * x with a scalar c that autograd did not keep: c absorbs nothing.
    "RsubBackward1": OpSpec(family="epsilon (signed contributions)", rule=lambda ctx: (ctx.out,)),
    "SumBackward0": _reduction(_reduce_forward(torch.sum)),
    "SumBackward1": _reduction(_reduce_forward(torch.sum)),
    "MeanBackward0": _reduction(_reduce_forward(torch.mean)),
    "MeanBackward1": _reduction(_reduce_forward(torch.mean)),
    "AvgPool2DBackward0": _reduction(_avg_pool, kept_inputs=_kept_self),
    "AvgPool3DBackward0": _reduction(_avg_pool, kept_inputs=_kept_self),
    "AdaptiveAvgPool2DBackward0": _reduction(_adaptive_avg_pool(2), kept_inputs=_kept_self),
    "AdaptiveAvgPool3DBackward0": _reduction(_adaptive_avg_pool(3), kept_inputs=_kept_self),
    "CumsumBackward0": _reduction(lambda n, x: x[0].cumsum(signed_dim(saved(n, "dim")))),
    "IndexAddBackward0": _reduction(_index_add, kept_inputs=lambda n: (None, saved(n, "source"))),
    "ScatterAddBackward0": _reduction(_scatter_add),
    "UpsampleLinear1DBackward0": _reduction(_interpolate("linear")),
    "UpsampleBilinear2DBackward0": _reduction(_interpolate("bilinear")),
    "UpsampleBicubic2DBackward0": _reduction(_interpolate("bicubic")),
    "UpsampleBilinear2DAaBackward0": _reduction(_interpolate("bilinear", antialias=True)),
    "UpsampleBicubic2DAaBackward0": _reduction(_interpolate("bicubic", antialias=True)),
    "UpsampleTrilinear3DBackward0": _reduction(_interpolate("trilinear")),
    "GluBackward0": OpSpec(
        family="bilinear uniform (products)",
        rule=_glu_rule,
        forward=lambda n, x: F.glu(x[0], signed_dim(saved(n, "dim"))),
        kept_inputs=lambda n: (saved(n, "self"),),
    ),
    "WeightNormInterfaceBackward0": _product(
        lambda n, x: torch._weight_norm_interface(x[0], x[1], saved(n, "dim")),
        lambda n: (saved(n, "v"), saved(n, "g")),
    ),
    "MulBackward0": _product(lambda n, x: x[0] * x[1], _kept_self_other),
    "MulBackward1": _product(lambda n, x: x[0] * saved(n, "other"), _kept_scalar_other),
    "DivBackward0": _product(lambda n, x: x[0] / x[1], _kept_self_other),
    "DivBackward1": _product(lambda n, x: x[0] / saved(n, "other"), _kept_scalar_other),
    "CumprodBackward0": OpSpec(
        family="bilinear uniform (products)",
        rule=cumprod_uniform_rule,
        forward=lambda n, x: x[0].cumprod(signed_dim(saved(n, "dim")), dtype=n._input_metadata[0].dtype),
        kept_inputs=_kept_self,
        kept_output=lambda n: saved(n, "result"),
    ),
}

