"""The engine against an independent reference (``tests/reference_engine.py``).

The reference records every aten op of the forward with a ``TorchDispatchMode`` and
applies the epsilon rule table with every operand at hand: no autograd nodes, no
promises. Each model below produces one of the promise shapes of the DynamicLRP paper
(chain, tree, residual deadlock, aggregation, input leaf as Arg Node), and the engine
must agree with the reference to float64 precision. A last group checks the plan
invariants: each node is recovered at most once and propagates exactly once.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from captum.testing.helpers.basic_models import BasicModel_ConvNet_One_Conv, BasicModel_MultiLayer
from torch import Tensor

from captum_dynamiclrp.engine import Engine, build_graph
from captum_dynamiclrp.engine.plan import KEPT_OUTPUT, LEAF, PROPAGATE, REPLAY, Plan
from captum_dynamiclrp.engine.promise import Promise
from captum_dynamiclrp.rules.base import RuleSettings

try:  # run as part of the ``tests`` package or with ``tests`` on sys.path
    from .reference_engine import record
except ImportError:  # pragma: no cover
    from reference_engine import record

DTYPE = torch.float64
EPS = 1e-6
SETTINGS = RuleSettings(epsilon=EPS, linear="epsilon")
RTOL, ATOL = 1e-9, 1e-10


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------
class Run:
    """One comparison: the engine's and the reference's relevances, plus the engine's plan."""

    def __init__(self, engine: Engine, out: Tensor, requested: Sequence[Tensor], got, ref) -> None:
        self.engine, self.out, self.requested, self.got, self.ref = engine, out, requested, got, ref

    @property
    def plan(self) -> Plan:
        return self.engine.last_run.plan

    @property
    def types(self) -> list[str]:
        """Node type names, indexed like the plan (graph discovery order is deterministic)."""
        return build_graph(self.out.grad_fn, self.requested).types


def compare(
    forward: Callable[[], object],
    requested: Callable[[object], Sequence[Tensor]],
    seed: Optional[Callable[[Tensor], Tensor]] = None,
    pick_output: Callable[[object], Tensor] = lambda result: result,
) -> Run:
    """Record ``forward()``, run engine and reference on the same graph, assert they agree.

    ``requested(result)`` names the tensors to explain (leaves or intermediate tensors
    the forward returned); ``seed(out)`` is the relevance at the output (default: the
    output itself, i.e. every logit explained).
    """
    trace = record(forward)
    out = pick_output(trace.output)
    inputs = list(requested(trace.output))
    r_seed = out.detach().clone() if seed is None else seed(out)
    ref = trace.relevance(inputs, r_seed, output=out, epsilon=EPS)
    engine = Engine(settings=SETTINGS, cache_size=0)
    got = engine.relevance(out, inputs, r_seed)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.dtype == DTYPE
        assert r.abs().sum() > 0, "degenerate test: the reference relevance is all zero"
        torch.testing.assert_close(g, r, rtol=RTOL, atol=ATOL)
    return Run(engine, out, inputs, got, ref)


def one_hot_seed(targets: Sequence[int]) -> Callable[[Tensor], Tensor]:
    """Seed each row at its own target logit, with the logit's value."""

    def seed(out: Tensor) -> Tensor:
        mask = torch.zeros_like(out)
        mask[torch.arange(out.shape[0]), list(targets)] = 1.0
        return (mask * out).detach()

    return seed


def leaf(*shape: int, scale: float = 1.0) -> Tensor:
    return (torch.randn(*shape, dtype=DTYPE) * scale).requires_grad_(True)


def all_branches(promises: Sequence[Promise]):
    for p in promises:
        yield from p.branches


# --------------------------------------------------------------------------------------------
# Models, one per promise shape
# --------------------------------------------------------------------------------------------
class ChainModel(nn.Module):
    """The add needs ``h.view(...).permute(...)``: a branch with a forward chain of routing nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 6)
        self.c = nn.Parameter(torch.randn(3, 2))
        self.head = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        y = h.view(-1, 2, 3).permute(0, 2, 1) + self.c
        return self.head(y.reshape(-1, 6))


class ChainSumModel(nn.Module):
    """A summed output: ``sum(dim)`` of an add of a routed activation and a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 6)
        self.c = nn.Parameter(torch.randn(3, 2))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x))
        return (h.view(-1, 2, 3).transpose(1, 2) + self.c).sum(dim=(1, 2))


