"""The engine's shortcuts for speed and memory give the results of the plain computation.

* saved tensors owned by the engine (``engine/saved.py``) are freed during the walk, never too early;
* a linear rule reads its own output from a ReLU that kept ``max(z, 0)`` (``ratio_given_rectified``)
  only where that is exact, and from a value a promise already rebuilt (``("value", node)`` sources);
* rows without relevance are skipped in ``x @ W`` (``rules/rows.py``);
* a strided pointwise convolution's input gradient is a stride-1 one scattered into zeros.

No timings here: ``benchmarks/bench_engine.py`` measures them.
"""

from __future__ import annotations

import dataclasses
import gc
import weakref
from typing import Optional

import pytest
import torch
from torch import nn

from captum_dynamiclrp import DynamicLRP
from captum_dynamiclrp.engine import Engine, SavedTensorStore, build_graph
from captum_dynamiclrp.engine.graph import consumer_edges
from captum_dynamiclrp.engine.plan import FROM_OUTPUT, PROPAGATE, REPLAY
from captum_dynamiclrp.engine.promise import output_rebuilt_by_routing
from captum_dynamiclrp.engine.saved import ReleasedSavedTensorError, saved_schedule
from captum_dynamiclrp.engine.walker import _rebuilt, build_plan
from captum_dynamiclrp.rules import RULE_TABLE
from captum_dynamiclrp.rules import rows as rows_module
from captum_dynamiclrp.rules import base
from captum_dynamiclrp.rules.routing import ROUTING
from captum_dynamiclrp.rules.base import RuleSettings, ratio, ratio_given_rectified

DT = torch.float64


def mlp(depth: int = 3, width: int = 16, relu: type = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), relu()]
    return nn.Sequential(*layers, nn.Linear(width, 4)).to(DT).eval()


class Residual(nn.Module):
    """h + W2 relu(W1 h): the sum's promise rebuilds W2's output, which W2's own rule then reuses."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.inner, self.outer, self.head = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, 3)

    def forward(self, x):
        h = x + self.outer(torch.relu(self.inner(x)))
        return self.head(torch.tanh(h))


def strip_output_sources(plan, kinds: tuple) -> None:
    """Turn the plan's output sources of the given kinds off (the rules then recompute their output)."""
    for index, step in enumerate(plan.steps):
        if step[0] == PROPAGATE and step[6] is not None and step[6][0] in kinds:
            plan.steps[index] = step[:6] + (None,) + step[7:]
    plan.release_after_last_use()
    plan.saved_schedule = None


def run(model, x, target, store: bool, kinds: tuple = (), settings: Optional[RuleSettings] = None) -> torch.Tensor:
    """Relevance of ``x`` through a plan with the output sources ``kinds`` turned off."""
    engine = Engine(settings=settings or RuleSettings(), cache_size=0)
    leaf = x.detach().clone().requires_grad_(True)
    with SavedTensorStore() as saved:
        with saved.recording() if store else torch.enable_grad():
            out = model(leaf)
        seed = torch.zeros_like(out).scatter_(1, target[:, None], out.detach().gather(1, target[:, None]))
        graph = build_graph(out.grad_fn, (leaf,))
        plan = build_plan(graph, engine.table)
        strip_output_sources(plan, kinds)
        engine.cache.maxsize = 1
        engine.cache.put(graph.signature, plan)
        (r,) = engine.relevance(out, leaf, seed, saved=saved if store else None)
    assert engine.last_run.cached
    return r


# ------------------------------------------------------------------ saved tensors


def test_store_gives_identical_results_and_empties_every_box():
    model = Residual().to(DT).eval()
    x, t = torch.randn(5, 8, dtype=DT), torch.tensor([0, 1, 2, 0, 1])
    assert torch.equal(run(model, x, t, store=True), run(model, x, t, store=False))
    store = SavedTensorStore()
    leaf = x.clone().requires_grad_(True)
    with store.recording():
        model(leaf)
    boxes = list(store._boxes)
    assert boxes and all(box[0] is not None for box in boxes)
    store.clear()
    assert all(box[0] is None for box in boxes)


def deep_activation_alive_when(make_method, layer_index: int) -> dict:
    """Whether the deepest activation of ``mlp(3)`` is still alive when layer ``layer_index``'s rule runs.

    ``make_method(model, rules)`` builds the attribution method (with ``rules`` overriding the table);
    the result is also checked against the method without the spy.
    """
    model = mlp(depth=3)
    seen: dict[str, bool] = {}
    watched: list[weakref.ref] = []
    model[5].register_forward_hook(lambda m, i, o: watched.append(weakref.ref(o)))  # last ReLU's output
    layer = model[layer_index]

    def spy(ctx):
        if ctx.inputs[2].data_ptr() == layer.weight.data_ptr():  # mat2 = W^T of that layer
            gc.collect()
            seen["deep activation alive"] = watched[-1]() is not None
        return RULE_TABLE["AddmmBackward0"].rule(ctx)

    overrides = {"AddmmBackward0": dataclasses.replace(RULE_TABLE["AddmmBackward0"], rule=spy)}
    x = torch.randn(5, 16, dtype=DT)
    result = make_method(model, overrides).attribute(x, target=0)
    torch.testing.assert_close(result, make_method(model, None).attribute(x, target=0), rtol=0, atol=0)
    return seen


def test_activations_are_freed_during_the_walk():
    """When the first layer's rule runs, the deepest activation is gone, as after a backward pass."""
    assert deep_activation_alive_when(lambda m, rules: DynamicLRP(m, rules=rules), 0) == {"deep activation alive": False}


def test_layer_attribution_frees_activations_during_the_walk():
    """LayerDynamicLRP records its forward in a store too (explaining the first layer's output)."""
    from captum_dynamiclrp import LayerDynamicLRP

    seen = deep_activation_alive_when(lambda m, rules: LayerDynamicLRP(m, m[1], rules=rules), 2)
    assert seen == {"deep activation alive": False}


