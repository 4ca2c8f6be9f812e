r"""Linear maps and products of two operands: mm, addmm, bmm, mv, convolution.

Each op is a bilinear form :math:`z = B(a, b) + \beta` (``beta`` a bias term).
The rule depends on which operands lead to a requested tensor ("activations"):

* one activation :math:`x`, the other operand a parameter or constant :math:`w`:
  the preset's linear rule, with :math:`s = R / \mathrm{stab}(\cdot)`:

  - ``epsilon``: :math:`R_x = x \odot \partial_x \langle s, B(x, w)\rangle`,
    :math:`s = R / \mathrm{stab}(B(x, w) + \beta)`;
  - ``zplus``: :math:`z = B(x^+, w^+) + B(x^-, w^-) + \beta^+`,
    :math:`R_x = x^+ \odot \partial\langle s, B(x^+, w^+)\rangle + x^- \odot \partial\langle s, B(x^-, w^-)\rangle`;
  - ``gamma`` (generalised, Andeol et al. 2021): outputs with :math:`B(x,w)+\beta > 0` use
    :math:`z = B(x^+, w + \gamma w^+) + B(x^-, w + \gamma w^-) + \beta + \gamma\beta^+`, outputs
    below zero use :math:`z = B(x^+, w + \gamma w^-) + B(x^-, w + \gamma w^+) + \beta + \gamma\beta^-`,
    relevance split as in zplus over the two pairs;

* two activations (``q @ k^T``): bilinear uniform, each gets half of the epsilon
  share, :math:`R_a = \tfrac12 a \odot \partial_a\langle s, B(a,b)\rangle` and likewise for ``b``.

The input-side products :math:`\partial_x\langle s, B\rangle` are computed from the
operands autograd kept (``_saved_mat2``, ``_saved_weight``, ...), never by calling
the weight-bearing node, which would compute the unused weight gradient too.

Bias folding. PyTorch runs one ``nn.Linear`` as a single ``addmm`` (bias inside,
:math:`\beta` = the bias) or, for a non-contiguous input, as ``mm`` (or ``bmm``, ``mv``)
followed by a separate ``add`` of the bias; which one depends on the memory layout, so
a batch and its single examples can get different graphs. Both must give the same
relevance, so a bias-free linear map with one activation operand takes the bias of
the pattern

.. math:: y = \mathrm{reshape}^{0..3}\big(B(x, w)\big) + b, \qquad
          b \text{ 1-d of size } 1 \text{ or } y_{\text{last dim}},

(reshapes read once each and ending in the map's last dim; ``add`` with ``alpha = 1``; ``b``
tracked and carrying no relevance: a parameter or a constant) as its own
:math:`\beta = b`, exactly as ``addmm`` does, in every preset above. The ``add`` then
hands :math:`R_y` on unchanged, and ``b`` receives what the fused rule gives a bias:
nothing (its share of the denominator is absorbed). :func:`bias_after` finds the
pattern; the engine does the folding (``OpSpec.bias_after``, ``RuleContext.bias``).

Batch-norm merging (setting ``batch_norm="merge"``, off by default). A convolution whose output
only a batch norm reads, :math:`y = a \odot (W * x + b) + c` per output channel with the
statistics held constant, is one linear map :math:`y = W' * x + b'` with
:math:`W' = a W` (each output channel's filter scaled) and :math:`b' = a b + c`. Its rule is the
preset's linear rule on :math:`(W', b')` with :math:`z = y` (read from the batch norm's consumers
where they kept it, as for any output), and the batch norm hands :math:`R_y` on unchanged.
That is LRP with the network canonized as Zennit's ``SequentialMergeBatchNorm`` does; it differs
from the default (epsilon on each of the two maps) by :math:`O(\epsilon / |z|)` and saves the batch
norm's passes. The engine finds the pattern (``OpSpec.affine``, ``OpSpec.merges_affine``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ..errors import UnrecoverableOperandError
from .base import (
    MaybeTensor,
    Node,
    OpSpec,
    RuleContext,
    RuleSettings,
    handed_ratio,
    needs_all_inputs,
    ratio,
    ratio_given_rectified,
    saved,
)
from .rows import on_relevant_rows

# Ops that only reshape; one that keeps the last dim keeps every output column in place
# (row-major order), so a bias along the last dim still lines up with the map's columns.
_RESHAPES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})
_MAX_RESHAPES = 3


class BilinearOp:
    """How one op computes :math:`B(a, b)`, its operand gradients and its bias term.

    Args:
        a_slot, b_slot (int): Positions of the two operands in ``next_functions``.
        bias_slot (int, optional): Position of the bias operand, if the op has one.
    """

    # Whether row i of the output depends on row i of operand a alone (a 2-d x @ W), so that a
    # rule for an activation a can run on the rows that carry relevance only.
    row_separable = False

    def __init__(self, a_slot: int, b_slot: int, bias_slot: Optional[int] = None) -> None:
        self.a_slot, self.b_slot, self.bias_slot = a_slot, b_slot, bias_slot

    def apply(self, node: Node, a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError

    def grads(self, node: Node, s: Tensor, a: Tensor, b: Tensor, want_a: bool, want_b: bool) -> tuple:
        raise NotImplementedError

    def bias(self, node: Node, inputs: list) -> MaybeTensor:
        """The bias term, broadcastable to the output; ``None`` if absent or untracked."""
        return None

    def has_unknown_bias(self, node: Node, inputs: list) -> bool:
        return False

    def kept(self, node: Node) -> tuple:
        raise NotImplementedError


class MatMulOp(BilinearOp):
    """``a @ b`` (mm, bmm), optionally ``beta * bias + alpha * a @ b`` (addmm)."""

    def __init__(self, a_slot: int, b_slot: int, bias_slot: Optional[int] = None, a_name: str = "self",
                 b_name: str = "mat2", row_separable: bool = False) -> None:
        super().__init__(a_slot, b_slot, bias_slot)
        self.a_name, self.b_name = a_name, b_name
        self.row_separable = row_separable

    def _alpha(self, node: Node) -> float:
        alpha = saved(node, "alpha")
        return 1.0 if alpha is None else alpha

    def apply(self, node: Node, a: Tensor, b: Tensor) -> Tensor:
        alpha = self._alpha(node)
        z = a @ b
        return z if alpha == 1 else z * alpha

    def grads(self, node: Node, s: Tensor, a: Tensor, b: Tensor, want_a: bool, want_b: bool) -> tuple:
        alpha = self._alpha(node)
        if alpha != 1:
            s = s * alpha
        ga = s @ b.mT.to(s.dtype) if want_a else None
        gb = a.mT.to(s.dtype) @ s if want_b else None
        return ga, gb

    def bias(self, node: Node, inputs: list) -> MaybeTensor:
        # An untracked bias is a constant the forward built, such as the additive key-padding
        # mask nn.MultiheadAttention hands baddbmm. Autograd keeps no trace of it, so it is
        # replayed as zero, as an untracked summand is (see _replay_sum in arithmetic.py): exact
        # for a 0 / -inf mask, whose masked positions the softmax sets to 0 and gives no relevance.
        if self.bias_slot is None or inputs[self.bias_slot] is None:
            return None
        beta = saved(node, "beta")
        bias = inputs[self.bias_slot]
        return bias if beta in (None, 1) else bias * beta

    def kept(self, node: Node) -> tuple:
        values = [None] * len(node.next_functions)
        values[self.a_slot] = saved(node, self.a_name)
        values[self.b_slot] = saved(node, self.b_name)
        return tuple(values)


class MatVecOp(MatMulOp):
    """``a @ v`` for a matrix and a vector."""

    def grads(self, node: Node, s: Tensor, a: Tensor, b: Tensor, want_a: bool, want_b: bool) -> tuple:
        ga = s.unsqueeze(-1) * b.to(s.dtype) if want_a else None
        gb = a.mT.to(s.dtype) @ s if want_b else None
        return ga, gb


class ConvolutionOp(BilinearOp):
    """Convolution of any dimension, transposed or not, grouped or not (slots: input, weight, bias)."""

    def __init__(self) -> None:
        super().__init__(0, 1, 2)

    @staticmethod
    def _params(node: Node) -> tuple:
        return (
            list(saved(node, "stride")),
            list(saved(node, "padding")),
            list(saved(node, "dilation")),
            saved(node, "transposed"),
            list(saved(node, "output_padding")),
            saved(node, "groups"),
        )

    def apply(self, node: Node, a: Tensor, b: Tensor) -> Tensor:
        return torch.convolution(a, b.to(a.dtype), None, *self._params(node))

    def grads(self, node: Node, s: Tensor, a: Tensor, b: Tensor, want_a: bool, want_b: bool) -> tuple:
        params = self._params(node)
        w = b.to(s.dtype)
        stride, padding, _, transposed, _, groups = params
        if want_a and _is_strided_pointwise(w, stride, padding, transposed) and _scatter_pays(s, w):
            ga = _strided_pointwise_input_grad(s, a, w, stride, groups)
            if not want_b:
                return ga, None
            return ga, torch.ops.aten.convolution_backward(s, a.to(s.dtype), w, None, *params, [False, True, False])[1]
        ga, gb, _ = torch.ops.aten.convolution_backward(s, a.to(s.dtype), w, None, *params, [want_a, want_b, False])
        return ga, gb

    def bias(self, node: Node, inputs: list) -> MaybeTensor:
        bias = inputs[2]
        if bias is None:
            return None
        spatial = len(saved(node, "stride"))
        return bias.view(-1, *([1] * spatial))

    def has_unknown_bias(self, node: Node, inputs: list) -> bool:
        # Without a bias autograd records its size as (0,); a frozen bias keeps its real size.
        sizes = saved(node, "bias_sym_sizes_opt")
        return inputs[2] is None and sizes is not None and tuple(sizes) != (0,)

    def kept(self, node: Node) -> tuple:
        return (saved(node, "input"), saved(node, "weight"), None)

    def merge_affine(self, node: Node, inputs: list, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
        r"""Bias term :math:`ab + c` of :math:`a \odot (W * x + b) + c` as one convolution, and :math:`a`,
        both shaped to broadcast over the output."""
        bias = inputs[2]
        merged = shift if bias is None else torch.addcmul(shift, scale, bias)
        spatial = [1] * len(saved(node, "stride"))
        return merged.view(-1, *spatial), scale.view(-1, *spatial)

    @staticmethod
    def scale_filters(weight: Tensor, scale: Tensor) -> Tensor:
        """:math:`aW`: each output channel's filter scaled."""
        return weight * scale.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1)))


