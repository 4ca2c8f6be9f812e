"""Hostile inputs: each gets a clear error, a warning, or a correct result -- never a silent wrong one.

One test (or one parametrised group) per item of the reliability issue: unsupported ops, NaN/inf
in the input or produced by the model, bad targets, outputs that do not depend on the input,
integer / boolean inputs, inputs with and without ``requires_grad``, ``torch.no_grad()`` and
``torch.inference_mode()``, training mode, devices, fp16 / bf16, empty batches, 10,000-layer
graphs, ``torch.compile`` / TorchScript, and ``detach`` inside the forward.

Documented behaviour pinned here:

* a tensor detached inside the forward (or computed under ``torch.no_grad()``) is a *constant*:
  no relevance flows through it, exactly as if it had been passed in from outside; an output that
  reaches the input only through detached tensors raises ``NotConnectedError``;
* the model's own errors (e.g. an fp32 input into an fp16 model) surface unchanged, as in a plain
  forward call.

Every test also checks that the model is left exactly as it was (``snapshot``).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_dynamiclrp import DynamicLRP, DynamicLRPError, LayerDynamicLRP, UnsupportedOperationError
from captum_dynamiclrp.engine import NotConnectedError

DT = torch.float64


def mlp(dtype: torch.dtype = DT) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype).eval()


def cnn(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5),
    ).to(dtype).eval()


def attribute_quietly(model, x, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unexpected warning is a failure
        return DynamicLRP(model).attribute(x, **kwargs)


# ---------------------------------------------------------------------------------------------
# Unsupported ops: the message names the op and the module that made it.
# ---------------------------------------------------------------------------------------------
class Asinh(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.asinh(x)


class Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


class CubeModule(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return Cube.apply(x)


class Nested(nn.Module):
    def __init__(self, squash: nn.Module) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.Tanh(), squash))
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


@pytest.mark.parametrize("squash, node", [(Asinh(), "AsinhBackward0"), (CubeModule(), "CubeBackward")],
                         ids=["aten-op", "autograd-function"])
def test_unsupported_op_names_the_op_and_the_module(squash, node, snapshot):
    model = Nested(squash).to(DT).eval()
    before = snapshot(model)
    with pytest.raises(UnsupportedOperationError) as info:
        DynamicLRP(model).attribute(torch.randn(2, 6, dtype=DT), target=1)
    assert info.value.node_type == node
    assert info.value.module_path == "encoder.1.1"
    assert node in str(info.value) and "encoder.1.1" in str(info.value)
    assert isinstance(info.value, DynamicLRPError)
    before.assert_unchanged(model)


# ---------------------------------------------------------------------------------------------
# NaN / inf.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["single", "second-of-tuple"])
def test_non_finite_input_is_a_clear_error(bad, where, snapshot):
    model = mlp()
    before = snapshot(model)
    x = torch.randn(2, 6, dtype=DT)
    x[1, 3] = bad
    x_before = x.clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        if where == "single":
            DynamicLRP(model).attribute(x, target=0)
        else:
            DynamicLRP(lambda a, b: model(a + b)).attribute((torch.randn(2, 6, dtype=DT), x), target=0)
    assert torch.equal(x.isnan(), x_before.isnan()) and torch.equal(x.nan_to_num(), x_before.nan_to_num())
    before.assert_unchanged(model)


class LogOfInput(nn.Module):
    """NaN in the output: log of a negative number."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(torch.log(x))


class Overflow(nn.Module):
    """inf in the output: exp overflows."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.exp(self.lin(x) * 1e4)


@pytest.mark.parametrize("model_cls", [LogOfInput, Overflow])
def test_non_finite_output_is_a_clear_error(model_cls, snapshot):
    model = model_cls().to(DT).eval()
    before = snapshot(model)
    x = -torch.rand(2, 6, dtype=DT) - 0.5 if model_cls is LogOfInput else torch.ones(2, 6, dtype=DT) * 3
    assert not torch.isfinite(model(x)).all()
    with pytest.raises(ValueError, match="NaN or inf"):
        DynamicLRP(model).attribute(x, target=0)
    before.assert_unchanged(model)


class SaturatedExp(nn.Module):
    """exp overflows to inf inside, a sigmoid brings the output back to [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.sigmoid(-torch.exp(self.inner(x) * 1e3)))


