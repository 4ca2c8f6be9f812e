r"""Routing ops: they move values without mixing them.

Rule (all entries here): the node's own vector-Jacobian product,
:math:`R_x = J^\top R_z`. For a copy, a slice, a permutation or a winner-takes-all
pick this hands every output element's relevance to the input element it came
from (summed where an input element was copied to several outputs), so routing
conserves relevance exactly and costs what the gradient costs.

Two selections have their rule written out instead of calling the node, because
the gradient does not route every output element exactly once:

* Elementwise ``maximum`` / ``minimum`` / ``fmax`` / ``fmin`` of two tensors
  (winner takes all): with :math:`w_a = [a \text{ selected}] + \tfrac12 [a = b]`,

  .. math:: R_a = w_a \odot R, \qquad R_b = (1 - w_a) \odot R,

  summed over broadcast dimensions. Ties split evenly, as torch's gradient does. At a
  NaN the gradient hands *both* operands the full relevance (it would double it); here
  the operand the op returned takes it: the NaN for ``maximum`` / ``minimum``, the
  other operand for ``fmax`` / ``fmin`` (which skip NaN), half each when both are NaN.
  So :math:`R_a + R_b = R` everywhere. When one operand is a constant (an untracked
  tensor, ``torch.maximum(x, zeros)``) it takes its share and that share is absorbed:
  the activation gets :math:`R` where it won, :math:`R/2` at ties, nothing where the
  constant was selected.
* ``logsumexp`` (a smooth max): the relevance is routed with the softmax weights,

  .. math:: R_{x_i} = p_i R, \qquad p_i = e^{x_i - \mathrm{lse}(x)},

  which is the node's own vector-Jacobian product (:math:`\partial\,\mathrm{lse} /
  \partial x_i = p_i`). It conserves exactly (:math:`\sum_i p_i = 1`), is invariant to a
  shift of all inputs like the op itself, and tends to the winner-takes-all rule of
  ``max`` / ``amax`` as the inputs spread apart. The Deep Taylor alternative on the
  decomposition :math:`\mathrm{lse}(x) = \sum_i p_i x_i + H(p)` (AttnLRP's view of the
  softmax, the entropy :math:`H(p)` a bias) would absorb :math:`H(p) R / \mathrm{lse}`,
  change under a shift of the inputs and divide by :math:`\mathrm{lse}`, which may be 0.
  Entries at :math:`-\infty` (masked) get 0, and a fully masked slice (all
  :math:`-\infty`) hands on nothing instead of the gradient's NaN.

Each entry also says how to replay the op's forward on its operand, which the
Promise System needs when a routing node sits on a Promise Branch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import MaybeTensor, Node, OpSpec, RuleContext, node_vjp, saved, signed_dim, sum_to


def vjp_rule(ctx: RuleContext) -> Sequence[MaybeTensor]:
    r"""Routing: :math:`R_x = J^\top R_z`, computed by calling the autograd node itself."""
    return node_vjp(ctx.node, ctx.filled_relevance())


def _out_shape(node: Node, k: int = 0) -> torch.Size:
    return node._input_metadata[k].shape


def _reshape(node: Node, inputs: list) -> Tensor:
    return inputs[0].reshape(_out_shape(node))


def _slice(node: Node, inputs: list) -> Tensor:
    dim = signed_dim(saved(node, "dim"))
    index = [slice(None)] * inputs[0].dim()
    start, end = saved(node, "start"), saved(node, "end")
    # Negative bounds come back as unsigned 64-bit integers, like dims.
    start = None if start is None else signed_dim(start)
    end = None if end is None else signed_dim(end)
    index[dim] = slice(start, end, saved(node, "step"))
    return inputs[0][tuple(index)]


def _index(node: Node, inputs: list) -> Tensor:
    return torch.ops.aten.index.Tensor(inputs[0], list(saved(node, "indices")))


def _max_pool(node: Node, inputs: list) -> Tensor:
    # The pooled value is the input at the saved argmax indices (flattened over the spatial dims).
    indices = saved(node, "result1")
    spatial = len(saved(node, "kernel_size"))
    picked = inputs[0].flatten(-spatial).gather(-1, indices.flatten(-spatial))
    return picked.view(indices.shape)


def _max_dim(node: Node, inputs: list) -> Tensor:
    dim, indices = signed_dim(saved(node, "dim")), saved(node, "indices")
    keepdim = saved(node, "keepdim")
    picked = inputs[0].gather(dim, indices if keepdim else indices.unsqueeze(dim))
    return picked if keepdim else picked.squeeze(dim)


def _gather_indices(node: Node, inputs: list) -> Tensor:
    # topk / sort values: the input gathered at the saved indices.
    return inputs[0].gather(signed_dim(saved(node, "dim")), saved(node, "indices"))


def _interpolate_nearest(mode: str):
    def forward(node: Node, inputs: list) -> Tensor:
        return F.interpolate(inputs[0], size=list(saved(node, "output_size")), mode=mode)

    return forward


def _where(node: Node, inputs: list) -> Tensor:
    # A branch that autograd did not track (a constant fill) is replayed as zero: exact
    # wherever the result is later masked out (attention masks), see the README.
    a, b = inputs
    if a is None:
        a = torch.zeros((), dtype=b.dtype, device=b.device)
    if b is None:
        b = torch.zeros((), dtype=a.dtype, device=a.device)
    return torch.where(saved(node, "condition"), a, b)


def _to_copy(node: Node, inputs: list) -> Tensor:
    meta = node._input_metadata[0]
    return inputs[0].to(dtype=meta.dtype, device=meta.device)


def _first_selected(a: Tensor, b: Tensor, larger: bool, skip_nan: bool) -> Tensor:
    r"""Weight :math:`w_a` of the first operand in an elementwise max/min (broadcast shape, floating point).

    1 where ``a`` is the value returned, 0 where ``b`` is, 1/2 at ties (both equal or both NaN).
    """
    wins = a > b if larger else a < b
    w = torch.where(a == b, 0.5, wins.to(a.dtype))
    nan_a, nan_b = a.isnan(), b.isnan()
    # maximum/minimum return a NaN operand; fmax/fmin return the other one.
    w = torch.where(nan_a, 0.0 if skip_nan else 1.0, w)
    w = torch.where(nan_b, 1.0 if skip_nan else 0.0, w)
    return torch.where(nan_a & nan_b, 0.5, w)


def winner_takes_all_rule(larger: bool, skip_nan: bool):
    r"""Rule of an elementwise max/min of two tensors: :math:`R_a = w_a R`, :math:`R_b = (1 - w_a) R`.

    Args:
        larger (bool): ``True`` for ``maximum`` / ``fmax``, ``False`` for ``minimum`` / ``fmin``.
        skip_nan (bool): ``True`` for ``fmax`` / ``fmin``, which return the non-NaN operand.

    Returns:
        callable: The rule; it reads the operands autograd kept (``self`` and ``other``).
    """

    def rule(ctx: RuleContext) -> list[MaybeTensor]:
        node = ctx.node
        r = ctx.out
        a, b = saved(node, "self"), saved(node, "other")
        w_a = _first_selected(a.to(r.dtype), b.to(r.dtype), larger, skip_nan)
        result: list[MaybeTensor] = []
        for (child, k), rel, share in zip(node.next_functions, ctx.relevant, (w_a, 1.0 - w_a)):
            result.append(sum_to(share * r, child._input_metadata[k].shape) if rel else None)
        return result

    return rule


def _winner_takes_all(forward, larger: bool, skip_nan: bool) -> OpSpec:
    return OpSpec(
        family="routing (winner takes all)",
        rule=winner_takes_all_rule(larger, skip_nan),
        forward=lambda n, x: forward(*_kept_or_given(n, x)),
        kept_inputs=lambda n: (saved(n, "self"), saved(n, "other")),
    )


def _kept_or_given(node: Node, inputs: list) -> tuple:
    # Both operands are always kept; an untracked constant is only available that way.
    a, b = inputs
    return (saved(node, "self") if a is None else a, saved(node, "other") if b is None else b)


def _lse_dims(node: Node, ndim: int) -> list[int]:
    dims = [signed_dim(d) % max(ndim, 1) for d in saved(node, "dim")]
    return sorted(dims) if dims else list(range(ndim))


def smooth_max_rule(ctx: RuleContext) -> list[MaybeTensor]:
    r"""``logsumexp``: :math:`R_{x_i} = p_i R` with :math:`p = e^{x - \mathrm{lse}(x)}`; 0 at :math:`-\infty`."""
    node = ctx.node
    r = ctx.out
    x = saved(node, "self").to(r.dtype)
    lse = saved(node, "result").to(r.dtype)
    if x.dim() > 0 and not saved(node, "keepdim"):
        for d in _lse_dims(node, x.dim()):
            lse, r = lse.unsqueeze(d), r.unsqueeze(d)
    p = torch.exp(x - lse)
    return [torch.where(x == float("-inf"), 0.0, p * r)]


def _logsumexp(node: Node, inputs: list) -> Tensor:
    x = inputs[0]
    return torch.logsumexp(x, _lse_dims(node, x.dim()), keepdim=bool(saved(node, "keepdim")))


def _routing(forward, kept_inputs=None, kept_output=None) -> OpSpec:
    return OpSpec(
        family="routing (vector-Jacobian product)",
        rule=vjp_rule,
        forward=forward,
        kept_inputs=kept_inputs,
        kept_output=kept_output,
    )


_SHAPE_ONLY = (
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
    "SqueezeBackward0",
    "SqueezeBackward1",
    "SqueezeBackward2",
    "SqueezeBackward3",
    "SqueezeBackward4",
    "UnsqueezeBackward0",
    "UnsqueezeBackward1",
)

# Shape-only ops let the engine find a kept output behind them (OpSpec.reshapes).
ROUTING: dict[str, OpSpec] = {name: replace(_routing(_reshape), reshapes=True) for name in _SHAPE_ONLY}
ROUTING.update(
    {
        "ExpandBackward0": _routing(lambda n, x: x[0].expand(_out_shape(n))),
        "PermuteBackward0": _routing(lambda n, x: x[0].permute([signed_dim(d) for d in saved(n, "dims")])),
        "TransposeBackward0": _routing(
            lambda n, x: x[0].transpose(signed_dim(saved(n, "dim0")), signed_dim(saved(n, "dim1")))
        ),
        "TBackward0": _routing(lambda n, x: x[0].t()),
        "SliceBackward0": _routing(_slice),
        "SelectBackward0": _routing(
            lambda n, x: x[0].select(signed_dim(saved(n, "dim")), signed_dim(saved(n, "index")))
        ),
        "IndexBackward0": _routing(_index),
        "GatherBackward0": _routing(
            lambda n, x: x[0].gather(signed_dim(saved(n, "dim")), saved(n, "index")),
            kept_inputs=lambda n: (saved(n, "self"),),
        ),
        "CatBackward0": _routing(lambda n, x: torch.cat(x, signed_dim(saved(n, "dim")))),
        "StackBackward0": _routing(lambda n, x: torch.stack(x, signed_dim(saved(n, "dim")))),
        "SplitBackward0": _routing(lambda n, x: x[0].split(saved(n, "split_size"), signed_dim(saved(n, "dim")))),
        "SplitWithSizesBackward0": _routing(
            lambda n, x: x[0].split(list(saved(n, "split_sizes")), signed_dim(saved(n, "dim")))
        ),
        "UnbindBackward0": _routing(lambda n, x: x[0].unbind(signed_dim(saved(n, "dim")))),
        # Autograd does not keep the pad value; replay assumes the default zero padding.
        "ConstantPadNdBackward0": _routing(lambda n, x: F.pad(x[0], list(saved(n, "pad")))),
        "FlipBackward0": _routing(lambda n, x: x[0].flip([signed_dim(d) for d in saved(n, "dims")])),
        "RollBackward0": _routing(
            lambda n, x: x[0].roll(list(saved(n, "shifts")), [signed_dim(d) for d in saved(n, "dims")])
        ),
        "CloneBackward0": _routing(lambda n, x: x[0]),
        "TopkBackward0": _routing(_gather_indices),
        "SortBackward0": _routing(_gather_indices),
        "IndexSelectBackward0": _routing(
            lambda n, x: x[0].index_select(signed_dim(saved(n, "dim")), saved(n, "index"))
        ),
        # Autograd does not keep the fill value; replay fills with zero (see _where).
        "MaskedFillBackward0": _routing(lambda n, x: x[0].masked_fill(saved(n, "mask"), 0.0)),
        "WhereBackward0": _routing(_where),
        "TrilBackward0": _routing(lambda n, x: x[0].tril(saved(n, "diagonal"))),
        "TriuBackward0": _routing(lambda n, x: x[0].triu(saved(n, "diagonal"))),
        "RepeatBackward0": _routing(lambda n, x: x[0].repeat(list(saved(n, "repeats")))),
        "UnfoldBackward0": _routing(
            lambda n, x: x[0].unfold(signed_dim(saved(n, "dimension")), saved(n, "size"), saved(n, "step"))
        ),
        "Im2ColBackward0": _routing(
            lambda n, x: F.unfold(x[0], saved(n, "kernel_size"), saved(n, "dilation"), saved(n, "padding"),
                                  saved(n, "stride"))
        ),
        "DiagonalBackward0": _routing(
            lambda n, x: x[0].diagonal(saved(n, "offset"), signed_dim(saved(n, "dim1")), signed_dim(saved(n, "dim2")))
        ),
        "UpsampleNearest1DBackward0": _routing(_interpolate_nearest("nearest")),
        "UpsampleNearest2DBackward0": _routing(_interpolate_nearest("nearest")),
        "UpsampleNearest3DBackward0": _routing(_interpolate_nearest("nearest")),
        "UpsampleNearestExact1DBackward0": _routing(_interpolate_nearest("nearest-exact")),
        "UpsampleNearestExact2DBackward0": _routing(_interpolate_nearest("nearest-exact")),
        # Token relevance lands on the embedding rows that were looked up.
        "EmbeddingBackward0": _routing(lambda n, x: F.embedding(saved(n, "indices"), x[0])),
        "ScatterBackward0": _routing(
            lambda n, x: x[0].scatter(signed_dim(saved(n, "dim")), saved(n, "index"), x[1])
        ),
        "IndexPutBackward0": _routing(
            lambda n, x: x[0].index_put(tuple(saved(n, "indices")), x[1], saved(n, "accumulate"))
        ),
        # In-place writes into a view: the gradient routes each element to where it came from.
        "CopySlices": _routing(None),
        # Views of in-place results; replay assumes the base is laid out contiguously.
        "AsStridedBackward0": _routing(
            lambda n, x: x[0].contiguous().as_strided(
                saved(n, "size"), saved(n, "stride"), saved(n, "storage_offset")
            )
        ),
        "AliasBackward0": _routing(lambda n, x: x[0]),
        "ToCopyBackward0": _routing(_to_copy),
        # Winner takes all: the gradient routes each output to its argmax input.
        "MaxPool1DWithIndicesBackward0": replace(
            _routing(_max_pool, kept_inputs=lambda n: (saved(n, "self"),)), keeps_zeros=True
        ),
        "MaxPool2DWithIndicesBackward0": replace(
            _routing(_max_pool, kept_inputs=lambda n: (saved(n, "self"),)), keeps_zeros=True
        ),
        "MaxPool3DWithIndicesBackward0": replace(
            _routing(_max_pool, kept_inputs=lambda n: (saved(n, "self"),)), keeps_zeros=True
        ),
        "MaxBackward0": _routing(_max_dim),
        "MinBackward0": _routing(_max_dim),
        "MaxBackward1": _routing(None, kept_output=lambda n: saved(n, "result")),
        "MinBackward1": _routing(None, kept_output=lambda n: saved(n, "result")),
        "AmaxBackward0": _routing(None, kept_output=lambda n: saved(n, "result")),
        "AminBackward0": _routing(None, kept_output=lambda n: saved(n, "result")),
    }
)

# Nodes whose outputs are always views of their single input (never a copy): a matrix product's
# output is found behind chains of them (OpSpec.view, OpSpec.fresh_output).
_VIEWS = (
    "AliasBackward0", "ExpandBackward0", "PermuteBackward0", "ReshapeAliasBackward0", "SelectBackward0",
    "SliceBackward0", "SplitBackward0", "SplitWithSizesBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "SqueezeBackward2", "TBackward0", "TransposeBackward0", "UnbindBackward0", "UnsafeViewBackward0",
    "UnsqueezeBackward0", "ViewBackward0",
)
for _name in _VIEWS:
    ROUTING[_name] = replace(ROUTING[_name], view=True)


def _inverse_by_vjp(node: Node, outputs: list) -> Tensor:
    """The operand of a node whose outputs hold each of its elements once: its VJP is its inverse."""
    return node_vjp(node, outputs)[0]


def _tracked_part(node: Node, outputs: list) -> Tensor:
    """The one tracked operand of ``cat``: its slice of the output (the other operands are constants,
    such as the empty past of a key/value cache that a transformer appends the new keys to)."""
    parts = node_vjp(node, outputs)
    (part,) = [p for p, (child, _) in zip(parts, node.next_functions) if child is not None]
    return part


def _first_copy(node: Node, outputs: list) -> Tensor:
    """The operand of ``expand``: the first copy along every dimension it added or broadcast."""
    shape = list(saved(node, "self_sym_sizes"))
    value = outputs[0]
    value = value[(0,) * (value.dim() - len(shape))]
    for dim, size in enumerate(shape):
        if size == 1 and value.shape[dim] != 1:
            value = value.narrow(dim, 0, 1)
    return value


# Nodes whose outputs hold each operand element once: their VJP rebuilds the operand (OpSpec.inverse).
_INVERTED_BY_VJP = _SHAPE_ONLY + (
    "AliasBackward0", "CloneBackward0", "FlipBackward0", "PermuteBackward0", "RollBackward0",
    "SplitBackward0", "SplitWithSizesBackward0", "TBackward0", "TransposeBackward0", "UnbindBackward0",
)
for _name in _INVERTED_BY_VJP:
    ROUTING[_name] = replace(ROUTING[_name], inverse=_inverse_by_vjp)
ROUTING["ExpandBackward0"] = replace(ROUTING["ExpandBackward0"], inverse=_first_copy)
ROUTING["CatBackward0"] = replace(ROUTING["CatBackward0"], inverse=_tracked_part)
# Elementwise max/min of two tensors: winner takes all, ties halved, conserving at NaN.
ROUTING.update(
    {
        "MaximumBackward0": _winner_takes_all(torch.maximum, larger=True, skip_nan=False),
        "MinimumBackward0": _winner_takes_all(torch.minimum, larger=False, skip_nan=False),
        "FmaxBackward0": _winner_takes_all(torch.fmax, larger=True, skip_nan=True),
        "FminBackward0": _winner_takes_all(torch.fmin, larger=False, skip_nan=True),
        # A smooth max: routed with the softmax weights (its own gradient), masked entries excluded.
        "LogsumexpBackward0": OpSpec(
            family="routing (softmax weights of a smooth max)",
            rule=smooth_max_rule,
            forward=_logsumexp,
            kept_inputs=lambda n: (saved(n, "self"),),
            kept_output=lambda n: saved(n, "result"),
        ),
    }
)