def _is_strided_pointwise(w: Tensor, stride: list, padding: list, transposed: bool) -> bool:
    """A plain convolution with a 1 x 1 (x 1) kernel, no padding and a stride above 1 somewhere."""
    return (
        not transposed
        and all(k == 1 for k in w.shape[2:])
        and all(p == 0 for p in padding)
        and any(st > 1 for st in stride)
    )


# The scatter path's transposed convolution is slow where its weight is large next to the gradient and
# cold in cache (presumably a weight reorder per call); there autograd's strided kernel is the cheaper
# one. ResNet-50's 1024 -> 2048 downsample on 2 CPU threads, weights cold in cache, as in a
# walk (weight / gradient elements; scatter vs autograd ms): 20.9 at batch 1, 1.75 vs 1.29; 10.4 at
# batch 2, 2.15 vs 3.34; 5.2 at batch 4, 3.12 vs 5.26. The scatter is taken up to this ratio.
_MAX_WEIGHT_PER_GRADIENT = 16


def _scatter_pays(s: Tensor, w: Tensor) -> bool:
    """Whether the scatter path beats autograd's kernel: the weight is not much larger than ``s``."""
    return w.numel() <= _MAX_WEIGHT_PER_GRADIENT * s.numel()


def _strided_pointwise_input_grad(s: Tensor, a: Tensor, w: Tensor, stride: list, groups: int) -> Tensor:
    r"""Input gradient of a pointwise convolution with a stride: :math:`W^\top s` at the positions the
    stride reads, zero elsewhere.

    Such a convolution is a stride-1 pointwise convolution of the subsampled input, so its input
    gradient is the stride-1 transposed convolution of ``s``, scattered into zeros. The same sums as
    ``convolution_backward``, without its strided backward kernel, which oneDNN runs several times
    slower on the CPU (ResNet-50's downsample convolutions at batch 8: 38 ms against 7 ms for
    the 256 -> 512 one on 2 cores).
    """
    spatial = len(stride)
    at_stride = (slice(None), slice(None)) + tuple(slice(None, None, st) for st in stride)
    grad = torch.zeros_like(a, dtype=s.dtype)  # a's layout, as convolution_backward gives
    grad[at_stride] = torch.convolution(s, w, None, [1] * spatial, [0] * spatial, [1] * spatial, True, [0] * spatial, groups)
    return grad


