"""Batch-norm merging (``batch_norm="merge"``): LRP on the network with each batch norm folded into its convolution.

The oracle is the canonized network itself, built here by hand: every (convolution, batch norm) pair is replaced
by one convolution with weights ``a W`` and bias ``a b + c`` (``a = w / sqrt(var + eps)``, ``c = beta - mean a``)
and the batch norm by the identity. DynamicLRP's default rules on that network must equal its merged rules on the
original one, for every linear preset; the engine never sees the canonized modules' origin.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from captum.attr import InputXGradient
from torch import nn

from captum_dynamiclrp import DynamicLRP
from captum_dynamiclrp.engine import Engine
from captum_dynamiclrp.engine.plan import PROPAGATE
from captum_dynamiclrp.rules.base import MERGED_AFFINE, RuleSettings

DTYPE = torch.float64


def randomize_batch_norms_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Statistics and affine parameters far from the identity, so that merging matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                shape = module.running_mean.shape
                module.running_mean.copy_(torch.rand(shape, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(shape, generator=generator) * 1.5 + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                    module.bias.copy_((torch.rand(shape, generator=generator) - 0.5) * 0.4)
    return model


def merged_convolution(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One convolution computing ``bn(conv(x))`` in eval mode."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0)
    merged = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        conv.groups, bias=True,
    ).to(conv.weight.dtype)
    with torch.no_grad():
        merged.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        merged.bias.copy_(shift + (scale * conv.bias if conv.bias is not None else 0))
    return merged.eval()


def canonized_resnet(model: torchvision.models.ResNet) -> torchvision.models.ResNet:
    canon = copy.deepcopy(model)
    canon.conv1, canon.bn1 = merged_convolution(canon.conv1, canon.bn1), nn.Identity()
    for layer in (canon.layer1, canon.layer2, canon.layer3, canon.layer4):
        for block in layer:
            block.conv1, block.bn1 = merged_convolution(block.conv1, block.bn1), nn.Identity()
            block.conv2, block.bn2 = merged_convolution(block.conv2, block.bn2), nn.Identity()
            if block.downsample is not None:
                block.downsample[0] = merged_convolution(block.downsample[0], block.downsample[1])
                block.downsample[1] = nn.Identity()
    return canon.eval()


class ConvNet(nn.Module):
    """Convolutions with and without bias, batch norms with and without affine parameters, a 1x1 shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, affine=False)
        self.shortcut, self.bn3 = nn.Conv2d(3, 8, 1, bias=True), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)) + self.bn3(self.shortcut(x)))
        return self.head(h.mean((2, 3)))


def canonized_convnet(model: ConvNet) -> ConvNet:
    canon = copy.deepcopy(model)
    canon.conv1, canon.bn1 = merged_convolution(canon.conv1, canon.bn1), nn.Identity()
    canon.conv2, canon.bn2 = merged_convolution(canon.conv2, canon.bn2), nn.Identity()
    canon.shortcut, canon.bn3 = merged_convolution(canon.shortcut, canon.bn3), nn.Identity()
    return canon.eval()


def make_resnet() -> torchvision.models.ResNet:
    torch.manual_seed(0)
    return randomize_batch_norms_(torchvision.models.resnet18(weights=None, num_classes=10)).to(DTYPE).eval()


def make_convnet() -> ConvNet:
    torch.manual_seed(0)
    model = randomize_batch_norms_(ConvNet())
    with torch.no_grad():
        model.bn1.weight[0] = 0.0  # a switched-off channel (pruning, zero-initialised residual branches)
    return model.to(DTYPE).eval()


MODELS = {"resnet18": (make_resnet, canonized_resnet, (2, 3, 32, 32)), "convnet": (make_convnet, canonized_convnet, (2, 3, 12, 12))}


def merged_steps(lrp: DynamicLRP) -> tuple[int, int]:
    """(convolution steps that merged a batch norm, batch-norm steps that hand relevance on)."""
    steps = [s for s in lrp.engine.last_run.plan.steps if s[0] == PROPAGATE]
    return sum(1 for s in steps if s[8] is not None), sum(1 for s in steps if s[2] is MERGED_AFFINE)


