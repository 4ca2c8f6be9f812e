"""Exact oracles: Input x Gradient identity, conservation, bias absorption, batch = per-example."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.attr import InputXGradient
from torch import nn

from captum_dynamiclrp import DynamicLRP

DT = torch.float64


class ResidualCNN(nn.Module):
    """ReLU, conv, max-pool, residual adds, linear; biases optional."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
        self.body = nn.Conv2d(6, 6, 3, padding=1, bias=bias)
        self.body2 = nn.Conv2d(6, 6, 1, bias=bias)
        self.head = nn.Linear(6 * 4 * 4, 8, bias=bias)
        self.out = nn.Linear(8, 5, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = F.relu(h + self.body(h))
        h = F.max_pool2d(h, 2)
        h = h + F.relu(self.body2(h))
        h = F.relu(self.head(h.flatten(1)))
        return self.out(h) + h[:, :5]


class ResidualMLP(nn.Module):
    def __init__(self, bias: bool, depth: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(7, 16, bias=bias)
        self.blocks = nn.ModuleList([nn.Linear(16, 16, bias=bias) for _ in range(depth)])
        self.out = nn.Linear(16, 5, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(x))
        for block in self.blocks:
            h = h + F.relu(block(h))
        return self.out(h)


MODELS = {
    "residual_cnn": (lambda bias: ResidualCNN(bias), (4, 3, 8, 8)),
    "residual_mlp": (lambda bias: ResidualMLP(bias), (4, 7)),
    "plain_mlp": (
        lambda bias: nn.Sequential(nn.Linear(7, 12, bias=bias), nn.ReLU(), nn.Linear(12, 5, bias=bias)),
        (4, 7),
    ),
}
TARGETS = [0, 3, 1, 4]


def build(name: str, bias: bool):
    factory, shape = MODELS[name]
    model = factory(bias).to(DT).eval()
    return model, torch.randn(*shape, dtype=DT)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("bias", [False, True])
def test_epsilon_to_zero_equals_input_x_gradient(name, bias):
    # Classical identity: LRP-0 = Input x Gradient on ReLU networks (biases only shift the delta).
    model, x = build(name, bias)
    ours = DynamicLRP(model, rules="epsilon", epsilon=1e-12).attribute(x, target=TARGETS)
    reference = InputXGradient(model).attribute(x, target=TARGETS)
    torch.testing.assert_close(ours, reference.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("rules", ["epsilon", "zplus", "gamma"])
def test_bias_free_networks_conserve(name, rules):
    model, x = build(name, bias=False)
    attr, delta = DynamicLRP(model, rules=rules, epsilon=1e-12).attribute(
        x, target=TARGETS, return_convergence_delta=True
    )
    logits = model(x).detach()[torch.arange(4), TARGETS]
    assert delta.shape == (4,)
    # zplus/gamma drop relevance only where no positive (resp. same-signed) contribution exists.
    if rules == "epsilon":
        torch.testing.assert_close(delta, torch.zeros_like(delta), atol=1e-9 * logits.abs().max().item() + 1e-12,
                                   rtol=0)
    torch.testing.assert_close(attr.flatten(1).sum(1) - logits, delta)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_delta_equals_relevance_absorbed_by_biases(name):
    # With eps -> 0, relevance at every op output is value * gradient, so a bias b absorbs
    # b * df/db; the delta is minus the total absorbed.
    model, x = build(name, bias=True)
    attr, delta = DynamicLRP(model, epsilon=1e-12).attribute(x, target=TARGETS, return_convergence_delta=True)
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    selected = model(x)[torch.arange(4), TARGETS]
    absorbed = torch.zeros(4, dtype=DT)
    for row in range(4):
        grads = torch.autograd.grad(selected[row], biases, retain_graph=True)
        absorbed[row] = sum((b * g).sum() for b, g in zip(biases, grads)).detach()
    torch.testing.assert_close(delta, -absorbed, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("rules", ["epsilon", "zplus", "gamma"])
def test_batch_equals_per_example(name, rules):
    model, x = build(name, bias=True)
    lrp = DynamicLRP(model, rules=rules)
    batch = lrp.attribute(x, target=TARGETS)
    singles = torch.cat([lrp.attribute(x[i : i + 1], target=TARGETS[i]) for i in range(4)])
    torch.testing.assert_close(batch, singles, rtol=1e-10, atol=1e-12)


def test_batch_norm_resnet_block_batch_equals_per_example():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return F.relu(x + self.bn(self.conv(x)))

    model = nn.Sequential(nn.Conv2d(3, 4, 1), Block(), Block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).to(DT)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(3, 3, 6, 6, dtype=DT)
    lrp = DynamicLRP(model)
    batch, delta = lrp.attribute(x, target=[2, 0, 1], return_convergence_delta=True)
    singles = torch.cat([lrp.attribute(x[i : i + 1], target=t) for i, t in enumerate([2, 0, 1])])
    torch.testing.assert_close(batch, singles, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(delta).all()