class MaskedSqrt(nn.Module):
    """sqrt of negatives is NaN inside, ``torch.where`` keeps only the defined half."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inner(x)
        return self.head(torch.where(h > 0, torch.sqrt(h), torch.zeros_like(h)))


class ConstantMask(nn.Module):
    """An additive ``-inf`` attention mask that does not depend on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        mask = torch.zeros(4, 4).masked_fill(~torch.ones(4, 4, dtype=torch.bool).tril(), float("-inf"))
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:  # x: (batch, 4, 6)
        scores = self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(6) + self.mask
        return self.head((torch.softmax(scores, -1) @ self.v(x)).mean(1))


class LogDomainMask(nn.Module):
    """A mask made *from the input* in the log domain: ``log(relu(.))`` is ``-inf`` where the gate
    is closed. The output is finite; the relevance of the gate branch meets ``-inf * 0``."""

    def __init__(self) -> None:
        super().__init__()
        self.scores, self.gate = nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.softmax(self.scores(x) + torch.log(torch.relu(self.gate(x))), -1))


@pytest.mark.parametrize(
    "model_cls",
    [
        SaturatedExp,
        MaskedSqrt,
        ConstantMask,
        LogDomainMask,
    ],
)
def test_non_finite_values_inside_the_model_never_give_silent_nan(model_cls, snapshot):
    torch.manual_seed(0)
    model = model_cls().to(DT).eval()
    before = snapshot(model)
    x = torch.randn(2, 4, 6, dtype=DT) if model_cls is ConstantMask else torch.randn(2, 6, dtype=DT)
    assert torch.isfinite(model(x)).all()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            attr = DynamicLRP(model).attribute(x, target=0)
        except (DynamicLRPError, ValueError):
            attr = None  # a clear error is acceptable
    warned = any(issubclass(w.category, UserWarning) for w in caught)
    assert attr is None or warned or torch.isfinite(attr).all(), "silent non-finite attributions"
    before.assert_unchanged(model)


def test_non_finite_relevance_warning_names_the_input_and_the_cause(snapshot):
    # A warning exactly when the relevance is not finite, saying where and why, for the input
    # and for a layer (LayerDynamicLRP returns attributions through its own path).
    torch.manual_seed(0)
    model = LogDomainMask().to(DT).eval()
    before = snapshot(model)
    x = torch.randn(2, 6, dtype=DT)
    cases = [
        (DynamicLRP(model), "DynamicLRP: the relevance of input 0 "),
        (LayerDynamicLRP(model, model.gate), "LayerDynamicLRP: the relevance of layer output 0 "),
    ]
    for method, where in cases:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            attr = method.attribute(x, target=0)
        messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        if torch.isfinite(attr).all():
            assert not messages, "a false alarm on finite relevance"
        else:
            assert any(m.startswith(where) and "log of zero" in m for m in messages), messages
    before.assert_unchanged(model)


# ---------------------------------------------------------------------------------------------
# Targets.
# ---------------------------------------------------------------------------------------------
BAD_TARGETS = {
    "too-high": 3,
    "too-low": -4,
    "list-entry-too-high": [0, 5],
    "tensor-entry-too-high": torch.tensor([0, 7]),
    "list-too-short": [0],
    "list-too-long": [0, 1, 2],
    "tensor-too-long": torch.tensor([0, 1, 2]),
    "float": 1.5,
    "string": "cat",
    "list-of-floats": [0.5, 1.0],
    "list-of-strings": ["a", "b"],
    "float-tensor": torch.tensor([0.0, 1.0]),
    "bool-tensor": torch.tensor([True, False]),
    "dict": {0: 1},
    "tuple-too-long-for-2d-output": (0, 1),
}


@pytest.mark.parametrize("target", list(BAD_TARGETS.values()), ids=list(BAD_TARGETS))
def test_bad_target_is_a_clear_error(target, snapshot):
    model = mlp()
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match="[Tt]arget"):
        DynamicLRP(model).attribute(torch.randn(2, 6, dtype=DT), target=target)
    before.assert_unchanged(model)


@pytest.mark.parametrize("target", [-1, [2, -3], torch.tensor([-1, 0])], ids=["int", "list", "tensor"])
def test_negative_targets_count_from_the_end_or_fail_clearly(target):
    model = mlp()
    x = torch.randn(2, 6, dtype=DT)
    positive = target % 3 if isinstance(target, int) else (torch.as_tensor(target) % 3).tolist()
    try:
        attr = DynamicLRP(model).attribute(x, target=target)
    except ValueError as err:  # Captum's gather rejects negative indices in lists and tensors
        assert "target" in str(err)
    else:
        torch.testing.assert_close(attr, DynamicLRP(model).attribute(x, target=positive))


