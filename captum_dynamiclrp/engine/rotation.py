r"""Rotated operands: rebuild ``u`` from ``out = u * c + rotate_half(u) * s`` instead of replaying it.

Rotary position embeddings (RoPE, in Llama, Qwen, Gemma, Mistral, ... as Hugging Face writes
them) turn a query or key projection ``u`` into

.. math::
    \mathrm{out} = u \odot c + \mathrm{cat}(-u_{hi}, u_{lo}) \odot s,

with ``u_lo`` and ``u_hi`` the two halves of the last dimension and ``c``, ``s`` constants
(cosines and sines) that the products kept. Attention keeps ``out``; nothing keeps ``u``, which
the epsilon rule of the projection needs (its output) and the sum's rule needs (through its two
operands). Without this module the Promise System replays the projection (a matrix product).

Per pair of elements the map is the 2x2 system

.. math::
    \mathrm{out}_{lo} = c_{lo} u_{lo} - s_{lo} u_{hi}, \qquad
    \mathrm{out}_{hi} = s_{hi} u_{lo} + c_{hi} u_{hi},

solved exactly by :math:`u_{lo} = (c_{hi}\,\mathrm{out}_{lo} + s_{lo}\,\mathrm{out}_{hi}) / D` and
:math:`u_{hi} = (c_{lo}\,\mathrm{out}_{hi} - s_{hi}\,\mathrm{out}_{lo}) / D`, with
:math:`D = c_{lo} c_{hi} + s_{lo} s_{hi}` (:math:`\cos^2 + \sin^2 = 1` for RoPE). No assumption on the
constants beyond a well-conditioned system, which :func:`unrotate` checks when it runs (on the
CPU, where reading the check back costs nothing; elsewhere, and where the check fails, the plan
replays the projection as before). The result differs from the forward's ``u`` by rounding
(a few units in the last place of ``out``), so it is used in float32 and float64 only.

:func:`rotation_of` finds the pattern in the graph: O(1) per node (a fixed neighbourhood).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..rules.base import saved, signed_dim
from .graph import AutogradGraph

# Readers of u examined, and reachable nodes in all: keeps the search O(1) per node.
_MAX_READERS = 8
# A system whose squared Frobenius norm exceeds this multiple of |D| is refused (a rotation: 2).
MAX_CONDITION = 4.0
_PRECISE_ENOUGH = (torch.float32, torch.float64)


def _only_reader(consumers: Sequence[Sequence[tuple[int, int]]], node: int) -> Optional[tuple[int, int]]:
    readers = consumers[node]
    return readers[0] if len(readers) == 1 else None


def _constant_factor(graph: AutogradGraph, node: int, tracked: int) -> Optional[int]:
    """The slot of a product's untracked factor, if ``node`` is ``x * c`` with ``x`` from ``tracked``."""
    if graph.types[node] != "MulBackward0":
        return None
    edges = graph.edges[node]
    if len(edges) != 2:
        return None
    for slot in (0, 1):
        if edges[slot] == (tracked, 0) and edges[1 - slot][0] < 0:
            return 1 - slot
    return None


def _half_slice(graph: AutogradGraph, node: int, u: int, dim: int, half: int) -> Optional[str]:
    """``"lo"`` / ``"hi"`` if ``node`` slices the first / second half of ``u``'s dimension ``dim``."""
    if graph.types[node] != "SliceBackward0" or graph.edges[node] != ((u, 0),):
        return None
    n = graph.nodes[node]
    ndim = len(graph.nodes[u]._input_metadata[0].shape)
    if signed_dim(saved(n, "dim")) % ndim != dim % ndim or saved(n, "step") != 1:
        return None
    start, end = saved(n, "start"), saved(n, "end")
    if start == 0 and end == half:
        return "lo"
    if start == half and end is not None and end >= 2 * half:
        return "hi"
    return None


def rotation_of(graph: AutogradGraph, consumers: Sequence[Sequence[tuple[int, int]]], u: int) -> Optional[tuple]:
    """Whether ``u``'s output 0 is rotated: ``(sum, cos_product, cos_slot, sin_product, sin_slot, half)``.

    The pattern, in autograd nodes: an ``AddBackward0`` (alpha 1) of ``MulBackward0(u, c)`` and
    ``MulBackward0(CatBackward0(NegBackward0(u[..., half:]), u[..., :half]), s)`` along the last
    dimension, ``c`` and ``s`` untracked, float32 or float64. Other readers of ``u`` do not matter
    (this is about values only). The caller still needs a consumer that kept the sum's output.
    """
    readers = consumers[u]
    if not 3 <= len(readers) <= _MAX_READERS:  # the cheap test first: the walk asks at every node it passes
        return None
    meta = graph.nodes[u]._input_metadata
    if len(meta) != 1 or meta[0].dtype not in _PRECISE_ENOUGH or len(meta[0].shape) == 0:
        return None
    width = meta[0].shape[-1]
    if width < 2 or width % 2:
        return None
    half, dim = width // 2, len(meta[0].shape) - 1
    cos_product = cos_slot = None
    slices: dict[str, int] = {}
    for reader, slot in readers:
        if graph.edges[reader][slot][1] != 0:
            continue
        constant = _constant_factor(graph, reader, u)
        if constant is not None and cos_product is None:
            cos_product, cos_slot = reader, constant
            continue
        which = _half_slice(graph, reader, u, dim, half)
        if which is not None:
            slices.setdefault(which, reader)
    if cos_product is None or len(slices) != 2:
        return None
    negated = _only_reader(consumers, slices["hi"])
    if negated is None or graph.types[negated[0]] != "NegBackward0":
        return None
    joined = _only_reader(consumers, negated[0])
    if joined is None or graph.types[joined[0]] != "CatBackward0":
        return None
    cat = joined[0]
    if graph.edges[cat] != ((negated[0], 0), (slices["lo"], 0)):
        return None
    if signed_dim(saved(graph.nodes[cat], "dim")) % (dim + 1) != dim:
        return None
    rotated = _only_reader(consumers, cat)
    if rotated is None:
        return None
    sin_slot = _constant_factor(graph, rotated[0], cat)
    if sin_slot is None:
        return None
    sin_product = rotated[0]
    total = _only_reader(consumers, cos_product)
    if total is None or graph.types[total[0]] != "AddBackward0" or saved(graph.nodes[total[0]], "alpha") != 1:
        return None
    add = total[0]
    if sorted(graph.edges[add]) != sorted(((cos_product, 0), (sin_product, 0))):
        return None
    if tuple(graph.nodes[add]._input_metadata[0].shape) != tuple(meta[0].shape):
        return None  # out and u must match element for element (no broadcasting by the constants)
    return (add, cos_product, cos_slot, sin_product, sin_slot, half)