class TreeModel(nn.Module):
    """Nested (dependent) promises: the add's operand is a cat whose first operand is an add.

    The head reads ``tanh(u)``, which keeps its result, not ``u``: a head reading ``u`` itself would
    keep it, and the sum would rebuild the cat as ``u - p`` instead (``OpSpec.operand_from_output``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.lin2, self.lin3 = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(4, 3)
        self.p = nn.Parameter(torch.randn(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.relu(self.lin1(x))
        b = torch.tanh(self.lin2(x))
        c = self.lin3(x) * 2.0
        u = torch.cat([a + b, c], dim=-1) + self.p
        return self.head(torch.tanh(u))


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + x)``: y = f(x) + g(f(x)) style residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + x)


class ResNetLike(nn.Module):
    def __init__(self, channels: int = 4, blocks: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.blocks = nn.Sequential(*[BasicBlock(channels) for _ in range(blocks)])
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(torch.relu(self.bn(self.stem(x))), 2)
        h = self.blocks(h)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class TransformerLikeMLP(nn.Module):
    """``h = h + mlp(h)`` three times (no norm), on a (batch, tokens, dim) tensor."""

    def __init__(self, dim: int = 6, hidden: int = 10, depth: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)) for _ in range(depth)
        )
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        for mlp in self.mlps:
            h = h + mlp(h)
        return self.head(h.mean(dim=1))


class AggregationModel(nn.Module):
    """The same intermediate tensor feeds three adds: three branches meet at one node."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.p1, self.p2, self.p3 = (nn.Parameter(torch.randn(6)) for _ in range(3))
        self.heads = nn.ModuleList(nn.Linear(6, 3) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        return self.heads[0](h + self.p1) + self.heads[1](torch.relu(h + self.p2)) + self.heads[2](h - self.p3)


class LeafArgModel(nn.Module):
    """``(x + b)`` and ``lin(x + x_other)``: promise branches whose Arg Node is an input leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.randn(5))
        self.lin = nn.Linear(5, 3)

    def forward(self, x: Tensor, x_other: Tensor) -> Tensor:
        # The explicit expand keeps the final add free of a broadcast relevant operand (see
        # test_broadcast_relevant_operand for that case).
        return self.lin(x + x_other) + (x + self.b).sum(dim=1, keepdim=True).expand(-1, 3)


class TwoInputModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(3, 5)
        self.head = nn.Linear(10, 3)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        u, v = torch.relu(self.a(x1)), self.b(x2)
        return self.head(torch.cat([u + v, u * v], dim=-1))


class HiddenModel(nn.Module):
    """Returns (logits, hidden) so that relevance can be asked at ``hidden``."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor):
        hidden = torch.relu(self.l1(x))
        h = hidden + self.l2(hidden)
        return self.l3(h), hidden


class OpZoo(nn.Module):
    """Routing ops, sums and products of two activations, in one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 8), nn.Linear(4, 8)
        self.q, self.k = nn.Linear(4, 6), nn.Linear(4, 6)
        self.c = nn.Parameter(torch.randn(2, 1, 4))
        self.d = nn.Parameter(torch.rand(8) + 1.0)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        a = F.leaky_relu(self.l1(x), 0.1)  # (B, 8)
        b = F.silu(self.l2(x))
        g = torch.sigmoid(b) + self.d  # a denominator away from zero
        prod = a * b - 0.5 * torch.sub(a, b, alpha=0.5) + torch.add(a, b, alpha=2.0)
        ratio = F.hardtanh(a) / g
        # routing: view, unsqueeze/squeeze, expand, slice, select, index, stack, split, unbind, pad
        r = prod.view(-1, 2, 4).unsqueeze(1).squeeze(1)  # (B, 2, 4)
        r = r + self.c.transpose(0, 1)  # broadcast add with a parameter: (1, 2, 4)
        first, second = r.unbind(1)  # (B, 4) each
        lo, hi = ratio.split(4, dim=1)
        stacked = torch.stack([first, -second, lo, hi], dim=1)  # (B, 4, 4)
        picked = stacked[:, torch.tensor([0, 2, 3])]  # (B, 3, 4)
        padded = F.pad(picked[:, 1:, :], (1, 1))[..., 1:5]  # (B, 2, 4)
        sel = stacked.select(1, 1).unsqueeze(1).expand(-1, 2, -1)  # (B, 2, 4)
        # bilinear products of two activations: bmm and mm
        q, k = self.q(x).view(-1, 2, 3), self.k(x).view(-1, 2, 3)
        scores = torch.bmm(q, k.transpose(1, 2))  # (B, 2, 2)
        mixed = torch.bmm(scores, padded + sel)  # (B, 2, 4)
        gram = q[:, 0] @ k[:, 1].t()  # (B, B) mm of two activations
        feats = torch.cat([mixed.flatten(1), (padded * sel).mean(dim=1), gram.sum(1, keepdim=True).expand(-1, 4)], 1)
        return self.head(feats)


class PoolZoo(nn.Module):
    """avg-pool, adaptive avg-pool to a non-trivial size, max-pool, a grouped conv and a 1-d conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, stride=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.conv1d = nn.Conv1d(4, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(9 + 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.bn(self.conv(x)))
        h = h + self.grouped(h)
        m = F.max_pool2d(h, 2)  # (B, 4, 4, 4)
        a = F.avg_pool2d(h, 2, stride=2, padding=1)  # (B, 4, 5, 5)
        ad = F.adaptive_avg_pool2d(a, (3, 3))  # (B, 4, 3, 3)
        seq = self.conv1d(ad.flatten(2))  # (B, 3, 9)
        return self.fc(torch.cat([seq.mean(1), m.mean(dim=(2, 3))], 1))


def _eval(model: nn.Module) -> nn.Module:
    model = model.to(DTYPE).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


# --------------------------------------------------------------------------------------------
# Cases: name -> () -> (forward, requested, seed, pick_output)
# --------------------------------------------------------------------------------------------
def case_chain():
    m, x = _eval(ChainModel()), leaf(3, 5)
    return lambda: m(x), lambda r: (x,), one_hot_seed([0, 3, 1]), None


def case_chain_sum():
    m, x = _eval(ChainSumModel()), leaf(3, 5)
    return lambda: m(x), lambda r: (x,), None, None


def case_tree():
    m, x = _eval(TreeModel()), leaf(3, 4)
    return lambda: m(x), lambda r: (x,), one_hot_seed([2, 0, 1]), None


def case_resnet():
    m, x = _eval(ResNetLike()), leaf(2, 2, 8, 8)
    return lambda: m(x), lambda r: (x,), one_hot_seed([4, 1]), None


def case_transformer_mlp():
    m, x = _eval(TransformerLikeMLP()), leaf(2, 5, 3)
    return lambda: m(x), lambda r: (x,), one_hot_seed([3, 0]), None


def case_aggregation():
    m, x = _eval(AggregationModel()), leaf(3, 4)
    return lambda: m(x), lambda r: (x,), one_hot_seed([0, 1, 2]), None


def case_leaf_arg():
    m, x, x_other = _eval(LeafArgModel()), leaf(3, 5), leaf(3, 5)
    return lambda: m(x, x_other), lambda r: (x,), one_hot_seed([1, 2, 0]), None


def case_two_inputs():
    m, x1, x2 = _eval(TwoInputModel()), leaf(3, 4), leaf(3, 3)
    return lambda: m(x1, x2), lambda r: (x1, x2), one_hot_seed([0, 2, 1]), None


def case_hidden():
    m, x = _eval(HiddenModel()), leaf(3, 4)
    return lambda: m(x), lambda r: (r[1],), one_hot_seed([2, 1, 0]), lambda r: r[0]


def case_hidden_and_input():
    m, x = _eval(HiddenModel()), leaf(3, 4)
    return lambda: m(x), lambda r: (x, r[1]), one_hot_seed([1, 1, 0]), lambda r: r[0]


def case_op_zoo():
    m, x = _eval(OpZoo()), leaf(3, 4)
    return lambda: m(x), lambda r: (x,), one_hot_seed([0, 2, 1]), None


def case_pool_zoo():
    m, x = _eval(PoolZoo()), leaf(2, 2, 8, 8)
    return lambda: m(x), lambda r: (x,), one_hot_seed([1, 2]), None


def case_captum_conv():
    m = BasicModel_ConvNet_One_Conv().to(DTYPE).eval()
    # Biases -50 / -75 against all-ones 3x3 kernels: inputs around 8 keep some ReLUs open.
    x = (torch.randn(3, 1, 4, 4, dtype=DTYPE) * 4 + 8).requires_grad_(True)
    x2 = (torch.randn(3, 1, 4, 4, dtype=DTYPE) * 2).requires_grad_(True)
    return lambda: m(x, x2), lambda r: (x, x2), one_hot_seed([0, 1, 3]), None


def case_captum_multilayer():
    m = BasicModel_MultiLayer(multi_input_module=True).to(DTYPE).eval()
    x, add = leaf(3, 3, scale=3.0), leaf(3, 3)
    return lambda: m(x, add), lambda r: (x, add), one_hot_seed([0, 1, 1]), None


def case_captum_multilayer_multidim():
    m = BasicModel_MultiLayer().to(DTYPE).eval()
    x = leaf(3, 3, scale=3.0)
    return lambda: m(x, None, True), lambda r: (x,), None, None


CASES = {
    "chain": case_chain,
    "chain_sum": case_chain_sum,
    "tree": case_tree,
    "resnet": case_resnet,
    "transformer_mlp": case_transformer_mlp,
    "aggregation": case_aggregation,
    "leaf_arg": case_leaf_arg,
    "two_inputs": case_two_inputs,
    "hidden": case_hidden,
    "hidden_and_input": case_hidden_and_input,
    "op_zoo": case_op_zoo,
    "pool_zoo": case_pool_zoo,
    "captum_conv": case_captum_conv,
    "captum_multilayer": case_captum_multilayer,
    "captum_multilayer_multidim": case_captum_multilayer_multidim,
}


def run_case(name: str) -> Run:
    forward, requested, seed, pick = CASES[name]()
    return compare(forward, requested, seed, pick or (lambda r: r))


# --------------------------------------------------------------------------------------------
# Engine == reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_engine_matches_reference(name):
    run_case(name)


def test_chain_promise_has_routing_forward_chain():
    run = run_case("chain")
    types = run.types
    chains = [[types[n] for n in b.forward_chain] for b in all_branches(run.plan.promises)]
    assert any("PermuteBackward0" in c and "ViewBackward0" in c for c in chains), chains
    origins = [types[p.origin] for p in run.plan.promises if p.kind == "strict"]
    assert "AddBackward0" in origins


def test_tree_has_nested_dependent_promises():
    run = run_case("tree")
    types = run.types
    dependent = [p for p in run.plan.promises if p.kind == "dependent"]
    assert dependent, "expected a Promise Tree"
    assert all(p.parent is not None for p in dependent)
    assert "CatBackward0" in {types[p.origin] for p in dependent}
    # a + b inside the cat: a promise two levels deep
    assert any(p.parent.promise.kind == "dependent" for p in dependent)
    assert any(isinstance(b.arg, Promise) for b in all_branches(run.plan.promises))


@pytest.mark.parametrize("name", ["resnet", "transformer_mlp"])
def test_residual_deadlock_resolves(name):
    run = run_case(name)
    types = run.types
    add_nodes = [i for i, t in enumerate(types) if t == "AddBackward0"]
    propagated = {s[1] for s in run.plan.steps if s[0] == PROPAGATE}
    assert len(add_nodes) >= 3 and set(add_nodes) <= propagated


def test_aggregated_branches():
    run = run_case("aggregation")
    assert any(b.aggregated for b in all_branches(run.plan.promises))


def test_input_leaf_is_arg_node():
    run = run_case("leaf_arg")
    types = run.types
    x_node = build_graph(run.out.grad_fn, run.requested).sinks[0][0]
    assert types[x_node] == "AccumulateGrad"
    assert any(b.arg == x_node and not isinstance(b.arg, Promise) for b in all_branches(run.plan.promises))


class BroadcastModel(nn.Module):
    """An add / sub whose *relevant* operand is broadcast: ``h (B, 1) + g (B, 3)``."""

    def __init__(self, sign: float) -> None:
        super().__init__()
        self.lin, self.other = nn.Linear(4, 1), nn.Linear(4, 3)
        self.sign = sign

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.lin(x))  # (B, 1)
        g = self.other(x)  # (B, 3)
        return h + g if self.sign > 0 else h - g


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["add", "sub"])
def test_broadcast_relevant_operand(sign):
    m, x = _eval(BroadcastModel(sign)), leaf(3, 4)
    compare(lambda: m(x), lambda r: (x,), one_hot_seed([0, 2, 1]))