def _merges_affine(node: Node) -> bool:
    # A transposed convolution's weight is (in, out / groups, ...): its output channels are not dim 0.
    return not saved(node, "transposed")


def _plus(t: Tensor) -> Tensor:
    return t.clamp(min=0)


def _minus(t: Tensor) -> Tensor:
    return t.clamp(max=0)


def _linear_relevance(op: BilinearOp, node: Node, x_is_a: bool, x: Tensor, w: Tensor, bias: MaybeTensor,
                      relevance: Tensor, settings: RuleSettings, output: MaybeTensor,
                      take_rectified: Callable[[], MaybeTensor] = lambda: None,
                      rectified_vanishes: bool = False, channel_scale: MaybeTensor = None) -> Tensor:
    r"""The preset's rule for one activation ``x`` against a parameter operand ``w``.

    ``channel_scale`` (epsilon only): the map is :math:`W' = aW` with :math:`a` this per-channel
    scale of the output (a merged batch norm; ``bias`` is then the merged one). The weights are
    never scaled: :math:`\partial_x\langle s, W' * x\rangle = \partial_x\langle a s, W * x\rangle`,
    one pass over the output instead of one over the weights.

    ``output`` is the op's forward output if a consumer kept it (saves one forward product);
    ``take_rectified()`` hands over ``max(output, 0)`` if a ReLU kept that instead (see
    ``ratio_given_rectified``); taken only where it is used, and dropped once the ratio exists.
    ``rectified_vanishes``: the planner proved that relevance vanishes where that value is 0.
    """

    def apply(xv: Tensor, wv: Tensor) -> Tensor:
        return op.apply(node, xv, wv) if x_is_a else op.apply(node, wv, xv)

    def grad(s: Tensor, xv: Tensor, wv: Tensor) -> Tensor:
        if x_is_a:
            return op.grads(node, s, xv, wv, True, False)[0]
        return op.grads(node, s, wv, xv, False, True)[1]

    eps = settings.epsilon
    dtype = relevance.dtype
    if settings.linear == "epsilon":
        handed = [relevance]
        del relevance  # handed over: the ratio may be written into it where nothing else refers to it
        if output is not None:
            s = handed_ratio(handed, output, eps)
        else:
            s = ratio_given_rectified(handed[0], take_rectified(), eps, rectified_vanishes)
            if s is None:  # recompute z; it is freed as soon as the ratio exists
                z = apply(x, w)
                if channel_scale is not None:
                    z = z.mul_(channel_scale) if bias is None else torch.addcmul(bias, z, channel_scale)
                elif bias is not None:
                    z = z.add_(bias)
                s = handed_ratio(handed, z, eps)
                del z
        handed.clear()  # done with the relevance: freed before the products
        if channel_scale is not None:
            s = s.mul_(channel_scale)
        return grad(s, x, w).mul_(x)

    x_pos, x_neg = _plus(x), _minus(x)
    if settings.linear == "zplus":
        w_pos, w_neg = _plus(w), _minus(w)
        z = apply(x_pos, w_pos) + apply(x_neg, w_neg)
        if bias is not None:
            z = z + _plus(bias)
        s = ratio(relevance, z, eps)
        return x_pos.to(dtype) * grad(s, x_pos, w_pos) + x_neg.to(dtype) * grad(s, x_neg, w_neg)

    if settings.linear == "gamma":
        g = settings.gamma
        w_up, w_down = w + g * _plus(w), w + g * _minus(w)
        out = output
        if out is None:
            out = apply(x, w) if bias is None else apply(x, w) + bias
        positive = out > 0
        # Pairs that raise a positive output (x+ with w_up, x- with w_down) and a negative one.
        z_pos = apply(x_pos, w_up) + apply(x_neg, w_down)
        z_neg = apply(x_pos, w_down) + apply(x_neg, w_up)
        if bias is not None:
            z_pos = z_pos + bias + g * _plus(bias)
            z_neg = z_neg + bias + g * _minus(bias)
        s_pos = torch.where(positive, ratio(relevance, z_pos, eps), 0.0)
        s_neg = torch.where(out < 0, ratio(relevance, z_neg, eps), 0.0)
        return x_pos.to(dtype) * (grad(s_pos, x_pos, w_up) + grad(s_neg, x_pos, w_down)) + x_neg.to(dtype) * (
            grad(s_pos, x_neg, w_down) + grad(s_neg, x_neg, w_up)
        )
    raise ValueError(f"unknown linear rule {settings.linear!r}")


