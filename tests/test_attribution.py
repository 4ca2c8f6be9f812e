"""The Captum contract of DynamicLRP, bad input, and models and tensors left untouched."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, NoiseTunnel
from torch import nn

from captum_dynamiclrp import DynamicLRP, DynamicLRPError, Preset, UnsupportedOperationError
from captum_dynamiclrp.rules import RuleContext
from captum_dynamiclrp.rules.base import OpSpec

DT = torch.float64


def mlp(out: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, out)).to(DT).eval()


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 8)
        self.b = nn.Linear(3, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, a, b, mask, scale=1.0):
        return self.out(F.relu(self.a(a) + self.b(b)) * mask) * scale


def test_captum_identity():
    lrp = DynamicLRP(mlp())
    assert lrp.get_name() == "DynamicLRP"
    assert lrp.has_convergence_delta()
    assert lrp.multiplies_by_inputs
    assert hasattr(DynamicLRP.attribute, "__wrapped__")  # captum.log.log_usage, used by NoiseTunnel


def test_tensor_in_tensor_out_and_tuple_in_tuple_out():
    model = mlp()
    x = torch.randn(3, 6, dtype=DT)
    lrp = DynamicLRP(model)
    single = lrp.attribute(x, target=1)
    assert isinstance(single, torch.Tensor) and single.shape == x.shape
    as_tuple = lrp.attribute((x,), target=1)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], single)


def test_multiple_inputs_and_additional_forward_args():
    model = TwoInputs().to(DT).eval()
    a, b = torch.randn(2, 5, dtype=DT), torch.randn(2, 3, dtype=DT)
    mask = (torch.rand(2, 8) > 0.3).to(DT)
    lrp = DynamicLRP(model)
    (ra, rb), delta = lrp.attribute((a, b), target=2, additional_forward_args=(mask, 2.0),
                                    return_convergence_delta=True)
    assert ra.shape == a.shape and rb.shape == b.shape
    # Delta of the tuple is the sum over both inputs.
    expected = ra.sum(1) + rb.sum(1) - model(a, b, mask, 2.0)[:, 2].detach()
    torch.testing.assert_close(delta, expected)
    torch.testing.assert_close(
        lrp.compute_convergence_delta((ra, rb), (a, b), target=2, additional_forward_args=(mask, 2.0)), delta
    )


@pytest.mark.parametrize(
    "target, rows",
    [
        (2, [2, 2, 2]),
        (torch.tensor(1), [1, 1, 1]),
        (torch.tensor([0, 3, 1]), [0, 3, 1]),
        ([3, 2, 0], [3, 2, 0]),
    ],
    ids=["int", "scalar_tensor", "tensor", "list"],
)
def test_every_target_form_selects_per_example(target, rows):
    model = mlp()
    x = torch.randn(3, 6, dtype=DT)
    lrp = DynamicLRP(model)
    attr = lrp.attribute(x, target=target)
    for i, t in enumerate(rows):
        torch.testing.assert_close(attr[i : i + 1], lrp.attribute(x[i : i + 1], target=t))


def test_tuple_targets_on_three_dimensional_outputs():
    class PerPosition(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x)  # (batch, positions, classes)

    model = PerPosition().to(DT).eval()
    x = torch.randn(2, 5, 4, dtype=DT)
    lrp = DynamicLRP(model, epsilon=1e-12)
    attr = lrp.attribute(x, target=(4, 1))
    # Only position 4 feeds the selected output.
    assert attr[:, :4].abs().max() == 0
    per_row = lrp.attribute(x, target=[(4, 1), (0, 2)])
    assert per_row[0, :4].abs().max() == 0 and per_row[1, 1:].abs().max() == 0


def test_target_none_for_one_score_per_example():
    model = nn.Sequential(nn.Linear(6, 1), nn.Flatten(0)).to(DT)
    x = torch.randn(3, 6, dtype=DT)
    attr, delta = DynamicLRP(model).attribute(x, return_convergence_delta=True)
    assert attr.shape == x.shape and delta.shape == (3,)
    with pytest.raises(ValueError, match="target"):
        DynamicLRP(mlp()).attribute(x)


@pytest.mark.parametrize("target", [4, [0, 9, 1], (0, 1), [0, 1]], ids=["high", "list", "tuple",
                                                                           "short_list"])
def test_target_out_of_range_is_a_clear_error(target, snapshot):
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match="target"):
        DynamicLRP(model).attribute(torch.randn(3, 6, dtype=DT), target=target)
    before.assert_unchanged(model)


def test_integer_inputs_point_to_embeddings(snapshot):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    before = snapshot(model)
    with pytest.raises(TypeError, match="embedding"):
        DynamicLRP(model).attribute(torch.randint(0, 10, (2, 3)), target=0)
    before.assert_unchanged(model)


def test_output_not_connected_to_input(snapshot):
    class Ignores(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(torch.ones_like(x))

    model = Ignores()
    before = snapshot(model)
    with pytest.raises(DynamicLRPError, match="does not depend"):
        DynamicLRP(model).attribute(torch.randn(2, 3), target=0)
    before.assert_unchanged(model)


class Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


class WithCustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(Cube.apply(self.inner(x)))


def test_unsupported_op_names_op_and_module(snapshot):
    model = WithCustomOp()
    before = snapshot(model)
    with pytest.raises(UnsupportedOperationError) as info:
        DynamicLRP(model).attribute(torch.randn(2, 4), target=1)
    assert info.value.node_type == "CubeBackward"
    assert "CubeBackward" in str(info.value)
    assert info.value.module_path == "WithCustomOp"
    before.assert_unchanged(model)


def test_unsupported_op_inside_submodule_names_the_submodule():
    class Wrapper(nn.Module):
        def forward(self, x):
            return Cube.apply(x)

    model = nn.Sequential(nn.Linear(4, 4), Wrapper(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedOperationError) as info:
        DynamicLRP(model).attribute(torch.randn(2, 4), target=1)
    assert info.value.module_path == "1"


def test_fallback_is_opt_in_and_reported():
    model = WithCustomOp()
    lrp = DynamicLRP(model, fallback=True)
    attr = lrp.attribute(torch.randn(2, 4), target=1)
    assert torch.isfinite(attr).all()
    assert lrp.last_fallback_ops == ["CubeBackward"]


def test_per_op_override_replaces_a_rule():
    seen = []

    def halve(ctx: RuleContext):
        seen.append(type(ctx.node).__name__)
        return (ctx.out * 0.5,)

    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False)).to(DT)
    x = torch.randn(2, 4, dtype=DT)
    plain = DynamicLRP(model).attribute(x, target=0)
    halved = DynamicLRP(model, rules={"ReluBackward0": OpSpec(family="custom", rule=halve)}).attribute(x, target=0)
    assert seen == ["ReluBackward0"]
    torch.testing.assert_close(halved, plain * 0.5)
    custom = Preset("mine", linear="zplus", epsilon=1e-3)
    assert DynamicLRP(model, rules=custom).preset.linear == "zplus"


def test_bad_preset_names():
    with pytest.raises(ValueError, match="unknown preset"):
        DynamicLRP(mlp(), rules="alphabeta")
    with pytest.raises(ValueError, match="linear rule"):
        Preset("x", linear="nope")


def test_ig_keywords_are_accepted_and_ignored_unknown_rejected():
    model = mlp()
    x = torch.randn(2, 6, dtype=DT)
    lrp = DynamicLRP(model)
    plain = lrp.attribute(x, target=0)
    swapped = lrp.attribute(x, baselines=torch.zeros_like(x), target=0, n_steps=50, method="gausslegendre",
                            internal_batch_size=2)
    torch.testing.assert_close(swapped, plain)
    with pytest.raises(TypeError, match="unexpected"):
        lrp.attribute(x, target=0, nsteps=3)


def test_same_pipeline_with_integrated_gradients_and_dynamiclrp():
    model = mlp()
    x = torch.randn(2, 6, dtype=DT)
    results = {}
    for method_cls in (IntegratedGradients, DynamicLRP):
        method = method_cls(model)
        attr, delta = method.attribute(x, target=1, return_convergence_delta=True)
        results[method_cls.__name__] = (attr, delta)
        assert attr.shape == x.shape and delta.shape == (2,)


def test_noise_tunnel_wraps_dynamiclrp():
    model = mlp()
    x = torch.randn(2, 6, dtype=DT)
    nt = NoiseTunnel(DynamicLRP(model))
    attr = nt.attribute(x, nt_type="smoothgrad", nt_samples=3, stdevs=0.1, target=0)
    assert attr.shape == x.shape and torch.isfinite(attr).all()


def test_works_under_no_grad_and_leaves_inputs_alone():
    model = mlp()
    x = torch.randn(3, 6, dtype=DT)
    x_before = x.clone()
    expected = DynamicLRP(model).attribute(x, target=0)
    with torch.no_grad():
        attr = DynamicLRP(model).attribute(x, target=0)
    torch.testing.assert_close(attr, expected)
    assert torch.equal(x, x_before) and not x.requires_grad and x.grad is None
    y = torch.randn(3, 6, dtype=DT, requires_grad=True)
    DynamicLRP(model).attribute(y, target=0)
    assert y.requires_grad and y.grad is None


def test_model_is_bit_identical_after_the_call(snapshot):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    model.eval()
    model[0].weight.requires_grad_(False)
    before = snapshot(model)
    DynamicLRP(model).attribute(torch.randn(2, 3, 6, 6), target=1)
    before.assert_unchanged(model)


def test_frozen_parameters_give_the_same_relevance_as_trainable_ones(snapshot):
    trainable = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.Flatten(),
                              nn.Linear(4 * 4 * 4, 3)).to(DT).eval()
    x = torch.randn(2, 3, 6, 6, dtype=DT)
    expected = DynamicLRP(trainable).attribute(x, target=1)
    trainable.requires_grad_(False)
    before = snapshot(trainable)
    torch.testing.assert_close(DynamicLRP(trainable).attribute(x, target=1), expected)
    before.assert_unchanged(trainable)


def test_training_mode_warns_and_leaves_statistics_alone(snapshot):
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.2), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    before = snapshot(model)
    with pytest.warns(UserWarning, match="training mode"):
        attr = DynamicLRP(model).attribute(torch.randn(4, 6), target=0)
    assert torch.isfinite(attr).all()
    before.assert_unchanged(model)


def test_eval_mode_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DynamicLRP(mlp()).attribute(torch.randn(2, 6, dtype=DT), target=0)


def test_model_returning_a_tuple_gets_a_clear_error():
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x), x

    with pytest.raises(TypeError, match="logits"):
        DynamicLRP(Pair()).attribute(torch.randn(2, 3), target=0)


def test_plain_function_as_forward_func():
    weight = torch.randn(6, 3, dtype=DT)
    x = torch.randn(2, 6, dtype=DT)
    attr = DynamicLRP(lambda inp: inp @ weight).attribute(x, target=2)
    torch.testing.assert_close(attr, x * weight[:, 2], rtol=1e-5, atol=1e-8)
