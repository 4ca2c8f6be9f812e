r"""An independent, deliberately plain LRP reference for the engine tests.

It shares no code with :mod:`captum_dynamiclrp`. Instead of walking autograd nodes
and recovering operands with promises, it *records* every aten op of the forward
pass with a :class:`~torch.utils._python_dispatch.TorchDispatchMode` -- operator,
operand values, output values -- so every operand of every op is at hand. Relevance
is then pushed backwards over the recorded ops, newest first, with explicit
formulas (epsilon preset, ``stab(z) = z + eps * sign(z)``, ``sign(0) = +1``):

====================================  =====================================================
ops                                   rule
====================================  =====================================================
addmm / mm / bmm / convolution,       :math:`R_x = x \odot J_x^\top (R / stab(z))`, the bias
one operand depends on the input      inside ``z`` (it absorbs its share)
mm / bmm / mv (one activation),       bias folding: the add passes ``R`` on unchanged and the
then reshapes, then ``+ b``           map uses ``z = B(x, w) + b``, as addmm does (``b`` 1-d,
                                      size 1 or the last dim, not relevant; each value read once)
mm / bmm / addmm of two activations   :math:`R_a = \tfrac12 a \odot (s\,b^\top)`,
                                      :math:`R_b = \tfrac12 b \odot (a^\top s)`, ``s = R/stab(z)``
mul / div                             half of ``R`` to each relevant operand (summed over
                                      broadcast dims); all of it with one constant operand
add / sub / sum / mean / avg-pool /   :math:`R_i = x_i \odot J_i^\top (R / stab(z))`
adaptive avg-pool
batch norm (eval)                     :math:`R_x = a x \odot R / stab(a x + c)`
relu, gelu, silu, tanh, atan, ...     identity
max-pool                              winner takes all (scatter by the recorded indices)
maximum / minimum / fmax / fmin       winner takes all: the operand(s) equal to the recorded
                                      output (NaN matches NaN) share ``R`` evenly
logsumexp                             :math:`R_x = \mathrm{softmax}(x) \odot R` over the
                                      reduced dims (0 at ``-inf``)
cumprod                               :math:`R_{y_k}` split evenly over its ``k`` factors
routing ops                           their vector-Jacobian product (the op is re-run on its
                                      recorded operand and differentiated locally)
====================================  =====================================================

"Relevant" means: the operand depends (transitively) on a requested tensor.

Usage::

    trace = record(lambda: model(x))
    (R_x,) = trace.relevance([x], seed, epsilon=1e-6)

Requested tensors may be leaves (inputs) or intermediate tensors produced during the
recorded forward (found by object identity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

Key = str


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------
@dataclass
class OpRecord:
    """One recorded aten call.

    Attributes:
        func: The aten overload (``aten.addmm.default``...).
        name: Its packet name without an in-place ``_`` suffix (``"addmm"``, ``"relu"``).
        args, kwargs: The call's arguments, every tensor replaced by the recorded value of
            the tensor at call time (a detached copy, shared by all uses of that value).
        outs: Output values (tuple; detached copies, non-tensors as they are).
        out_keys: Value key per output (``None`` for non-tensors).
    """

    func: Any
    name: str
    args: tuple
    kwargs: dict
    outs: tuple
    out_keys: tuple

    def tensor_args(self) -> List[Tensor]:
        return [a for a in tree_flatten((self.args, self.kwargs))[0] if isinstance(a, Tensor)]


def _packet_name(func) -> str:
    name = func.overloadpacket.__name__
    # In-place variants (relu_, add_) follow the rule of their out-of-place op.
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


class _Recorder(TorchDispatchMode):
    def __init__(self, trace: "Trace") -> None:
        super().__init__()
        self.trace = trace

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.trace._add(func, args, kwargs, out)
        return out


@dataclass
class Trace:
    """The recorded forward: records in call order and the value behind every key.

    Tensors are identified by Python object identity at the time of each call: a
    value key names one *version* of a tensor (an in-place op gives its result a new
    key). Every recorded object is kept alive so that identities are never reused.
    """

    records: List[OpRecord] = field(default_factory=list)
    values: Dict[Key, Tensor] = field(default_factory=dict)  # key -> recorded value
    current: Dict[int, Key] = field(default_factory=dict)  # id(live tensor) -> latest key
    key_of_value: Dict[int, Key] = field(default_factory=dict)  # id(recorded value) -> key
    _alive: List[Tensor] = field(default_factory=list)
    output: Any = None

    def _store(self, key: Key, t: Tensor) -> Tensor:
        value = t.detach().clone()
        self.values[key] = value
        self.key_of_value[id(value)] = key
        self.current[id(t)] = key
        self._alive.append(t)
        return value

    def _value_at_call(self, t: Tensor) -> Tensor:
        key = self.current.get(id(t))
        if key is None:  # a tensor made outside the recorded forward: input, parameter, buffer
            key = f"ext:{len(self.values)}"
            return self._store(key, t)
        return self.values[key]

    def _add(self, func, args, kwargs, out) -> None:
        idx = len(self.records)
        wrap = lambda a: self._value_at_call(a) if isinstance(a, Tensor) else a  # noqa: E731
        arg_vals, kwarg_vals = tree_map(wrap, args), tree_map(wrap, kwargs)
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        out_vals, out_keys = [], []
        for k, o in enumerate(outs):
            if isinstance(o, Tensor):
                key = f"op:{idx}:{k}"
                out_vals.append(self._store(key, o))
                out_keys.append(key)
            else:
                out_vals.append(o)
                out_keys.append(None)
        self.records.append(OpRecord(func, _packet_name(func), arg_vals, kwarg_vals, tuple(out_vals), tuple(out_keys)))

    def key(self, t: Tensor) -> Optional[Key]:
        """Value key of a tensor seen during the recorded forward (``None`` if never seen)."""
        return self.current.get(id(t))

    # ----------------------------------------------------------------------------------------
    def relevance(
        self,
        inputs: Sequence[Tensor],
        seed: Tensor,
        output: Optional[Tensor] = None,
        epsilon: float = 1e-6,
    ) -> Tuple[Tensor, ...]:
        """Propagate ``seed`` (relevance at ``output``) back to each tensor in ``inputs``."""
        output = self.output if output is None else output
        out_key = self.key(output)
        if out_key is None:
            raise ValueError("the output was not produced during the recorded forward")
        dtype = torch.float64 if output.dtype == torch.float64 else torch.float32
        requested = [self.key(t) for t in inputs]

        # Which values depend on a requested tensor (floating point values only).
        relevant = {k for k in requested if k is not None}
        for rec in self.records:
            if any(self.key_of_value[id(a)] in relevant for a in rec.tensor_args()):
                for k, o in zip(rec.out_keys, rec.outs):
                    if k is not None and o.is_floating_point():
                        relevant.add(k)

        folded_adds, folded_biases = _bias_folds(self, relevant)
        R: Dict[Key, Tensor] = {out_key: seed.detach().to(dtype).clone()}
        for rec in reversed(self.records):
            r_outs = [None if k is None else R.get(k) for k in rec.out_keys]
            if all(r is None for r in r_outs):
                continue
            if not any(self.key_of_value[id(a)] in relevant for a in rec.tensor_args()):
                continue
            rule = RULES.get(rec.name)
            if rule is None:
                raise NotImplementedError(f"reference engine has no rule for aten.{rec.name}")
            ctx = _Ctx(self, rec, r_outs, relevant, epsilon, dtype)
            ctx.bias, ctx.folded = folded_biases.get(id(rec)), id(rec) in folded_adds
            for value, r in rule(ctx):
                key = self.key_of_value[id(value)]
                if key not in relevant or r is None:
                    continue
                assert tuple(r.shape) == tuple(value.shape), (rec.name, r.shape, value.shape)
                r = r.to(dtype)
                R[key] = r if key not in R else R[key] + r
        results = []
        for t, key in zip(inputs, requested):
            r = None if key is None else R.get(key)
            results.append(torch.zeros(t.shape, dtype=dtype) if r is None else r)
        return tuple(results)


_LINEAR_OPS = ("mm", "bmm", "mv")
_RESHAPE_OPS = ("view", "_unsafe_view", "reshape", "_reshape_alias")


def _bias_folds(trace: Trace, relevant: set) -> Tuple[set, Dict[int, Tensor]]:
    """Find ``reshape*(B(x, w)) + b`` (see the table above): the ids of the folded add records,
    and the bias of each folded linear record (by record id)."""
    key = lambda v: trace.key_of_value[id(v)]  # noqa: E731
    producer: Dict[Key, OpRecord] = {}
    uses: Dict[Key, int] = {}
    for rec in trace.records:
        for a in rec.tensor_args():
            uses[key(a)] = uses.get(key(a), 0) + 1
        for k in rec.out_keys:
            if k is not None:
                producer[k] = rec
    adds, biases = set(), {}
    for rec in trace.records:
        alpha = rec.kwargs.get("alpha", rec.args[2] if len(rec.args) > 2 else 1)
        if rec.name != "add" or alpha != 1 or not all(isinstance(a, Tensor) for a in rec.args[:2]):
            continue
        out = rec.outs[0]
        for lin_pos in (0, 1):
            y, b = rec.args[lin_pos], rec.args[1 - lin_pos]
            if key(b) in relevant or b.dim() != 1 or b.shape[0] not in (1, out.shape[-1]) or y.shape != out.shape:
                continue
            src = producer.get(key(y))
            while src is not None and src.name in _RESHAPE_OPS and uses[key(src.outs[0])] == 1:
                src = producer.get(key(src.args[0]))
            if src is None or src.name not in _LINEAR_OPS or uses[key(src.outs[0])] != 1:
                continue
            if src.outs[0].shape[-1:] != out.shape[-1:]:
                continue
            if sum(key(a) in relevant for a in src.args[:2]) != 1:
                continue
            adds.add(id(rec))
            biases[id(src)] = b
            break
    return adds, biases


def record(fn: Callable[[], Any]) -> Trace:
    """Run ``fn()`` under the recorder; the returned trace's ``output`` is what ``fn`` returned."""
    trace = Trace()
    with _Recorder(trace):
        trace.output = fn()
    return trace


