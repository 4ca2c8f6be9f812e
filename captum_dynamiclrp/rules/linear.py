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
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..errors import UnrecoverableOperandError
from .base import MaybeTensor, Node, OpSpec, RuleContext, RuleSettings, needs_all_inputs, ratio, saved


class BilinearOp:
    """How one op computes :math:`B(a, b)`, its operand gradients and its bias term.

    Args:
        a_slot, b_slot (int): Positions of the two operands in ``next_functions``.
        bias_slot (int, optional): Position of the bias operand, if the op has one.
    """

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
                 b_name: str = "mat2") -> None:
        super().__init__(a_slot, b_slot, bias_slot)
        self.a_name, self.b_name = a_name, b_name

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
        if self.bias_slot is None or inputs[self.bias_slot] is None:
            return None
        beta = saved(node, "beta")
        bias = inputs[self.bias_slot]
        return bias if beta in (None, 1) else bias * beta

    def has_unknown_bias(self, node: Node, inputs: list) -> bool:
        return self.bias_slot is not None and inputs[self.bias_slot] is None

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
        ga, gb, _ = torch.ops.aten.convolution_backward(
            s, a.to(s.dtype), b.to(s.dtype), None, *self._params(node), [want_a, want_b, False]
        )
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


def _plus(t: Tensor) -> Tensor:
    return t.clamp(min=0)


def _minus(t: Tensor) -> Tensor:
    return t.clamp(max=0)


def _linear_relevance(op: BilinearOp, node: Node, x_is_a: bool, x: Tensor, w: Tensor, bias: MaybeTensor,
                      relevance: Tensor, settings: RuleSettings, output: MaybeTensor) -> Tensor:
    """The preset's rule for one activation ``x`` against a parameter operand ``w``.

    ``output`` is the op's forward output if a consumer kept it (saves one forward product).
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
        if output is not None:
            s = ratio(relevance, output, eps)
        else:  # recompute z; it is freed as soon as the ratio exists
            s = ratio(relevance, apply(x, w) if bias is None else apply(x, w).add_(bias), eps)
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


def _bilinear_rule(op: BilinearOp) -> Callable[[RuleContext], list]:
    def rule(ctx: RuleContext) -> list[MaybeTensor]:
        node = ctx.node
        a, b = ctx.inputs[op.a_slot], ctx.inputs[op.b_slot]
        bias = op.bias(node, ctx.inputs)
        rel_a, rel_b = ctx.relevant[op.a_slot], ctx.relevant[op.b_slot]
        result: list[MaybeTensor] = [None] * len(node.next_functions)
        if rel_a and rel_b:
            # Two activations: bilinear uniform, half of the epsilon share to each.
            z = ctx.output
            if z is None:
                z = op.apply(node, a, b)
                if bias is not None:
                    z = z + bias
            s = ratio(ctx.out, z, ctx.settings.epsilon).mul_(0.5)
            ga, gb = op.grads(node, s, a, b, True, True)
            result[op.a_slot] = a.to(ctx.dtype) * ga
            result[op.b_slot] = b.to(ctx.dtype) * gb
        elif rel_a:
            result[op.a_slot] = _linear_relevance(op, node, True, a, b, bias, ctx.out, ctx.settings, ctx.output)
        elif rel_b:
            result[op.b_slot] = _linear_relevance(op, node, False, b, a, bias, ctx.out, ctx.settings, ctx.output)
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
    )


LINEAR: dict[str, OpSpec] = {
    "AddmmBackward0": _spec(MatMulOp(1, 2, bias_slot=0, a_name="mat1", b_name="mat2")),
    "BaddbmmBackward0": _spec(MatMulOp(1, 2, bias_slot=0, a_name="batch1", b_name="batch2")),
    "MmBackward0": _spec(MatMulOp(0, 1)),
    "BmmBackward0": _spec(MatMulOp(0, 1)),
    "MvBackward0": _spec(MatVecOp(0, 1, b_name="vec")),
    "ConvolutionBackward0": _spec(ConvolutionOp()),
}