def rotation_constants(nodes: Sequence, rotation: tuple) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The constants ``(c, s)`` the two products of a :func:`rotation_of` result kept."""
    _, cos_product, cos_slot, sin_product, sin_slot, _ = rotation
    names = ("self", "other")
    return saved(nodes[cos_product], names[cos_slot]), saved(nodes[sin_product], names[sin_slot])


def _halves(t: Tensor, half: int) -> tuple[Tensor, Tensor]:
    if t.dim() == 0 or t.shape[-1] == 1:
        return t, t
    return t[..., :half], t[..., half:]


# The solved coefficients of one set of constants, or None for an ill-conditioned system.
Coefficients = Optional[tuple[Tensor, Tensor, Tensor, Tensor]]


def _constants_key(c: Tensor, s: Tensor, half: int, dtype: torch.dtype) -> tuple:
    """Identifies the constants by their memory (address, layout and version), not by object: each
    layer's product keeps its own view of the one cosine and sine table the model computed."""
    return tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t._version) for t in (c, s)) + (half, dtype)


def _coefficients(c: Tensor, s: Tensor, half: int, dtype: torch.dtype) -> Coefficients:
    r""":math:`(c_{hi}/D, s_{lo}/D, c_{lo}/D, s_{hi}/D)`, or ``None`` where the system is not well
    conditioned everywhere (see :func:`unrotate`)."""
    c, s = c.to(dtype), s.to(dtype)
    c_lo, c_hi = _halves(c, half)
    s_lo, s_hi = _halves(s, half)
    det = c_lo * c_hi + s_lo * s_hi
    norm = c_lo * c_lo + c_hi * c_hi + s_lo * s_lo + s_hi * s_hi
    if not bool((norm <= MAX_CONDITION * det.abs()).all()):  # also False for NaN
        return None
    return c_hi / det, s_lo / det, c_lo / det, s_hi / det


def unrotate(out: Tensor, c: Tensor, s: Tensor, half: int, solved: Optional[dict] = None) -> Optional[Tensor]:
    """``u`` from ``out = u * c + cat(-u[..., half:], u[..., :half]) * s`` (see the module docstring).

    ``None`` when the system is not well conditioned everywhere (squared Frobenius norm above
    :data:`MAX_CONDITION` times :math:`|D|`, or not finite), when not on the CPU (the check is a
    host read-back), or when the constants have the wrong shape: the caller then replays.

    ``solved``: a dict that keeps the coefficients solved for each set of constants (and the
    constants, so that their memory is not reused while the dict lives), so that the rotations of
    one call that share them (every layer's query and key) solve the system once. One dict per
    call: it holds the constants until it is dropped.
    """
    if out.device.type != "cpu" or out.dtype not in _PRECISE_ENOUGH or out.shape[-1] != 2 * half:
        return None
    if c.shape[-1:] not in ((1,), (2 * half,)) or s.shape[-1:] not in ((1,), (2 * half,)):
        return None
    if solved is None:
        coefficients = _coefficients(c, s, half, out.dtype)
    else:
        key = _constants_key(c, s, half, out.dtype)
        if key not in solved:  # the entry holds c and s, so no other tensor takes their memory meanwhile
            solved[key] = (_coefficients(c, s, half, out.dtype), c, s)
        coefficients = solved[key][0]
    if coefficients is None:
        return None
    lo_from_lo, lo_from_hi, hi_from_hi, hi_from_lo = coefficients
    out_lo, out_hi = out[..., :half], out[..., half:]
    u = torch.empty(out.shape, dtype=out.dtype, device=out.device)
    u_lo, u_hi = u[..., :half], u[..., half:]
    torch.mul(out_lo, lo_from_lo, out=u_lo)
    u_lo.addcmul_(out_hi, lo_from_hi)
    torch.mul(out_hi, hi_from_hi, out=u_hi)
    u_hi.addcmul_(out_lo, hi_from_lo, value=-1)
    return u