# --------------------------------------------------------------------------------------------
# Rules: each yields (operand value, relevance) pairs; the operand value identifies the key.
# --------------------------------------------------------------------------------------------
class _Ctx:
    """What a rule sees: the record, relevance per output, the relevance mask, settings."""

    def __init__(self, trace: Trace, rec: OpRecord, r_outs: list, relevant: set, eps: float,
                 dtype: torch.dtype) -> None:
        self.trace, self.rec, self.r_outs, self.relevant = trace, rec, r_outs, relevant
        self.eps, self.dtype = eps, dtype
        self.bias: Optional[Tensor] = None  # a folded bias (linear maps)
        self.folded = False  # an add whose bias a linear map took over

    def arg(self, i: int, name: Optional[str] = None, default: Any = None) -> Any:
        """Positional argument ``i`` (or keyword ``name``), ``default`` when absent."""
        if i < len(self.rec.args):
            return self.rec.args[i]
        if name is not None and name in self.rec.kwargs:
            return self.rec.kwargs[name]
        return default

    def rel(self, value: Any) -> bool:
        """Whether an operand (a recorded value) depends on a requested tensor."""
        return isinstance(value, Tensor) and self.trace.key_of_value[id(value)] in self.relevant

    @property
    def out(self) -> Tensor:
        return self.r_outs[0]

    def filled(self) -> List[Tensor]:
        """Relevance at each tensor output, zeros where none arrived."""
        return [
            torch.zeros(o.shape, dtype=self.dtype) if r is None else r
            for r, o in zip(self.r_outs, self.rec.outs)
            if isinstance(o, Tensor)
        ]

    def s(self) -> Tensor:
        """``R / stab(z)`` with the recorded output (plus a folded bias) as ``z``."""
        z = self.rec.outs[0].to(self.dtype)
        if self.bias is not None:
            z = z + self.bias.to(self.dtype)
        return self.out / stab(z, self.eps)


