r"""Routing ops: they move values without mixing them.

Rule (all entries here): the node's own vector-Jacobian product,
:math:`R_x = J^\top R_z`. For a copy, a slice, a permutation or a winner-takes-all
pick this hands every output element's relevance to the input element it came
from (summed where an input element was copied to several outputs), so routing
conserves relevance exactly and costs what the gradient costs.

Each entry also says how to replay the op's forward on its operand, which the
Promise System needs when a routing node sits on a Promise Branch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import MaybeTensor, Node, OpSpec, RuleContext, node_vjp, saved, signed_dim


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

ROUTING: dict[str, OpSpec] = {name: _routing(_reshape) for name in _SHAPE_ONLY}
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
        "MaxPool1DWithIndicesBackward0": _routing(_max_pool, kept_inputs=lambda n: (saved(n, "self"),)),
        "MaxPool2DWithIndicesBackward0": _routing(_max_pool, kept_inputs=lambda n: (saved(n, "self"),)),
        "MaxPool3DWithIndicesBackward0": _routing(_max_pool, kept_inputs=lambda n: (saved(n, "self"),)),
        "MaxBackward0": _routing(_max_dim),
        "MinBackward0": _routing(_max_dim),
        "MaxBackward1": _routing(None, kept_output=lambda n: saved(n, "result")),
        "MinBackward1": _routing(None, kept_output=lambda n: saved(n, "result")),
        "AmaxBackward0": _routing(None, kept_output=lambda n: saved(n, "result")),
        "AminBackward0": _routing(None, kept_output=lambda n: saved(n, "result")),
    }
)