class LastPosition(nn.Module):
    """Logits of the last position only, returned as a view of every position's logits."""

    def __init__(self, width: int = 8, vocab: int = 50) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(width, width), nn.Linear(width, vocab)

    def forward(self, x):  # (batch, positions, width) -> (batch, vocab)
        return self.head(torch.relu(self.body(x)))[:, -1]


def alive_at_first_relu(model: nn.Module, x: torch.Tensor, make_method, watch_head: bool) -> dict:
    """Whether the seed (and, with ``watch_head``, the head's whole output) is alive when the ReLU
    before the head hands on its relevance, i.e. after the root's rule has run. The result is also
    checked against the method without the spy."""
    seeds: list[weakref.ref] = []
    heads: list[weakref.ref] = []
    if watch_head:
        model.head.register_forward_hook(lambda m, i, o: heads.append(weakref.ref(o)))
    original_seed = DynamicLRP._seed
    seen: dict[str, bool] = {}

    def watched_seed(output, target):
        seed, selected = original_seed(output, target)
        seeds.append(weakref.ref(seed))
        return seed, selected

    def spy(ctx):
        gc.collect()
        seen["seed alive"] = seeds[-1]() is not None
        if watch_head:
            seen["head output alive"] = heads[-1]() is not None
        return RULE_TABLE["ReluBackward0"].rule(ctx)

    overrides = {"ReluBackward0": dataclasses.replace(RULE_TABLE["ReluBackward0"], rule=spy)}
    reference = make_method(model, None).attribute(x, target=3)
    DynamicLRP._seed = staticmethod(watched_seed)
    try:
        result = make_method(model, overrides).attribute(x, target=3)
    finally:
        DynamicLRP._seed = staticmethod(original_seed)
    torch.testing.assert_close(result, reference, rtol=0, atol=0)
    return seen


class ConvBlock(nn.Module):
    """conv -> batch norm -> ReLU -> conv -> batch norm, + the block's input, -> ReLU, then a head."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels * 25, 3)

    def forward(self, x):
        h = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.head(h.flatten(1))


def test_arrived_relevance_is_freed_before_the_products(monkeypatch):
    """Convolution, batch-norm and sum rules drop the relevance that reached them once they have
    :math:`R / \\mathrm{stab}(z)`, before the products (a backward pass likewise frees a gradient
    once used): checked at each rule's product step, with the result of the unspied walk."""
    from captum_dynamiclrp.rules import arithmetic, linear, normalization

    torch.manual_seed(0)
    model = ConvBlock().to(DT).eval()
    for bn in (model.bn1, model.bn2):  # statistics away from the defaults, so the maps are not identities
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 4, 5, 5, dtype=DT)
    reference = DynamicLRP(model).attribute(x, target=1)

    arrived: list[weakref.ref] = []
    seen: list[tuple[str, bool]] = []

    def spying(name: str):
        spec = RULE_TABLE[name]

        def rule(ctx):
            arrived.append(weakref.ref(ctx.relevance[0]))
            return spec.rule(ctx)

        return dataclasses.replace(spec, rule=rule)

    def checkpoint(name: str, function):
        def checked(*args, **kwargs):
            gc.collect()
            seen.append((name, arrived[-1]() is not None))
            return function(*args, **kwargs)

        return checked

    monkeypatch.setattr(linear.ConvolutionOp, "grads", checkpoint("conv", linear.ConvolutionOp.grads))
    monkeypatch.setattr(normalization, "_channel_view", checkpoint("batch norm", normalization._channel_view))
    monkeypatch.setattr(arithmetic, "node_vjp", checkpoint("sum", arithmetic.node_vjp))
    names = ("ConvolutionBackward0", "NativeBatchNormBackward0", "AddBackward0")
    result = DynamicLRP(model, rules={name: spying(name) for name in names}).attribute(x, target=1)

    torch.testing.assert_close(result, reference, rtol=0, atol=0)
    assert sorted(set(seen)) == [("batch norm", False), ("conv", False), ("sum", False)]
    assert len(seen) == 5  # two convolutions, two batch norms, one sum


@pytest.mark.parametrize("layer", [False, True])
def test_seed_is_freed_after_the_first_step(layer):
    """The seed (as large as the output) is handed over to the walk, which drops it after the root."""
    from captum_dynamiclrp import LayerDynamicLRP

    model = mlp(depth=2)
    make = (lambda m, rules: LayerDynamicLRP(m, m[0], rules=rules)) if layer else (
        lambda m, rules: DynamicLRP(m, rules=rules))
    seen = alive_at_first_relu(model, torch.randn(5, 16, dtype=DT), make, watch_head=False)
    assert seen == {"seed alive": False}


@pytest.mark.parametrize("layer", [False, True])
def test_view_of_a_larger_output_lets_the_rest_go(layer):
    """``logits[:, -1]`` would keep every position's logits alive through the walk; a gradient pass frees them."""
    from captum_dynamiclrp import LayerDynamicLRP

    torch.manual_seed(0)
    model = LastPosition().to(DT).eval()
    make = (lambda m, rules: LayerDynamicLRP(m, m.body, rules=rules)) if layer else (
        lambda m, rules: DynamicLRP(m, rules=rules))
    x = torch.randn(3, 6, 8, dtype=DT)
    seen = alive_at_first_relu(model, x, make, watch_head=True)
    assert seen == {"seed alive": False, "head output alive": False}
    # the same relevance as the engine on the uncopied view
    leaf = x.clone().requires_grad_(True)
    out = model(leaf)
    seed = torch.zeros_like(out)
    seed[:, 3] = out.detach()[:, 3]
    (expected,) = Engine().relevance(out, leaf, seed)
    torch.testing.assert_close(DynamicLRP(model).attribute(x, target=3), expected, rtol=1e-12, atol=1e-15)