def stab(z: Tensor, eps: float) -> Tensor:
    sign = torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))
    return z + eps * sign


def reduce_to(t: Tensor, shape: Sequence[int]) -> Tensor:
    """Sum a broadcast tensor back to ``shape`` (leading dims dropped, size-1 dims summed)."""
    shape = tuple(shape)
    while t.dim() > len(shape):
        t = t.sum(0)
    for d, n in enumerate(shape):
        if n == 1 and t.shape[d] != 1:
            t = t.sum(d, keepdim=True)
    return t


# -- identity (elementwise nonlinearities, copies) --------------------------------------------
def identity_rule(ctx: _Ctx):
    yield ctx.arg(0), ctx.out.reshape(ctx.arg(0).shape)


# -- routing: local vector-Jacobian product of the re-run op ----------------------------------
def routing_rule(ctx: _Ctx):
    """``R_x = J^T R``: re-run the op on its recorded operands and differentiate it locally."""
    rec = ctx.rec
    leaves, spec = tree_flatten((rec.args, rec.kwargs))
    wanted = []  # (recorded operand value, differentiable copy)
    for i, v in enumerate(leaves):
        if isinstance(v, Tensor) and v.is_floating_point():
            copy = v.detach().to(ctx.dtype)
            if ctx.rel(v):
                copy.requires_grad_(True)
                wanted.append((v, copy))
            leaves[i] = copy
    args, kwargs = tree_unflatten(leaves, spec)
    with torch.enable_grad():
        out = rec.func(*args, **kwargs)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, Tensor)]
        pairs = [(o, r) for o, r in zip(outs, ctx.filled()) if o.requires_grad]
        grads = torch.autograd.grad(
            [o for o, _ in pairs], [c for _, c in wanted], [r for _, r in pairs], allow_unused=True
        )
    for (v, c), g in zip(wanted, grads):
        yield v, (torch.zeros_like(c) if g is None else g)


