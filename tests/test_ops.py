"""Each op of the rule table against its formula, written out independently in the test.

Every case builds ``out = f(x)`` directly on a float64 leaf, seeds the output with a random
relevance ``R`` and compares the engine's relevance at ``x`` with the formula.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_dynamiclrp.engine import relevance
from captum_dynamiclrp.rules import RuleSettings

from .conftest import stab

EPS = 1e-6
DT = torch.float64


def leaf(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=DT, requires_grad=True)


def engine_relevance(out, inputs, seed, **settings):
    return relevance(out, inputs, seed, settings=RuleSettings(epsilon=EPS, **settings))


def vjp(out, x, seed):
    return torch.autograd.grad(out, x, seed, retain_graph=True, allow_unused=True)[0]


# ---------------------------------------------------------------------------------------------
# Routing ops: R_x = J^T R (the vector-Jacobian product), which conserves what is not dropped.
ROUTING_CASES = {
    "view": lambda x: x.view(6, 4),
    "reshape": lambda x: x.reshape(2, 12),
    "flatten": lambda x: x.flatten(),
    "permute": lambda x: x.permute(2, 0, 1),
    "transpose": lambda x: x.transpose(0, 2),
    "t": lambda x: x[0].t(),
    "expand": lambda x: x[:, :1].expand(2, 5, 4),
    "squeeze_unsqueeze": lambda x: x.unsqueeze(1).unsqueeze(-1).squeeze(1).squeeze(),
    "slice": lambda x: x[:, 1:3, ::2],
    "select": lambda x: x[1, 2],
    "index": lambda x: x[:, [0, 2, 2]],
    "gather": lambda x: x.gather(2, torch.tensor([[[0, 3], [1, 1], [2, 0]]] * 2)),
    "cat": lambda x: torch.cat([x, x[:, :1] * 1.0], dim=1),
    "stack": lambda x: torch.stack([x[0], x[1]], dim=-1),
    "split": lambda x: torch.cat([p.flip(0) for p in x.split(2, dim=2)], dim=1),
    "split_sizes": lambda x: x.split([1, 2], dim=1)[1],
    "unbind": lambda x: torch.cat(x.unbind(1)[::-1], dim=1),
    "pad": lambda x: F.pad(x, (1, 2)),
    "clone": lambda x: x.clone(),
    "to_copy": lambda x: x.to(torch.float32).to(DT),
    "max_pool2d": lambda x: F.max_pool2d(x.unsqueeze(0), 2),
    "max_pool1d": lambda x: F.max_pool1d(x, 2),
    "max_pool3d": lambda x: F.max_pool3d(x.unsqueeze(0).unsqueeze(0), (1, 2, 2)),
    "max_dim": lambda x: x.max(dim=1).values,
    "amax": lambda x: x.amax(dim=(0, 2)),
}


@pytest.mark.parametrize("name", sorted(ROUTING_CASES))
def test_routing_ops_equal_their_vjp(name):
    x = leaf(2, 3, 4)
    out = ROUTING_CASES[name](x)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    expected = vjp(out, x, seed)
    torch.testing.assert_close(r, expected)


def test_pure_routing_conserves():
    x = leaf(2, 3, 4)
    out = x.permute(1, 0, 2).reshape(3, 8).t().contiguous()
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    torch.testing.assert_close(r.sum(), seed.sum())


# ---------------------------------------------------------------------------------------------
# Elementwise nonlinearities: identity.
NONLINEAR = {
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "hardswish": F.hardswish,
    "relu6": F.relu6,
    "neg": torch.neg,
    "softplus": F.softplus,
    "atan": torch.atan,
}


@pytest.mark.parametrize("name", sorted(NONLINEAR))
def test_nonlinearities_pass_relevance_through(name):
    x = leaf(3, 5)
    out = NONLINEAR[name](x)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    torch.testing.assert_close(r, seed)


@pytest.mark.parametrize("name", sorted(NONLINEAR))
def test_nonlinearities_replay_on_a_promise_branch(name):
    # The add needs the nonlinearity's output value: it must be read or replayed exactly.
    x = leaf(3, 5)
    h = NONLINEAR[name](x)
    c = torch.randn(3, 5, dtype=DT, requires_grad=True)
    out = h + c
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    hv = h.detach()
    torch.testing.assert_close(r, seed * hv / stab(hv + c.detach(), EPS))


def test_dropout_in_eval_mode_adds_nothing():
    x = leaf(4, 6)
    lin = nn.Linear(6, 3).double()
    with_dropout = nn.Sequential(lin, nn.Dropout(0.5)).eval()
    seed = torch.randn(4, 3, dtype=DT)
    (r1,) = engine_relevance(with_dropout(x), x, seed)
    (r2,) = engine_relevance(lin(x), x, seed)
    torch.testing.assert_close(r1, r2)


# ---------------------------------------------------------------------------------------------
# Sums: epsilon on signed contributions.
def test_add_two_activations_with_broadcasting():
    a, b = leaf(4, 5), leaf(1, 5)
    out = a * 1.0 + b * 1.0
    seed = torch.randn_like(out)
    ra, rb = engine_relevance(out, (a, b), seed)
    s = seed / stab(a.detach() + b.detach(), EPS)
    torch.testing.assert_close(ra, a.detach() * s)
    torch.testing.assert_close(rb, (b.detach() * s).sum(0, keepdim=True))


def test_add_of_a_tensor_to_itself_gives_both_halves():
    # Both operands' VJP is one tensor; the rule writes the last product into it, after the first.
    a = leaf(3, 4)
    h = a * 1.0
    out = h + h
    seed = torch.randn_like(out)
    kept = seed.clone()
    (r,) = engine_relevance(out, a, seed)
    torch.testing.assert_close(r, 2 * a.detach() * seed / stab(2 * a.detach(), EPS))
    torch.testing.assert_close(seed, kept, rtol=0, atol=0)


def test_add_with_alpha_and_parameter_operand():
    x = leaf(3, 4)
    bias = nn.Parameter(torch.randn(4, dtype=DT))
    out = torch.add(x, bias, alpha=-0.5)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    torch.testing.assert_close(r, x.detach() * seed / stab(x.detach() - 0.5 * bias.detach(), EPS))


def test_sub_and_rsub():
    a, b = leaf(3, 4), leaf(3, 4)
    out = a - 2 * b
    seed = torch.randn_like(out)
    ra, rb = engine_relevance(out, (a, b), seed)
    s = seed / stab(a.detach() - 2 * b.detach(), EPS)
    torch.testing.assert_close(ra, a.detach() * s)
    torch.testing.assert_close(rb, -2 * b.detach() * s)


@pytest.mark.parametrize(
    "reduce",
    [
        lambda x: x.sum(),
        lambda x: x.sum(dim=1),
        lambda x: x.sum(dim=(0, 2), keepdim=True),
        lambda x: x.mean(),
        lambda x: x.mean(dim=-1),
        lambda x: x.mean(dim=(1, 2), keepdim=True),
    ],
    ids=["sum", "sum_dim", "sum_dims_keepdim", "mean", "mean_dim", "mean_dims_keepdim"],
)
def test_reductions(reduce):
    x = leaf(2, 3, 4)
    out = reduce(x)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    # Contribution of x_i to its output is x_i (sum) or x_i / n (mean); J^T gives the 1 or 1/n.
    z = reduce(x.detach())
    expected = x.detach() * vjp(out, x, seed / stab(z, EPS))
    torch.testing.assert_close(r, expected)
    # Without a constant operand, sums conserve up to the stabiliser.
    torch.testing.assert_close(r.sum(), (seed * z / stab(z, EPS)).sum())


@pytest.mark.parametrize(
    "pool",
    [
        lambda x: F.avg_pool2d(x, 2),
        lambda x: F.avg_pool2d(x, 3, stride=1, padding=1),
        lambda x: F.adaptive_avg_pool2d(x, (2, 3)),
        lambda x: F.adaptive_avg_pool2d(x, 1),
        lambda x: F.avg_pool1d(x.flatten(2), 4),
        lambda x: F.avg_pool3d(x.unsqueeze(0), (1, 2, 2)),
    ],
    ids=["avg2d", "avg2d_pad", "adaptive2d", "adaptive_global", "avg1d", "avg3d"],
)
def test_average_pools(pool):
    x = leaf(2, 3, 6, 6)
    out = pool(x)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    z = pool(x.detach())
    torch.testing.assert_close(r, x.detach() * vjp(out, x, seed / stab(z, EPS)))


# ---------------------------------------------------------------------------------------------
# Products.
def test_mul_and_div_by_constants_give_all_to_the_activation():
    x = leaf(3, 4)
    w = nn.Parameter(torch.randn(4, dtype=DT))
    out = (x * w) / 3.0 * 2.0 / torch.tensor(5.0, dtype=DT)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    torch.testing.assert_close(r, seed)


def test_mul_of_two_activations_is_uniform():
    a, b = leaf(3, 4), leaf(1, 4)
    out = a * b
    seed = torch.randn_like(out)
    ra, rb = engine_relevance(out, (a, b), seed)
    torch.testing.assert_close(ra, seed / 2)
    torch.testing.assert_close(rb, (seed / 2).sum(0, keepdim=True))


def test_div_of_two_activations_is_uniform():
    a, b = leaf(3, 4), leaf(3, 4)
    out = a / b
    seed = torch.randn_like(out)
    ra, rb = engine_relevance(out, (a, b), seed)
    torch.testing.assert_close(ra, seed / 2)
    torch.testing.assert_close(rb, seed / 2)


def test_gated_product_through_one_input():
    # x * sigmoid(x): both factors depend on x, each gets half, and both halves reach x.
    x = leaf(3, 4)
    out = x * torch.sigmoid(x)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    torch.testing.assert_close(r, seed)


# ---------------------------------------------------------------------------------------------
# Linear maps with a parameter: epsilon, zplus, gamma against explicit contribution matrices.
def _contributions(x, w):
    # c[n, i, j] = x[n, i] * w[j, i] for a Linear layer with weight w (out, in).
    return x[:, :, None] * w.t()[None]


def _explicit(x, w, b, seed, rule, gamma=0.25):
    c = _contributions(x, w)
    out = c.sum(1) + b
    if rule == "epsilon":
        cm, bm = c, b.expand_as(out)
    elif rule == "zplus":
        cm, bm = c.clamp(min=0), b.clamp(min=0).expand_as(out)
    else:
        positive = (out > 0)[:, None, :]
        cm = torch.where(positive, c + gamma * c.clamp(min=0), c + gamma * c.clamp(max=0))
        bm = torch.where(out > 0, b + gamma * b.clamp(min=0), b + gamma * b.clamp(max=0))
        seed = torch.where(out != 0, seed, 0)
    z = cm.sum(1) + bm
    return (cm * (seed / stab(z, EPS))[:, None, :]).sum(2)


@pytest.mark.parametrize("rule", ["epsilon", "zplus", "gamma"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_rules_match_contribution_matrices(rule, bias):
    lin = nn.Linear(5, 3, bias=bias).double()
    x = leaf(4, 5)
    out = lin(x)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed, linear=rule, gamma=0.25)
    b = lin.bias.detach() if bias else torch.zeros(3, dtype=DT)
    torch.testing.assert_close(r, _explicit(x.detach(), lin.weight.detach(), b, seed, rule))


def test_gamma_zero_equals_epsilon():
    lin = nn.Linear(5, 3).double()
    x = leaf(4, 5)
    out = lin(x)
    seed = torch.randn_like(out)
    (r_gamma,) = engine_relevance(out, x, seed, linear="gamma", gamma=0.0)
    (r_eps,) = engine_relevance(out, x, seed)
    torch.testing.assert_close(r_gamma, r_eps)


def _epsilon_by_autograd(f, x, seed):
    xd = x.detach().requires_grad_(True)
    z = f(xd)
    (g,) = torch.autograd.grad(z, xd, (seed / stab(z.detach(), EPS)))
    return xd.detach() * g


LINEAR_OPS = {
    "linear_2d_addmm": (nn.Linear(6, 4), (5, 6)),
    "linear_3d": (nn.Linear(6, 4), (2, 5, 6)),
    "linear_no_bias_mm": (nn.Linear(6, 4, bias=False), (5, 6)),
    "linear_1d_mv": (nn.Linear(6, 4, bias=False), (6,)),
    "conv1d": (nn.Conv1d(3, 4, 3, padding=1), (2, 3, 9)),
    "conv2d": (nn.Conv2d(3, 4, 3, stride=2), (2, 3, 9, 9)),
    "conv2d_dilated_grouped": (nn.Conv2d(4, 4, 3, dilation=2, groups=2, padding=2), (2, 4, 9, 9)),
    "conv3d": (nn.Conv3d(2, 3, 2), (1, 2, 4, 4, 4)),
    "conv_transpose2d": (nn.ConvTranspose2d(3, 2, 3, stride=2), (2, 3, 5, 5)),
    "conv_transpose1d": (nn.ConvTranspose1d(3, 2, 3), (2, 3, 5)),
}


@pytest.mark.parametrize("name", sorted(LINEAR_OPS))
def test_linear_ops_epsilon(name):
    module, shape = LINEAR_OPS[name]
    module = module.double()
    x = leaf(*shape)
    out = module(x)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    torch.testing.assert_close(r, _epsilon_by_autograd(module, x, seed))


def test_matmul_of_two_activations_is_bilinear_uniform():
    a, b = leaf(2, 3, 4), leaf(2, 4, 5)
    out = torch.bmm(a, b)
    seed = torch.randn_like(out)
    ra, rb = engine_relevance(out, (a, b), seed)
    s = seed / stab(out.detach(), EPS)
    torch.testing.assert_close(ra, 0.5 * a.detach() * (s @ b.detach().transpose(1, 2)))
    torch.testing.assert_close(rb, 0.5 * b.detach() * (a.detach().transpose(1, 2) @ s))
    # Conserves up to the stabiliser: sum R_in = sum R * z / stab(z).
    torch.testing.assert_close(ra.sum() + rb.sum(), (out.detach() * s).sum())


def test_batch_norm_eval_is_epsilon_on_its_affine_map():
    bn = nn.BatchNorm2d(3).double()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    bn.eval()
    x = leaf(2, 3, 4, 4)
    out = bn(x)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().view(1, 3, 1, 1)
    torch.testing.assert_close(r, scale * x.detach() * seed / stab(out.detach(), EPS))


def test_parameters_can_be_requested_as_leaves():
    lin = nn.Linear(4, 3, bias=False).double()
    x = leaf(2, 4)
    out = lin(x)
    seed = torch.randn_like(out)
    rx, rw = engine_relevance(out, (x, lin.weight), seed)
    # Both operands are requested, so the product is treated as bilinear: half each.
    s = seed / stab(out.detach(), EPS)
    torch.testing.assert_close(rx, 0.5 * x.detach() * (s @ lin.weight.detach()))
    torch.testing.assert_close(rw, 0.5 * lin.weight.detach() * (s.t() @ x.detach()))


# ---------------------------------------------------------------------------------------------
# Elementwise max / min of two tensors: winner takes all, ties halved, NaN conserved.
SELECT_TWO = {
    "maximum": (torch.maximum, True, False),
    "minimum": (torch.minimum, False, False),
    "fmax": (torch.fmax, True, True),
    "fmin": (torch.fmin, False, True),
}


def _weight_of_a(a, b, larger, skip_nan):
    # Written out element by element: 1 if the op returns a, 0 if b, 1/2 for a tie.
    w = torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=DT)
    a, b = a.expand(w.shape), b.expand(w.shape)
    for i in range(w.numel()):
        ai, bi = float(a.reshape(-1)[i]), float(b.reshape(-1)[i])
        nan_a, nan_b = math.isnan(ai), math.isnan(bi)
        if nan_a and nan_b:
            value = 0.5
        elif nan_a or nan_b:
            value = float(nan_a != skip_nan)  # a NaN is returned by maximum, skipped by fmax
        elif ai == bi:
            value = 0.5
        else:
            value = float((ai > bi) == larger)
        w.view(-1)[i] = value
    return w


@pytest.mark.parametrize("name", sorted(SELECT_TWO))
def test_elementwise_max_min_is_winner_takes_all(name):
    op, larger, skip_nan = SELECT_TWO[name]
    a, b = leaf(4, 5), leaf(1, 5)
    with torch.no_grad():  # ties, a NaN on either side, and both NaN
        a[0, 0] = b[0, 0] = 0.25
        a[1, 1] = a[2, 1] = float("nan")
        b[0, 2] = float("nan")
        a[3, 2] = float("nan")
    out = op(a, b)
    seed = torch.randn_like(out)
    ra, rb = engine_relevance(out, (a, b), seed)
    w = _weight_of_a(a.detach(), b.detach(), larger, skip_nan)
    torch.testing.assert_close(ra, w * seed)
    torch.testing.assert_close(rb, ((1 - w) * seed).sum(0, keepdim=True))
    # Conserves exactly, NaN included (the gradient would hand both operands all of it there).
    torch.testing.assert_close(ra.sum() + rb.sum(), seed.sum())


@pytest.mark.parametrize("name", sorted(SELECT_TWO))
def test_elementwise_max_min_equals_the_gradient_where_finite(name):
    # Away from NaN the rule is the op's own VJP, ties halved as torch's gradient halves them.
    op = SELECT_TWO[name][0]
    a = leaf(3, 4)
    b = torch.where(torch.rand(3, 4) < 0.3, a.detach(), torch.randn(3, 4, dtype=DT)).requires_grad_(True)
    out = op(a, b)
    seed = torch.randn_like(out)
    ra, rb = engine_relevance(out, (a, b), seed)
    ga, gb = torch.autograd.grad(out, (a, b), seed)
    torch.testing.assert_close(ra, ga)
    torch.testing.assert_close(rb, gb)


def test_maximum_with_a_constant_gives_the_activation_its_wins_only():
    # maximum(x, 0) as a ReLU spelt out: x keeps R where it won, half at ties, the constant
    # absorbs the rest (where it was selected the output did not come from x).
    x = leaf(4, 6)
    with torch.no_grad():
        x[0, :2] = 0.0
    out = torch.maximum(x, torch.zeros((), dtype=DT))
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    xd = x.detach()
    share = torch.where(xd > 0, 1.0, torch.where(xd == 0, 0.5, 0.0)).to(DT)
    torch.testing.assert_close(r, share * seed)


# ---------------------------------------------------------------------------------------------
# logsumexp: a smooth max, routed with its softmax weights.
@pytest.mark.parametrize(
    "dims, keepdim",
    [(1, False), (-1, True), ((0, 2), False), ((0, 1, 2), True)],
    ids=["dim", "neg_keepdim", "two", "all"],
)
def test_logsumexp_routes_by_softmax_weights(dims, keepdim):
    x = leaf(2, 3, 4)
    out = torch.logsumexp(x, dims, keepdim=keepdim)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    reduced = [d % 3 for d in (dims if isinstance(dims, tuple) else (dims,))]
    xd = x.detach()
    e = (xd - xd.amax(dim=reduced, keepdim=True)).exp()
    p = e / e.sum(dim=reduced, keepdim=True)
    s = seed
    if not keepdim:
        for d in sorted(reduced):
            s = s.unsqueeze(d)
    torch.testing.assert_close(r, p * s)
    torch.testing.assert_close(r.sum(), seed.sum())  # conserves exactly


def test_logsumexp_of_masked_entries_gives_zero_not_nan():
    x = leaf(3, 4)
    mask = torch.tensor([[False, True, False, True], [True, True, True, True], [False] * 4])
    scores = x.masked_fill(mask, float("-inf"))
    out = torch.logsumexp(scores, dim=1)
    seed = torch.tensor([1.0, 2.0, 3.0], dtype=DT)  # row 1 is fully masked: its lse is -inf
    (r,) = engine_relevance(out, x, seed)
    assert torch.isfinite(r).all()
    assert (r[mask] == 0).all()
    torch.testing.assert_close(r[0].sum(), seed[0])
    torch.testing.assert_close(r[2].sum(), seed[2])


# ---------------------------------------------------------------------------------------------
# cumprod: y_k = x_1 ... x_k, R_{y_k} split evenly over its k factors.
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_cumprod_splits_evenly_over_the_factors(dim):
    x = leaf(3, 4, 5)
    out = x.cumprod(dim)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    d = dim % 3
    expected = torch.zeros_like(seed)
    sm, em = seed.movedim(d, 0), expected.movedim(d, 0)
    for k in range(sm.shape[0]):  # output k (0-based) has k + 1 factors: x_0 ... x_k
        for j in range(k + 1):
            em[j] += sm[k] / (k + 1)
    torch.testing.assert_close(r, expected)
    torch.testing.assert_close(r.sum(), seed.sum())  # conserves exactly


def test_cumprod_of_two_is_bilinear_uniform():
    # Along a dim of length 2: y_1 = x_1 (copy), y_2 = x_1 x_2 (half each).
    x = leaf(4, 2)
    out = x.cumprod(1)
    seed = torch.randn_like(out)
    (r,) = engine_relevance(out, x, seed)
    torch.testing.assert_close(r[:, 0], seed[:, 0] + seed[:, 1] / 2)
    torch.testing.assert_close(r[:, 1], seed[:, 1] / 2)


# ---------------------------------------------------------------------------------------------
# The new ops: replay, coverage, and agreement with the independent reference engine.
class _NewOps(nn.Module):
    """A tiny model using atan, maximum, minimum, fmax, fmin, logsumexp and cumprod."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, g = self.a(x), self.b(x)
        h = torch.atan(h) + torch.maximum(h, g) - torch.minimum(h, 0.5 * g)
        h = h + torch.fmax(g, torch.zeros((), dtype=g.dtype)) + torch.fmin(h, g)
        h = h + torch.logsumexp(torch.stack([h, g], dim=-1), dim=-1)
        h = h + torch.cumprod(torch.tanh(h).view(-1, 2, 4), dim=-1).flatten(1)
        return self.head(h)