@pytest.mark.parametrize("rules", ["epsilon", "gamma", "zplus"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_merged_batch_norm_equals_lrp_on_the_canonized_network(name, rules):
    make, canonize, shape = MODELS[name]
    model = make()
    canon = canonize(model)
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=DTYPE)
    target = torch.tensor([3, 1])
    torch.testing.assert_close(canon(x), model(x), rtol=1e-12, atol=1e-12)  # the oracle is the same function
    lrp = DynamicLRP(model, rules=rules, batch_norm="merge")
    merged = lrp.attribute(x, target=target)
    expected = DynamicLRP(canon, rules=rules).attribute(x, target=target)
    torch.testing.assert_close(merged, expected, rtol=1e-9, atol=1e-12)
    batch_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert merged_steps(lrp) == (batch_norms, batch_norms)
    assert torch.equal(lrp.attribute(x, target=target), merged)  # the cached plan gives the same
    # The default keeps batch norm as a layer of its own: a different (not merged) result.
    unmerged = DynamicLRP(model, rules=rules).attribute(x, target=target)
    assert not torch.allclose(unmerged, expected, rtol=1e-6, atol=0)


def test_merged_batch_norm_with_vanishing_epsilon_is_input_times_gradient():
    model = make_resnet()
    torch.manual_seed(2)
    x = torch.randn(3, 3, 32, 32, dtype=DTYPE)
    target = torch.tensor([0, 4, 9])
    merged = DynamicLRP(model, epsilon=1e-12, batch_norm="merge").attribute(x, target=target)
    expected = InputXGradient(model).attribute(x.clone(), target=target)
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-10)


def test_merged_batch_rows_equal_single_examples_and_leave_the_model_untouched():
    model = make_convnet()
    before = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    torch.manual_seed(3)
    x = torch.randn(3, 3, 12, 12, dtype=DTYPE)
    x_before = x.clone()
    target = torch.tensor([0, 2, 4])
    lrp = DynamicLRP(model, batch_norm="merge")
    batch = lrp.attribute(x, target=target)
    for row in range(3):
        single = lrp.attribute(x[row : row + 1], target=target[row : row + 1])
        torch.testing.assert_close(batch[row : row + 1], single, rtol=1e-10, atol=1e-13)
    assert torch.equal(x, x_before)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_batch_norm_is_merged_only_where_it_alone_reads_the_convolution():
    # The convolution's output is read twice (batch norm and a skip): merging would change what the skip
    # gets, so nothing is merged and the result is the default one.
    class TwoReaders(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            z = self.conv(x)
            return self.head((torch.relu(self.bn(z)) + z).mean((2, 3)))

    torch.manual_seed(0)
    model = randomize_batch_norms_(TwoReaders()).to(DTYPE).eval()
    x = torch.randn(2, 3, 6, 6, dtype=DTYPE)
    lrp = DynamicLRP(model, batch_norm="merge")
    merged = lrp.attribute(x, target=1)
    assert merged_steps(lrp) == (0, 0)
    torch.testing.assert_close(merged, DynamicLRP(model).attribute(x, target=1), rtol=0, atol=0)


def test_requested_convolution_output_and_frozen_bias_are_not_merged():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1).to(DTYPE), randomize_batch_norms_(nn.BatchNorm2d(4)).to(DTYPE).eval()
    x = torch.randn(2, 3, 5, 5, dtype=DTYPE, requires_grad=True)
    engine = Engine(RuleSettings(batch_norm="merge"))

    z = conv(x)
    out = torch.relu(bn(z)).sum((1, 2, 3))
    engine.relevance(out, (x, z))  # the convolution's output is requested: its relevance must be its own
    steps = [s for s in engine.last_run.plan.steps if s[0] == PROPAGATE]
    assert all(s[8] is None and s[2] is not MERGED_AFFINE for s in steps)

    bn.bias.requires_grad_(False)  # autograd keeps no trace of a frozen bias: the shift is unknown
    out = torch.relu(bn(conv(x))).sum((1, 2, 3))
    engine.relevance(out, x)
    steps = [s for s in engine.last_run.plan.steps if s[0] == PROPAGATE]
    assert all(s[8] is None and s[2] is not MERGED_AFFINE for s in steps)


def test_unknown_batch_norm_rule_is_an_error():
    with pytest.raises(ValueError, match="batch_norm"):
        DynamicLRP(nn.Linear(2, 2), batch_norm="fuse")
    with pytest.raises(ValueError, match="batch_norm"):
        Engine(RuleSettings(batch_norm="fuse"))
