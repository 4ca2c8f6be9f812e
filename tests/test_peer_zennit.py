"""Peer test: DynamicLRP's linear-layer presets against Zennit's module rules on a plain CNN.

The network is VGG-shaped (conv-relu-conv-relu-maxpool twice, flatten, linear-relu-linear), has
biases everywhere and runs in float64. Zennit is configured explicitly so that both libraries apply
the same rules layer by layer:

* every ``Conv2d`` and ``Linear``: the rule under test (``Epsilon`` / ``ZPlus`` / ``Gamma``);
* every ``ReLU``: ``Pass`` (relevance passes through unchanged, the identity rule);
* ``MaxPool2d`` and ``Flatten``: no rule, i.e. the plain gradient (winner takes all / reshape).

Zennit's ``Gradient`` attributor is seeded with ``one_hot * output``, the same seed DynamicLRP uses.

Semantics compared (both are written out in ``zennit/rules.py`` and ``captum_dynamiclrp/rules/linear.py``):

* stabiliser: ``z + eps * sign(z)`` with ``sign(0) = +1`` in both;
* ``ZPlus``: ``z = B(x+, w+) + b+ + B(x-, w-)`` (the bias takes part only through its positive part);
* ``Gamma`` (generalised): outputs ``> 0`` use the pairs ``(x+, w + g w+)``, ``(x-, w + g w-)`` with the bias
  ``b + g b+``; outputs ``< 0`` use ``(x+, w + g w-)``, ``(x-, w + g w+)`` with ``b + g b-``; outputs exactly
  ``0`` get no relevance in either library.

Set ``DYNAMICLRP_REQUIRE_PEERS=1`` to turn a missing Zennit into a failure instead of a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from captum_dynamiclrp import DynamicLRP

REQUIRE_PEERS = os.environ.get("DYNAMICLRP_REQUIRE_PEERS") == "1"

if REQUIRE_PEERS:
    try:
        import zennit  # noqa: F401
    except ImportError as err:  # pragma: no cover - exercised by test_missing_zennit_is_an_error_when_required
        pytest.fail(
            f"DYNAMICLRP_REQUIRE_PEERS=1 but the Zennit peer cannot be imported ({err}); "
            "install it with pip install 'captum-dynamiclrp[test]'.",
            pytrace=False,
        )
else:
    pytest.importorskip("zennit")

from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import LayerMapComposite  # noqa: E402
from zennit.rules import Epsilon, Gamma, Pass, ZPlus  # noqa: E402
from zennit.types import Activation, Convolution, Linear  # noqa: E402

DTYPE = torch.float64
TARGETS = torch.tensor([0, 3, 5, 9])
RTOL, ATOL = 1e-6, 1e-9


def make_cnn(seed: int = 0) -> nn.Sequential:
    """Small VGG-style CNN with biases, float64, eval mode, weights scaled to keep activations O(1)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                # Biases of both signs and of a size that matters next to the pre-activations.
                module.bias.uniform_(-0.3, 0.3)
        # A dead channel: zero weights and zero bias give pre-activations that are exactly 0,
        # exercising the sign(0) = +1 convention of the stabiliser in both libraries.
        model[2].weight[0].zero_()
        model[2].bias[0].zero_()
    return model.to(DTYPE).eval()


@pytest.fixture(scope="module")
def model() -> nn.Sequential:
    return make_cnn()


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32, dtype=DTYPE)


def zennit_composite(rule_factory) -> LayerMapComposite:
    """Rule on every conv and linear layer, Pass on activations, nothing (gradient) elsewhere."""
    return LayerMapComposite(
        layer_map=[
            (Activation, Pass()),
            (Convolution, rule_factory()),
            (Linear, rule_factory()),
        ]
    )


def zennit_relevance(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, composite) -> torch.Tensor:
    def seed(output: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(targets, output.shape[1]).to(output.dtype) * output

    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x.clone(), seed)
    return relevance.detach()


def ours(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, **kwargs) -> torch.Tensor:
    return DynamicLRP(model, **kwargs).attribute(x, target=targets)


def test_composite_assigns_the_intended_rule_to_every_layer(model):
    """Guard against a vacuous comparison: Zennit must hook each layer as intended."""
    composite = zennit_composite(lambda: Epsilon(epsilon=1e-6))
    expected = {nn.Conv2d: Epsilon, nn.Linear: Epsilon, nn.ReLU: Pass}
    seen = set()
    ctx: dict = {}
    for name, module in model.named_modules():
        hook = composite.module_map(ctx, name, module)
        want = expected.get(type(module))
        if want is None:
            assert hook is None, f"{name} ({type(module).__name__}) should use the plain gradient, got {hook}"
        else:
            assert isinstance(hook, want), f"{name} ({type(module).__name__}) got {type(hook).__name__}"
            seen.add(type(module))
    assert seen == set(expected)
    # After the attributor's context every hook is gone again.
    zennit_relevance(model, torch.zeros(1, 3, 32, 32, dtype=DTYPE), TARGETS[:1], composite)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks


def test_fixture_exercises_biases_and_dead_units(model, inputs):
    """The comparison is meaningful only if biases absorb relevance and some units are exactly zero."""
    _, delta = DynamicLRP(model, rules="epsilon").attribute(inputs, target=TARGETS, return_convergence_delta=True)
    assert (delta.abs() > 1e-3).all(), delta
    with torch.no_grad():
        first = model[1](model[0](inputs))
        pre = model[2](first)
    assert (pre[:, 0] == 0).all()
    assert (first == 0).any() and (first > 0).any()