def bias_after(graph: Any, consumers: Sequence[Sequence[tuple[int, int]]], node: int,
               relevant: tuple) -> Optional[tuple[int, int]]:
    """The ``add`` of a bias right after a bias-free linear map, as ``(sum node, bias slot)``.

    The pattern of the module docstring (bias folding). Looks at no more than
    ``_MAX_RESHAPES + 1`` consumers: O(1). Everything it reads is part of the plan cache's
    graph signature (types, edges, shapes) except the sum's ``alpha``, a constant of the
    model's code.

    Args:
        graph (AutogradGraph): The auxiliary graph (``types``, ``edges``, ``nodes``).
        consumers (sequence): Per node, the ``(consumer, slot)`` pairs that read it.
        node (int): Index of the linear map (mm, bmm, mv).
        relevant (tuple of bool): The map's relevance mask.

    Returns:
        tuple or None: The sum's index and the slot of its bias operand, or ``None``.
    """
    if sum(relevant) != 1:  # two activations (q @ k^T): no weight, so no bias to fold
        return None
    columns = tuple(graph.nodes[node]._input_metadata[0].shape[-1:])
    current = node
    for _ in range(_MAX_RESHAPES + 1):
        if len(consumers[current]) != 1:  # relevance from another reader must not see the bias
            return None
        parent, slot = consumers[current][0]
        name = graph.types[parent]
        if name in _RESHAPES:
            current = parent
            continue
        if name != "AddBackward0" or saved(graph.nodes[parent], "alpha") != 1 or len(graph.edges[parent]) != 2:
            return None
        bias_slot = 1 - slot
        child, k = graph.edges[parent][bias_slot]
        if child < 0:  # untracked: neither its value nor its shape is known
            return None
        out_shape = tuple(graph.nodes[parent]._input_metadata[0].shape)
        if tuple(graph.nodes[current]._input_metadata[0].shape) != out_shape or out_shape[-1:] != columns:
            return None
        # 1-d only: a (1, n) "bias" could be a batch of one, and then a batch would differ again.
        bias_shape = tuple(graph.nodes[child]._input_metadata[k].shape)
        if len(bias_shape) != 1 or bias_shape[0] not in (1,) + columns:
            return None
        return parent, bias_slot
    return None