# ---------------------------------------------------------------------------------------------
# Outputs that do not depend on the input.
# ---------------------------------------------------------------------------------------------
class IgnoresInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(torch.ones_like(x))


class ConstantOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("logits", torch.randn(1, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(x.shape[0], 3)


@pytest.mark.parametrize("model_cls", [IgnoresInput, ConstantOutput])
def test_output_not_depending_on_the_input_is_a_clear_error(model_cls, snapshot):
    model = model_cls().to(DT).eval()
    before = snapshot(model)
    with pytest.raises(NotConnectedError, match="does not depend|no autograd graph"):
        DynamicLRP(model).attribute(torch.randn(2, 6, dtype=DT), target=0)
    before.assert_unchanged(model)


def test_an_unused_input_of_several_gets_zeros():
    model = mlp()
    a, b = torch.randn(2, 6, dtype=DT), torch.randn(2, 6, dtype=DT)
    r_a, r_b = DynamicLRP(lambda a, b: model(a)).attribute((a, b), target=0)
    assert torch.equal(r_b, torch.zeros_like(b))
    torch.testing.assert_close(r_a, DynamicLRP(model).attribute(a, target=0))


# ---------------------------------------------------------------------------------------------
# Input dtypes and flags.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_boolean_inputs_are_a_clear_error(dtype, snapshot):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)).eval()
    before = snapshot(model)
    ids = torch.randint(0, 2, (2, 3)).to(dtype)
    with pytest.raises(TypeError, match="floating-point"):
        DynamicLRP(model).attribute(ids, target=0)
    with pytest.raises(TypeError, match="embedding"):
        DynamicLRP(lambda a, b: model(b.long())).attribute((torch.randn(2, 3), ids), target=0)
    before.assert_unchanged(model)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_inputs_with_or_without_requires_grad(requires_grad, snapshot):
    model = mlp()
    before = snapshot(model)
    x = torch.randn(3, 6, dtype=DT).requires_grad_(requires_grad)
    x_before = x.detach().clone()
    expected = DynamicLRP(model).attribute(x.detach().clone(), target=1)
    attr = DynamicLRP(model).attribute(x, target=1)
    torch.testing.assert_close(attr, expected)
    assert not attr.requires_grad and attr.grad_fn is None
    assert x.requires_grad == requires_grad and x.is_leaf and x.grad is None
    assert torch.equal(x.detach(), x_before)
    before.assert_unchanged(model)


def test_non_leaf_input_is_not_backpropagated_into():
    model = mlp()
    base = torch.randn(3, 6, dtype=DT, requires_grad=True)
    x = base * 2.0
    attr = DynamicLRP(model).attribute(x, target=1)
    torch.testing.assert_close(attr, DynamicLRP(model).attribute(x.detach(), target=1))
    assert base.grad is None and x.grad_fn is not None


# ---------------------------------------------------------------------------------------------
# Grad modes.
# ---------------------------------------------------------------------------------------------
def test_under_no_grad(snapshot):
    model = mlp()
    x = torch.randn(3, 6, dtype=DT)
    expected = DynamicLRP(model).attribute(x, target=2)
    before = snapshot(model)
    with torch.no_grad():
        attr = DynamicLRP(model).attribute(x, target=2)
        assert not torch.is_grad_enabled()  # the mode is restored
    torch.testing.assert_close(attr, expected)
    before.assert_unchanged(model)


def test_under_inference_mode_with_inference_tensors(snapshot):
    model = mlp()
    x = torch.randn(3, 6, dtype=DT)
    expected = DynamicLRP(model).attribute(x, target=2)
    before = snapshot(model)
    with torch.inference_mode():
        x_inference = x.clone()  # an inference tensor: it can never be saved for backward
        attr = DynamicLRP(model).attribute(x_inference, target=2)
        assert torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
    assert x_inference.is_inference()
    torch.testing.assert_close(attr, expected)
    before.assert_unchanged(model)


# ---------------------------------------------------------------------------------------------
# Training mode.
# ---------------------------------------------------------------------------------------------
def test_training_mode_warns_and_leaves_dropout_and_batch_norm_alone(snapshot):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 8), nn.BatchNorm1d(8, momentum=None), nn.Dropout(0.5),
                          nn.Linear(8, 3)).train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    before = snapshot(model)
    with pytest.warns(UserWarning, match="training mode"):
        attr = DynamicLRP(model).attribute(torch.randn(4, 3, 6, 6), target=0)
    assert torch.isfinite(attr).all() and attr.shape == (4, 3, 6, 6)
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():  # running means, variances and num_batches_tracked
        assert torch.equal(v, stats[k]), k
    before.assert_unchanged(model)


