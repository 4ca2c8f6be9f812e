"""Rules for the ops of modern architectures, each against a formula written out here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from captum_dynamiclrp.engine import relevance
from captum_dynamiclrp.engine.graph import build_graph
from captum_dynamiclrp.errors import UnrecoverableOperandError
from captum_dynamiclrp.rules import CP_LRP_OVERRIDES, RuleSettings, attention

from .conftest import stab
from .test_ops import DT, EPS, engine_relevance, leaf, vjp


# ---------------------------------------------------------------------------------------------
# Softmax (AttnLRP Deep Taylor) and masks.
def test_softmax_rule():
    x = leaf(3, 6)
    out = torch.softmax(x, dim=-1)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    s = out.detach()
    torch.testing.assert_close(r, x.detach() * (seed - s * seed.sum(-1, keepdim=True)))


def test_log_softmax_rule():
    x = leaf(3, 6)
    out = torch.log_softmax(x, dim=0)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    s = out.detach().exp()
    torch.testing.assert_close(r, x.detach() * (seed - s * seed.sum(0, keepdim=True)))


@pytest.mark.parametrize("fill", [float("-inf"), torch.finfo(DT).min], ids=["-inf", "finfo.min"])
@pytest.mark.parametrize("how", ["add", "masked_fill", "where"])
def test_masked_softmax_gives_zero_not_nan(fill, how):
    x = leaf(2, 5)
    keep = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    scores = x * 2.0
    if how == "add":
        masked = scores + torch.zeros(2, 5, dtype=DT).masked_fill(~keep, fill)
    elif how == "masked_fill":
        masked = scores.masked_fill(~keep, fill)
    else:
        masked = torch.where(keep, scores, torch.tensor(fill, dtype=DT))
    probs = torch.softmax(masked, -1)
    v = leaf(5, 3)
    out = probs @ v
    seed = torch.randn_like(out)
    rx, rv = engine_relevance(out, (x, v), seed)
    assert torch.isfinite(rx).all() and torch.isfinite(rv).all()
    assert (rx[~keep] == 0).all()
    # Unmasked positions: the same as a softmax over the kept logits only.
    for row in range(2):
        xr = x.detach()[row, keep[row]].clone().requires_grad_(True)
        vr = v.detach()[keep[row]].clone().requires_grad_(True)
        o = torch.softmax(xr * 2.0, -1) @ vr
        expected, _ = engine_relevance(o, (xr, vr), seed[row])
        # The mask add's stabiliser sees z = logits, the reference has no add: eps-level differences.
        torch.testing.assert_close(rx[row, keep[row]], expected, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Fused attention against the math backend (which PyTorch decomposes into ops with their own rules).
ATTENTION_CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "bool_mask": dict(attn_mask="bool"),
    "zero_float_mask": dict(attn_mask="float0"),
    "gqa": dict(gqa=True),
    "scale": dict(scale=0.3),
    "causal_more_keys": dict(is_causal=True, keys=7),
    "causal_fewer_keys": dict(is_causal=True, keys=3),
    "float_mask_per_batch": dict(attn_mask="float_batch"),
    "float_mask_dead_row": dict(attn_mask="float_dead_row"),
    "bool_mask_dead_row": dict(attn_mask="bool_dead_row"),
    "gqa_causal": dict(gqa=True, is_causal=True),
    "gqa_bool_mask": dict(gqa=True, attn_mask="bool"),
}


def _attention_inputs(case):
    q = leaf(2, 4, 5, 8)
    kv_heads = 2 if case.get("gqa") else 4
    keys = case.get("keys", 5 if case.get("is_causal") and "attn_mask" not in case else 6)
    k, v = leaf(2, kv_heads, keys, 8), None
    v = leaf(*k.shape)
    kwargs = {}
    if case.get("is_causal"):
        kwargs["is_causal"] = True
    if case.get("attn_mask") in ("bool", "bool_dead_row"):
        mask = torch.rand(5, keys) > 0.3
        mask[:, 0] = True
        if case["attn_mask"] == "bool_dead_row":
            mask[2] = False  # a query that sees no key: PyTorch gives it a zero output
        kwargs["attn_mask"] = mask
    if case.get("attn_mask") == "float0":
        kwargs["attn_mask"] = torch.zeros(5, keys, dtype=DT)
    if case.get("attn_mask") == "float_batch":
        kwargs["attn_mask"] = torch.randn(2, 1, 5, keys, dtype=DT)
    if case.get("attn_mask") == "float_dead_row":
        mask = torch.randn(5, keys, dtype=DT)
        mask[1] = float("-inf")
        mask[3, 2:] = torch.finfo(DT).min
        kwargs["attn_mask"] = mask
    if case.get("gqa"):
        kwargs["enable_gqa"] = True
    if "scale" in case:
        kwargs["scale"] = case["scale"]
    return q, k, v, kwargs


@pytest.mark.parametrize("blocks", ["whole", "row_by_row", "two_rows"])
@pytest.mark.parametrize("preset", ["attnlrp", "cp"])
@pytest.mark.parametrize("name", sorted(ATTENTION_CASES))
def test_fused_attention_equals_its_decomposition(name, preset, blocks, monkeypatch):
    if blocks != "whole":  # one or two query rows per block (5 queries: blocks 2, 2, 1 rows)
        monkeypatch.setattr(attention, "_BLOCK_ELEMENTS", 1)
        monkeypatch.setattr(attention, "_MIN_ROWS", 1 if blocks == "row_by_row" else 2)
    q, k, v, kwargs = _attention_inputs(ATTENTION_CASES[name])
    settings = RuleSettings(epsilon=EPS, attention=preset)
    overrides = CP_LRP_OVERRIDES if preset == "cp" else None
    fused = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert "Attention" in type(fused.grad_fn).__name__
    seed = torch.randn_like(fused)
    r_fused = relevance(fused, (q, k, v), seed, settings=settings, overrides=overrides)
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        # Tracked (not requested), so that the decomposition's sum knows the mask's value: an
        # untracked operand enters a recomputed sum as zero.
        kwargs["attn_mask"] = mask.clone().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        math = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert "Attention" not in type(math.grad_fn).__name__
    r_math = relevance(math, (q, k, v), seed, settings=settings, overrides=overrides)
    for a, b in zip(r_fused, r_math):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    if preset == "cp":
        assert r_fused[0].abs().max() == 0 and r_fused[1].abs().max() == 0
        # All relevance flows into v: conservation up to the stabiliser.
        z = fused.detach()
        torch.testing.assert_close(r_fused[2].sum(), (seed * z / stab(z, EPS)).sum())


@pytest.mark.parametrize("blocks", ["whole", "two_rows"])
@pytest.mark.parametrize("rows", ["last", "middle", "first", "none"])
@pytest.mark.parametrize("name", ["plain", "causal", "bool_mask_dead_row", "float_mask_dead_row", "gqa_causal"])
def test_fused_attention_skips_query_rows_without_relevance(name, rows, blocks, monkeypatch):
    """Relevance on some query rows only (a causal LM's last layer, explained at its last position):
    the blocks cover only the span of rows that carry it, and the result is the decomposition's."""
    if blocks == "two_rows":
        monkeypatch.setattr(attention, "_BLOCK_ELEMENTS", 1)
        monkeypatch.setattr(attention, "_MIN_ROWS", 2)
    spans = []
    real = attention._relevant_rows
    monkeypatch.setattr(attention, "_relevant_rows", lambda r: spans.append(real(r)) or spans[-1])
    q, k, v, kwargs = _attention_inputs(ATTENTION_CASES[name])
    settings = RuleSettings(epsilon=EPS)
    fused = F.scaled_dot_product_attention(q, k, v, **kwargs)
    keep = {"last": [4], "middle": [1, 3], "first": [0], "none": []}[rows]
    seed = torch.zeros_like(fused)
    seed[:, :, keep] = torch.randn_like(seed[:, :, keep])
    seed[1, 2] = 0.0  # one head without any: the span is that of all heads together
    r_fused = relevance(fused, (q, k, v), seed, settings=settings)
    assert spans == [(keep[0], keep[-1] + 1) if keep else (0, 0)]
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kwargs["attn_mask"] = mask.clone().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        math = F.scaled_dot_product_attention(q, k, v, **kwargs)
    r_math = relevance(math, (q, k, v), seed, settings=settings)
    for a, b in zip(r_fused, r_math):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    outside = [i for i in range(q.shape[-2]) if not keep or not keep[0] <= i <= keep[-1]]
    assert (r_fused[0][:, :, outside] == 0).all()


# The CUDA backends: each forced in turn, its node must give what the math backend's decomposition
# gives on the same inputs. Flash attention needs half precision; the reference then runs in float64
# from the same half-precision values, so the tolerance is that of a float16 / bfloat16 forward.
CUDA_BACKENDS = {
    "flash": (SDPBackend.FLASH_ATTENTION, "ScaledDotProductFlashAttentionBackward0"),
    "efficient": (SDPBackend.EFFICIENT_ATTENTION, "ScaledDotProductEfficientAttentionBackward0"),
    "cudnn": (SDPBackend.CUDNN_ATTENTION, "ScaledDotProductCudnnAttentionBackward0"),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ["plain", "causal", "float_mask", "gqa", "scale"])
@pytest.mark.parametrize("backend", sorted(CUDA_BACKENDS))
def test_cuda_attention_backend_equals_the_math_decomposition(backend, case, dtype):
    kernel, node_name = CUDA_BACKENDS[backend]
    torch.manual_seed(0)
    shape_kv = (2, 2 if case == "gqa" else 4, 16, 64)
    q, k, v = (torch.randn(*s, device="cuda", dtype=dtype, requires_grad=True) for s in ((2, 4, 16, 64), shape_kv, shape_kv))
    kwargs = {}
    if case == "causal":
        kwargs["is_causal"] = True
    if case == "float_mask":
        kwargs["attn_mask"] = torch.randn(16, 16, device="cuda", dtype=dtype)
    if case == "gqa":
        kwargs["enable_gqa"] = True
    if case == "scale":
        kwargs["scale"] = 0.05
    try:
        with sdpa_kernel(kernel):
            fused = F.scaled_dot_product_attention(q, k, v, **kwargs)
    except RuntimeError as err:  # this GPU / build cannot run the backend with these arguments
        pytest.skip(f"{backend} cannot run {case} in {dtype}: {str(err).splitlines()[0]}")
    assert type(fused.grad_fn).__name__ == node_name
    seed = torch.randn(fused.shape, device="cuda", dtype=torch.float32)
    r_fused = relevance(fused, (q, k, v), seed, settings=RuleSettings(epsilon=EPS))

    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    kwargs64 = {key: value.double() if torch.is_tensor(value) else value for key, value in kwargs.items()}
    with sdpa_kernel(SDPBackend.MATH):
        math = F.scaled_dot_product_attention(q64, k64, v64, **kwargs64)
    r_math = relevance(math, (q64, k64, v64), seed.double(), settings=RuleSettings(epsilon=EPS))
    for got, expected in zip(r_fused, r_math):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        scale = expected.abs().max().item()
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-2 * scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (on CPU, attention with dropout is decomposed)")
def test_fused_attention_with_dropout_is_a_clear_error():
    q, k, v = (torch.randn(2, 4, 16, 64, device="cuda", requires_grad=True) for _ in range(3))
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert "Attention" in type(out.grad_fn).__name__
    with pytest.raises(UnrecoverableOperandError, match="dropout"):
        relevance(out, (q, k, v), torch.randn_like(out), settings=RuleSettings(epsilon=EPS))


@pytest.mark.parametrize("relevant", [(True, True, True), (True, False, True), (False, False, True)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_rule_without_the_kept_output_recomputes_the_same(causal, relevant, monkeypatch):
    # sigma and rho come from the kept output for all rows at once, or per block from a
    # recomputed one (an output in another dtype than the relevance): both must agree.
    monkeypatch.setattr(attention, "_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(attention, "_MIN_ROWS", 2)
    q, k, v = (torch.randn(2, 3, 7, 4, dtype=DT) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    seed = torch.randn_like(out)
    kept = attention._attention_relevance(q, k, v, None, causal, None, seed, EPS, relevant, out)
    recomputed = attention._attention_relevance(q, k, v, None, causal, None, seed, EPS, relevant, None)
    for a, b, wanted in zip(kept, recomputed, relevant):
        assert (a is None) == (b is None) == (not wanted)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_attention_output_conserves_into_q_k_v():
    q, k, v, kwargs = _attention_inputs({})
    out = F.scaled_dot_product_attention(q, k, v)
    seed = torch.randn_like(out)
    rq, rk, rv = engine_relevance(out, (q, k, v), seed)
    # Softmax Deep Taylor conserves (sum x(R - s sum R) = sum (x - c)(...)), so up to eps and the
    # softmax's shift-dependence the total matches within a small fraction.
    assert torch.isfinite(rq).all() and torch.isfinite(rk).all() and torch.isfinite(rv).all()
    z = out.detach()
    torch.testing.assert_close(rv.sum(), 0.5 * (seed * z / stab(z, EPS)).sum())


# ---------------------------------------------------------------------------------------------
# Normalisation.
def _epsilon_with_detached_statistics(f, x, seed):
    xd = x.detach().requires_grad_(True)
    z = f(xd)
    (g,) = torch.autograd.grad(z, xd, seed / stab(z.detach(), EPS))
    return xd.detach() * g


def test_layer_norm_constant_normaliser():
    ln = nn.LayerNorm(6).double()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = leaf(3, 4, 6)
    out = ln(x)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)

    def detached(xd):
        mu = xd.mean(-1, keepdim=True)
        sd = torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + ln.eps).detach()
        return (xd - mu) / sd * ln.weight.detach() + ln.bias.detach()

    torch.testing.assert_close(r, _epsilon_with_detached_statistics(detached, x, seed))


def test_group_norm_constant_normaliser():
    gn = nn.GroupNorm(2, 4).double()
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    x = leaf(2, 4, 3, 3)
    out = gn(x)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)

    def detached(xd):
        g = xd.reshape(2, 2, -1)
        mu = g.mean(-1, keepdim=True)
        sd = torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + gn.eps).detach()
        return ((g - mu) / sd).reshape(xd.shape) * gn.weight.view(1, 4, 1, 1).detach() + gn.bias.view(
            1, 4, 1, 1).detach()

    torch.testing.assert_close(r, _epsilon_with_detached_statistics(detached, x, seed))


def test_rms_norm_written_out_is_identity():
    weight = nn.Parameter(torch.randn(6, dtype=DT))
    x = leaf(3, 6)
    variance = x.pow(2).mean(-1, keepdim=True)
    out = weight * (x * torch.rsqrt(variance + 1e-6))
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    torch.testing.assert_close(r, seed)
    # torch's own rms_norm composes the same way.
    out2 = F.rms_norm(x, (6,), weight, 1e-6)
    (r2,) = engine_relevance(out2, x, seed)
    torch.testing.assert_close(r2, seed)


def test_layer_norm_written_out_equals_the_native_rule():
    w, b = nn.Parameter(torch.randn(6, dtype=DT)), nn.Parameter(torch.randn(6, dtype=DT))
    x = leaf(3, 6)
    seed = torch.randn(3, 6, dtype=DT)
    manual = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) * w + b
    native = F.layer_norm(x, (6,), w, b, 1e-5)
    # A tiny epsilon: x - mean(x) can be near zero, where the stabiliser would dominate.
    tiny = RuleSettings(epsilon=1e-12)
    (r_manual,) = relevance(manual, x, seed, settings=tiny)
    (r_native,) = relevance(native, x, seed, settings=tiny)
    torch.testing.assert_close(r_manual, r_native, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("stat", ["var", "std", "norm"])
def test_statistics_alone_share_by_squares(stat):
    x = leaf(3, 5)
    out = {"var": lambda: x.var(-1), "std": lambda: x.std(-1), "norm": lambda: x.norm(dim=-1)}[stat]()
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    d = x.detach() - x.detach().mean(-1, keepdim=True) if stat != "norm" else x.detach()
    torch.testing.assert_close(r, d**2 / (d**2).sum(-1, keepdim=True) * seed[:, None], rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Routing ops of transformers and friends: the VJP.
MORE_ROUTING = {
    "masked_fill": lambda x: x.masked_fill(x > 0.5, 0.0),
    "where_two": lambda x: torch.where(x > 0, x, x.flip(0)),
    "topk": lambda x: x.topk(2, dim=-1).values,
    "sort": lambda x: x.sort(dim=1).values,
    "index_select": lambda x: x.index_select(1, torch.tensor([2, 0])),
    "tril": lambda x: x.tril(),
    "triu": lambda x: x.triu(1),
    "repeat": lambda x: x.repeat(1, 2, 1),
    "repeat_interleave": lambda x: x.repeat_interleave(2, dim=1),
    "unfold": lambda x: x.unfold(2, 2, 1),
    "im2col": lambda x: F.unfold(x.unsqueeze(0), 2),
    "roll": lambda x: x.roll(1, dims=2),
    "flip": lambda x: x.flip(-1),
    "nearest": lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
    "scatter": lambda x: x.scatter(2, torch.zeros(2, 3, 1, dtype=torch.long), x[..., 1:2] * 1.0),
    "index_put": lambda x: x.index_put((torch.tensor([1]),), x[:1] * 1.0),
    "diagonal": lambda x: x.diagonal(dim1=1, dim2=2),
    "chunk": lambda x: x.chunk(2, dim=-1)[1],
    "movedim": lambda x: x.movedim(0, 2),
}


@pytest.mark.parametrize("name", sorted(MORE_ROUTING))
def test_more_routing_ops_equal_their_vjp(name):
    x = leaf(2, 3, 4)
    out = MORE_ROUTING[name](x)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    torch.testing.assert_close(r, vjp(out, x, seed))


def test_embedding_relevance_lands_on_looked_up_rows():
    emb = nn.Embedding(10, 4).double()
    ids = torch.tensor([[1, 3, 1]])
    out = emb(ids)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, emb.weight, seed)
    expected = torch.zeros(10, 4, dtype=DT).index_add_(0, ids.flatten(), seed.reshape(-1, 4))
    torch.testing.assert_close(r, expected)


# ---------------------------------------------------------------------------------------------
# Identity nonlinearities of transformers.
@pytest.mark.parametrize(
    "fn",
    [torch.exp, torch.log, lambda x: x.pow(3), torch.sqrt, torch.rsqrt, torch.sin, torch.cos, torch.erf,
     lambda x: x.clamp(0.8, 1.5), lambda x: x.clamp(min=1.1), F.logsigmoid, torch.reciprocal],
    ids=["exp", "log", "pow", "sqrt", "rsqrt", "sin", "cos", "erf", "clamp", "clamp_min", "logsigmoid",
         "reciprocal"],
)
def test_elementwise_transformer_ops_are_identity(fn):
    x = (torch.rand(3, 4, dtype=DT) + 0.5).requires_grad_(True)  # positive: log, sqrt defined
    out = fn(x * 1.0)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    torch.testing.assert_close(r, seed)


# ---------------------------------------------------------------------------------------------
# Sums of transformers: epsilon on contributions.
SUMS = {
    "cumsum": lambda x: x.cumsum(1),
    "bilinear_upsample": lambda x: F.interpolate(x.unsqueeze(0), scale_factor=2, mode="bilinear"),
    "linear_upsample": lambda x: F.interpolate(x, scale_factor=2, mode="linear"),
    "scatter_add": lambda x: x.scatter_add(2, torch.zeros(2, 3, 2, dtype=torch.long), x[..., :2] * 1.0),
    "index_add": lambda x: x.index_add(1, torch.tensor([0, 0]), x[:, 1:] * 1.0),
}


@pytest.mark.parametrize("name", sorted(SUMS))
def test_transformer_sums_epsilon_on_contributions(name):
    x = leaf(2, 3, 4)
    out = SUMS[name](x)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    # No constants: relevance is conserved up to the stabiliser.
    z = out.detach()
    torch.testing.assert_close(r.sum(), (seed * z / stab(z, EPS)).sum(), rtol=1e-5, atol=1e-8)
    if name in ("cumsum", "bilinear_upsample", "linear_upsample"):
        f = SUMS[name]
        xd = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(f(xd), xd, seed / stab(z, EPS))
        torch.testing.assert_close(r, x.detach() * g)


def test_glu_and_baddbmm_and_weight_norm():
    x = leaf(3, 8)
    out = F.glu(x, dim=-1)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    torch.testing.assert_close(r, torch.cat([seed / 2, seed / 2], -1))

    a, b = leaf(2, 3, 4), leaf(2, 4, 5)
    bias = nn.Parameter(torch.randn(2, 3, 5, dtype=DT))
    out = torch.baddbmm(bias, a, b, beta=0.5, alpha=2.0)
    seed = torch.randn_like(out)
    ra, rb = engine_relevance(out, (a, b), seed)
    s = seed / stab(out.detach(), EPS)
    torch.testing.assert_close(ra, 0.5 * a.detach() * (2.0 * s @ b.detach().transpose(1, 2)))
    torch.testing.assert_close(rb, 0.5 * b.detach() * (2.0 * a.detach().transpose(1, 2) @ s))

    conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(3, 4, 3)).double()
    xin = leaf(2, 3, 7)
    out = conv(xin)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, xin, seed)
    w = conv.weight.detach()
    ref = xin.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(F.conv1d(ref, w, conv.bias.detach()), ref, seed / stab(out.detach(), EPS))
    torch.testing.assert_close(r, xin.detach() * g)