def test_seed_handed_over_as_a_list_is_taken():
    model = mlp(depth=1)
    leaf = torch.randn(2, 16, dtype=DT, requires_grad=True)
    out = model(leaf)
    box = [out.detach().clone()]
    (r,) = Engine().relevance(out, leaf, box)
    assert box == []
    torch.testing.assert_close(r, Engine().relevance(model(leaf), leaf)[0])
    with pytest.raises(TypeError, match="exactly one tensor"):
        Engine().relevance(model(leaf), leaf, [])


def test_reading_a_released_box_is_an_error():
    store = SavedTensorStore()
    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    with store.recording():
        y = torch.sin(x)
    assert torch.equal(y.grad_fn._saved_self, x)
    store.release(y.grad_fn)
    with pytest.raises(ReleasedSavedTensorError):
        _ = y.grad_fn._saved_self
    store.clear()


def test_in_place_ops_keep_their_boxes_until_the_end():
    """In-place ops make autograd create helper nodes mid-op; such boxes are never released early."""

    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.a(x).sin()
            h.mul_(x)  # saves the original h: autograd clones it first
            h[:, :3] *= x[:, 3:]
            return self.b(torch.relu(h))

    model = InPlace().to(DT).eval()
    x = torch.randn(4, 6, dtype=DT)
    result = DynamicLRP(model).attribute(x, target=1)
    assert torch.equal(result, run(model, x, torch.tensor([1, 1, 1, 1]), store=False))


def test_schedule_covers_every_node_once():
    model = Residual().to(DT).eval()
    leaf = torch.randn(2, 8, dtype=DT, requires_grad=True)
    out = model(leaf)
    graph = build_graph(out.grad_fn, (leaf,))
    plan = build_plan(graph, RULE_TABLE)
    unread, after = saved_schedule(plan, len(graph.nodes))
    released = unread + [j for nodes in after.values() for j in nodes]
    assert sorted(released) == list(range(len(graph.nodes)))
    assert plan.saved_schedule is not None  # kept for cached calls


# ------------------------------------------------------------------ outputs that need no recomputation


@pytest.mark.parametrize("linear", ["epsilon", "gamma", "zplus"])
def test_rectified_output_gives_the_recomputed_result(linear):
    model = mlp(depth=4)
    x, t = torch.randn(6, 16, dtype=DT), torch.tensor([0, 1, 2, 3, 0, 1])
    settings = RuleSettings(linear=linear)
    leaf = torch.randn(2, 16, dtype=DT, requires_grad=True)
    graph = build_graph(model(leaf).grad_fn, (leaf,))
    kinds = [s[6][0] for s in build_plan(graph, RULE_TABLE).steps if s[0] == PROPAGATE and s[6] is not None]
    assert kinds.count("rectified") == 4
    torch.testing.assert_close(
        run(model, x, t, store=True, settings=settings),
        run(model, x, t, store=True, kinds=("rectified",), settings=settings),
        rtol=1e-10, atol=1e-12,  # the forward's own z against a recomputed one: rounding apart
    )


