"""Fuzzing: random models built from the covered ops, checked against the explicit reference.

A Hypothesis strategy (:func:`programs`) draws a small random *program*: a DAG of steps over
the input, from one of two families,

* ``seq``: values of shape ``(batch, T, d)``: linear layers (new or a shared module used a
  second time), a weight matrix reused (tied, also transposed), elementwise activations,
  residual adds and subtractions of merging branches, products and quotients of two
  activations, concatenations and splits, reductions broadcast back (sum, mean, amax, max),
  routing (transpose, flip, roll, reshape, pad + slice, narrow), scaling by a constant or a
  parameter, attention blocks (explicit ``softmax(q k^T) v`` with optional causal mask, or fused
  ``scaled_dot_product_attention``, one or several heads), layer norm, batch norm and an RMS
  norm written out in plain ops; a head pooling over ``T`` (mean, sum, last position, flatten);
* ``img``: values of shape ``(batch, C, H, W)``: convolutions (1x1 / 3x3, grouped, shared),
  batch norm, activations, residual adds, products, channel concatenations, max / average
  pooling (downsampling or same size), flips; a head with adaptive average pooling or flatten;

with random widths, spatial sizes, batch sizes (1-3), biases on or off, some parameters frozen,
and a random input. Properties checked on every example (:func:`check_program`):

1. ``DynamicLRP(model).attribute`` does not crash;
2. the attribution is finite, float64 and of the input's shape;
3. it equals the explicit reference engine of ``tests/reference_engine.py`` (which records every
   aten op with a ``TorchDispatchMode`` and applies the rule formulas with every operand at hand,
   no promises), extended here by plain rules for softmax, layer norm, fused attention, the
   constant factors of products (RMS-norm normalisers, self-gates), amax / max and a few routing
   ops;
4. conservation where the epsilon preset conserves: for bias-free programs made of linear maps,
   activations, sums, products of activations, reductions and routing, the convergence delta is
   ~0 (the stabiliser is the only loss);
5. batch = per-example: each row of a batch call equals a call on that row alone;
6. the model and the input are left exactly as they were (``snapshot``).

A second, smaller fuzz runs the ``gamma`` and ``zplus`` presets (properties 1, 2, 5, 6).

Runs:

* default (CI): ``DYNAMICLRP_FUZZ_EXAMPLES`` examples (default 200) of the epsilon fuzz, plus the
  programs found earlier (``@example``), and a third as many of the preset fuzz: 15-30 s on two
  CPU cores;
* long (``pytest -m slow tests/test_fuzz.py``, i.e. ``tox -e slow``): 10,000 examples
  (``DYNAMICLRP_FUZZ_LONG_EXAMPLES`` to change it), programs of up to 12 steps: 12 minutes on two
  idle cores, 30 on busy ones.

Record of the runs made while writing this file (torch 2.14.1, CPU):

* development batches, 3,600 examples: two failures. (a) A conservation false alarm:
  ``flip(x) - x`` on a single feature is an exact zero, so the stabiliser absorbs the relevance of
  that branch; the conservation check now allows exactly the stabilisers' worst-case loss, which
  the reference adds up (``FOUND_ZERO_SUM``). (b) A real bug, in the preset fuzz: gamma / z+ give a
  batch other results than its examples when PyTorch runs a biased linear layer as ``addmm`` for
  one memory layout and as ``mm`` + ``add`` for another (issue #7). Kept as an xfail at first,
  with the preset fuzz making linear inputs contiguous; since fixed (the engine folds such a bias
  into the linear rule, see ``captum_dynamiclrp/rules/linear.py``, and so does the reference):
  ``test_bias_fusion_is_batch_independent``, and the workaround is gone.
* long run 1 (10,000 examples): no failure.
* long run 2: 2,746 examples passed, then one failure (``FOUND_SELF_GATE``): the engine had
  gained the constant-factor rule for self-gates (``x * f(x)``) while this reference split such
  products in half; a 1e-6 relative difference, visible only through a stabilised sum inside the
  gate. Fixed in the reference (``_constant_factors``), which now mirrors that documented rule.
* long run 3 (10,000 examples): no failure.
* preset fuzz (gamma / z+), 2,000 examples: no failure.
* long run 4 (10,000 examples, on the engine as of the end of this work): no failure.
* after the bias-folding fix (issue #7), without the contiguous workaround:
  preset fuzz 2,000 examples (``DYNAMICLRP_FUZZ_EXAMPLES=6000``), epsilon fuzz 2,000 examples
  (``DYNAMICLRP_FUZZ_EXAMPLES=2000``): no failure.

In all: 32,746 long-run examples of the epsilon fuzz (36,346 with the development batches, 38,346
with the run after the fix), 4,000 of the preset fuzz (2,000 of them with the workaround).

The fuzz catches rule changes: scaling the output of any one rule (softmax, layer norm, batch
norm, add, mul, cat, amax, max-pool, convolution, fused attention) by 0.9 fails it within 300
examples.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from captum_dynamiclrp import DynamicLRP

try:  # run as part of the ``tests`` package or with ``tests`` on sys.path
    from . import reference_engine as reference
    from .conftest import ModelSnapshot
except ImportError:  # pragma: no cover
    import reference_engine as reference
    from conftest import ModelSnapshot

DT = torch.float64
EPS = 1e-9
EXAMPLES = int(os.environ.get("DYNAMICLRP_FUZZ_EXAMPLES", "200"))
LONG_EXAMPLES = int(os.environ.get("DYNAMICLRP_FUZZ_LONG_EXAMPLES", "10000"))
HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


# =============================================================================================
# Reference rules the shared reference engine lacks, written out here (float64, explicit).
# They are patched into ``reference.RULES`` only for the duration of one comparison.
# =============================================================================================
def _ref_softmax(ctx):
    r"""AttnLRP Deep Taylor: :math:`R_x = x (R - s \sum R)` along the softmax dim; 0 where s = 0."""
    x, dim = ctx.arg(0), ctx.arg(1)
    s = ctx.rec.outs[0].to(ctx.dtype)
    r = ctx.out
    value = x.to(ctx.dtype) * (r - s * r.sum(dim, keepdim=True))
    yield x, torch.where(s > 0, value, torch.zeros_like(value))


def _ref_layer_norm(ctx):
    r"""Constant normaliser: z_i = w_i rho (x_i - mean x) + b_i is linear in x; epsilon on it.

    With ``s = R / stab(z)`` and ``g = rho w s``: :math:`R_x = x (g - \overline{g})`.
    """
    x, shape, weight, eps = ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(4)
    xd = x.to(ctx.dtype)
    dims = tuple(range(x.dim() - len(shape), x.dim()))
    centred = xd - xd.mean(dims, keepdim=True)
    rho = 1.0 / torch.sqrt((centred * centred).mean(dims, keepdim=True) + eps)
    g = rho * ctx.s()
    if weight is not None:
        g = g * weight.to(ctx.dtype)
    yield x, xd * (g - g.mean(dims, keepdim=True))


def _ref_attention(ctx):
    r"""Fused attention as the composition of its parts (all in float64):

    ``L = a q k^T``, ``S = L`` (+ causal ``-inf``), ``P = softmax(S)``, ``o = P v``.
    ``P v`` bilinear (half each when q/k and v are both relevant); softmax Deep Taylor on ``S``;
    the logits' share of ``S`` (epsilon on contributions, masked positions 0); ``q k^T``
    bilinear with the scale inside the second factor.
    """
    q_val, k_val, v_val = ctx.arg(0), ctx.arg(1), ctx.arg(2)
    causal = bool(ctx.arg(4, "is_causal", False))
    scale = ctx.rec.kwargs.get("scale")
    if ctx.rec.kwargs.get("attn_mask") is not None:
        raise NotImplementedError("reference: fused attention with a mask tensor")
    q, k, v = (t.to(ctx.dtype) for t in (q_val, k_val, v_val))
    rel_q, rel_k, rel_v = ctx.rel(q_val), ctx.rel(k_val), ctx.rel(v_val)
    alpha = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = alpha * (q @ k.transpose(-2, -1))
    scores = logits
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = logits.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, -1)
    sigma = ctx.out / reference.stab(probs @ v, ctx.eps)
    share = 0.5 if ((rel_q or rel_k) and rel_v) else 1.0
    if rel_v:
        yield v_val, share * v * (probs.transpose(-2, -1) @ sigma)
    if not (rel_q or rel_k):
        return
    r_probs = share * probs * (sigma @ v.transpose(-2, -1))
    r_scores = r_probs - probs * r_probs.sum(-1, keepdim=True)
    r_scores = torch.where(probs > 0, torch.where(probs > 0, scores, 0.0) * r_scores, 0.0)
    if causal:
        safe = torch.where(probs > 0, scores, 1.0)
        r_logits = torch.where(probs > 0, logits * r_scores / reference.stab(safe, ctx.eps), 0.0)
    else:
        r_logits = r_scores
    tau = r_logits / reference.stab(logits, ctx.eps)
    share_qk = 0.5 if (rel_q and rel_k) else 1.0
    if rel_q:
        yield q_val, share_qk * q * (tau @ (alpha * k))
    if rel_k:
        yield k_val, share_qk * k * (tau.transpose(-2, -1) @ (alpha * q))


# -- products: which factor is a constant ------------------------------------------------------
# The rule table treats two kinds of factor as constants of a product (``rules/arithmetic.py``):
# a normaliser statistic (``x * rsqrt(var + eps)``: RMS norm) and a self-gate (both factors are
# elementwise functions of one tensor; the less direct one, e.g. ``sigmoid(x)`` in
# ``x * sigmoid(x)``, is the gate). Written out here over the recorded aten ops. "Tracked" means
# the tensor requires grad (autograd records an edge for it); python scalars never are.
_NORMALISERS = {"rsqrt", "sqrt", "std", "var", "linalg_vector_norm", "norm"}
_THROUGH = {"expand", "view", "unsqueeze", "squeeze", "_to_copy", "clone", "add", "reciprocal", "clamp_min", "clamp"}
# aten op (overload) -> elementwise in the sense of the self-gate rule.
_ELEMENTWISE = {
    "tanh": None, "sigmoid": None, "erf": None, "exp": None, "neg": None, "relu": None, "gelu": None,
    "silu": None, "softplus": None, "hardsigmoid": None, "log_sigmoid_forward": None,
    "pow": "Tensor_Scalar", "mul": "Tensor", "div": "Tensor", "add": "Tensor", "sub": "Tensor", "clamp": "default",
}


def _producer(trace, value):
    key = trace.key_of_value.get(id(value))
    if key is None or not key.startswith("op:"):
        return None
    return trace.records[int(key.split(":")[1])]


def _tracked(trace, rec) -> list:
    """The operands autograd would record an edge for: tensors that require grad."""
    return [a for a in rec.tensor_args() if trace.requires_grad.get(trace.key_of_value[id(a)], False)]


def _is_normaliser(trace, value, hops: int = 6) -> bool:
    """A normalising statistic, seen through broadcasts and ``+ eps``."""
    for _ in range(hops):
        rec = _producer(trace, value)
        if rec is None:
            return False
        if rec.name in _NORMALISERS:
            return True
        tracked = _tracked(trace, rec)
        if rec.name not in _THROUGH or len(tracked) != 1:
            return False
        value = tracked[0]
    return False


def _elementwise_root(trace, value, budget: int = 8) -> tuple:
    """(root key, hops): the tensor ``value`` is an elementwise function of, and how far down it is.

    Steps down unary elementwise ops; at a sum or product of several tracked operands, their
    common root (if they share one) ends the walk; at most ``budget`` steps.
    """
    key, hops = trace.key_of_value[id(value)], 0
    while budget > 0:
        rec = _producer(trace, value)
        if rec is None or rec.name not in _ELEMENTWISE:
            break
        overload = _ELEMENTWISE[rec.name]
        if overload is not None and rec.func._overloadname != overload:
            break
        tracked = _tracked(trace, rec)
        if not tracked:
            break
        budget -= 1
        if len(tracked) == 1:
            value, key, hops = tracked[0], trace.key_of_value[id(tracked[0])], hops + 1
            continue
        roots = [_elementwise_root(trace, a, budget) for a in tracked]
        if any(r[0] != roots[0][0] for r in roots):
            break
        key, hops = roots[0][0], hops + 1 + max(r[1] for r in roots)
        break
    return key, hops


def _constant_factors(trace, a, b) -> list:
    operands = [a, b]
    tracked = [isinstance(v, Tensor) and trace.requires_grad.get(trace.key_of_value[id(v)], False)
               for v in operands]
    flags = [t and _is_normaliser(trace, v) for v, t in zip(operands, tracked)]
    if not any(t and not f for t, f in zip(tracked, flags)):
        flags = [False, False]
    plain = [i for i in range(2) if tracked[i] and not flags[i]]
    if len(plain) == 2:
        (ra, ha), (rb, hb) = (_elementwise_root(trace, operands[i]) for i in plain)
        if ra == rb and ha != hb:
            flags[plain[0] if ha > hb else plain[1]] = True
    return flags


def _ref_product(ctx):
    """mul / div: the relevance split evenly over the relevant factors that are not constants."""
    operands = [ctx.arg(0), ctx.arg(1)]
    flags = _constant_factors(ctx.trace, *operands)
    takers = [v for v, f in zip(operands, flags) if ctx.rel(v) and not f]
    for v in takers:
        yield v, reference.reduce_to(ctx.out / len(takers), v.shape)


EXTRA_RULES = {
    "_softmax": _ref_softmax,
    "native_layer_norm": _ref_layer_norm,
    "_scaled_dot_product_flash_attention_for_cpu": _ref_attention,
    "mul": _ref_product,
    "div": _ref_product,
    "exp": reference.identity_rule,
    **{name: reference.routing_rule for name in ("amax", "max", "flip", "roll", "masked_fill", "narrow")},
}


# Ops whose rule divides by ``stab(z)``: each loses ``|R| eps / (|z| + eps)`` of relevance at most.
STABILISED = ("addmm", "mm", "bmm", "convolution", "add", "sub", "sum", "mean", "avg_pool2d",
              "_adaptive_avg_pool2d", "native_batch_norm", "_native_batch_norm_legit_no_training",
              "native_layer_norm", "_scaled_dot_product_flash_attention_for_cpu")


def _budgeted(rule, budget: list):
    """Wrap a stabilised rule so that it adds its worst-case stabiliser loss to ``budget[0]``."""

    def wrapped(ctx):
        z = ctx.rec.outs[0].to(ctx.dtype)
        budget[0] += float((ctx.out.abs() * ctx.eps / (z.abs() + ctx.eps)).sum())
        yield from rule(ctx)

    return wrapped


def reference_relevance(model: nn.Module, x: Tensor, targets: list[int]) -> tuple[Tensor, Tensor, float]:
    """The reference's relevance of ``x`` for each row's target logit, the model output, and the
    stabiliser budget: an upper bound on the relevance the epsilon stabilisers absorb."""
    leaf = x.detach().clone().requires_grad_(True)
    budget = [0.0]
    rules = {**reference.RULES, **EXTRA_RULES}
    rules.update({name: _budgeted(rules[name], budget) for name in STABILISED})
    frozen = [p for p in model.parameters() if not p.requires_grad]
    with mock.patch.dict(reference.RULES, rules), torch.enable_grad():
        try:  # as DynamicLRP does: frozen parameters are tracked during the forward
            for p in frozen:
                p.requires_grad_(True)
            trace = reference.record(lambda: model(leaf))
        finally:
            for p in frozen:
                p.requires_grad_(False)
        # requires_grad of every recorded value, read once the forward is over (autograd marks
        # an op's output after the dispatch mode has seen it); stored values and originals pair up.
        trace.requires_grad = {key: t.requires_grad for key, t in zip(trace.values, trace._alive)}
        out = trace.output
        seed = torch.zeros_like(out)
        seed[torch.arange(out.shape[0]), targets] = 1.0
        (r,) = trace.relevance([leaf], (seed * out).detach(), epsilon=EPS)
    return r, out.detach(), budget[0]


# =============================================================================================
# Programs: a random DAG of steps, and the module that runs it.
# =============================================================================================
@dataclass
class Step:
    op: str
    inputs: tuple[int, ...]
    attrs: dict = field(default_factory=dict)


@dataclass
class Program:
    family: str  # "seq" (batch, T, d) or "img" (batch, C, H, W)
    in_shape: tuple[int, ...]
    batch: int
    classes: int
    modules: list  # module specs: ("linear", in, out, bias), ("conv", ...), ...
    params: list  # shapes of shared parameters
    steps: list
    head: dict
    conserving: bool
    seed: int
    frozen: tuple = ()  # indices into model.parameters() to freeze

    def describe(self) -> str:
        lines = [(f"{self.family} in={self.in_shape} batch={self.batch} classes={self.classes} "
                  f"conserving={self.conserving} seed={self.seed} frozen={self.frozen}")]
        lines += [f"  module {i}: {m}" for i, m in enumerate(self.modules)]
        lines += [f"  param {i}: {p}" for i, p in enumerate(self.params)]
        lines += [f"  v{i + 1} = {s.op}{s.inputs} {s.attrs}" for i, s in enumerate(self.steps)]
        lines.append(f"  head: {self.head}")
        return "\n".join(lines)


def _make_module(spec: tuple) -> nn.Module:
    kind = spec[0]
    if kind == "linear":
        return nn.Linear(spec[1], spec[2], bias=spec[3])
    if kind == "conv":
        _, cin, cout, k, groups, bias = spec
        return nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=bias)
    if kind == "layernorm":
        norm = nn.LayerNorm(spec[1], elementwise_affine=spec[2])
        if spec[2]:
            with torch.no_grad():
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0.0, 0.3)
        return norm
    if kind in ("batchnorm1d", "batchnorm2d"):
        norm = (nn.BatchNorm1d if kind == "batchnorm1d" else nn.BatchNorm2d)(spec[1], affine=spec[2])
        with torch.no_grad():
            norm.running_mean.normal_(0.0, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            if spec[2]:
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0.0, 0.3)
        return norm
    if kind == "rms":
        return _RMSWeight(spec[1])
    raise ValueError(kind)


class _RMSWeight(nn.Module):
    """RMS norm written out in plain ops (the normaliser ``rsqrt(mean(x^2) + eps)`` is a constant)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))

    def forward(self, h: Tensor) -> Tensor:
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