def test_training_mode_without_state_does_not_warn():
    # A stateless wrapper's mode changes nothing: no warning.
    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(x)

    wrapper = Wrapper(mlp())
    wrapper.training = True
    attribute_quietly(wrapper, torch.randn(2, 6, dtype=DT), target=0)


# ---------------------------------------------------------------------------------------------
# Devices.
# ---------------------------------------------------------------------------------------------
def test_model_on_another_device_than_the_inputs_is_a_clear_error(snapshot):
    model = mlp().to("meta")
    before_flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="meta"):
        DynamicLRP(model).attribute(torch.randn(2, 6, dtype=DT), target=0)
    assert [p.requires_grad for p in model.parameters()] == before_flags


def test_inputs_on_another_device_than_the_model_is_a_clear_error(snapshot):
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match="device|meta"):
        DynamicLRP(model).attribute(torch.randn(2, 6, dtype=DT, device="meta"), target=0)
    with pytest.raises(ValueError, match="device|meta"):
        LayerDynamicLRP(model, model[0]).attribute(torch.randn(2, 6, dtype=DT, device="meta"), target=0)
    before.assert_unchanged(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model_device, input_device", [("cuda", "cpu"), ("cpu", "cuda")])
def test_cuda_and_cpu_mismatch_is_a_clear_error(model_device, input_device, snapshot):
    model = mlp().to(model_device)
    before = snapshot(model)
    with pytest.raises(ValueError, match="cuda|cpu"):
        DynamicLRP(model).attribute(torch.randn(2, 6, dtype=DT, device=input_device), target=0)
    before.assert_unchanged(model)


# ---------------------------------------------------------------------------------------------
# Half precision.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("build", [mlp, cnn], ids=["mlp", "cnn"])
def test_half_precision_models_give_finite_float32_relevance(dtype, build, snapshot):
    half = build(dtype)
    before = snapshot(half)
    shape = (3, 6) if build is mlp else (3, 3, 8, 8)
    x = torch.randn(*shape).to(dtype)
    attr, delta = DynamicLRP(half).attribute(x, target=1, return_convergence_delta=True)
    assert attr.dtype == torch.float32 and delta.dtype == torch.float32
    assert torch.isfinite(attr).all() and torch.isfinite(delta).all()
    # The same weights and inputs, upcast: only the half-precision forward differs. Rounding may
    # move a max-pool winner or a ReLU edge, so compare per-example totals and the overall pattern.
    full = build(torch.float32)
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    expected = DynamicLRP(full).attribute(x.float(), target=1)
    totals, expected_totals = attr.flatten(1).sum(1), expected.flatten(1).sum(1)
    scale = expected.flatten(1).abs().sum(1)
    assert ((totals - expected_totals).abs() <= 2e-2 * scale).all()
    assert F.cosine_similarity(attr.flatten(), expected.flatten(), dim=0) > 0.95
    before.assert_unchanged(half)


def test_half_precision_keeps_the_stabiliser():
    # eps = 1e-6 underflows to 0 in fp16 arithmetic near large values; accumulation in float32 keeps it.
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False)).half().eval()
    x = torch.zeros(2, 4, dtype=torch.float16)
    x[0, 0] = 1.0
    attr = DynamicLRP(model).attribute(x, target=0)
    assert attr.dtype == torch.float32 and torch.isfinite(attr).all()


# ---------------------------------------------------------------------------------------------
# Empty batch.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [mlp, cnn], ids=["mlp", "cnn"])
def test_empty_batch_gives_empty_attributions(build, snapshot):
    model = build(DT)
    before = snapshot(model)
    x = torch.randn(0, 6, dtype=DT) if build is mlp else torch.randn(0, 3, 8, 8, dtype=DT)
    attr = DynamicLRP(model).attribute(x, target=0)
    assert attr.shape == x.shape and attr.dtype == DT
    before.assert_unchanged(model)