def test_rectified_output_falls_back_where_relevance_sits_on_a_cut_unit():
    """A sigmoid after the ReLU hands relevance to units the ReLU set to zero: z is recomputed."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sigmoid(), nn.Linear(8, 3)).to(DT).eval()
    x, t = torch.randn(5, 8, dtype=DT), torch.tensor([0, 1, 2, 0, 1])
    torch.testing.assert_close(run(model, x, t, store=True), run(model, x, t, store=True, kinds=("rectified",)),
                               rtol=0, atol=0)


_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_stabilize_gives_the_bits_of_its_definition(dtype, layout, device):
    # The definition read literally: z + eps where the sign bit is clear, z - eps where it is set
    # (so -0 goes to -eps), each one rounded add in z's dtype.
    eps = 1e-6
    tiny = torch.finfo(dtype).tiny
    special = [0.0, -0.0, eps, -eps, eps / 3, -eps / 3, tiny, -tiny, 1.0, -1.0, 3e4, -3e4,
               float("inf"), float("-inf"), float("nan")]
    values = torch.cat([torch.tensor(special, dtype=torch.float64),
                        torch.randn(241, generator=torch.Generator().manual_seed(0), dtype=torch.float64).mul_(1e-5)])
    z = values.to(dtype=dtype, device=device).view(16, 16)
    if layout == "transposed":
        z = z.t()
    before = z.clone()
    got = base.stabilize(z, eps)
    want = torch.where(torch.signbit(z), z - eps, z + eps)
    assert got.dtype == dtype and got.shape == z.shape and got.device == z.device
    assert torch.equal(torch.signbit(got), torch.signbit(want))
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(z, before, rtol=0, atol=0, equal_nan=True)  # z itself is left alone


def test_ratio_given_rectified_is_exact_or_declines():
    z = torch.tensor([[1.5, -2.0, 0.0, 3.0]], dtype=DT)
    y = z.clamp(min=0)
    r = torch.tensor([[0.3, 0.0, 0.0, -1.0]], dtype=DT)
    assert torch.equal(ratio_given_rectified(r, y, 1e-6), ratio(r, z, 1e-6))
    assert ratio_given_rectified(r, y, 0.0) is None  # 0 / stab(0) would be 0/0
    assert ratio_given_rectified(torch.tensor([[0.3, 0.1, 0.0, -1.0]], dtype=DT), y, 1e-6) is None
    assert ratio_given_rectified(torch.tensor([[0.3, float("nan"), 0.0, 1.0]], dtype=DT), y, 1e-6) is None
    assert ratio_given_rectified(r, None, 1e-6) is None


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_ratio_given_rectified_checks_every_block(layout, monkeypatch):
    monkeypatch.setattr(base, "_CHECK_BLOCK", 3)  # the check runs over blocks of 3 elements
    z = torch.randn(6, 5, dtype=DT)
    z[:, 1] = -1.0
    r = torch.where(z > 0, torch.randn(6, 5, dtype=DT), 0.0)
    if layout == "transposed":
        z, r = z.t(), r.t()
    y = z.clamp(min=0)
    assert torch.equal(ratio_given_rectified(r, y, 1e-6), ratio(r, z, 1e-6))
    for position in [(0, 1), (5, 1)] if layout == "contiguous" else [(1, 0), (1, 5)]:
        bad = r.clone()
        bad[position] = 0.5  # relevance where the ReLU cut z, in the first or the last block
        assert ratio_given_rectified(bad, y, 1e-6) is None


def test_rebuilt_value_is_reused_and_gives_the_same_result():
    model = Residual().to(DT).eval()
    x, t = torch.randn(5, 8, dtype=DT), torch.tensor([0, 1, 2, 0, 1])
    leaf = torch.randn(2, 8, dtype=DT, requires_grad=True)
    graph = build_graph(model(leaf).grad_fn, (leaf,))
    kinds = [s[6][0] for s in build_plan(graph, RULE_TABLE).steps if s[0] == PROPAGATE and s[6] is not None]
    assert "value" in kinds
    assert torch.equal(run(model, x, t, store=True), run(model, x, t, store=True, kinds=("value",)))


class ResidualStream(nn.Module):
    """Pre-norm residual blocks: ``h + down(relu(up(norm(h))))``, the sum read by the next norm."""

    def __init__(self, width: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth + 1))
        self.ups = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(depth))
        self.downs = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, h):
        for norm, up, down in zip(self.norms, self.ups, self.downs):
            h = h + down(torch.relu(up(norm(h))))
        return self.head(self.norms[-1](h)).flatten(1)[:, :3]


WITHOUT_REBUILD = {
    name: dataclasses.replace(RULE_TABLE[name], operand_from_output=None) for name in ("AddBackward0", "SubBackward0")
}


@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 8)], ids=["2d", "3d"])
def test_residual_branch_is_rebuilt_from_the_kept_sum(shape):
    """``down(...)`` = sum - h (both kept by the norms) instead of a replayed matrix product."""
    torch.manual_seed(0)
    model = ResidualStream().to(DT).eval()
    x = torch.randn(*shape, dtype=DT)
    leaf = x.clone().requires_grad_(True)
    graph = build_graph(model(leaf).grad_fn, (leaf,))
    plan = build_plan(graph, RULE_TABLE)
    rebuilt = [step for step in plan.steps if step[0] == FROM_OUTPUT]
    assert len(rebuilt) == 3  # one per block
    replayed = {graph.types[step[1]] for step in plan.steps if step[0] == REPLAY}
    assert not replayed & {"AddmmBackward0", "MmBackward0"}, "no matrix product is replayed"
    # each down projection's rule reads the rebuilt value as its own output
    for step in rebuilt:
        producer = step[7][-1]
        assert graph.types[producer] in ("AddmmBackward0", "MmBackward0")
        assert ("value", producer) in [s[6] for s in plan.steps if s[0] == PROPAGATE and s[1] == producer]
    # the same relevance as replaying the branch (up to the rounding of one subtraction)
    t = torch.tensor([0, 1, 2, 0, 1])[: shape[0]]
    ours = DynamicLRP(model).attribute(x, target=t)
    replaying = DynamicLRP(model, rules=WITHOUT_REBUILD).attribute(x, target=t)
    assert replaying.shape == ours.shape
    torch.testing.assert_close(ours, replaying, rtol=1e-10, atol=1e-12)
    assert not torch.equal(ours, torch.zeros_like(ours))


def test_operand_of_a_sum_from_its_output():
    """a + alpha b, a - alpha b: each operand from the output and the other operand."""
    a, b = torch.randn(4, 3, dtype=DT), torch.randn(4, 3, dtype=DT)
    for name, alpha, forward in [("AddBackward0", 1, torch.add), ("AddBackward0", 2.5, torch.add),
                                 ("SubBackward0", 1, torch.sub), ("SubBackward0", -3.0, torch.sub)]:
        la, lb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        z = forward(la, lb, alpha=alpha)
        assert type(z.grad_fn).__name__ == name
        operand = RULE_TABLE[name].operand_from_output
        torch.testing.assert_close(operand(z.grad_fn, 0, z.detach(), [None, b]), a)
        torch.testing.assert_close(operand(z.grad_fn, 1, z.detach(), [a, None]), b)


def test_rebuild_declines_in_16_bit_formats():
    """z - b in bfloat16 is exact only to z's scale, far coarser than a small branch: replay it there."""
    for dtype, expected in ((torch.bfloat16, 0), (torch.float16, 0), (torch.float32, 3)):
        model = ResidualStream().to(dtype).eval()
        leaf = torch.randn(5, 8, dtype=dtype, requires_grad=True)
        plan = build_plan(build_graph(model(leaf).grad_fn, (leaf,)), RULE_TABLE)
        assert len([s for s in plan.steps if s[0] == FROM_OUTPUT]) == expected, dtype


def test_rebuild_declines_for_broadcast_or_untracked_operands():
    """A broadcast operand (a bias row) or an untracked one cannot be solved for: the branch is replayed."""
    torch.manual_seed(0)
    lin, norm = nn.Linear(8, 8).to(DT), nn.LayerNorm(8).to(DT)
    row = torch.randn(8, dtype=DT, requires_grad=True)
    cases = {
        "broadcast": lambda x: norm(torch.relu(x) + (row * 2.0)),  # the dear operand is (8,), the sum (5, 8)
        "untracked": lambda x: norm(lin(x) + torch.ones(8, dtype=DT)),
    }
    for name, fn in cases.items():
        leaf = torch.randn(5, 8, dtype=DT, requires_grad=True)
        graph = build_graph(fn(leaf).sum(1).grad_fn, (leaf, row))
        plan = build_plan(graph, RULE_TABLE)
        assert not [s for s in plan.steps if s[0] == FROM_OUTPUT], name