@pytest.mark.parametrize("bounds", [(1, -1), (-4, None)], ids=["end=-1", "start=-4"])
def test_negative_slice_bound_on_promise_branch(bounds):
    lin, p = nn.Linear(3, 6).to(DTYPE), nn.Parameter(torch.randn(4, dtype=DTYPE))
    x = leaf(2, 3)
    start, stop = bounds
    # the add keeps no operands: its branch replays the slice from the kept tanh output
    compare(lambda: torch.tanh(lin(x))[:, start:stop] + p, lambda r: (x,))


def test_untracked_constant_operand_absorbs_its_share():
    # At the output (or wherever a consumer kept the sum) the true sum is known, so the
    # untracked constant takes its share; deeper in a graph it is replayed as zero (README).
    lin = nn.Linear(3, 4).to(DTYPE)
    c = torch.randn(4, dtype=DTYPE)  # a buffer: no requires_grad, no autograd node
    x = leaf(2, 3)
    compare(lambda: torch.tanh(lin(x)) + c, lambda r: (x,))


def test_batch_equals_per_example():
    m, x = _eval(ResNetLike()), leaf(3, 2, 8, 8)
    targets = [4, 0, 2]
    batched = compare(lambda: m(x), lambda r: (x,), one_hot_seed(targets)).got[0]
    for i, t in enumerate(targets):
        xi = x[i : i + 1].detach().clone().requires_grad_(True)
        single = compare(lambda: m(xi), lambda r: (xi,), one_hot_seed([t])).got[0]
        torch.testing.assert_close(batched[i : i + 1], single, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------
# The reference itself: the Input x Gradient oracle and conservation
# --------------------------------------------------------------------------------------------
def test_reference_equals_input_x_gradient_without_biases():
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(48, 6, bias=False),
        nn.ReLU(),
        nn.Linear(6, 3, bias=False),
    ).to(DTYPE)
    x = leaf(2, 2, 8, 8)
    trace = record(lambda: net(x))
    out = trace.output
    seed = one_hot_seed([0, 2])(out)
    (ref,) = trace.relevance([x], seed, epsilon=1e-13)
    (grad,) = torch.autograd.grad(out, x, (seed != 0).to(DTYPE))  # d f_target / dx per row
    torch.testing.assert_close(ref, x.detach() * grad, rtol=1e-6, atol=1e-9)


