"""Graph walker, pruning, cached promise paths, deep graphs and the functional engine API."""

from __future__ import annotations

import gc
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_dynamiclrp import DynamicLRP
from captum_dynamiclrp.engine import Engine, NotConnectedError, build_graph, relevance
from captum_dynamiclrp.engine.plan import CAPTURE, KEPT_OUTPUT, LEAF, PROPAGATE, REPLAY, PlanCache
from captum_dynamiclrp.engine.walker import build_plan
from captum_dynamiclrp.rules import RULE_TABLE

DT = torch.float64


class Branchy(nn.Module):
    """Takes a different path depending on a flag: same parameters, different graph structure."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x, twice: bool = False):
        h = F.relu(self.a(x))
        if twice:
            h = h + F.relu(self.a(h))
        return self.b(h)


def test_cached_call_gives_identical_results():
    model = Branchy().to(DT).eval()
    x = torch.randn(4, 5, dtype=DT)
    lrp = DynamicLRP(model)
    first = lrp.attribute(x, target=1, additional_forward_args=(True,))
    assert lrp.engine.last_run.cached is False
    second = lrp.attribute(x, target=1, additional_forward_args=(True,))
    assert lrp.engine.last_run.cached is True
    assert torch.equal(first, second)


def test_a_different_graph_never_reuses_a_stale_plan():
    model = Branchy().to(DT).eval()
    x = torch.randn(4, 5, dtype=DT)
    lrp = DynamicLRP(model)
    lrp.attribute(x, target=1, additional_forward_args=(True,))
    short = lrp.attribute(x, target=1, additional_forward_args=(False,))
    assert lrp.engine.last_run.cached is False
    torch.testing.assert_close(short, DynamicLRP(model).attribute(x, target=1, additional_forward_args=(False,)))
    # A different batch size changes shapes: a new plan, correct results.
    small = lrp.attribute(x[:2], target=1, additional_forward_args=(True,))
    assert lrp.engine.last_run.cached is False
    torch.testing.assert_close(small, DynamicLRP(model).attribute(x[:2], target=1, additional_forward_args=(True,)))
    assert len(lrp.engine.cache) == 3


def test_cache_is_bounded_and_can_be_cleared():
    model = Branchy().to(DT).eval()
    lrp = DynamicLRP(model, cache_size=2)
    for batch in (1, 2, 3, 4):
        lrp.attribute(torch.randn(batch, 5, dtype=DT), target=0)
    assert len(lrp.engine.cache) == 2
    lrp.clear_cache()
    assert len(lrp.engine.cache) == 0
    lrp.attribute(torch.randn(1, 5, dtype=DT), target=0)
    assert lrp.engine.last_run.cached is False


def test_cache_key_is_compared_in_full():
    cache = PlanCache(4)
    cache.put(("a", (1, 2)), "plan-a")
    assert cache.get(("a", (1, 2))) == "plan-a"
    assert cache.get(("a", (1, 3))) is None


def test_plans_hold_no_tensors_or_nodes():
    model = Branchy().to(DT).eval()
    lrp = DynamicLRP(model)
    lrp.attribute(torch.randn(2, 5, dtype=DT), target=0, additional_forward_args=(True,))
    plan = lrp.engine.last_run.plan

    def walk(obj):
        if isinstance(obj, torch.Tensor) or type(obj).__module__ == "torch.autograd.graph":
            raise AssertionError(f"plan holds {type(obj)}")
        if isinstance(obj, (tuple, list)):
            for item in obj:
                walk(item)
        assert "Backward" not in type(obj).__name__

    walk(plan.steps)


def test_weights_are_pruned():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4, requires_grad=True)
    out = model(x)
    graph = build_graph(out.grad_fn, (x,))
    plan = build_plan(graph, RULE_TABLE)
    propagated = {graph.types[s[1]] for s in plan.steps if s[0] == PROPAGATE}
    assert "TBackward0" not in propagated  # the weight transposes lead to no requested tensor
    assert plan.relevant < plan.total
    assert [graph.types[s[1]] for s in plan.steps if s[0] == CAPTURE] == ["AccumulateGrad"]


def test_each_node_propagates_once_and_is_recovered_at_most_once():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.ReLU()) for _ in range(3)])
    x = torch.randn(2, 6, requires_grad=True)
    h = x
    for layer in model:
        h = h + layer(h)  # residual adds: strict promises that aggregate
    graph = build_graph(h.grad_fn, (x,))
    plan = build_plan(graph, RULE_TABLE)
    propagated = [s[1] for s in plan.steps if s[0] == PROPAGATE]
    recovered = [s[1] for s in plan.steps if s[0] in (LEAF, KEPT_OUTPUT, REPLAY)]
    assert len(propagated) == len(set(propagated))
    assert len(recovered) == len(set(recovered))
    assert any(p.kind == "strict" for p in plan.promises)


def test_deep_graph_does_not_hit_the_recursion_limit():
    depth = max(3000, sys.getrecursionlimit() * 2)
    x = torch.randn(2, 4, dtype=DT, requires_grad=True)
    h = x
    for _ in range(depth):
        h = h + 0.001 * torch.tanh(h)  # add -> strict promise; the branch walks all the way down
    seed = torch.randn_like(h)
    (r,) = relevance(h, x, seed)
    assert torch.isfinite(r).all() and r.shape == x.shape


def test_relevance_at_an_intermediate_tensor():
    lin1, lin2 = nn.Linear(4, 6).double(), nn.Linear(6, 2).double()
    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    hidden = F.relu(lin1(x))
    out = lin2(hidden)
    seed = torch.randn_like(out)
    r_hidden, r_x = relevance(out, (hidden, x), seed)
    # The hidden relevance is what the second layer gives it; x gets the first layer's share of it.
    expected_hidden = hidden.detach() * ((seed / (out.detach() + 1e-6 * out.detach().sign())) @ lin2.weight.detach())
    torch.testing.assert_close(r_hidden, expected_hidden, rtol=1e-6, atol=1e-9)
    (r_x_from_hidden,) = relevance(lin1(x), x, r_hidden)
    torch.testing.assert_close(r_x, r_x_from_hidden, rtol=1e-6, atol=1e-9)


def test_seed_defaults_to_the_output_and_shape_is_checked():
    x = torch.randn(3, dtype=DT, requires_grad=True)
    out = 2 * x
    (r,) = relevance(out, x)
    torch.testing.assert_close(r, out.detach())
    with pytest.raises(ValueError, match="seed shape"):
        relevance(out, x, seed=torch.ones(4, dtype=DT))


def test_inputs_must_require_grad_and_be_connected():
    x = torch.randn(3)
    with pytest.raises(ValueError, match="require grad"):
        relevance(x * 2, x)
    y = torch.randn(3, requires_grad=True)
    z = torch.randn(3, requires_grad=True)
    with pytest.raises(NotConnectedError):
        relevance(y * 2, z)


def test_unused_requested_input_gets_zeros():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    ra, rb = relevance(a * 2, (a, b))
    assert torch.equal(rb, torch.zeros(3))
    torch.testing.assert_close(ra, (a * 2).detach())


def test_float32_models_accumulate_in_float32_and_float64_in_float64():
    for dtype, expected in ((torch.float32, torch.float32), (torch.float64, torch.float64)):
        x = torch.randn(2, 3, dtype=dtype, requires_grad=True)
        (r,) = relevance(nn.Linear(3, 2).to(dtype)(x), x)
        assert r.dtype == expected


def test_engine_objects_do_not_share_caches():
    e1, e2 = Engine(), Engine()
    x = torch.randn(2, 3, requires_grad=True)
    e1.relevance((x * 2).sum(1), x)
    assert len(e1.cache) == 1 and len(e2.cache) == 0


def test_graph_is_released_after_the_call():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    lrp = DynamicLRP(model.eval())
    lrp.attribute(torch.randn(4, 8), target=0)
    gc.collect()
    leftovers = [o for o in gc.get_objects() if type(o).__name__ == "AddmmBackward0"]
    assert not leftovers