class Sequence3d(nn.Module):
    """Linear maps on (batch, tokens, features): each is an addmm whose output is viewed back to 3-d."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(width, 2 * width), nn.Linear(2 * width, width), nn.Linear(width, 3)

    def forward(self, x):
        h = torch.relu(self.b(nn.functional.gelu(self.a(x))))
        return self.c(h).sum(1)


def test_kept_outputs_are_found_behind_reshapes():
    model = Sequence3d().to(DT).eval()
    x, t = torch.randn(4, 5, 8, dtype=DT), torch.tensor([0, 1, 2, 0])
    leaf = torch.randn(2, 5, 8, dtype=DT, requires_grad=True)
    graph = build_graph(model(leaf).grad_fn, (leaf,))
    kinds = {
        graph.types[s[1]] + ":" + s[6][0]
        for s in build_plan(graph, RULE_TABLE).steps
        if s[0] == PROPAGATE and s[6] is not None
    }
    assert {"AddmmBackward0:consumer", "AddmmBackward0:rectified"} <= kinds  # GELU kept a's, ReLU b's (as max)
    torch.testing.assert_close(
        run(model, x, t, store=True), run(model, x, t, store=True, kinds=("consumer", "rectified")),
        rtol=1e-10, atol=1e-12,
    )


# ------------------------------------------------------------------ row-sparse relevance


@pytest.mark.parametrize("check_elements", [1 << 20, 1, 7])
def test_relevant_rows(check_elements, monkeypatch):
    # 1 and 7 elements: rows are tested one and two at a time (blocks of R, not a boolean copy of it)
    monkeypatch.setattr(rows_module, "_CHECK_ELEMENTS", check_elements)
    r = torch.zeros(6, 3, dtype=DT)
    r[4, 1] = 2.0
    assert rows_module.relevant_rows(r).tolist() == [4]
    r[1, 0] = float("nan")
    assert rows_module.relevant_rows(r).tolist() == [1, 4]
    assert rows_module.relevant_rows(torch.ones(6, 3, dtype=DT)) is None  # dense: not worth it
    assert rows_module.relevant_rows(torch.ones(1, 3, dtype=DT)) is None


def test_relevant_rows_probes_before_the_full_pass(monkeypatch):
    """Dense relevance (every layer below a sequence model's first attention) costs a 16-row probe only."""
    seen = []
    carrying = rows_module._rows_carrying
    monkeypatch.setattr(rows_module, "_rows_carrying", lambda r: seen.append(r.shape[0]) or carrying(r))
    dense = torch.randn(100, 5, dtype=DT)
    dense[7] = 0.0
    assert rows_module.relevant_rows(dense) is None
    assert seen == [rows_module.PROBE_ROWS]
    sparse = torch.zeros(100, 5, dtype=DT)
    sparse[99, 2] = 1.0
    sparse[40, 0] = float("nan")
    seen.clear()
    assert rows_module.relevant_rows(sparse).tolist() == [40, 99]
    assert seen == [rows_module.PROBE_ROWS, 100]
    # A sparse pattern on exactly the probed rows looks dense: the rule then runs on all rows (speed, not results).
    probed = torch.zeros(100, 5, dtype=DT)
    probed[torch.arange(16) * 99 // 15] = 1.0
    assert rows_module.relevant_rows(probed) is None
    assert rows_module.relevant_rows(probed[:32]).tolist() == [0, 6, 13, 19, 26]  # small: no probe, full pass


@pytest.mark.parametrize("linear", ["epsilon", "gamma", "zplus"])
def test_last_position_skips_other_rows_with_the_same_result(linear, monkeypatch):
    """Explaining the last position of a sequence: the head and last MLP see one relevant row."""
    torch.manual_seed(0)
    body, head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).to(DT), nn.Linear(8, 11).to(DT)

    def model(x):  # (seq, 8) -> logits of the last position, shape (1, 11); the mean mixes positions
        h = x + x.mean(0, keepdim=True)
        return head(h + body(h))[-1:]

    x = torch.randn(7, 8, dtype=DT)
    lrp = DynamicLRP(model, rules=linear)
    sparse = lrp.attribute(x, target=3)
    monkeypatch.setattr(rows_module, "MAX_ROW_FRACTION", -1.0)
    dense = DynamicLRP(model, rules=linear).attribute(x, target=3)
    # Exact up to rounding: a one-row product may accumulate in another order than the full one.
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-14)
    assert sparse[:-1].abs().sum() > 0  # the other positions get relevance through the mean


# ------------------------------------------------------------------ outputs behind views


class SplitAttention(nn.Module):
    """GPT-2's pattern: one projection, split into q, k, v, reshaped and transposed into fused attention.

    ``touch_key`` scales k in place after the split, which writes to the projection's storage.
    """

    def __init__(self, width: int = 8, heads: int = 2, touch_key: bool = False, contiguous: bool = False,
                 squash_value: bool = False) -> None:
        super().__init__()
        self.heads, self.touch_key, self.contiguous, self.squash_value = heads, touch_key, contiguous, squash_value
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, 3)

    def forward(self, x):
        batch, length, width = x.shape
        if self.touch_key:  # slices (split's views may not be written in place)
            h = self.qkv(x)
            q, k, v = h[..., :width], h[..., width:2 * width], h[..., 2 * width:]
            k.mul_(2.0)
        else:
            q, k, v = self.qkv(x).split(width, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        if self.contiguous:  # copies, as transformers 4.x's SDPA path makes them
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if self.squash_value:  # tanh keeps its result, not v: v is nowhere kept
            v = torch.tanh(v)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(batch, length, width)[:, -1])


def _output_kinds(model, x) -> list:
    """(node type, output source kind) of every rule step of the plan."""
    leaf = x.detach().clone().requires_grad_(True)
    graph = build_graph(model(leaf).grad_fn, (leaf,))
    plan = build_plan(graph, RULE_TABLE)
    return [(graph.types[s[1]], s[6] and s[6][0]) for s in plan.steps if s[0] == PROPAGATE]