def max_pool_rule(ctx: _Ctx):
    """Winner takes all: each output's relevance goes to the input element at its recorded argmax."""
    x = ctx.arg(0)
    indices = ctx.rec.outs[1]
    spatial = len(ctx.arg(1))
    lead = tuple(x.shape[: x.dim() - spatial])
    flat_x = torch.zeros(lead + (math.prod(x.shape[x.dim() - spatial:]),), dtype=ctx.dtype)
    flat_x.scatter_add_(-1, indices.flatten(-spatial), ctx.out.flatten(-spatial))
    yield x, flat_x.view(x.shape)


# -- linear maps with explicit adjoints ---------------------------------------------------------
def _mm_pair(ctx: _Ctx, ia: int, ib: int, alpha: float = 1.0):
    """Rule for ``alpha * a @ b`` (a bias is inside the recorded z): linear, or bilinear half."""
    a_val, b_val = ctx.arg(ia), ctx.arg(ib)
    a, b = a_val.to(ctx.dtype), b_val.to(ctx.dtype)
    rel_a, rel_b = ctx.rel(a_val), ctx.rel(b_val)
    s = ctx.s() * alpha
    share = 0.5 if (rel_a and rel_b) else 1.0
    if rel_a:
        yield a_val, share * a * (s @ b.transpose(-1, -2))
    if rel_b:
        yield b_val, share * b * (a.transpose(-1, -2) @ s)