def test_reference_conserves_without_biases():
    """Bias-free ReLU residual MLP: linear maps, adds and ReLU conserve, so sum(R_x) = f_target(x)."""
    layers = nn.ModuleList(nn.Linear(6, 6, bias=False) for _ in range(3)).to(DTYPE)
    head = nn.Linear(6, 3, bias=False).to(DTYPE)
    x = leaf(4, 6)

    def forward():
        h = x
        for lin in layers:
            h = h + torch.relu(lin(h))
        return head(h)

    trace = record(forward)
    seed = one_hot_seed([0, 1, 2, 0])(trace.output)
    (ref,) = trace.relevance([x], seed, epsilon=1e-12)
    torch.testing.assert_close(ref.sum(1), seed.sum(1), rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Plan invariants
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_plan_touches_each_node_once(name):
    run = run_case(name)
    steps = run.plan.steps
    recovered = [s[1] for s in steps if s[0] in (LEAF, KEPT_OUTPUT, REPLAY)]
    assert len(recovered) == len(set(recovered)), "a node's forward value was recovered twice"
    propagated = [s[1] for s in steps if s[0] == PROPAGATE]
    assert len(propagated) == len(set(propagated)), "a node propagated relevance twice"
    # every node on a path to a requested tensor that has a relevant operand propagates
    graph = build_graph(run.out.grad_fn, run.requested)
    reach = _reaches_request(graph)
    expected = {
        i
        for i, t in enumerate(graph.types)
        if reach[i] and t != "AccumulateGrad" and any(c >= 0 and reach[c] for c, _ in graph.edges[i])
    }
    assert set(propagated) == expected


def _reaches_request(graph) -> list[bool]:
    """Per node: does a path lead from it down to a requested tensor? (computed here, not by the package)"""
    reach = [False] * len(graph.types)
    for node, _, _ in graph.sinks:
        reach[node] = True
    changed = True
    while changed:  # small graphs: iterate to the fixed point
        changed = False
        for i, node_edges in enumerate(graph.edges):
            if not reach[i] and any(c >= 0 and reach[c] for c, _ in node_edges):
                reach[i] = changed = True
    return reach
