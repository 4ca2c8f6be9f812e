"""Shared fixtures: float64, seeded randomness, a snapshot to prove models are left untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference stabiliser written independently of the package: z + eps*sign(z), sign(0)=+1."""
    sign = torch.ones_like(z)
    sign[z < 0] = -1.0
    return z + eps * sign


class ModelSnapshot:
    """Everything about a module a call must not change."""

    def __init__(self, model: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.flags = {k: p.requires_grad for k, p in model.named_parameters()}
        self.training = {k: m.training for k, m in model.named_modules()}
        self.hooks = {
            k: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for k, m in model.named_modules()
        }
        self.tree = [k for k, _ in model.named_modules()]
        self.grads = {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}

    def assert_unchanged(self, model: nn.Module) -> None:
        after = ModelSnapshot(model)
        assert after.tree == self.tree
        assert after.flags == self.flags
        assert after.training == self.training
        assert after.hooks == self.hooks
        assert self.state.keys() == after.state.keys()
        for k in self.state:
            assert torch.equal(self.state[k], after.state[k]), f"{k} changed"
        for k in self.grads:
            assert (self.grads[k] is None) == (after.grads[k] is None), f"grad of {k} changed"


@pytest.fixture
def snapshot():
    return ModelSnapshot


def deep_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