ACTIVATIONS = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "leaky_relu": lambda h: F.leaky_relu(h, 0.1),
}


class FuzzNet(nn.Module):
    """Runs a :class:`Program`: every step reads earlier values and appends its results."""

    def __init__(self, program: Program) -> None:
        super().__init__()
        self.program = program
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(program.seed)
        try:
            self.layers = nn.ModuleList(_make_module(spec) for spec in program.modules)
            self.shared = nn.ParameterList(nn.Parameter(torch.randn(*shape) / math.sqrt(shape[0]))
                                           for shape in program.params)
            head = program.head
            self.head = nn.Linear(head["features"], program.classes, bias=head["bias"])
        finally:
            torch.random.set_rng_state(gen_state)

    def forward(self, x: Tensor) -> Tensor:
        values = [x]
        for step in self.program.steps:
            out = self._step(step, [values[i] for i in step.inputs])
            values.extend(out if isinstance(out, tuple) else (out,))
        return self._head(values[-1])

    def _step(self, step: Step, args: list) -> Any:
        op, a = step.op, step.attrs
        h = args[0]
        if op == "module":
            return self.layers[a["module"]](h)
        if op == "tied":
            w = self.shared[a["param"]]
            return h @ (w.t() if a["transpose"] else w)
        if op == "act":
            return ACTIVATIONS[a["kind"]](h)
        if op == "add":
            return h + args[1]
        if op == "sub":
            return h - args[1]
        if op == "mul":
            return h * args[1]
        if op == "div":
            return h / torch.exp(torch.tanh(args[1]))
        if op == "cat":
            return torch.cat([h, args[1]], dim=a["dim"])
        if op == "split":
            first, second = torch.split(h, [a["size"], h.shape[a["dim"]] - a["size"]], dim=a["dim"])
            return first, second
        if op == "narrow":
            return h.narrow(a["dim"], a["start"], a["length"])
        if op == "reduce":
            dim = a["dim"]
            if a["kind"] == "sum":
                r = h.sum(dim, keepdim=True)
            elif a["kind"] == "mean":
                r = h.mean(dim, keepdim=True)
            elif a["kind"] == "amax":
                r = h.amax(dim, keepdim=True)
            else:
                r = h.max(dim=dim, keepdim=True).values
            return r.expand_as(h) if a["expand"] else h + r
        if op == "route":
            kind = a["kind"]
            if kind == "transpose":
                return h.transpose(-1, -2).contiguous().transpose(-1, -2)
            if kind == "flip":
                return h.flip(-1)
            if kind == "roll":
                return h.roll(1, -1)
            if kind == "reshape":
                return h.reshape(h.shape[0], -1).reshape(h.shape)
            if kind == "pad":
                return F.pad(h, (1, 2))[..., 1:-2]
            if kind == "permute":
                order = list(range(h.dim()))
                order[1], order[-1] = order[-1], order[1]
                return h.permute(*order).permute(*order)
            raise ValueError(kind)
        if op == "scale":
            if a["kind"] == "scalar":
                return h * a["value"]
            if a["kind"] == "halve":
                return h / 2.0
            return h * self.shared[a["param"]]
        if op == "attention":
            return self._attention(h, a)
        if op == "norm":
            layer = self.layers[a["module"]]
            if isinstance(layer, nn.BatchNorm1d):
                return layer(h.transpose(1, 2)).transpose(1, 2)
            return layer(h)
        if op == "pool":
            kind = a["kind"]
            if kind == "max2":
                return F.max_pool2d(h, 2)
            if kind == "avg2":
                return F.avg_pool2d(h, 2)
            if kind == "max3":
                return F.max_pool2d(h, 3, stride=1, padding=1)
            if kind == "avg3":
                return F.avg_pool2d(h, 3, stride=1, padding=1)
            raise ValueError(kind)
        raise ValueError(op)

    def _attention(self, h: Tensor, a: dict) -> Tensor:
        q, k, v, o = (self.layers[i] for i in a["modules"])
        batch, length, _ = h.shape
        heads = a["heads"]

        def split_heads(t: Tensor) -> Tensor:
            return t.view(batch, length, heads, -1).transpose(1, 2)

        qh, kh, vh = split_heads(q(h)), split_heads(k(h)), split_heads(v(h))
        if a["fused"]:
            mixed = F.scaled_dot_product_attention(qh, kh, vh, is_causal=a["causal"])
        else:
            scores = (qh @ kh.transpose(-1, -2)) * (1.0 / math.sqrt(qh.shape[-1]))
            if a["causal"]:
                keep = torch.ones(length, length, dtype=torch.bool, device=h.device).tril()
                scores = scores.masked_fill(~keep, float("-inf"))
            mixed = torch.softmax(scores, dim=-1) @ vh
        return o(mixed.transpose(1, 2).reshape(batch, length, -1))

    def _head(self, h: Tensor) -> Tensor:
        kind = self.program.head["kind"]
        if kind == "mean":
            h = h.mean(1)
        elif kind == "sum":
            h = h.sum(1)
        elif kind == "last":
            h = h[:, -1]
        elif kind == "gap":
            h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        elif kind == "gap2":
            h = F.adaptive_avg_pool2d(h, 2).flatten(1)
        elif kind == "flatten":
            h = h.flatten(1)
        return self.head(h)