@pytest.mark.parametrize("touch_key", [False, True], ids=["untouched", "written_in_place"])
def test_output_behind_views_is_read_from_their_storage(touch_key):
    model = SplitAttention(touch_key=touch_key).to(DT).eval()
    x, t = torch.randn(3, 5, 8, dtype=DT), torch.tensor([0, 1, 2])
    # The projection's output is found behind split / view / transpose (the plan is not vacuous);
    # after an in-place write autograd re-records the views as AsStrided over CopySlices, which are
    # not looked through (the version check of output_from_storage is the second line of defence,
    # tested below) ...
    assert (("AddmmBackward0", "storage") in _output_kinds(model, x)) is not touch_key
    # ... and the result is that of recomputing the output.
    for store in (True, False):
        torch.testing.assert_close(run(model, x, t, store=store), run(model, x, t, store=store, kinds=("storage",)),
                                   rtol=1e-12, atol=1e-14)


def test_output_behind_copies_is_rebuilt_by_routing():
    """q, k, v made contiguous (copies) after split and transpose: the projection's output is rebuilt
    from the three copies by calling the routing nodes (transpose, view, split) on them."""
    torch.manual_seed(0)
    model = SplitAttention(contiguous=True).to(DT).eval()
    x, t = torch.randn(3, 5, 8, dtype=DT), torch.tensor([0, 1, 2])
    assert ("AddmmBackward0", "routed") in _output_kinds(model, x)
    # the rebuilt value has the forward's bits
    outputs = []
    model.qkv.register_forward_hook(lambda m, i, o: outputs.append(o))
    leaf = x.clone().requires_grad_(True)
    graph = build_graph(model(leaf).grad_fn, (leaf,))
    projection = graph.types.index("AddmmBackward0", graph.types.index("SplitBackward0"))
    recipe = output_rebuilt_by_routing(graph, RULE_TABLE, consumer_edges(graph), projection)
    assert recipe[0] == "invert" and graph.types[recipe[1]] in ("ViewBackward0", "UnsafeViewBackward0")
    with torch.no_grad():
        rebuilt = _rebuilt(recipe, graph.nodes)
    assert torch.equal(rebuilt, outputs[-1].detach().reshape(rebuilt.shape))
    for store in (True, False):
        torch.testing.assert_close(run(model, x, t, store=store), run(model, x, t, store=store, kinds=("routed",)),
                                   rtol=1e-12, atol=1e-14)


