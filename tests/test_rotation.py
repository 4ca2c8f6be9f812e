"""Rotated operands (``engine/rotation.py``): q and k solved for from the rotary embedding's kept
output instead of replaying their projections.

Oracles: the independent reference engine (no promises, every value recorded), the same plan with
the solve turned off (it then replays), and the solve itself against the forward's value.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_dynamiclrp import DynamicLRP
from captum_dynamiclrp.engine import build_graph, rotation, walker
from captum_dynamiclrp.engine.plan import REPLAY, UNROTATE
from captum_dynamiclrp.engine.walker import build_plan
from captum_dynamiclrp.rules import RULE_TABLE

from .test_performance_paths import run
from .test_reference_engine import compare, leaf, one_hot_seed

DT = torch.float64


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(positions: int, dim: int, dtype=DT):
    """Cosines and sines as Hugging Face's rotary embedding makes them: (1, 1, positions, dim)."""
    inverse = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=dtype) / dim))
    angles = torch.arange(positions, dtype=dtype)[:, None] * inverse[None]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos()[None, None], angles.sin()[None, None]


class Rotary(nn.Module):
    """q (no bias) and k (bias) projections, split into heads and rotated; their product feeds a head.

    ``constants`` replaces the cosines and sines (a singular "rotation" must make the engine replay);
    ``cos_first`` writes ``cos * q`` instead of ``q * cos``.
    """

    def __init__(self, width: int = 8, heads: int = 2, constants=None, cos_first: bool = False) -> None:
        super().__init__()
        self.heads, self.constants, self.cos_first = heads, constants, cos_first
        self.q, self.k = nn.Linear(width, width, bias=False), nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def embed(self, x, cos, sin):
        return (cos * x if self.cos_first else x * cos) + rotate_half(x) * sin

    def forward(self, x):
        b, t, w = x.shape
        d = w // self.heads
        cos, sin = self.constants if self.constants is not None else rotary(t, d, x.dtype)
        q = self.embed(self.q(x).view(b, t, self.heads, d).transpose(1, 2), cos, sin)
        k = self.embed(self.k(x).view(b, t, self.heads, d).transpose(1, 2), cos, sin)
        return self.head((q * k).transpose(1, 2).reshape(b, t, w))[:, -1]


def plan_of(model, x) -> tuple:
    leaf_x = x.detach().clone().requires_grad_(True)
    graph = build_graph(model(leaf_x).grad_fn, (leaf_x,))
    plan = build_plan(graph, RULE_TABLE)
    replayed = [graph.types[s[1]] for s in plan.steps if s[0] == REPLAY]
    return plan.count(UNROTATE), replayed


def solve_off(monkeypatch):
    monkeypatch.setattr(walker, "unrotate", lambda *args, **kwargs: None)


@pytest.mark.parametrize("cos_first", [False, True])
def test_rotated_projections_are_solved_for_and_match_the_reference(cos_first):
    torch.manual_seed(0)
    model = Rotary(cos_first=cos_first).to(DT).eval()
    x = leaf(2, 5, 8)
    count, replayed = plan_of(model, x)
    assert count == 2  # q and k
    assert not {"MmBackward0", "AddmmBackward0"} & set(replayed)  # no projection replayed
    compare(lambda: model(x), lambda r: (x,), one_hot_seed([0, 2]))


def test_same_relevance_as_replaying(monkeypatch):
    torch.manual_seed(1)
    model = Rotary().to(DT).eval()
    x = torch.randn(3, 6, 8, dtype=DT)
    solved = DynamicLRP(model).attribute(x, target=1)
    solve_off(monkeypatch)
    replayed = DynamicLRP(model).attribute(x, target=1)
    torch.testing.assert_close(solved, replayed, rtol=1e-10, atol=1e-12)
    model32 = Rotary().eval()
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    replayed32 = DynamicLRP(model32).attribute(x.float(), target=1)
    monkeypatch.undo()
    solved32 = DynamicLRP(model32).attribute(x.float(), target=1)
    torch.testing.assert_close(solved32, replayed32, rtol=1e-4, atol=1e-5 * replayed32.abs().max().item())


def test_unrotate_inverts_the_embedding():
    torch.manual_seed(2)
    u = torch.randn(2, 3, 7, 16, dtype=DT)
    cos, sin = rotary(7, 16)
    out = u * cos + rotate_half(u) * sin
    torch.testing.assert_close(rotation.unrotate(out, cos, sin, 8), u, rtol=0, atol=1e-14)
    # Any well-conditioned constants, not only a rotation: the 2x2 system per pair is solved exactly.
    c, s = torch.rand(1, 1, 7, 16, dtype=DT) + 1.0, 0.3 * torch.rand(1, 1, 7, 16, dtype=DT)
    torch.testing.assert_close(rotation.unrotate(u * c + rotate_half(u) * s, c, s, 8), u, rtol=1e-12, atol=1e-12)
    ones = torch.ones(1, 1, 7, 16, dtype=DT)
    singular = torch.cat((ones[..., :8], -ones[..., 8:]), -1)  # D = c_lo c_hi + s_lo s_hi = 1 - 1 = 0
    assert rotation.unrotate(out, ones, singular, 8) is None
    assert rotation.unrotate(out.to(torch.bfloat16), cos, sin, 8) is None  # too coarse: replay instead