def build(program: Program) -> nn.Module:
    model = FuzzNet(program).to(DT).eval()
    params = list(model.parameters())
    for i in program.frozen:
        params[i].requires_grad_(False)
    return model


# =============================================================================================
# The strategy.
# =============================================================================================
SEQ_OPS = ["module", "tied", "act", "add", "sub", "mul", "div", "cat", "split", "narrow", "reduce", "route",
           "scale"] + ["attention", "norm"] * 3
IMG_OPS = ["module", "act", "add", "sub", "mul", "cat", "split", "reduce", "route", "scale"] + ["norm", "pool"] * 2
NOT_CONSERVING = {"attention", "norm"}


class _Builder:
    """Draw-time bookkeeping: value shapes, module specs, shared parameters."""

    def __init__(self, draw, family: str, in_shape: tuple, conserving: bool) -> None:
        self.draw, self.family, self.conserving = draw, family, conserving
        self.shapes: list[tuple] = [in_shape]
        self.modules: list = []
        self.params: list = []
        self.steps: list = []

    def bias(self) -> bool:
        return False if self.conserving else self.draw(st.booleans())

    def new_module(self, spec: tuple) -> int:
        self.modules.append(spec)
        return len(self.modules) - 1

    def pick(self, candidates: list | None = None) -> int:
        candidates = list(range(len(self.shapes))) if candidates is None else candidates
        # Mostly the newest value, so that most steps end up on the path to the output.
        if self.draw(st.sampled_from([True, True, False])):
            return candidates[-1]
        return self.draw(st.sampled_from(candidates))

    def emit(self, op: str, inputs: tuple, shapes: list, **attrs) -> None:
        self.steps.append(Step(op, inputs, attrs))
        self.shapes.extend(shapes)

    # -- width changes ------------------------------------------------------------------------
    def linear(self, i: int, out: int | None = None) -> None:
        t, d = self.shapes[i]
        reusable = [m for m, spec in enumerate(self.modules) if spec[0] == "linear" and spec[1] == d
                    and (out is None or spec[2] == out)]
        if reusable and self.draw(st.booleans()):  # a shared module used a second time
            m = self.draw(st.sampled_from(reusable))
        else:
            width = out if out is not None else self.draw(st.integers(1, 8))
            m = self.new_module(("linear", d, width, self.bias()))
        self.emit("module", (i,), [(t, self.modules[m][2])], module=m)

    def conv(self, i: int, out: int | None = None, k: int | None = None) -> None:
        c, hh, ww = self.shapes[i]
        reusable = [m for m, spec in enumerate(self.modules) if spec[0] == "conv" and spec[1] == c
                    and (out is None or spec[2] == out) and (k is None or spec[3] == k)]
        if reusable and self.draw(st.booleans()):
            m = self.draw(st.sampled_from(reusable))
        else:
            cout = out if out is not None else self.draw(st.integers(1, 5))
            kernel = k if k is not None else self.draw(st.sampled_from([1, 3]))
            common = [g for g in range(1, min(c, cout) + 1) if c % g == 0 and cout % g == 0]
            groups = self.draw(st.sampled_from(common)) if k is None else 1
            m = self.new_module(("conv", c, cout, kernel, groups, self.bias()))
        self.emit("module", (i,), [(self.modules[m][2], hh, ww)], module=m)

    def align(self, j: int, shape: tuple) -> int:
        """Project value ``j`` to ``shape`` (only the feature/channel count may differ)."""
        if self.shapes[j] == shape:
            return j
        if self.family == "seq":
            self.linear(j, out=shape[-1])
        else:
            self.conv(j, out=shape[0], k=1)
        return len(self.shapes) - 1

    def mergeable(self, i: int) -> list:
        """Values that can meet value ``i`` after an align (same T / same spatial size)."""
        same = self.shapes[i][:1] if self.family == "seq" else self.shapes[i][1:]
        key = (lambda s: s[:1]) if self.family == "seq" else (lambda s: s[1:])
        return [j for j, s in enumerate(self.shapes) if key(s) == same]

    # -- one random step ----------------------------------------------------------------------
    def step(self) -> None:
        draw = self.draw
        ops = SEQ_OPS if self.family == "seq" else IMG_OPS
        if self.conserving:
            ops = [o for o in ops if o not in NOT_CONSERVING]
        op = draw(st.sampled_from(ops))
        i = self.pick()
        shape = self.shapes[i]
        feat = -1 if self.family == "seq" else 0  # index into the shape (without batch)
        if op == "module":
            self.linear(i) if self.family == "seq" else self.conv(i)
        elif op == "tied":
            t, d = shape
            usable = [p for p, s in enumerate(self.params) if len(s) == 2 and d in s]
            if usable and draw(st.booleans()):  # a parameter reused (possibly transposed)
                p = draw(st.sampled_from(usable))
                rows, cols = self.params[p]
                transpose = rows != d or (rows == cols and draw(st.booleans()))
                out = rows if transpose else cols
            else:
                out = draw(st.integers(1, 8))
                self.params.append((d, out))
                p, transpose = len(self.params) - 1, False
            self.emit("tied", (i,), [(t, out)], param=p, transpose=transpose)
        elif op == "act":
            self.emit("act", (i,), [shape], kind=draw(st.sampled_from(sorted(ACTIVATIONS))))
        elif op in ("add", "sub", "mul", "div"):
            candidates = self.mergeable(i)
            if op == "sub":  # x - x is an exact zero: stabiliser territory, not a merge
                candidates = [j for j in candidates if j != i] or candidates
            j = self.pick(candidates)
            if op == "sub" and j == i:
                return
            j = self.align(j, shape)
            self.emit(op, (i, j), [shape])
        elif op == "cat":
            j = self.pick(self.mergeable(i))
            other = self.shapes[j]
            if self.family == "seq" and draw(st.booleans()) and other[1] == shape[1]:
                self.emit("cat", (i, j), [(shape[0] + other[0], shape[1])], dim=1)  # along T
            else:
                joined = list(shape)
                joined[feat] += other[feat]
                self.emit("cat", (i, j), [tuple(joined)], dim=-1 if self.family == "seq" else 1)
        elif op == "split":
            axis = draw(st.sampled_from([0, len(shape) - 1]))  # T or d / C or W
            n = shape[axis]
            if n < 2:
                return
            size = draw(st.integers(1, n - 1))
            first, second = list(shape), list(shape)
            first[axis], second[axis] = size, n - size
            self.emit("split", (i,), [tuple(first), tuple(second)], dim=axis + 1, size=size)
        elif op == "narrow":
            axis = len(shape) - 1
            n = shape[axis]
            length = draw(st.integers(1, n))
            start = draw(st.integers(0, n - length))
            cut = list(shape)
            cut[axis] = length
            self.emit("narrow", (i,), [tuple(cut)], dim=axis + 1, start=start, length=length)
        elif op == "reduce":
            kind = draw(st.sampled_from(["sum", "mean", "amax", "max"]))
            dim = draw(st.integers(1, len(shape)))
            self.emit("reduce", (i,), [shape], kind=kind, dim=dim, expand=draw(st.booleans()))
        elif op == "route":
            kinds = ["flip", "roll", "reshape", "pad", "permute"]
            if self.family == "seq" or shape[1] == shape[2]:
                kinds.append("transpose")
            self.emit("route", (i,), [shape], kind=draw(st.sampled_from(kinds)))
        elif op == "scale":
            kind = draw(st.sampled_from(["scalar", "halve", "param"]))
            if kind == "param":
                pshape = (shape[-1],) if self.family == "seq" else (shape[0], 1, 1)
                self.params.append(pshape)
                self.emit("scale", (i,), [shape], kind="param", param=len(self.params) - 1)
            else:
                value = draw(st.sampled_from([-1.5, -0.5, 0.25, 2.0, 3.0]))
                self.emit("scale", (i,), [shape], kind=kind, value=value)
        elif op == "attention":
            t, d = shape
            heads = draw(st.sampled_from([h for h in (1, 2, 4) if d % h == 0]))
            width = draw(st.sampled_from([w for w in (heads, 2 * heads, 4 * heads) if w <= 8]))
            mods = [self.new_module(("linear", d, width, self.bias())) for _ in range(3)]
            mods.append(self.new_module(("linear", width, d, self.bias())))
            self.emit("attention", (i,), [shape], modules=tuple(mods), heads=heads,
                      fused=draw(st.booleans()), causal=draw(st.booleans()))
        elif op == "norm":
            if self.family == "seq":
                kind = draw(st.sampled_from(["layernorm", "batchnorm1d", "rms"]))
            else:
                kind = "batchnorm2d"
            channels = shape[-1] if self.family == "seq" else shape[0]
            if kind == "layernorm" and channels < 2:
                return
            spec = (kind, channels, draw(st.booleans()))[: 2 if kind == "rms" else 3]
            self.emit("norm", (i,), [shape], module=self.new_module(spec))
        elif op == "pool":
            c, hh, ww = shape
            kind = draw(st.sampled_from(["max2", "avg2", "max3", "avg3"]))
            if kind.endswith("2"):
                if hh < 2 or ww < 2:
                    return
                self.emit("pool", (i,), [(c, hh // 2, ww // 2)], kind=kind)
            else:
                self.emit("pool", (i,), [shape], kind=kind)


@st.composite
def programs(draw, max_steps: int = 8) -> Program:
    family = draw(st.sampled_from(["seq", "img"]))
    conserving = draw(st.sampled_from([True, False, False]))
    if family == "seq":
        in_shape = (draw(st.integers(1, 4)), draw(st.integers(1, 6)))
    else:
        in_shape = (draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    builder = _Builder(draw, family, in_shape, conserving)
    for _ in range(draw(st.integers(1, max_steps))):
        builder.step()
    last = builder.shapes[-1]
    if family == "seq":
        kind = draw(st.sampled_from(["mean", "sum", "last", "flatten"]))
        features = last[0] * last[1] if kind == "flatten" else last[1]
    else:
        kinds = ["gap", "flatten"] + (["gap2"] if last[1] >= 2 and last[2] >= 2 else [])
        kind = draw(st.sampled_from(kinds))
        features = {"gap": last[0], "gap2": 4 * last[0], "flatten": math.prod(last)}[kind]
    head = {"kind": kind, "features": features, "bias": builder.bias()}
    program = Program(
        family=family, in_shape=in_shape, batch=draw(st.integers(1, 3)), classes=draw(st.integers(1, 4)),
        modules=builder.modules, params=builder.params, steps=builder.steps, head=head,
        conserving=conserving, seed=draw(st.integers(0, 2**16)),
    )
    n_params = sum(1 for _ in FuzzNet(program).parameters())
    if n_params and draw(st.booleans()):
        program.frozen = tuple(draw(st.sets(st.integers(0, n_params - 1), max_size=n_params)))
    return program


# =============================================================================================
# Properties.
# =============================================================================================
def inputs_for(program: Program) -> tuple[Tensor, list[int]]:
    gen = torch.Generator().manual_seed(program.seed + 1)
    x = torch.randn((program.batch,) + program.in_shape, generator=gen, dtype=DT)
    targets = torch.randint(0, program.classes, (program.batch,), generator=gen).tolist()
    return x, targets


def close(got: Tensor, want: Tensor, rtol: float, what: str, program: Program) -> None:
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(
        got, want, rtol=rtol, atol=rtol * (1.0 + scale),
        msg=lambda m: f"{what}\n{m}\nprogram:\n{program.describe()}",
    )


def check_program(program: Program, rules: str = "epsilon", against_reference: bool = True) -> None:
    event(f"family={program.family} conserving={program.conserving}")
    for step in program.steps:
        event(f"op={step.op}" + (f":{step.attrs['kind']}" if "kind" in step.attrs else ""))
    model = build(program)
    x, targets = inputs_for(program)
    x_before = x.clone()
    before = ModelSnapshot(model)
    lrp = DynamicLRP(model, rules=rules, epsilon=EPS)

    attr, delta = lrp.attribute(x, target=targets, return_convergence_delta=True)  # 1. no crash
    info = f"\nprogram:\n{program.describe()}"
    assert attr.shape == x.shape, info  # 2. shape, dtype, finite
    assert attr.dtype == DT, info
    assert torch.isfinite(attr).all(), f"non-finite attribution{info}"

    if against_reference:  # 3. the explicit reference
        ref, out, budget = reference_relevance(model, x, targets)
        close(attr, ref, 1e-7, "engine != reference", program)
        if program.conserving:  # 4. conservation: bias-free, conserving ops only
            # Exact up to what the stabilisers absorb (``budget`` bounds it: large only where some
            # pre-activation is ~0, e.g. ``flip(x) - x`` on a single feature).
            selected = out[torch.arange(program.batch), targets]
            scale = selected.abs() + attr.reshape(program.batch, -1).abs().sum(1) + 1.0
            bound = budget + 1e-9 * scale
            assert (delta.abs() <= bound).all(), f"not conserved: delta={delta} f={selected}{info}"

    for row in range(program.batch):  # 5. batch = per-example
        single = lrp.attribute(x[row:row + 1], target=targets[row])
        close(single[0], attr[row], 1e-7, f"row {row} differs from its batch result", program)

    before.assert_unchanged(model)  # 6. nothing changed
    assert torch.equal(x, x_before) and not x.requires_grad and x.grad is None


FUZZ = {"deadline": None, "suppress_health_check": HEALTH, "derandomize": False}

# Programs the fuzzer found (see the module docstring), replayed on every run.
FOUND_ZERO_SUM = Program(  # flip(x) - x == 0 exactly on one feature: the stabiliser takes it all
    family="seq", in_shape=(1, 1), batch=1, classes=1,
    modules=[("linear", 1, 1, False), ("linear", 1, 1, False)], params=[(1, 1)],
    steps=[Step("act", (0,), {"kind": "gelu"}), Step("cat", (0, 0), {"dim": 1}), Step("route", (0,), {"kind": "flip"}),
           Step("sub", (3, 0)), Step("module", (0,), {"module": 0}), Step("module", (0,), {"module": 1}),
           Step("tied", (0,), {"param": 0, "transpose": False}), Step("div", (0, 4))],
    head={"kind": "mean", "features": 1, "bias": False}, conserving=True, seed=0,
)
FOUND_SELF_GATE = Program(  # v5 * v2 with v5 = 2 gelu(gelu(v2)): v5 is a self-gate of v2, a constant
    family="seq", in_shape=(1, 1), batch=1, classes=1, modules=[("linear", 1, 1, False)], params=[],
    steps=[Step("module", (0,), {"module": 0}), Step("act", (1,), {"kind": "leaky_relu"}),
           Step("act", (2,), {"kind": "gelu"}), Step("act", (3,), {"kind": "gelu"}), Step("add", (4, 4)),
           Step("mul", (5, 2)), Step("div", (0, 6))],
    head={"kind": "mean", "features": 1, "bias": False}, conserving=True, seed=0,
)


@settings(max_examples=EXAMPLES, **FUZZ)
@given(programs())
@example(program=FOUND_ZERO_SUM)
@example(program=FOUND_SELF_GATE)
def test_fuzz_epsilon_matches_reference(program):
    check_program(program)


@settings(max_examples=max(1, EXAMPLES // 3), **FUZZ)
@given(programs(), st.sampled_from(["gamma", "zplus"]))
def test_fuzz_other_presets_run_clean(program, rules):
    check_program(program, rules=rules, against_reference=False)


@pytest.mark.slow
@settings(max_examples=LONG_EXAMPLES, **FUZZ)
@given(programs(max_steps=12))
def test_fuzz_long(program):
    check_program(program)


# =============================================================================================
# Regressions: programs the fuzzer found, kept as plain tests (see the module docstring).
# =============================================================================================
class _SlicedLinear(nn.Module):
    """A biased linear layer on a sliced 3-d input, then a bias-free head.

    For a batch of 2 the slice ``x[:, :1]`` is not contiguous and ``F.linear`` runs as
    ``mm`` + ``add(bias)``; for a single example it is contiguous and runs as one ``addmm``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)
        self.head = nn.Linear(1, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lin(x[:, :1]).mean(1))


class _SeqFirstBlock(nn.Module):
    """A transformer-style feed-forward block run sequence-first, as ``nn.MultiheadAttention`` does.

    ``x.transpose(0, 1)`` of a ``(batch, T, d)`` input is ``(T, batch, d)``: contiguous for one
    example (``addmm``), not for a batch (``mm`` + ``add``), so the first layer's bias is fused for
    the single examples and separate for the batch; the second layer reads a fresh tensor.
    """

    def __init__(self, d: int = 3, hidden: int = 5, classes: int = 2) -> None:
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = x.transpose(0, 1)
        h = h + self.down(F.gelu(self.up(h)))
        return self.head(h.transpose(0, 1).mean(1))


def _node_types(out: Tensor) -> set[str]:
    seen, stack, types = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        types.add(type(node).__name__)
        stack.extend(child for child, _ in node.next_functions)
    return types


BIAS_FUSION_CASES = [
    pytest.param(_SlicedLinear, (2, 2, 1), id="sliced"),
    pytest.param(_SeqFirstBlock, (3, 4, 3), id="seq-first"),
]


@pytest.mark.parametrize("rules", ["gamma", "zplus", "epsilon"])
@pytest.mark.parametrize("make, shape", BIAS_FUSION_CASES)
def test_bias_fusion_is_batch_independent(make, shape, rules):
    """Issue #7 (found by ``test_fuzz_other_presets_run_clean``): a bias PyTorch fused into ``addmm``
    and the same bias added by a separate ``add`` after ``mm`` give the same relevance (the engine
    folds the latter into the linear rule), so a batch equals its single examples in every preset."""
    torch.manual_seed(0)
    model = make().to(DT).eval()
    if rules == "zplus":  # positive parameters, so that z+ (which drops w- x+ and b-) passes something on
        with torch.no_grad():
            for p in model.parameters():
                p.abs_()
    x = torch.randn(*shape, dtype=DT)
    with torch.enable_grad():  # the two spellings this test is about
        assert {"MmBackward0", "AddBackward0"} <= _node_types(model(x.requires_grad_()))
        assert "AddmmBackward0" in _node_types(model(x[:1]))
    x = x.detach()
    lrp = DynamicLRP(model, rules=rules)
    batch = lrp.attribute(x, target=0)
    assert batch.abs().sum() > 0, "degenerate test: no relevance"
    for row in range(x.shape[0]):
        single = lrp.attribute(x[row:row + 1], target=0)
        torch.testing.assert_close(single[0], batch[row], rtol=1e-12, atol=1e-15)


def test_epsilon_bias_fusion_is_exact():
    """Under epsilon the two spellings used to agree only up to the stabiliser (the split ``mm`` +
    ``add`` stabilised twice); with the bias folded into ``mm`` they agree exactly, for any eps."""
    torch.manual_seed(0)
    model = _SlicedLinear().to(DT).eval()
    x = torch.randn(2, 2, 1, dtype=DT)
    for eps in (1e-1, 1e-6, 1e-12):
        lrp = DynamicLRP(model, epsilon=eps)
        batch = lrp.attribute(x, target=0)
        single = lrp.attribute(x[:1], target=0)
        torch.testing.assert_close(single[0], batch[0], rtol=1e-14, atol=1e-17)


def test_bias_fold_is_planned_once_and_respects_a_user_sum_rule():
    """The batch graph of ``_SlicedLinear`` folds its one separate bias (the sum gets the pass-on
    rule); with the user's own rule for ``AddBackward0`` nothing is folded and that rule runs."""
    import dataclasses

    from captum_dynamiclrp.engine import Engine
    from captum_dynamiclrp.engine.plan import PROPAGATE
    from captum_dynamiclrp.rules import RULE_TABLE
    from captum_dynamiclrp.rules.base import FOLDED_BIAS_SUM

    torch.manual_seed(0)
    model = _SlicedLinear().to(DT).eval()
    x = torch.randn(2, 2, 1, dtype=DT, requires_grad=True)
    own_sum = dataclasses.replace(RULE_TABLE["AddBackward0"], family="user's sum rule")
    for overrides, folded in (({}, 1), ({"AddBackward0": own_sum}, 0)):
        engine = Engine(overrides=overrides)
        engine.relevance(model(x), x)
        specs = [step[2] for step in engine.last_run.plan.steps if step[0] == PROPAGATE]
        assert sum(spec is FOLDED_BIAS_SUM for spec in specs) == folded
        assert sum(spec is own_sum for spec in specs) == 1 - folded
        biased = [step for step in engine.last_run.plan.steps if step[0] == PROPAGATE and step[7] is not None]
        assert len(biased) == folded