def test_empty_batch_with_convergence_delta():
    attr, delta = DynamicLRP(mlp()).attribute(torch.randn(0, 6, dtype=DT), target=0,
                                              return_convergence_delta=True)
    assert attr.shape == (0, 6) and delta.shape == (0,)


# ---------------------------------------------------------------------------------------------
# Very deep graphs.
# ---------------------------------------------------------------------------------------------
def test_ten_thousand_layers_without_recursion_errors():
    torch.manual_seed(0)
    depth = 10_000
    layers = []
    for _ in range(depth):
        layer = nn.Linear(4, 4)
        with torch.no_grad():
            layer.weight.copy_(torch.eye(4) + 0.01 * torch.randn(4, 4))
            layer.bias.zero_()
        layers.append(layer)
    model = nn.Sequential(*layers).to(DT).eval()
    limit = sys.getrecursionlimit()
    x = torch.randn(2, 4, dtype=DT)
    # A tiny epsilon: each of the 10,000 layers loses ~eps/|z| of the relevance to the stabiliser.
    attr, delta = DynamicLRP(model, epsilon=1e-12).attribute(x, target=0, return_convergence_delta=True)
    assert torch.isfinite(attr).all() and attr.shape == x.shape
    with torch.no_grad():
        f = model(x)[:, 0]
    assert (delta.abs() <= 1e-6 * f.abs()).all()  # zero biases: conserved up to the stabiliser
    assert sys.getrecursionlimit() == limit


DEEP_RESIDUAL = textwrap.dedent(
    """
    import torch, torch.nn as nn
    from captum_dynamiclrp import DynamicLRP

    class DeepResidual(nn.Module):
        def __init__(self, depth):
            super().__init__()
            self.depth, self.lin = depth, nn.Linear(4, 4)

        def forward(self, x):
            h = x
            for _ in range(self.depth):
                h = h + 0.001 * torch.tanh(self.lin(h))
            return h

    torch.manual_seed(0)
    attr = DynamicLRP(DeepResidual({depth}).eval()).attribute(torch.randn(2, 4), target=0)
    assert torch.isfinite(attr).all()
    print("done")
    """
)