def test_layers_sharing_constants_solve_the_system_once_per_call(monkeypatch):
    """q and k of every layer read one cosine and sine table: the 2x2 system is solved once per call
    (in each call anew), and the relevance is bit for bit that of solving it at every rotation."""

    class TwoLayers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            table = rotary(5, 4)  # one table for both layers, as a model computes it once per forward
            self.first, self.second = Rotary(constants=table), Rotary(constants=table)
            self.mix = nn.Linear(3, 8)

        def forward(self, x):
            return self.second(torch.tanh(self.mix(self.first(x))).unsqueeze(1).expand(-1, x.shape[1], -1) + x)

    torch.manual_seed(6)
    model = TwoLayers().to(DT).eval()
    x = torch.randn(2, 5, 8, dtype=DT)
    solves = []
    real = rotation._coefficients
    monkeypatch.setattr(rotation, "_coefficients", lambda *a: solves.append(1) or real(*a))
    lrp = DynamicLRP(model)
    shared = lrp.attribute(x, target=1)
    assert lrp.engine.last_run.plan.count(UNROTATE) == 4  # q and k of both layers
    assert len(solves) == 1
    lrp.attribute(x, target=1)
    assert len(solves) == 2  # solved again in the next call: nothing is kept between calls
    unshared_unrotate = rotation.unrotate
    monkeypatch.setattr(walker, "unrotate", lambda out, c, s, half, solved: unshared_unrotate(out, c, s, half))
    assert torch.equal(DynamicLRP(model).attribute(x, target=1), shared)
    assert len(solves) == 2 + 4


def test_singular_constants_fall_back_to_the_replay():
    torch.manual_seed(3)
    ones = torch.ones(1, 1, 5, 4, dtype=DT)
    model = Rotary(constants=(ones, torch.cat((ones[..., :2], -ones[..., 2:]), -1))).to(DT).eval()
    x = leaf(2, 5, 8)
    assert plan_of(model, x)[0] == 2  # planned: the constants are only seen when run
    compare(lambda: model(x), lambda r: (x,), one_hot_seed([1, 0]))


def test_partial_rotation_is_not_matched():
    """Only part of the head rotated (GPT-NeoX's rotary_pct): not the pattern, so the projections replay."""

    class Partial(Rotary):
        def embed(self, x, cos, sin):
            r = x[..., :2]
            return torch.cat((r * cos[..., :2] + rotate_half(r) * sin[..., :2], x[..., 2:]), dim=-1)

    torch.manual_seed(4)
    model = Partial().to(DT).eval()
    x = leaf(2, 5, 8)
    count, _ = plan_of(model, x)
    assert count == 0
    compare(lambda: model(x), lambda r: (x,), one_hot_seed([2, 2]))


def test_batch_equals_per_example_and_saved_tensors_freed_after_the_solve():
    torch.manual_seed(5)
    model = Rotary().to(DT).eval()
    x = torch.randn(3, 5, 8, dtype=DT)
    lrp = DynamicLRP(model)
    batch = lrp.attribute(x, target=torch.tensor([0, 1, 2]))
    for i in range(3):
        torch.testing.assert_close(batch[i : i + 1], lrp.attribute(x[i : i + 1], target=i), rtol=1e-10, atol=1e-12)
    # The walk frees saved tensors after their last reader; the solve reads attention's kept q and k.
    t = torch.tensor([0, 1, 2])
    assert torch.equal(run(model, x, t, store=True), run(model, x, t, store=False))


class CachedLastTokenLogits(nn.Module):
    """Last-position logits of a causal LM called as Hugging Face's default does: with its key/value cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds):
        return self.model(inputs_embeds=inputs_embeds, use_cache=True).logits[:, -1, :]


def test_hf_llama_with_its_key_value_cache_replays_no_projection():
    """``use_cache=True`` puts a ``cat`` with the (empty) past between each rotated k (and each v) and
    attention. The projections' outputs are still solved for or rebuilt, not replayed, and the
    relevance is that of ``use_cache=False``."""
    pytest.importorskip("transformers")
    from captum_dynamiclrp.modules import parameters_tracked

    from .zoo import ZOO

    case = ZOO["llama3.2-sdpa"]()
    (x,) = case.inputs
    cached = CachedLastTokenLogits(case.model)
    leaf = x.detach().clone().requires_grad_(True)
    with parameters_tracked(cached):  # as DynamicLRP runs the forward
        graph = build_graph(cached(leaf).grad_fn, (leaf,))
    plan = build_plan(graph, RULE_TABLE)
    assert graph.types.count("CatBackward0") >= 4  # k and v of both layers: the test is not vacuous
    replayed = {graph.types[s[1]] for s in plan.steps if s[0] == REPLAY}
    assert not {"MmBackward0", "AddmmBackward0"} & replayed
    assert plan.count(UNROTATE) == 2 * 2  # q and k of both layers
    with_cache = DynamicLRP(cached).attribute(x, target=case.target)
    without_cache = DynamicLRP(case.forward).attribute(x, target=case.target)
    torch.testing.assert_close(with_cache, without_cache, rtol=1e-4, atol=1e-6 * without_cache.abs().max().item())
