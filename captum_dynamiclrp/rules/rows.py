r"""Row-sparse relevance: apply a row-separable rule only to the rows that carry relevance.

A matrix product :math:`z = x W + b` (``mm``, ``addmm``) maps each row of :math:`x` to the same
row of :math:`z`, and every linear rule (epsilon, z+, gamma) splits row :math:`i` of :math:`R_z`
over row :math:`i` of :math:`x` alone. A row with no relevance gets none:
:math:`s_i = 0 / \mathrm{stab}(z_i) = 0`, and its share :math:`x_i \odot (W s_i) = 0`.

So when most rows carry nothing, the rule can run on the others only. That is the common case of
explaining one position of a sequence model: the logits of the last token (``logits[:, -1]``)
put relevance on one row of the language-model head's input, and the layer norms and MLPs of the
last block keep it on that row. A gradient pass still multiplies every row there (the whole
``seq x vocab`` head); here the head costs one row. Results are those of the full computation
wherever the forward values are finite, up to rounding (a product over fewer rows may sum in
another order) and the sign of zeros.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .base import MaybeTensor

# Rows are subset only if at most this fraction carries relevance: finding them costs one pass
# over R (and one host sync, two when the probe below runs), gathering and scattering a little more.
MAX_ROW_FRACTION = 0.5


def relevant_rows(relevance: Tensor, max_fraction: Optional[float] = None) -> Optional[Tensor]:
    """Indices of the rows of a 2-d relevance that hold a non-zero (or NaN), if few enough; else ``None``.

    ``max_fraction`` defaults to :data:`MAX_ROW_FRACTION` (read at call time).
    """
    if max_fraction is None:
        max_fraction = MAX_ROW_FRACTION
    if relevance.dim() != 2 or relevance.shape[0] < 2:
        return None
    if relevance.device.type != "cpu":  # the count below is a host sync: a stall per layer on an accelerator
        return None
    if _probe_says_dense(relevance, max_fraction):
        return None
    carries = _rows_carrying(relevance)
    count = int(carries.sum())  # the host sync
    if count > max_fraction * relevance.shape[0]:
        return None
    return carries.nonzero().squeeze(1)


# Rows probed before the full pass: evenly spaced, the first and the last among them.
PROBE_ROWS = 16


def _probe_says_dense(relevance: Tensor, max_fraction: float) -> bool:
    """Whether more than ``max_fraction`` of :data:`PROBE_ROWS` evenly spaced rows carry relevance.

    Below a sequence model's first attention (from the output) every row carries relevance, so the
    full pass over R would be wasted at most ``mm`` nodes; the probe reads 16 rows instead. It may
    miss a sparse pattern that happens to hit the probed rows, which costs speed, never correctness
    (the rule then runs on all rows).
    """
    n = relevance.shape[0]
    if n <= 2 * PROBE_ROWS:  # the full pass costs about as little
        return False
    picks = torch.arange(PROBE_ROWS, device=relevance.device) * (n - 1) // (PROBE_ROWS - 1)
    return int(_rows_carrying(relevance.index_select(0, picks)).sum()) > max_fraction * PROBE_ROWS


# Rows are tested this many elements at a time: ``any(dim=1)`` makes a boolean copy of its input,
# which for a language model's logits (positions x vocabulary) is a quarter of R's size.
_CHECK_ELEMENTS = 1 << 20


def _rows_carrying(relevance: Tensor) -> Tensor:
    """Per row of a 2-d relevance: whether it holds a non-zero or a NaN."""
    block = max(1, _CHECK_ELEMENTS // max(1, relevance.shape[1]))
    if block >= relevance.shape[0]:
        return relevance.any(dim=1)
    return torch.cat([part.any(dim=1) for part in relevance.split(block)])


def _take(t: MaybeTensor, rows: Tensor, n: int) -> MaybeTensor:
    """Rows of a per-row operand; operands broadcast over rows (a bias vector) are left whole."""
    if t is None or t.dim() != 2 or t.shape[0] != n:
        return t
    return t.index_select(0, rows)


def on_relevant_rows(
    rule: Callable[[Tensor, MaybeTensor, Tensor, MaybeTensor, Callable[[], MaybeTensor]], Tensor],
    x: Tensor,
    bias: MaybeTensor,
    relevance: Tensor,
    output: MaybeTensor,
    take_rectified: Callable[[], MaybeTensor],
) -> Tensor:
    r"""Run ``rule(x, bias, relevance, output, take_rectified)`` on the relevant rows only, where that pays.

    ``x`` is the activation operand of ``x @ W`` (rows of ``x`` are rows of the output); every
    other argument is either per row (same leading size) or broadcast over rows, and
    ``take_rectified`` hands over a per-row value when called (once). Falls back to one call on
    everything when ``x`` is not a matrix or most rows carry relevance.
    """
    rows = relevant_rows(relevance) if x.dim() == 2 and relevance.shape[0] == x.shape[0] else None
    if rows is None:
        return rule(x, bias, relevance, output, take_rectified)
    n = x.shape[0]

    def take_rows() -> MaybeTensor:
        return _take(take_rectified(), rows, n)

    part = rule(
        x.index_select(0, rows), _take(bias, rows, n), relevance.index_select(0, rows), _take(output, rows, n), take_rows
    )
    return torch.zeros(x.shape, dtype=part.dtype, device=part.device).index_copy_(0, rows, part)