def _bilinear_rule(op: BilinearOp) -> Callable[[RuleContext], list]:
    def rule(ctx: RuleContext) -> list[MaybeTensor]:
        node = ctx.node
        a, b = ctx.inputs[op.a_slot], ctx.inputs[op.b_slot]
        bias = op.bias(node, ctx.inputs)
        output = ctx.output
        # max(z, 0) is that of z without a folded bias: usable only where nothing was folded.
        take_rectified = ctx.take_rectified if ctx.bias is None else lambda: None
        if ctx.bias is not None:  # folded from the add that follows (see "Bias folding")
            bias = ctx.bias if bias is None else bias + ctx.bias
            output = None if output is None else output + ctx.bias
        channel_scale = None
        if ctx.affine is not None:  # a batch norm merged into this map (see "Batch-norm merging")
            bias, channel_scale = op.merge_affine(node, ctx.inputs, *ctx.affine)
            if ctx.settings.linear != "epsilon":  # z+ and gamma split the merged weights by sign
                b, channel_scale = op.scale_filters(b, ctx.affine[0]), None
        rel_a, rel_b = ctx.relevant[op.a_slot], ctx.relevant[op.b_slot]
        result: list[MaybeTensor] = [None] * len(node.next_functions)
        if rel_a and rel_b:
            # Two activations: bilinear uniform, half of the epsilon share to each.
            z = output
            if z is None:
                z = op.apply(node, a, b)
                if bias is not None:
                    z = z + bias
            s = ctx.ratio(z).mul_(0.5)
            del z
            ga, gb = op.grads(node, s, a, b, True, True)
            result[op.a_slot] = a.to(ctx.dtype) * ga
            result[op.b_slot] = b.to(ctx.dtype) * gb
        elif rel_a and op.row_separable:  # x @ W: rows without relevance are skipped (see rows.py)
            result[op.a_slot] = on_relevant_rows(
                lambda x, bias_, r, out, rect: _linear_relevance(
                    op, node, True, x, b, bias_, r, ctx.settings, out, rect, ctx.rectified_vanishes
                ),
                a, bias, ctx.out, output, take_rectified,
            )
        elif rel_a:
            result[op.a_slot] = _linear_relevance(
                op, node, True, a, b, bias, ctx.take_out(), ctx.settings, output, take_rectified,
                ctx.rectified_vanishes, channel_scale,
            )
        elif rel_b:
            result[op.b_slot] = _linear_relevance(
                op, node, False, b, a, bias, ctx.take_out(), ctx.settings, output, take_rectified,
                ctx.rectified_vanishes,
            )
        return result

    return rule