def addmm_rule(ctx: _Ctx):
    beta = ctx.rec.kwargs.get("beta", 1)
    alpha = ctx.rec.kwargs.get("alpha", 1)
    assert beta == 1, "reference: addmm with beta != 1 not supported"
    yield from _mm_pair(ctx, 1, 2, alpha)


def mm_rule(ctx: _Ctx):
    yield from _mm_pair(ctx, 0, 1)


def _conv_input_adjoint(s: Tensor, w: Tensor, x_shape, stride, padding, dilation) -> Tensor:
    """``J^T s`` of a plain 2-d convolution (one group), via unfold's adjoint ``fold``."""
    n, c, h, wd = x_shape
    o, _, kh, kw = w.shape
    # z[n, o, L] = W[o, c*kh*kw] @ unfold(x)[n, c*kh*kw, L]  =>  J^T s = fold(W^T @ s)
    cols = w.reshape(o, -1).t() @ s.reshape(n, o, -1)
    return F.fold(cols, (h, wd), (kh, kw), dilation=dilation, padding=padding, stride=stride)


def convolution_rule(ctx: _Ctx):
    x, w = ctx.arg(0).to(ctx.dtype), ctx.arg(1).to(ctx.dtype)
    stride, padding, dilation, transposed, _, groups = (ctx.arg(i) for i in range(3, 9))
    if transposed:
        raise NotImplementedError("reference: transposed convolution")
    if ctx.rel(ctx.arg(1)):
        raise NotImplementedError("reference: convolution with an input-dependent weight")
    if not ctx.rel(ctx.arg(0)):
        return
    s = ctx.s()
    one_d = x.dim() == 3
    if one_d:  # treat conv1d as a conv2d over a height of 1
        x, w, s = x.unsqueeze(2), w.unsqueeze(2), s.unsqueeze(2)
        stride, padding, dilation = [1, *stride], [0, *padding], [1, *dilation]
    elif x.dim() != 4:
        raise NotImplementedError("reference: only 1-d and 2-d convolutions")
    cin, cout = x.shape[1] // groups, w.shape[0] // groups
    parts = []
    for g in range(groups):
        parts.append(
            _conv_input_adjoint(
                s[:, g * cout:(g + 1) * cout],
                w[g * cout:(g + 1) * cout],
                (x.shape[0], cin, x.shape[2], x.shape[3]),
                tuple(stride),
                tuple(padding),
                tuple(dilation),
            )
        )
    grad = torch.cat(parts, 1)
    r = x * grad
    yield ctx.arg(0), r.squeeze(2) if one_d else r


# -- products ----------------------------------------------------------------------------------
def product_rule(ctx: _Ctx):
    """mul / div: uniform split over the relevant operands."""
    operands = [ctx.arg(0), ctx.arg(1)]
    rel = [ctx.rel(v) for v in operands]
    share = 1.0 / sum(rel)
    for v, r in zip(operands, rel):
        if r:
            yield v, reduce_to(ctx.out * share, v.shape)


# -- sums: epsilon on signed contributions -------------------------------------------------------
def add_rule(ctx: _Ctx, sign: float = 1.0):
    if ctx.folded:  # the linear map before it took the bias: everything to the map's output
        a, b = ctx.arg(0), ctx.arg(1)
        yield (a, ctx.out) if ctx.rel(a) else (b, ctx.out)
        return
    alpha = ctx.rec.kwargs.get("alpha", ctx.arg(2, default=1))
    s = ctx.s()
    a, b = ctx.arg(0), ctx.arg(1)
    if ctx.rel(a):
        yield a, reduce_to(a.to(ctx.dtype) * s, a.shape)
    if ctx.rel(b):
        yield b, reduce_to(b.to(ctx.dtype) * (sign * alpha) * s, b.shape)


def sub_rule(ctx: _Ctx):
    yield from add_rule(ctx, -1.0)


