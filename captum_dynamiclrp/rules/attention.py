r"""Softmax and attention (AttnLRP, Achtibat et al. 2024).

Softmax :math:`s = \mathrm{softmax}(x)` along one dim, with the Deep Taylor rule
with bias of AttnLRP (their Eq. 9):

.. math:: R_{x_i} = x_i \left(R_i - s_i \sum_j R_j\right).

Masked positions (``-inf`` or ``finfo.min`` logits, where :math:`s_i = 0`) get 0,
never ``NaN``. Log-softmax uses the same rule with :math:`s = e^{y}`.

Fused scaled-dot-product attention (every backend PyTorch may pick: CPU flash,
CUDA flash, memory-efficient, cuDNN) is explained as the composition of the
rules of its parts, :math:`S = \alpha\,q k^\top + M`, :math:`A = \mathrm{softmax}(S)`,
:math:`o = A v`:

1. :math:`A v`: bilinear uniform, :math:`R_A = \tfrac12 A \odot (\sigma v^\top)`,
   :math:`R_v = \tfrac12 v \odot (A^\top \sigma)`, :math:`\sigma = R / \mathrm{stab}(o)`;
   under CP-LRP (or when q and k lead to no requested tensor) :math:`A` is a constant:
   :math:`R_v = v \odot (A^\top \sigma)`, and likewise a constant :math:`v` gives :math:`A` all;
2. softmax rule above on :math:`S`;
3. :math:`\alpha q k^\top + M`: epsilon on contributions (a float mask absorbs its share;
   masked positions carry no relevance); the scale :math:`\alpha` is a constant;
4. :math:`q k^\top`: bilinear uniform (all to one factor when the other is a constant).

The causal mask is applied only when the call asked for it (``is_causal``). The composition is
computed a block of query rows at a time with five batched matrix products per block, as many as a
fused attention backward, and no full (queries x keys) intermediate (:func:`_attention_relevance`).
On the CPU the blocks cover only the span of query rows that carry relevance (:func:`_relevant_rows`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UnrecoverableOperandError
from .base import MaybeTensor, Node, OpSpec, RuleContext, ratio, saved, signed_dim


def _deep_taylor(x: Tensor, s: Tensor, relevance: Tensor, dim: int) -> Tensor:
    r = x.to(relevance.dtype) * (relevance - s.to(relevance.dtype) * relevance.sum(dim, keepdim=True))
    return torch.where(s > 0, r, 0.0)


def softmax_rule(ctx: RuleContext) -> list[MaybeTensor]:
    r"""AttnLRP softmax: :math:`R_x = x \odot (R - s \odot \sum R)`, zero where :math:`s = 0`."""
    node = ctx.node
    return [_deep_taylor(ctx.inputs[0], saved(node, "result"), ctx.out, signed_dim(saved(node, "dim")))]


def log_softmax_rule(ctx: RuleContext) -> list[MaybeTensor]:
    r"""Log-softmax: the softmax rule with :math:`s = e^{y}`."""
    node = ctx.node
    s = saved(node, "result").exp()
    return [_deep_taylor(ctx.inputs[0], s, ctx.out, signed_dim(saved(node, "dim")))]


def _softmax_spec(rule, forward) -> OpSpec:
    return OpSpec(
        family="AttnLRP softmax (Deep Taylor)",
        rule=rule,
        needs=lambda node, relevant: (0,),
        forward=forward,
        kept_output=lambda node: saved(node, "result"),
    )


def _first(node: Node, *names: str):
    for name in names:
        value = saved(node, name)
        if value is not None:
            return value
    return None


# Attention is explained a block of query rows at a time, so that the (rows x keys) temporaries of
# every head stay small however long the sequence: about this many elements each on the CPU
# (cache-sized), more on accelerators (fewer, larger kernels); never fewer than _MIN_ROWS rows.
_BLOCK_ELEMENTS = 1 << 18
_BLOCK_ELEMENTS_ACCELERATOR = 1 << 24
_MIN_ROWS = 32


# Under a causal mask a block of rows computes its whole (rows x rows) diagonal square, of which
# it keeps about half: with n blocks the scores cost 1/n more products than they need. More blocks
# cut that waste but cost a fixed ~20 small ops each, which at short lengths outweighs it: on one
# Llama-shaped causal layer (8 query heads, 4 key/value heads, 2 CPU threads; fastest of 41 calls
# of this rule) 3 blocks beat 8 by ~25% at 256 tokens and ~12% at 128 and 384. Longer sequences
# hit the element budget first, so this bound does not change them.
_CAUSAL_BLOCKS = 3


def _query_blocks(batch_heads: int, length: int, source: int, device: torch.device, causal: bool = False) -> int:
    budget = _BLOCK_ELEMENTS if device.type == "cpu" else _BLOCK_ELEMENTS_ACCELERATOR
    rows = max(_MIN_ROWS, budget // max(1, batch_heads * source))
    if causal:
        rows = min(rows, max(_MIN_ROWS, -(-length // _CAUSAL_BLOCKS)))
    return max(1, min(length, rows))


def _relevant_rows(relevance: Tensor) -> tuple[int, int]:
    """First and one past the last query row that carries relevance (or a NaN) in any head.

    Rows outside that span give nothing to q, k or v, so the blocks skip them: in a causal language
    model explained at its last position, the last layer's attention then costs one row instead of
    all. Read back to the host, so on the CPU only (elsewhere the caller takes every row).
    """
    live = relevance.ne(0).any(-1).any(0).nonzero()
    if live.numel() == 0:
        return 0, 0
    return int(live[0]), int(live[-1]) + 1


def _stabilised_fraction_(x: Tensor, eps: float) -> Tensor:
    r""":math:`x / \mathrm{stab}(x) = |x| / (|x| + \epsilon)`, written into ``x`` (bit for bit: IEEE
    rounding is symmetric)."""
    magnitude = x.abs_()
    return magnitude.div_(magnitude + eps)


def _sigma_rho(relevance: Tensor, out: Tensor, eps: float, rel_probs: bool) -> tuple[Tensor, Optional[Tensor]]:
    r""":math:`\sigma = R / \mathrm{stab}(o)` and, where the probabilities get relevance, the row sums
    :math:`\rho = \sigma \cdot o`."""
    sigma = ratio(relevance, out, eps)
    return sigma, (sigma * out).sum(-1, keepdim=True) if rel_probs else None


def _attention_relevance(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, scale: Optional[float],
    relevance: Tensor, eps: float, relevant: tuple[bool, bool, bool], output: MaybeTensor = None,
) -> tuple[MaybeTensor, MaybeTensor, MaybeTensor]:
    r"""Relevance of q, k, v for ``softmax(scale * q k^T + mask) v`` (see the module docstring).

    ``relevant`` says which of q, k, v lead to a requested tensor; as for any product, a
    factor that does not is a constant and the other factor takes the whole share.
    ``output``: the forward's result, used where it is in the relevance dtype (else recomputed).

    The composition of the four rules collapses to five matrix products per block of query
    rows, as many as a fused attention backward. With :math:`x = \alpha q k^\top`, scores
    :math:`S` (x plus the mask), :math:`A = \mathrm{softmax}(S)`, :math:`o = A v`,
    :math:`\sigma = R / \mathrm{stab}(o)`, shares :math:`c_{av}`, :math:`c_{qk}` (1/2 each where
    both factors are relevant) and :math:`f(t) = t / \mathrm{stab}(t)`:

    * :math:`R_v = c_{av}\, v \odot (A^\top \sigma)`;
    * the softmax rule on :math:`R_A = c_{av} A \odot \sigma v^\top` needs the row sums
      :math:`\sum_j R_{A,ij} = c_{av}\,\rho_i` with :math:`\rho_i = \sigma_i \cdot o_i`, so no
      (rows x keys) reduction: :math:`R_S = c_{av} S \odot A \odot (\sigma v^\top - \rho)`;
    * the mask step (epsilon on contributions, only where a mask was given or the call is causal)
      and the bilinear step on :math:`x` give
      :math:`\tau = c_{qk} \alpha\, R_x / \mathrm{stab}(x) = c_{qk} c_{av} \alpha\, A \odot (\sigma v^\top - \rho)
      \odot f(S) \,[\odot f(x)]`, and :math:`R_q = q \odot \tau k`, :math:`R_k = k \odot \tau^\top q`.

    Masked positions have :math:`A = 0`; they are filled with the dtype's lowest finite value
    (not ``-inf``), so that :math:`f` stays finite there and they contribute exactly zero. A row
    a boolean or ``-inf`` mask hides entirely gets :math:`A = 0` (as PyTorch's safe softmax).
    Under a causal mask a block of rows reads only the keys it can see.
    """
    rel_q, rel_k, rel_v = relevant
    rel_probs = rel_q or rel_k
    dtype = relevance.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    groups = q.shape[-3] // k.shape[-3] if q.dim() >= 3 and k.shape[-3] != q.shape[-3] else 1
    if groups > 1:  # grouped-query attention: each key/value head serves several query heads
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    alpha = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    share_av = 0.5 if (rel_probs and rel_v) else 1.0
    share_qk = 0.5 if (rel_q and rel_k) else 1.0
    lead, length, source = q.shape[:-2], q.shape[-2], k.shape[-2]
    # Three-d views (heads flattened into the batch) for the batched products.
    q3, k3, v3 = q.reshape(-1, length, q.shape[-1]), k.reshape(-1, source, k.shape[-1]), v.reshape(-1, source, v.shape[-1])
    relevance3 = relevance.reshape(-1, length, relevance.shape[-1])
    if output is not None and output.dtype == dtype:
        output = output.reshape(relevance3.shape)
    else:
        output = None
    lowest = torch.finfo(dtype).min
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    first, last = _relevant_rows(relevance3) if q.device.type == "cpu" else (0, length)
    if rel_q:  # rows outside [first, last) get nothing; the blocks write the others
        r_q = torch.empty_like(q3) if (first, last) == (0, length) else torch.zeros_like(q3)
    else:
        r_q = None
    sum_k = torch.zeros_like(k3) if rel_k else None  # tau^T q, summed over blocks
    sum_v = torch.zeros_like(v3) if rel_v else None  # A^T sigma, summed over blocks
    rows = _query_blocks(q3.shape[0], max(1, last - first), source, q.device, causal)
    # Per-row quantities once for all blocks (each block would cost its own few ops): the scaled
    # queries and, from a kept output, sigma and rho.
    q_scaled = q3 * alpha
    sigma_all, rho_all = _sigma_rho(relevance3, output, eps, rel_probs) if output is not None else (None, None)
    # A mask that only selects (causal, boolean) leaves the kept scores equal to the logits.
    selects = causal or (mask is not None and mask.dtype == torch.bool)
    if causal:  # PyTorch's is_causal (never with attn_mask): query i sees keys 0..i (top-left aligned)
        # A block of rows [start, stop) sees every key before start; of the keys [start, stop),
        # row start + i hides those after start + i: one upper triangle serves every block.
        hidden = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu_(1)
    for start in range(first, last, rows):
        stop = min(last, start + rows)
        seen = min(source, stop) if causal else source  # keys any row of the block can see
        q_block, k_seen, v_seen = q3[:, start:stop], k3[:, :seen], v3[:, :seen]
        x = torch.bmm(q_scaled[:, start:stop], k_seen.transpose(1, 2))  # the scaled logits
        x4 = x.view(lead + x.shape[1:])
        dead = scores = None
        if causal and seen > start:
            x4[..., start:seen].masked_fill_(hidden[: stop - start, : seen - start], lowest)
        if mask is not None:
            block = mask[..., start:stop, :seen] if mask.dim() >= 2 and mask.shape[-2] == length else mask[..., :seen]
            if block.dtype == torch.bool:
                x4.masked_fill_(~block, lowest)
                dead = ~block.any(-1, keepdim=True)
            else:
                scores = (x4 + block).clamp_(min=lowest)
                dead = torch.isneginf(block).all(-1, keepdim=True)
        probs = torch.softmax(x4 if scores is None else scores, dim=-1)
        if dead is not None:
            probs.masked_fill_(dead, 0.0)
        probs = probs.view(x.shape)
        if sigma_all is None:  # no output kept in the relevance dtype: this block's, recomputed
            sigma, rho = _sigma_rho(relevance3[:, start:stop], torch.bmm(probs, v_seen), eps, rel_probs)
        else:
            sigma = sigma_all[:, start:stop]
            rho = rho_all[:, start:stop] if rel_probs else None
        if rel_v:
            sum_v[:, :seen] += torch.bmm(probs.transpose(1, 2), sigma)
        if not rel_probs:
            continue
        tau = torch.bmm(sigma, v_seen.transpose(1, 2)).sub_(rho).mul_(probs)  # A (sigma v^T - rho)
        del probs
        del x4
        fraction = _stabilised_fraction_(x, eps)  # the logits are not read again
        tau.mul_(fraction)
        if scores is not None:  # f(S) f(x)
            tau.mul_(_stabilised_fraction_(scores, eps).view(x.shape))
        elif selects:  # f(S) f(x) with S = x at every kept position
            tau.mul_(fraction)
        del fraction, x, scores
        if rel_q:
            torch.mul(q_block, torch.bmm(tau, k_seen), out=r_q[:, start:stop])
        if rel_k:
            sum_k[:, :seen] += torch.bmm(tau.transpose(1, 2), q_block)
    coefficient = share_av * share_qk * alpha
    r_q = r_q.mul_(coefficient).view(q.shape) if rel_q else None
    r_k = sum_k.mul_(k3).mul_(coefficient).view(k.shape) if rel_k else None
    r_v = sum_v.mul_(v3).mul_(share_av).view(v.shape) if rel_v else None
    if groups > 1:
        def fold(r: MaybeTensor) -> MaybeTensor:
            if r is None:
                return None
            return r.reshape(r.shape[:-3] + (r.shape[-3] // groups, groups) + r.shape[-2:]).sum(-3)

        r_k, r_v = fold(r_k), fold(r_v)
    return r_q, r_k, r_v


def sdpa_rule(ctx: RuleContext) -> list[MaybeTensor]:
    """Fused attention: the composition of the bilinear, softmax and epsilon rules."""
    node = ctx.node
    dropout = saved(node, "dropout_p")
    if dropout:  # the fused kernels draw their dropout mask internally: it cannot be rebuilt
        raise UnrecoverableOperandError(
            f"fused attention ({type(node).__name__}) ran with dropout_p={dropout}: its dropout mask cannot be "
            "recovered; call model.eval() (or pass dropout_p=0) before explaining"
        )
    q, k, v = saved(node, "query"), saved(node, "key"), saved(node, "value")
    mask = _first(node, "attn_mask", "attn_bias")
    # Under CP-LRP the attention probabilities are constants: q and k get nothing.
    cp = ctx.settings.attention == "cp"
    relevant = (ctx.relevant[0] and not cp, ctx.relevant[1] and not cp, ctx.relevant[2])
    r_q, r_k, r_v = _attention_relevance(
        q, k, v, mask, bool(saved(node, "is_causal")), saved(node, "scale"), ctx.out, ctx.settings.epsilon, relevant,
        saved(node, "output"),
    )
    result: list[MaybeTensor] = [r_q, r_k, r_v]
    result += [None] * (len(node.next_functions) - 3)
    return result


def _sdpa_forward(node: Node, inputs: list):
    mask = _first(node, "attn_mask", "attn_bias")
    q, k, v = inputs[0], inputs[1], inputs[2]
    groups = q.shape[-3] // k.shape[-3] if k.shape[-3] != q.shape[-3] else 1
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=bool(saved(node, "is_causal")), scale=saved(node, "scale"),
        enable_gqa=groups > 1,
    )
    return (out,) + tuple(None for _ in range(len(node._input_metadata) - 1))


def _sdpa_spec() -> OpSpec:
    return OpSpec(
        family="attention (bilinear + AttnLRP softmax)",
        rule=sdpa_rule,
        forward=_sdpa_forward,
        kept_inputs=lambda node: (saved(node, "query"), saved(node, "key"), saved(node, "value"))
        + (None,) * (len(node.next_functions) - 3),
        kept_output=lambda node: (saved(node, "output"),) + (None,) * (len(node._input_metadata) - 1)
        if saved(node, "output") is not None
        else None,
    )


ATTENTION: dict[str, OpSpec] = {
    "SoftmaxBackward0": _softmax_spec(softmax_rule, lambda n, x: torch.softmax(x[0], signed_dim(saved(n, "dim")))),
    # The math attention backend's softmax (rows that are fully masked give 0, not NaN).
    "SafeSoftmaxBackward0": _softmax_spec(softmax_rule, lambda n, x: torch.softmax(x[0], signed_dim(saved(n, "dim")))),
    "LogSoftmaxBackward0": _softmax_spec(
        log_softmax_rule, lambda n, x: torch.log_softmax(x[0], signed_dim(saved(n, "dim")))
    ),
    "ScaledDotProductFlashAttentionForCpuBackward0": _sdpa_spec(),
    "ScaledDotProductFlashAttentionBackward0": _sdpa_spec(),
    "ScaledDotProductEfficientAttentionBackward0": _sdpa_spec(),
    "ScaledDotProductCudnnAttentionBackward0": _sdpa_spec(),
}

# Under CP-LRP the attention probabilities are constants.
CP_LRP_OVERRIDES: dict[str, OpSpec] = {
    name: OpSpec(
        family="CP-LRP: attention probabilities constant",
        rule=spec.rule,
        needs=spec.needs,
        forward=spec.forward,
        kept_output=spec.kept_output,
        constant=True,
    )
    for name, spec in ATTENTION.items()
    if "Softmax" in name
}