@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "padded_keys"])
def test_multihead_attention_key_padding_mask_weights_path_equals_fused_path(padded):
    # With need_weights=True, nn.MultiheadAttention adds the key-padding mask inside
    # baddbmm(mask, q, k^T): an untracked bias, replayed as zero. With need_weights=False the same
    # mask goes to the fused kernel, whose node keeps it: the two must give the same relevance.
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    query, memory = leaf(2, 3, 8), leaf(2, 5, 8)
    key_padding_mask = torch.zeros(2, 5, dtype=torch.bool)
    if padded:
        key_padding_mask[0, 3:] = True
        key_padding_mask[1, 1] = True
    weights_path = mha(query, memory, memory, key_padding_mask=key_padding_mask, need_weights=True)[0]
    assert "BaddbmmBackward0" in build_graph(weights_path.grad_fn, (query, memory)).types
    fused_path = mha(query, memory, memory, key_padding_mask=key_padding_mask, need_weights=False)[0]
    torch.testing.assert_close(weights_path, fused_path)
    seed = torch.randn_like(weights_path)
    # A tiny epsilon: the two graphs stabilise different intermediate sums, which would otherwise
    # differ by epsilon-sized amounts.
    r_weights = relevance(weights_path, (query, memory), seed, settings=RuleSettings(epsilon=1e-12))
    r_fused = relevance(fused_path, (query, memory), seed, settings=RuleSettings(epsilon=1e-12))
    for a, b in zip(r_weights, r_fused):
        assert torch.isfinite(a).all() and a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    # Padded keys are only read as keys and values, both masked out: no relevance reaches them.
    assert (r_weights[1][key_padding_mask] == 0).all()


def test_rotary_embedding_composition():
    # Rotary embeddings: x * cos + rotate_half(x) * sin with cos/sin constants.
    x = leaf(2, 4, 8)
    pos = torch.arange(4, dtype=DT)[:, None] * torch.arange(1, 5, dtype=DT)[None]
    cos, sin = torch.cat([pos.cos(), pos.cos()], -1), torch.cat([pos.sin(), pos.sin()], -1)
    x1, x2 = x[..., :4], x[..., 4:]
    rotated = torch.cat((-x2, x1), dim=-1)
    out = x * cos + rotated * sin
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    a, b = (x * cos).detach(), (rotated * sin).detach()
    s = seed / stab(a + b, EPS)
    ra, rb = a * s, b * s  # the add splits; the products with constants pass everything on
    expected = ra + torch.cat([rb[..., 4:], -rb[..., :4]], -1) * torch.tensor(-1.0, dtype=DT) * -1
    expected = ra + torch.cat([rb[..., 4:], rb[..., :4]], -1)
    torch.testing.assert_close(r, expected)