def _reduced_dims(x: Tensor, dims) -> List[int]:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(x.dim()))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return sorted(d % max(x.dim(), 1) for d in dims)


def _sum_like(ctx: _Ctx, mean: bool):
    x = ctx.arg(0).to(ctx.dtype)
    dims = ctx.arg(1, "dim")
    keepdim = ctx.arg(2, "keepdim", False)
    if ctx.rec.func.overloadpacket.__name__ in ("sum", "mean") and ctx.rec.func._overloadname == "default":
        dims, keepdim = None, False
    reduced = _reduced_dims(x, dims)
    s = ctx.s()
    if not keepdim:
        for d in reduced:
            s = s.unsqueeze(d)
    n = math.prod(x.shape[d] for d in reduced) if reduced else 1
    grad = s.expand(x.shape) / (n if mean else 1)
    yield ctx.arg(0), x * grad


def sum_rule(ctx: _Ctx):
    yield from _sum_like(ctx, mean=False)


def mean_rule(ctx: _Ctx):
    yield from _sum_like(ctx, mean=True)


def avg_pool2d_rule(ctx: _Ctx):
    x = ctx.arg(0).to(ctx.dtype)
    kernel = tuple(ctx.arg(1))
    stride = tuple(ctx.arg(2, "stride") or kernel)
    padding = tuple(ctx.arg(3, "padding", (0, 0)))
    ceil_mode = ctx.arg(4, "ceil_mode", False)
    count_include_pad = ctx.arg(5, "count_include_pad", True)
    divisor = ctx.arg(6, "divisor_override", None)
    if len(kernel) == 1:
        kernel = kernel * 2
    if len(stride) == 1:
        stride = stride * 2
    if len(padding) == 1:
        padding = padding * 2
    if ceil_mode or (not count_include_pad and any(padding)):
        raise NotImplementedError("reference: avg_pool2d with ceil_mode / count_include_pad=False")
    n, c, h, w = x.shape
    k = divisor or kernel[0] * kernel[1]
    s = ctx.s().reshape(n * c, 1, -1)
    cols = (s / k).expand(n * c, kernel[0] * kernel[1], s.shape[-1])
    grad = F.fold(cols, (h, w), kernel, padding=padding, stride=stride).view(n, c, h, w)
    yield ctx.arg(0), x * grad


def adaptive_avg_pool2d_rule(ctx: _Ctx):
    x = ctx.arg(0).to(ctx.dtype)
    h, w = x.shape[-2:]
    s = ctx.s()
    oh, ow = s.shape[-2:]
    grad = torch.zeros_like(x)
    for i in range(oh):
        h0, h1 = (i * h) // oh, -((-(i + 1) * h) // oh)
        for j in range(ow):
            w0, w1 = (j * w) // ow, -((-(j + 1) * w) // ow)
            area = (h1 - h0) * (w1 - w0)
            grad[..., h0:h1, w0:w1] += (s[..., i, j] / area)[..., None, None]
    yield ctx.arg(0), x * grad


def batch_norm_rule(ctx: _Ctx):
    """Eval batch norm ``z = a x + c`` per channel: ``R_x = a x R / stab(z)``."""
    name = ctx.rec.func.overloadpacket.__name__
    x, weight = ctx.arg(0).to(ctx.dtype), ctx.arg(1)
    running_var = ctx.arg(4)
    if name == "native_batch_norm":
        if ctx.arg(5):
            raise NotImplementedError("reference: batch norm in training mode")
        eps = ctx.arg(7)
    elif name == "_native_batch_norm_legit_no_training":
        eps = ctx.arg(6)
    else:
        raise NotImplementedError(f"reference: {name}")
    a = 1.0 / torch.sqrt(running_var.to(ctx.dtype) + eps)
    if weight is not None:
        a = a * weight.to(ctx.dtype)
    a = a.view(1, -1, *([1] * (x.dim() - 2)))
    yield ctx.arg(0), a * x * ctx.s()


