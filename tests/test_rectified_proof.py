"""The planner's proof that relevance vanishes where a ReLU cut its input (``relevance_vanishes_where_rectified``).

Where it holds, a rule reads its own output ``z`` from the ReLU's kept ``max(z, 0)`` with no check
when run (``RuleContext.rectified_vanishes``), also in batch norm and sums. Where it does not, the
check of ``ratio_given_rectified`` decides as before. Either way the relevance is that of
recomputing ``z``, up to rounding of ``z`` itself.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_dynamiclrp import DynamicLRP
from captum_dynamiclrp.engine import build_graph
from captum_dynamiclrp.engine.plan import PROPAGATE
from captum_dynamiclrp.engine import walker
from captum_dynamiclrp.engine.walker import build_plan
from captum_dynamiclrp.rules import RULE_TABLE
from captum_dynamiclrp.rules import base

from .test_performance_paths import run

DT = torch.float64


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN, a residual sum and a ReLU: the ResNet pattern."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def small_cnn() -> nn.Module:
    """Stem conv-BN-ReLU, a max pool, two residual blocks, a conv-ReLU-max-pool, average pool, head."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        Block(), Block(),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    ).to(DT).eval()
    for module in model.modules():  # statistics and shifts that put many units below zero
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.uniform_(-0.5, 0.2)
    return model


def rectified_sources(model: nn.Module, x: torch.Tensor) -> dict[str, list[bool]]:
    """Per node type, the ``proven`` flag of each ``("rectified", ...)`` output source in the plan."""
    leaf = x.clone().requires_grad_(True)
    graph = build_graph(model(leaf).grad_fn, (leaf,))
    found: dict[str, list[bool]] = {}
    for step in build_plan(graph, RULE_TABLE).steps:
        if step[0] == PROPAGATE and step[6] is not None and step[6][0] == "rectified":
            found.setdefault(graph.types[step[1]], []).append(step[6][3])
    return found


def test_cnn_patterns_are_proven():
    model, x = small_cnn(), torch.randn(2, 3, 8, 8, dtype=DT)
    found = rectified_sources(model, x)
    # stem BN and each block's first BN (-> ReLU -> conv / max pool), both residual sums
    # (-> ReLU -> next block / conv), the last conv (-> ReLU -> max pool -> average pool)
    assert found == {
        "NativeBatchNormBackward0": [True] * 3,
        "AddBackward0": [True] * 2,
        "ConvolutionBackward0": [True],
    }


def test_proven_sources_give_the_recomputed_result_and_skip_the_check(monkeypatch):
    model = small_cnn()
    x, t = torch.randn(3, 3, 8, 8, dtype=DT), torch.tensor([0, 3, 4])
    recomputed = run(model, x, t, store=True, kinds=("rectified",))

    def no_check(relevance, rectified):
        raise AssertionError("a proven source must not be checked when run")

    monkeypatch.setattr(base, "_vanishes_where_zero", no_check)
    proven = run(model, x, t, store=True)
    # the forward's own z (native batch norm, the sum) against a recomputed one: rounding apart
    torch.testing.assert_close(proven, recomputed, rtol=1e-10, atol=1e-12)
    assert recomputed.abs().sum() > 0


def test_max_pool_over_cut_windows_is_exact():
    """Windows whose every unit the ReLU cut: the pool's winner has value 0 and gets no relevance."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 4)).to(DT).eval()
    model[0].bias.data.fill_(-1.5)  # most units below zero: many windows are all zero
    x, t = torch.randn(4, 2, 8, 8, dtype=DT), torch.tensor([0, 1, 2, 3])
    pooled = model[:3](x)
    assert (pooled == 0).any() and (pooled > 0).any()
    assert rectified_sources(model, x) == {"ConvolutionBackward0": [True]}
    torch.testing.assert_close(run(model, x, t, store=True), run(model, x, t, store=True, kinds=("rectified",)),
                               rtol=1e-10, atol=1e-12)


class TwoReaders(nn.Module):
    """The linear output feeds the ReLU and, beside it, a sigmoid: relevance reaches z past the ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        z = self.inner(x)
        return self.head(torch.relu(z) + torch.sigmoid(z))


class ReluIntoSigmoid(nn.Module):
    """The ReLU's result goes into a sigmoid (identity rule), which hands relevance to cut units."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.sigmoid(torch.relu(self.inner(x))))


class ReluIsTheOutput(nn.Module):
    """The explained output is the ReLU itself: the seed arrives there."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 3)

    def forward(self, x):
        return torch.relu(self.inner(x))


@pytest.mark.parametrize("model_type", [TwoReaders, ReluIntoSigmoid, ReluIsTheOutput])
def test_proof_declines_where_relevance_may_reach_cut_units(model_type):
    torch.manual_seed(2)
    model = model_type().to(DT).eval()
    x, t = torch.randn(5, 6, dtype=DT), torch.tensor([0, 1, 2, 0, 1])
    found = rectified_sources(model, x)
    assert found and not any(flag for flags in found.values() for flag in flags)
    # the check decides when run: the same relevance as recomputing z
    torch.testing.assert_close(run(model, x, t, store=True), run(model, x, t, store=True, kinds=("rectified",)),
                               rtol=1e-10, atol=1e-12)


def test_skipping_the_check_there_would_be_wrong(monkeypatch):
    """The case the proof refuses: forced, the rule divides the cut units' relevance by eps."""
    torch.manual_seed(2)
    model = ReluIntoSigmoid().to(DT).eval()
    x, t = torch.randn(5, 6, dtype=DT), torch.tensor([0, 1, 2, 0, 1])
    assert (model.inner(x) < 0).any()
    right = run(model, x, t, store=True)
    monkeypatch.setattr(walker, "relevance_vanishes_where_rectified", lambda *args: True)
    forced = run(model, x, t, store=True)
    assert (forced - right).abs().max() > 1e3 * right.abs().max()


def test_batch_equals_per_example_with_proven_sources():
    model = small_cnn()
    x, t = torch.randn(3, 3, 8, 8, dtype=DT), torch.tensor([1, 0, 4])
    method = DynamicLRP(model)
    batch = method.attribute(x, target=t)
    single = torch.cat([method.attribute(x[i:i + 1], target=int(t[i])) for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=1e-9, atol=1e-12)


def test_ratio_from_a_rectified_value_in_two_passes_keeps_the_bits():
    """stab(y) = y + eps for y >= 0: the bits of ``ratio`` where y > 0, a signed zero at y = -0."""
    y = torch.tensor([[2.5, 0.0, -0.0, 1e-9, 3.0]], dtype=torch.bfloat16)
    r = torch.tensor([[0.3, 0.0, 0.0, -1.0, 2.0]], dtype=torch.float32)
    got = base.ratio_given_rectified(r, y, 1e-6, vanishes=True)
    assert got.dtype == torch.float32 and y.dtype == torch.bfloat16  # y is read, never written
    assert torch.equal(got, base.ratio(r, y.float(), 1e-6))  # -0 == +0 for torch.equal
    for dtype in (torch.float32, torch.float64):
        z = torch.randn(64, dtype=dtype)
        rr = torch.where(z > 0, torch.randn(64, dtype=dtype), 0.0)
        exact = base.ratio(rr, z, 1e-6)
        given = base.ratio_given_rectified(rr, z.clamp(min=0), 1e-6)
        positive = z > 0
        assert torch.equal(given[positive], exact[positive]) and torch.equal(given[~positive], exact[~positive])