def _run_isolated(source: str) -> subprocess.CompletedProcess:
    """Run a script in a fresh interpreter: a crash (segfault) there must not take pytest down."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, env=env, timeout=600,
                          check=False)


def test_deep_residual_graph_in_a_subprocess_baseline():
    # 2,000 residual layers (8,000 autograd nodes deep): fine.
    result = _run_isolated(DEEP_RESIDUAL.format(depth=2_000))
    assert result.returncode == 0 and "done" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize(
    "depth, stack_kib",
    [
        (10_000, None),  # ~40,000 nodes deep, on the main thread's stack (8 MiB usually)
        # The same on a 256 KiB thread stack: 1,000 layers overflowed it before the fix, whatever
        # `ulimit -s` the machine has.
        (1_000, 256),
    ],
)
def test_ten_thousand_residual_layers_without_crashing(depth, stack_kib):
    # Walking the graph gives every node a Python wrapper, which then owns its node: dropping
    # the output freed the whole chain recursively (a C stack overflow). The engine now frees
    # the nodes one at a time, consumers first (engine.graph.DeferredRelease).
    source = DEEP_RESIDUAL.format(depth=depth)
    if stack_kib is not None:
        source = (
            f"import threading\nthreading.stack_size({stack_kib} * 1024)\n\ndef main():\n"
            + textwrap.indent(source, "    ")
            + "\n\nthread = threading.Thread(target=main)\nthread.start()\nthread.join()\n"
        )
    result = _run_isolated(source)
    assert result.returncode == 0 and "done" in result.stdout, f"rc={result.returncode} {result.stderr[-2000:]}"


# ---------------------------------------------------------------------------------------------
# torch.compile and TorchScript: work, or a clear error.
# ---------------------------------------------------------------------------------------------
def _works_or_clear_error(forward, x, expected, hint: str, calls: int = 3) -> None:
    for _ in range(calls):
        try:
            attr = DynamicLRP(forward).attribute(x, target=0)
        except UnsupportedOperationError as err:
            assert hint in str(err), f"unclear error: {err}"
        else:
            torch.testing.assert_close(attr, expected)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_works_or_fails_clearly(backend, snapshot):
    model = mlp(torch.float32)
    x = torch.randn(2, 6)
    expected = DynamicLRP(model).attribute(x, target=0)
    compiled = torch.compile(model, backend=backend)
    before = snapshot(model)
    _works_or_clear_error(compiled, x, expected, "torch.compile", calls=2)
    before.assert_unchanged(model)
    torch._dynamo.reset()


def test_torch_jit_trace_works():
    model = mlp(torch.float32)
    x = torch.randn(2, 6)
    expected = DynamicLRP(model).attribute(x, target=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, x)
    for _ in range(3):
        torch.testing.assert_close(DynamicLRP(traced).attribute(x, target=0), expected)


def test_torch_jit_script_works_or_fails_clearly():
    model = mlp(torch.float32)
    x = torch.randn(2, 6)
    expected = DynamicLRP(model).attribute(x, target=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    _works_or_clear_error(scripted, x, expected, "TorchScript")


# ---------------------------------------------------------------------------------------------
# detach (and no_grad) inside the forward: the detached value is a constant.
# ---------------------------------------------------------------------------------------------
class DetachedBranch(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def side(self, x: Tensor) -> Tensor:
        if self.how == "detach":
            return self.b(x).detach()
        if self.how == "no_grad":
            with torch.no_grad():
                return self.b(x)
        return torch.from_numpy(self.b(x).detach().numpy())  # a round trip through numpy

    def forward(self, x: Tensor, side: Tensor = None) -> Tensor:
        return self.head(torch.relu(self.a(x) + (self.side(x) if side is None else side)))


@pytest.mark.parametrize("how", ["detach", "no_grad", "numpy"])
def test_detached_tensor_is_a_constant(how, snapshot):
    torch.manual_seed(0)
    model = DetachedBranch(how).to(DT).eval()
    before = snapshot(model)
    x = torch.randn(3, 6, dtype=DT)
    attr = DynamicLRP(model).attribute(x, target=1)
    # The same value passed in from outside, as a constant operand.
    with torch.no_grad():
        side = model.b(x)
    as_constant = DynamicLRP(model).attribute(x, target=1, additional_forward_args=(side,))
    assert torch.isfinite(attr).all()
    torch.testing.assert_close(attr, as_constant)
    before.assert_unchanged(model)


def test_output_reaching_the_input_only_through_detach_is_not_connected(snapshot):
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU()).to(DT).eval()
    head = nn.Linear(6, 3).to(DT)
    before = snapshot(model)
    with pytest.raises(NotConnectedError, match="detach"):
        DynamicLRP(lambda x: head(model(x).detach())).attribute(torch.randn(2, 6, dtype=DT), target=0)
    before.assert_unchanged(model)


# ---------------------------------------------------------------------------------------------
# Models that touch what they should not: their own input in place, hooks of the user.
# ---------------------------------------------------------------------------------------------
class InPlaceOnInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        x.sub_(x.mean(-1, keepdim=True))  # "normalises" its input in place
        return self.lin(x)


def test_model_writing_into_its_input_never_touches_the_callers_tensor(snapshot):
    model = InPlaceOnInput().to(DT).eval()
    before = snapshot(model)
    x = torch.randn(2, 6, dtype=DT)
    x_before, version = x.clone(), x._version
    try:
        attr = DynamicLRP(model).attribute(x, target=0)
    except RuntimeError as err:  # PyTorch refuses in-place ops on a leaf that requires grad
        assert "in-place" in str(err)
    else:
        assert torch.isfinite(attr).all()
    assert torch.equal(x, x_before) and x._version == version
    before.assert_unchanged(model)


def test_model_with_a_full_backward_hook(snapshot):
    model = mlp()
    model[0].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    before = snapshot(model)
    x = torch.randn(3, 6, dtype=DT)
    plain = mlp()
    attr = DynamicLRP(model).attribute(x, target=1)
    torch.testing.assert_close(attr, DynamicLRP(plain).attribute(x, target=1))
    before.assert_unchanged(model)


def test_model_with_forward_hooks_is_explained_with_them(snapshot):
    model = mlp()
    handle = model[1].register_forward_hook(lambda module, inp, out: out * 2.0)
    before = snapshot(model)
    x = torch.randn(3, 6, dtype=DT)
    attr = DynamicLRP(model).attribute(x, target=1)
    before.assert_unchanged(model)  # the user's hook is still there, and only it
    handle.remove()
    doubled = mlp()
    with torch.no_grad():
        doubled[2].weight.mul_(2.0)  # the hook's factor moved into the next layer
    torch.testing.assert_close(attr, DynamicLRP(doubled).attribute(x, target=1))