def select_two_rule(ctx: _Ctx):
    """Elementwise max/min of two tensors: ``R`` shared by the operands equal to the recorded output."""
    out = ctx.rec.outs[0].to(ctx.dtype)
    a_val, b_val = ctx.arg(0), ctx.arg(1)
    a = a_val.to(ctx.dtype).expand(out.shape)
    b = b_val.to(ctx.dtype).expand(out.shape)
    hit_a = ((a == out) | (a.isnan() & out.isnan())).to(ctx.dtype)
    hit_b = ((b == out) | (b.isnan() & out.isnan())).to(ctx.dtype)
    total = hit_a + hit_b
    assert bool((total > 0).all()), "the output of a max/min equals one of its operands"
    if ctx.rel(a_val):
        yield a_val, reduce_to(ctx.out * hit_a / total, a_val.shape)
    if ctx.rel(b_val):
        yield b_val, reduce_to(ctx.out * hit_b / total, b_val.shape)


def logsumexp_rule(ctx: _Ctx):
    """Smooth max: ``R_x = softmax(x) * R`` over the reduced dims, 0 where ``x = -inf``."""
    x_val = ctx.arg(0)
    x = x_val.to(ctx.dtype)
    reduced = _reduced_dims(x, ctx.arg(1, "dim"))
    r = ctx.out
    if not ctx.arg(2, "keepdim", False):
        for d in reduced:
            r = r.unsqueeze(d)
    top = x.amax(dim=reduced, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(x - top)
    p = e / e.sum(dim=reduced, keepdim=True)
    yield x_val, torch.where(x == float("-inf"), torch.zeros_like(p), p * r)


def cumprod_rule(ctx: _Ctx):
    """``y_k = x_1 ... x_k``: each ``R_{y_k}`` split evenly over its ``k`` factors (explicit loop)."""
    x_val = ctx.arg(0)
    r = ctx.out
    if r.dim() == 0:
        yield x_val, r
        return
    dim = ctx.arg(1, "dim") % r.dim()
    rx = torch.zeros_like(r)
    for k in range(r.shape[dim]):
        share = r.narrow(dim, k, 1) / (k + 1)
        rx.narrow(dim, 0, k + 1).add_(share)
    yield x_val, rx


IDENTITY_OPS = (
    "atan",
    "relu", "gelu", "silu", "tanh", "sigmoid", "leaky_relu", "hardtanh", "elu", "hardswish",
    "neg", "clone", "_to_copy", "detach", "alias", "lift_fresh",
)
ROUTING_OPS = (
    "view", "_unsafe_view", "reshape", "_reshape_alias", "permute", "transpose", "t", "expand",
    "squeeze", "unsqueeze", "slice", "select", "index", "cat", "stack", "split", "split_with_sizes",
    "unbind", "constant_pad_nd", "contiguous", "flatten", "unflatten",
)

RULES: Dict[str, Callable[[_Ctx], Any]] = {name: identity_rule for name in IDENTITY_OPS}
RULES.update({name: routing_rule for name in ROUTING_OPS})
RULES.update(
    {
        "addmm": addmm_rule,
        "mm": mm_rule,
        "bmm": mm_rule,
        "convolution": convolution_rule,
        "mul": product_rule,
        "div": product_rule,
        "add": add_rule,
        "sub": sub_rule,
        "sum": sum_rule,
        "mean": mean_rule,
        "avg_pool2d": avg_pool2d_rule,
        "_adaptive_avg_pool2d": adaptive_avg_pool2d_rule,
        "max_pool2d_with_indices": max_pool_rule,
        "maximum": select_two_rule,
        "minimum": select_two_rule,
        "fmax": select_two_rule,
        "fmin": select_two_rule,
        "logsumexp": logsumexp_rule,
        "cumprod": cumprod_rule,
        "native_batch_norm": batch_norm_rule,
        "_native_batch_norm_legit_no_training": batch_norm_rule,
    }
)