class RepeatedValues(nn.Module):
    """Grouped-query attention with keys and values repeated per head, as transformers 4.x's repeat_kv."""

    def __init__(self, width: int = 8, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.dim = heads, kv_heads, width // heads
        self.q, self.k = nn.Linear(width, width), nn.Linear(width, kv_heads * self.dim)
        self.v = nn.Linear(width, kv_heads * self.dim, bias=False)
        self.out = nn.Linear(width, 3)

    def repeat(self, t):
        batch, _, length, dim = t.shape
        rep = self.heads // self.kv_heads
        return t[:, :, None].expand(batch, self.kv_heads, rep, length, dim).reshape(batch, self.heads, length, dim)

    def forward(self, x):
        batch, length, width = x.shape
        q = self.q(x).view(batch, length, self.heads, self.dim).transpose(1, 2)
        k, v = (proj(x).view(batch, length, self.kv_heads, self.dim).transpose(1, 2) for proj in (self.k, self.v))
        o = torch.nn.functional.scaled_dot_product_attention(q, self.repeat(torch.tanh(k)), self.repeat(v))
        return self.out(o.transpose(1, 2).reshape(batch, length, width)[:, -1])


def test_repeated_values_are_rebuilt_from_their_first_copy():
    """v projected, viewed, transposed, unsqueezed, expanded and copied per head: the projection's
    output is the first copy of the kept value, put back through those nodes (7 deep)."""
    torch.manual_seed(0)
    model = RepeatedValues().to(DT).eval()
    x, t = torch.randn(2, 5, 8, dtype=DT), torch.tensor([0, 2])
    assert ("MmBackward0", "routed") in _output_kinds(model, x)  # v has no bias: an mm
    for store in (True, False):
        torch.testing.assert_close(run(model, x, t, store=store), run(model, x, t, store=store, kinds=("routed",)),
                                   rtol=1e-12, atol=1e-14)


class CachedAttention(nn.Module):
    """Keys and values appended to a key/value cache before attention, as Hugging Face's
    ``DynamicCache.update`` does: ``cat`` of the untracked past (empty on the first call) and the new."""

    def __init__(self, width: int = 8, heads: int = 2, past: int = 0) -> None:
        super().__init__()
        self.heads, self.dim, self.past = heads, width // heads, past
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = (proj(x).view(batch, length, self.heads, self.dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        generator = torch.Generator().manual_seed(7)
        past_k, past_v = (torch.randn(batch, self.heads, self.past, self.dim, dtype=x.dtype, generator=generator)
                          for _ in range(2))
        k, v = torch.cat((past_k, k), dim=-2), torch.cat((past_v, v), dim=-2)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(batch, length, width)[:, -1])


@pytest.mark.parametrize("past", [0, 3], ids=["empty_cache", "filled_cache"])
def test_outputs_behind_a_key_value_cache_are_rebuilt_by_routing(past):
    """k and v projected, transposed and appended to a cache: attention keeps the cat's result, and
    each projection's output is rebuilt from its slice of it instead of recomputed."""
    torch.manual_seed(0)
    model = CachedAttention(past=past).to(DT).eval()
    x, t = torch.randn(2, 5, 8, dtype=DT), torch.tensor([0, 2])
    kinds = _output_kinds(model, x)
    assert kinds.count(("AddmmBackward0", "routed")) == 1 and ("MmBackward0", "routed") in kinds  # k and v
    for store in (True, False):
        torch.testing.assert_close(run(model, x, t, store=store), run(model, x, t, store=store, kinds=("routed",)),
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("first", [True, False])
def test_cat_inverse_is_the_tracked_slice(first):
    x = torch.randn(2, 3, 4, dtype=DT, requires_grad=True)
    constant = torch.randn(2, 5, 4, dtype=DT)
    y = torch.cat((x, constant) if first else (constant, x), dim=1)
    rebuilt = ROUTING["CatBackward0"].inverse(y.grad_fn, [y.detach()])
    assert rebuilt.shape == x.shape and torch.equal(rebuilt, x.detach())


def test_expand_inverse_is_the_first_copy():
    x = torch.randn(2, 1, 3, dtype=DT, requires_grad=True)
    y = x.expand(4, 2, 5, 3)
    rebuilt = ROUTING["ExpandBackward0"].inverse(y.grad_fn, [y.detach()])
    assert rebuilt.shape == x.shape and torch.equal(rebuilt, x.detach())


def test_rebuild_by_routing_needs_every_part():
    """v goes through tanh, which keeps its result: the split cannot be inverted, the output is recomputed."""
    model = SplitAttention(contiguous=True, squash_value=True).to(DT).eval()
    kinds = [kind for name, kind in _output_kinds(model, torch.randn(2, 5, 8, dtype=DT)) if name == "AddmmBackward0"]
    assert kinds == ["root", None]  # the head explains the output; the projection recomputes its own


def test_output_from_storage_rebuilds_exactly_or_declines():
    from captum_dynamiclrp.engine.walker import output_from_storage

    a, w = torch.randn(6, 4, dtype=DT, requires_grad=True), torch.randn(4, 9, dtype=DT)
    z = a @ w
    view = z.view(2, 3, 9).split(3, dim=-1)[1].transpose(0, 1)
    rebuilt = output_from_storage(view.detach(), z.grad_fn)
    assert rebuilt is not None and torch.equal(rebuilt, z.detach()) and rebuilt.stride() == z.stride()
    assert output_from_storage(view.detach().float(), z.grad_fn) is None  # another dtype
    assert output_from_storage(view.detach().clone(), z.grad_fn) is None  # a copy: storage of another size
    z.detach()[0, 0] += 1.0  # an in-place write, seen by the shared version counter
    assert output_from_storage(view.detach(), z.grad_fn) is None


# ------------------------------------------------------------------ relevance divided in its own buffer


def small_in_place_threshold(monkeypatch) -> list:
    """Every handed-over relevance is eligible (threshold 1, blocks of 5 elements: several, a short last
    one); returns a list that counts the in-place divisions."""
    monkeypatch.setattr(base, "_IN_PLACE_MIN", 1)
    monkeypatch.setattr(base, "_IN_PLACE_BLOCK", 5)
    count: list = []
    real = base._divide_by_stabilized_
    monkeypatch.setattr(base, "_divide_by_stabilized_", lambda *a: count.append(1) or real(*a))
    return count


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_handed_ratio_divides_in_place_only_where_the_relevance_is_alone(dtype, monkeypatch):
    count = small_in_place_threshold(monkeypatch)
    torch.manual_seed(0)
    z, r = torch.randn(3, 7, dtype=dtype), torch.randn(3, 7, dtype=dtype)
    z[0, :2] = torch.tensor([0.0, -0.0])  # the stabiliser's signed zeros
    expected = ratio(r.clone(), z, 1e-3)
    handed = [r.clone()]
    address = handed[0].data_ptr()
    s = base.handed_ratio(handed, z, 1e-3)
    assert handed == [] and count == [1]
    assert s.data_ptr() == address and torch.equal(s, expected)  # its own buffer, the same bits

    def hand_over(keep):  # the relevance alone in the list, plus what ``keep`` makes of it
        t = r.clone()
        kept = keep(t)
        handed = [t]
        del t
        return handed, kept

    for keep in (lambda t: [t], lambda t: t.view(-1), lambda t: t[:1]):  # another reference, a view of it, of part
        handed, kept = hand_over(keep)
        s = base.handed_ratio(handed, z, 1e-3)
        assert torch.equal(s, expected) and count == [1]
        seen = kept[0] if isinstance(kept, list) else kept
        assert torch.equal(seen, r.view(-1) if seen.dim() == 1 else r[: seen.shape[0]])  # untouched
    # Not of z's shape, not contiguous, another dtype: the plain ratio.
    for handed, other_z in (([r.clone()[:, :1]], z[:, :1]), ([r.clone().t()], z.t()), ([r.clone().double()], z.float())):
        base.handed_ratio(handed, other_z, 1e-3)
    assert count == [1]


class CaptureBlock(nn.Module):
    """ConvBlock that also hands out the first convolution's output, to request its relevance."""

    def __init__(self) -> None:
        super().__init__()
        self.block = ConvBlock()

    def forward(self, x):
        b = self.block
        c1 = b.conv1(x)
        h = torch.relu(x + b.bn2(b.conv2(torch.relu(b.bn1(c1)))))
        return b.head(h.flatten(1)), c1


def test_relevance_divided_in_place_gives_the_bits_of_the_plain_walk(monkeypatch):
    """With every handed-over relevance eligible, the walk writes ratios into the relevance's buffer
    wherever it is alone, and gives bit for bit what it gives without that. Written in place: on
    convolutions with batch norm and a residual sum, and pre-norm residual blocks. Kept intact where
    something else holds it: a requested intermediate (the results hold its relevance while its
    producer's rule runs), a seed that is the output itself (target None: it shares the output's
    storage, which the convergence delta reads afterwards), relevance that is a view (fused attention
    behind reshapes)."""
    torch.manual_seed(0)
    block = ConvBlock().to(DT).eval()
    for bn in (block.bn1, block.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x_block = torch.randn(2, 4, 5, 5, dtype=DT)
    in_place = [(block, x_block, 1), (ResidualStream().to(DT).eval(), torch.randn(3, 8, dtype=DT), torch.tensor([0, 2, 1]))]
    kept = [
        (SplitAttention().to(DT).eval(), torch.randn(2, 5, 8, dtype=DT), 2),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(36, 1)).to(DT).eval(), torch.randn(2, 3, 5, 5, dtype=DT), None),
    ]
    capture = CaptureBlock().to(DT).eval()
    capture.block.load_state_dict(block.state_dict())

    def attribute(model, x, t):
        return DynamicLRP(model).attribute(x, target=t, return_convergence_delta=True)

    def requested() -> tuple:
        x = x_block.clone().requires_grad_(True)
        out, c1 = capture(x)
        seed = torch.zeros_like(out)
        seed[:, 1] = out[:, 1].detach()
        return Engine().relevance(out, (x, c1), seed)

    plain = [attribute(*case) for case in in_place + kept]
    plain_requested = requested()
    count = small_in_place_threshold(monkeypatch)
    for index, (case, (expected, delta)) in enumerate(zip(in_place + kept, plain)):
        before = len(count)
        got, got_delta = attribute(*case)
        assert torch.equal(got, expected) and torch.equal(got_delta, delta)
        assert (len(count) > before) == (index < len(in_place))  # not vacuous: some ratio was written in place
    before = len(count)
    for got, expected in zip(requested(), plain_requested):
        assert torch.equal(got, expected)
    assert len(count) > before  # the second convolution's
    monkeypatch.setattr(base, "_LONE", None)  # the switch the comparison relies on
    before = len(count)
    assert torch.equal(attribute(*in_place[0])[0], plain[0][0]) and len(count) == before


# ------------------------------------------------------------------ strided pointwise convolutions

from captum_dynamiclrp.rules import linear as linear_rules  # noqa: E402

STRIDED_POINTWISE = [  # input shape, weight shape, stride, groups
    ((2, 6, 9, 7), (4, 6, 1, 1), [2, 2], 1),
    ((2, 6, 9, 7), (4, 3, 1, 1), [3, 2], 2),  # sizes the stride does not divide; grouped
    ((2, 6, 8, 8), (4, 6, 1, 1), [1, 2], 1),  # a stride in one dimension only
    ((1, 4, 10), (5, 4, 1), [2], 1),
    ((1, 4, 5, 6, 7), (3, 4, 1, 1, 1), [2, 1, 3], 1),
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shapes", STRIDED_POINTWISE, ids=lambda c: f"{len(c[0]) - 2}d-s{c[2]}-g{c[3]}")
def test_strided_pointwise_input_grad_is_that_of_autograd(shapes, channels_last):
    x_shape, w_shape, stride, groups = shapes
    torch.manual_seed(0)
    x, w = torch.randn(*x_shape, dtype=DT), torch.randn(*w_shape, dtype=DT)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    z = nn.functional.conv1d if x.dim() == 3 else nn.functional.conv2d if x.dim() == 4 else nn.functional.conv3d
    out = z(x, w, stride=stride, groups=groups)
    s = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, x, s)
    node = out.grad_fn
    assert linear_rules._is_strided_pointwise(w, list(stride), [0] * len(stride), False)
    got, none = linear_rules.ConvolutionOp().grads(node, s, x.detach(), w, True, False)
    assert none is None and torch.equal(got, expected) and got.stride() == expected.stride()
    _, w_grad = linear_rules.ConvolutionOp().grads(node, s, x.detach(), w, True, True)
    assert torch.equal(w_grad, torch.autograd.grad(z(x, w.requires_grad_(True), stride=stride, groups=groups), w, s)[0])


def test_only_strided_pointwise_convolutions_take_the_scatter():
    w1, w3 = torch.zeros(4, 4, 1, 1), torch.zeros(4, 4, 3, 3)
    assert linear_rules._is_strided_pointwise(w1, [2, 2], [0, 0], False)
    assert not linear_rules._is_strided_pointwise(w1, [1, 1], [0, 0], False)  # no stride: autograd's kernel
    assert not linear_rules._is_strided_pointwise(w1, [2, 2], [1, 1], False)  # padding reads the border
    assert not linear_rules._is_strided_pointwise(w3, [2, 2], [0, 0], False)
    assert not linear_rules._is_strided_pointwise(w1, [2, 2], [0, 0], True)  # transposed


def test_a_weight_much_larger_than_the_gradient_keeps_autograds_kernel(monkeypatch):
    # One 1 x 1 output position against a 64 x 32 weight: the scatter would not pay (see _scatter_pays).
    torch.manual_seed(0)
    x, w = torch.randn(1, 32, 2, 2, dtype=DT, requires_grad=True), torch.randn(64, 32, 1, 1, dtype=DT)
    out = nn.functional.conv2d(x, w, stride=2)
    s = torch.randn_like(out)
    assert linear_rules._is_strided_pointwise(w, [2, 2], [0, 0], False)
    assert not linear_rules._scatter_pays(s, w) and linear_rules._scatter_pays(s.expand(32, -1, -1, -1), w)
    taken: list = []
    real = linear_rules._strided_pointwise_input_grad
    monkeypatch.setattr(linear_rules, "_strided_pointwise_input_grad", lambda *a: taken.append(1) or real(*a))
    got, _ = linear_rules.ConvolutionOp().grads(out.grad_fn, s, x.detach(), w, True, False)
    assert not taken and torch.equal(got, torch.autograd.grad(out, x, s)[0])


class Downsample(nn.Module):
    """A residual block whose shortcut is a strided 1 x 1 convolution with batch norm (ResNet's)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.shortcut = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x)) + self.shortcut(x)).flatten(1))


def test_walk_with_the_scatter_gives_the_walk_without_it(monkeypatch):
    torch.manual_seed(0)
    model = Downsample().to(DT).eval()
    for bn in (model.bn, model.shortcut[1]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x, target = torch.randn(3, 4, 7, 7, dtype=DT), torch.tensor([0, 2, 1])
    taken: list = []
    real = linear_rules._strided_pointwise_input_grad
    monkeypatch.setattr(linear_rules, "_strided_pointwise_input_grad", lambda *a: taken.append(1) or real(*a))
    got = DynamicLRP(model).attribute(x, target=target)
    assert taken  # the shortcut's rule took it
    monkeypatch.setattr(linear_rules, "_is_strided_pointwise", lambda *a: False)
    assert torch.allclose(got, DynamicLRP(model).attribute(x, target=target), rtol=1e-12, atol=1e-14)