@pytest.mark.parametrize("epsilon", [1e-6, 1e-2, 1.0])
def test_epsilon_matches_zennit(model, inputs, epsilon):
    reference = zennit_relevance(model, inputs, TARGETS, zennit_composite(lambda: Epsilon(epsilon=epsilon)))
    result = ours(model, inputs, TARGETS, rules="epsilon", epsilon=epsilon)
    assert result.dtype == DTYPE
    assert reference.abs().max() > 1e-3  # not comparing two tensors of near-zeros
    torch.testing.assert_close(result, reference, rtol=RTOL, atol=ATOL)


def test_zplus_matches_zennit(model, inputs):
    reference = zennit_relevance(model, inputs, TARGETS, zennit_composite(lambda: ZPlus(stabilizer=1e-6)))
    result = ours(model, inputs, TARGETS, rules="zplus", epsilon=1e-6)
    assert reference.abs().max() > 1e-3
    torch.testing.assert_close(result, reference, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("gamma", [0.25, 1.0])
def test_gamma_matches_zennit(model, inputs, gamma):
    reference = zennit_relevance(
        model, inputs, TARGETS, zennit_composite(lambda: Gamma(gamma=gamma, stabilizer=1e-6))
    )
    result = ours(model, inputs, TARGETS, rules="gamma", gamma=gamma, epsilon=1e-6)
    assert reference.abs().max() > 1e-3
    torch.testing.assert_close(result, reference, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("rules", ["epsilon", "zplus", "gamma"])
def test_batch_rows_match_single_examples_in_zennit(model, inputs, rules):
    """Each row of the batch equals Zennit's result for that example alone (no cross-row seeding)."""
    factory = {
        "epsilon": lambda: Epsilon(epsilon=1e-6),
        "zplus": lambda: ZPlus(stabilizer=1e-6),
        "gamma": lambda: Gamma(gamma=0.25, stabilizer=1e-6),
    }[rules]
    batch = ours(model, inputs, TARGETS, rules=rules, epsilon=1e-6)
    for row in range(inputs.shape[0]):
        single = zennit_relevance(model, inputs[row : row + 1], TARGETS[row : row + 1], zennit_composite(factory))
        torch.testing.assert_close(batch[row : row + 1], single, rtol=RTOL, atol=ATOL)


def _resnet_with_batch_norm_statistics() -> nn.Module:
    """The merge test's ResNet-18 (float64, eval, batch norms far from the identity), batch-norm eps 0."""
    from tests.test_batch_norm_merge import make_resnet

    model = make_resnet()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            # Zennit leaves a merged batch norm in place as x / sqrt(1 + eps) * 1 + 0, which is the
            # identity only for eps = 0 (with the default 1e-5 every block would scale by 1 - 5e-6).
            module.eps = 0.0
    return model


@pytest.mark.parametrize("rules", ["epsilon", "zplus", "gamma"])
def test_merged_batch_norm_matches_zennit_resnet_canonizer(rules):
    """``batch_norm="merge"`` against Zennit's ``ResNetCanonizer`` (batch norms merged, residual sums as
    modules with its ``Norm`` rule, which is epsilon on contributions as ours) on a ResNet-18."""
    from zennit.composites import layer_map_base
    from zennit.torchvision import ResNetCanonizer

    rule = {
        "epsilon": lambda: Epsilon(epsilon=1e-6),
        "zplus": lambda: ZPlus(stabilizer=1e-6),
        "gamma": lambda: Gamma(gamma=0.25, stabilizer=1e-6),
    }[rules]
    model = _resnet_with_batch_norm_statistics()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32, dtype=DTYPE)
    targets = torch.tensor([3, 7])
    composite = LayerMapComposite(
        layer_map=layer_map_base(1e-6) + [(Convolution, rule()), (Linear, rule())], canonizers=[ResNetCanonizer()]
    )
    reference = zennit_relevance(model, x, targets, composite)
    result = ours(model, x, targets, rules=rules, epsilon=1e-6, batch_norm="merge")
    assert reference.abs().max() > 1e-3
    torch.testing.assert_close(result, reference, rtol=RTOL, atol=ATOL)
    # Without merging, batch norm is a layer of its own and the results differ from Zennit's canonized ones.
    unmerged = ours(model, x, targets, rules=rules, epsilon=1e-6)
    assert not torch.allclose(unmerged, reference, rtol=1e-4, atol=0)


def test_missing_zennit_is_an_error_when_required(tmp_path):
    """With DYNAMICLRP_REQUIRE_PEERS=1 a missing Zennit fails the run; without it the module is skipped."""
    runner = tmp_path / "run_without_zennit.py"
    runner.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.modules["zennit"] = None  # makes `import zennit` raise ImportError
            import pytest
            sys.exit(pytest.main([{str(Path(__file__))!r}, "-q", "-p", "no:cacheprovider", "-o", "addopts="]))
            """
        )
    )
    repo = Path(__file__).resolve().parents[1]
    base_env = {k: v for k, v in os.environ.items() if k != "DYNAMICLRP_REQUIRE_PEERS"}
    base_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), base_env.get("PYTHONPATH", "")]))

    skipped = subprocess.run([sys.executable, str(runner)], env=base_env, cwd=tmp_path, capture_output=True, text=True)
    # 5 is pytest's "no tests collected": the whole module was skipped.
    assert skipped.returncode in (0, pytest.ExitCode.NO_TESTS_COLLECTED), skipped.stdout + skipped.stderr
    assert "skipped" in skipped.stdout

    required = subprocess.run(
        [sys.executable, str(runner)],
        env={**base_env, "DYNAMICLRP_REQUIRE_PEERS": "1"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert required.returncode in (pytest.ExitCode.TESTS_FAILED, pytest.ExitCode.INTERRUPTED), (
        required.stdout + required.stderr
    )
    assert "DYNAMICLRP_REQUIRE_PEERS=1" in required.stdout + required.stderr