def _bilinear_forward(op: BilinearOp):
    def forward(node: Node, inputs: list) -> Tensor:
        if op.has_unknown_bias(node, inputs):
            raise UnrecoverableOperandError(
                f"{type(node).__name__}: the bias does not require grad, so autograd kept no trace of it "
                "and the output cannot be replayed; let parameters require grad during the forward "
                "(DynamicLRP does this for you)."
            )
        z = op.apply(node, inputs[op.a_slot], inputs[op.b_slot])
        bias = op.bias(node, inputs)
        return z if bias is None else z + bias

    return forward


def _spec(op: BilinearOp) -> OpSpec:
    return OpSpec(
        family="linear (preset rule) / bilinear uniform",
        rule=_bilinear_rule(op),
        needs=needs_all_inputs,
        forward=_bilinear_forward(op),
        kept_inputs=op.kept,
        uses_output=True,
        # An op with a bias of its own (addmm, convolution) already has it in its rule.
        bias_after=bias_after if isinstance(op, MatMulOp) and op.bias_slot is None else None,
        # mm / addmm / bmm / baddbmm / mv allocate their result; a convolution's may be channels-last.
        fresh_output=isinstance(op, MatMulOp),
        scales_operands=True,  # every preset's rule hands x (and, for two activations, b) x * (...)
        merges_affine=_merges_affine if isinstance(op, ConvolutionOp) else None,
    )


LINEAR: dict[str, OpSpec] = {
    "AddmmBackward0": _spec(MatMulOp(1, 2, bias_slot=0, a_name="mat1", b_name="mat2", row_separable=True)),
    "BaddbmmBackward0": _spec(MatMulOp(1, 2, bias_slot=0, a_name="batch1", b_name="batch2")),
    "MmBackward0": _spec(MatMulOp(0, 1, row_separable=True)),
    "BmmBackward0": _spec(MatMulOp(0, 1)),
    "MvBackward0": _spec(MatVecOp(0, 1, b_name="vec")),
    "ConvolutionBackward0": _spec(ConvolutionOp()),
}
