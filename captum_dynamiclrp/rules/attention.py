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

The causal mask is applied only when the call asked for it (``is_causal``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UnrecoverableOperandError
from .base import MaybeTensor, Node, OpSpec, RuleContext, ratio, saved, signed_dim, stabilize


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


def _attention_relevance(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, scale: Optional[float],
    relevance: Tensor, eps: float, relevant: tuple[bool, bool, bool],
) -> tuple[MaybeTensor, MaybeTensor, MaybeTensor]:
    """Relevance of q, k, v for ``softmax(scale * q k^T + mask) v`` (see the module docstring).

    ``relevant`` says which of q, k, v lead to a requested tensor; as for any product, a
    factor that does not is a constant and the other factor takes the whole share.
    """
    rel_q, rel_k, rel_v = relevant
    rel_probs = rel_q or rel_k
    dtype = relevance.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    groups = q.shape[-3] // k.shape[-3] if q.dim() >= 3 and k.shape[-3] != q.shape[-3] else 1
    if groups > 1:  # grouped-query attention: each key/value head serves several query heads
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    alpha = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    logits = (q @ k.transpose(-2, -1)) * alpha
    scores = logits
    if causal:
        length, source = q.shape[-2], k.shape[-2]
        keep = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(dtype)
    probs = torch.softmax(scores, dim=-1)
    out = probs @ v
    sigma = ratio(relevance, out, eps)
    share_av = 0.5 if (rel_probs and rel_v) else 1.0
    r_q = r_k = r_v = None
    if rel_v:
        r_v = share_av * v * (probs.transpose(-2, -1) @ sigma)
    if rel_probs:
        r_probs = share_av * probs * (sigma @ v.transpose(-2, -1))
        r_scores = _deep_taylor(scores, probs, r_probs, -1)
        if mask is None and not causal:
            r_logits = r_scores
        else:  # scores = logits + mask: the logits' share; masked positions carry none.
            safe = torch.where(probs > 0, scores, 1.0)
            r_logits = torch.where(probs > 0, logits * r_scores / stabilize(safe, eps), 0.0)
        # The scale is a constant; q k^T is bilinear (stabilised on the scaled logits, as
        # PyTorch's math backend computes (sqrt(a) q)(sqrt(a) k)^T).
        share_qk = 0.5 if (rel_q and rel_k) else 1.0
        tau = ratio(r_logits, logits, eps).mul_(share_qk * alpha)
        if rel_q:
            r_q = q * (tau @ k)
        if rel_k:
            r_k = k * (tau.transpose(-2, -1) @ q)
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
        q, k, v, mask, bool(saved(node, "is_causal")), saved(node, "scale"), ctx.out, ctx.settings.epsilon, relevant
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