NEW_OPS = ("AtanBackward0", "MaximumBackward0", "MinimumBackward0", "FmaxBackward0", "FminBackward0",
           "LogsumexpBackward0", "CumprodBackward0")


def test_new_ops_are_covered_without_fallback():
    from captum_dynamiclrp import coverage

    report = coverage(_NewOps().double(), torch.randn(2, 6, dtype=DT))
    rows = {row.op: row for row in report.rows}
    assert not report.uncovered, str(report)
    for op in NEW_OPS:
        assert rows[op].status == "covered" and "fallback" not in rows[op].rule, str(report)


def test_new_ops_agree_with_the_reference_engine():
    try:
        from .reference_engine import record
    except ImportError:  # pragma: no cover
        from reference_engine import record

    model = _NewOps().double()
    x = leaf(2, 6)
    trace = record(lambda: model(x))
    out = trace.output
    seed = out.detach().clone()
    (expected,) = trace.relevance([x], seed, output=out, epsilon=EPS)
    (r,) = engine_relevance(out, x, seed)
    torch.testing.assert_close(r, expected, rtol=1e-9, atol=1e-10)


NEW_OP_CASES = {
    "atan": lambda x, y: torch.atan(x),
    "maximum": lambda x, y: torch.maximum(x, y),
    "maximum_const": lambda x, y: torch.maximum(x, torch.zeros((), dtype=DT)),
    "minimum": lambda x, y: torch.minimum(x, y[:1]),
    "fmax": lambda x, y: torch.fmax(x, y),
    "fmin": lambda x, y: torch.fmin(x, y),
    "logsumexp": lambda x, y: torch.logsumexp(x, 1),
    "logsumexp_keepdim": lambda x, y: torch.logsumexp(x, (0, -1), keepdim=True),
    "cumprod": lambda x, y: torch.cumprod(x, -1),
    "cumprod_dtype": lambda x, y: torch.cumprod(x.float(), 0, dtype=DT),
}


@pytest.mark.parametrize("name", sorted(NEW_OP_CASES))
def test_new_ops_replay_their_forward(name):
    # The Promise System replays a node from the operands autograd kept: that must give its output.
    from captum_dynamiclrp.rules import RULE_TABLE

    x, y = leaf(3, 4), leaf(3, 4)
    out = NEW_OP_CASES[name](x, y)
    node = out.grad_fn
    spec = RULE_TABLE[type(node).__name__]
    kept = list(spec.kept_inputs(node))
    torch.testing.assert_close(spec.forward(node, kept), out.detach())
    if spec.kept_output is not None:
        torch.testing.assert_close(spec.kept_output(node), out.detach())
