"""The attribution methods compared, each as ``(inputs, target) -> attributions``, all for the same target.

Sign convention: every method attributes the **logit** of the target; a positive value
speaks for the target. LRP methods (DynamicLRP, Zennit, LXT) start from the target logit
itself (one-hot times the logit), so relevance sums to the logit minus what biases absorb;
the gradient methods differentiate the same logit. Saliency is Captum's default
``|gradient|`` (never negative), Random is uniform noise.

Image methods return attributions of the input's shape; token methods return one value per
token (the sum over the embedding dimension of the attribution at the word-embedding output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from captum_dynamiclrp import DynamicLRP, LayerDynamicLRP


@dataclass
class Method:
    """One attribution method: ``run(inputs, target) -> attributions``; ``family`` groups the table rows."""

    name: str
    family: str  # "DynamicLRP", "gradient", "Zennit", "LXT" or "random"
    settings: str
    run: Callable[..., Tensor]


# --------------------------------------------------------------------------- images


def dynamiclrp_image(model: nn.Module, rules: str) -> Method:
    lrp = DynamicLRP(model, rules=rules)  # one instance: its cached promise plans serve every batch

    def run(x: Tensor, target: Tensor) -> Tensor:
        return lrp.attribute(x, target=target)

    return Method(f"DynamicLRP {rules}", "DynamicLRP", f"rules={rules!r}", run)


def captum_image_methods(
    model: nn.Module, baseline: Callable[[Tensor], Tensor], ig_steps: int, shap_samples: int, internal_batch: int
) -> list[Method]:
    """IntegratedGradients, GradientShap, InputXGradient and Saliency of Captum.

    ``baseline(x)`` is the same replacement the perturbation uses (a blurred copy, or black),
    the most favourable baseline for the path methods on this metric.
    """
    from captum.attr import GradientShap, InputXGradient, IntegratedGradients, Saliency

    def integrated_gradients(x: Tensor, target: Tensor) -> Tensor:
        return IntegratedGradients(model).attribute(
            x, baselines=baseline(x), target=target, n_steps=ig_steps, internal_batch_size=internal_batch
        )

    def gradient_shap(x: Tensor, target: Tensor) -> Tensor:
        out = []
        for i in range(x.shape[0]):  # GradientShap draws baselines for the batch; one example at a time
            xi = x[i : i + 1]
            baselines = torch.cat([baseline(xi), torch.zeros_like(xi)])
            out.append(
                GradientShap(model).attribute(
                    xi, baselines=baselines, target=target[i : i + 1], n_samples=shap_samples, stdevs=0.1
                )
            )
        return torch.cat(out)

    def input_x_gradient(x: Tensor, target: Tensor) -> Tensor:
        return InputXGradient(model).attribute(x, target=target)

    def saliency(x: Tensor, target: Tensor) -> Tensor:
        return Saliency(model).attribute(x, target=target)

    return [
        Method(
            "IntegratedGradients", "gradient", f"n_steps={ig_steps}, baseline = the replacement", integrated_gradients
        ),
        Method(
            "GradientShap", "gradient", f"n_samples={shap_samples}, stdevs=0.1, baselines = replacement and zeros",
            gradient_shap,
        ),
        Method("InputXGradient", "gradient", "", input_x_gradient),
        Method("Saliency", "gradient", "abs=True (Captum's default)", saliency),
    ]


def random_method(seed: int) -> Method:
    """Uniform noise of the input's shape (images) or one value per token (``(1, L)`` ids give ``(L,)``)."""
    generator = torch.Generator().manual_seed(seed)

    def run(x: Tensor, target: Any) -> Tensor:
        if x.is_floating_point():
            return torch.rand(x.shape, generator=generator, dtype=torch.float32).to(x.device)
        return torch.rand(x.shape[1:], generator=generator, dtype=torch.float32)

    return Method("Random", "random", f"uniform noise, seed {seed}", run)


class BatchNormAfterConvolution:
    """Zennit canonizer for models that are not ``nn.Sequential``: merge each batch norm into the
    convolution that runs just before it (found by tracing one forward), as Zennit's
    ``SequentialMergeBatchNorm`` does for sequential models."""

    def __init__(self, example: Tensor) -> None:
        self.example = example

    def canonizers(self, model: nn.Module) -> list:
        from zennit.canonizers import MergeBatchNorm

        order: list[nn.Module] = []
        handles = [
            m.register_forward_hook(lambda mod, args, out: order.append(mod))
            for m in model.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))
        ]
        try:
            with torch.no_grad():
                model(self.example)
        finally:
            for h in handles:
                h.remove()
        pairs = []
        for previous, current in zip(order, order[1:]):
            if isinstance(current, nn.BatchNorm2d) and isinstance(previous, (nn.Conv2d, nn.Linear)):
                pairs.append((previous, current))

        class Pair(MergeBatchNorm):
            def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
                super().__init__()
                self.conv, self.bn = conv, bn

            def apply(self, root_module: nn.Module) -> list:
                instance = self.copy()
                instance.register([self.conv], self.bn)
                return [instance]

            def copy(self):
                return Pair(self.conv, self.bn)

        return [Pair(conv, bn) for conv, bn in pairs]


def zennit_methods(model: nn.Module, low: float, high: float, example: Optional[Tensor] = None) -> list[Method]:
    """Zennit's composites for CNNs: EpsilonGammaBox, EpsilonPlusFlat and EpsilonAlpha2Beta1Flat.

    Batch norms are merged into the convolution before them (canonizer). The seed is one-hot
    times the target logit, as in DynamicLRP.
    """
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonAlpha2Beta1Flat, EpsilonGammaBox, EpsilonPlusFlat

    canonizers = BatchNormAfterConvolution(example).canonizers(model) if example is not None else []

    def make(name: str, build: Callable[[], Any], settings: str) -> Method:
        def run(x: Tensor, target: Tensor) -> Tensor:
            composite = build()

            def seed(output: Tensor) -> Tensor:
                one_hot = torch.zeros_like(output)
                one_hot[torch.arange(output.shape[0]), target] = 1.0
                return one_hot * output

            with Gradient(model=model, composite=composite) as attributor:
                _, relevance = attributor(x.detach().clone(), seed)
            return relevance.detach()

        return Method(name, "Zennit", settings, run)

    return [
        make("Zennit EpsilonGammaBox", lambda: EpsilonGammaBox(low=low, high=high, canonizers=canonizers),
             f"gamma=0.25, ZBox first layer [{low:g}, {high:g}]"),
        make("Zennit EpsilonPlusFlat", lambda: EpsilonPlusFlat(canonizers=canonizers),
             "z+ convolutions, flat first layer"),
        make("Zennit EpsilonAlpha2Beta1Flat", lambda: EpsilonAlpha2Beta1Flat(canonizers=canonizers),
             "alpha=2 beta=1 convolutions, flat first layer"),
    ]


# --------------------------------------------------------------------------- tokens


class TokenMethods:
    """Methods for a model ``forward(input_ids, attention_mask) -> logits`` with relevance at ``embeddings``.

    Each ``run(ids, target)`` takes one unpadded sequence ``(1, L)`` and returns ``(L,)``.
    ``baseline_ids(ids)`` gives the path methods' baseline: the same replacement tokens the
    perturbation uses (special tokens kept).
    """

    def __init__(self, forward: nn.Module, embeddings: nn.Module, baseline_ids: Callable[[Tensor], Tensor],
                 ig_steps: int, shap_samples: int, internal_batch: int) -> None:
        self.forward = forward
        self.embeddings = embeddings
        self.baseline_ids = baseline_ids
        self.ig_steps = ig_steps
        self.shap_samples = shap_samples
        self.internal_batch = internal_batch

    def dynamiclrp(self, rules: str) -> Method:
        lrp = LayerDynamicLRP(self.forward, self.embeddings, rules=rules)

        def run(ids: Tensor, target: int) -> Tensor:
            mask = torch.ones_like(ids)
            return lrp.attribute(ids, target=target, additional_forward_args=(mask,)).sum(-1)[0].detach()

        settings = f"LayerDynamicLRP at the word embeddings, rules={rules!r}"
        return Method(f"DynamicLRP {rules}", "DynamicLRP", settings, run)

    def captum(self) -> list[Method]:
        from captum.attr import GradientShap, LayerGradientXActivation, LayerIntegratedGradients

        forward, embeddings = self.forward, self.embeddings

        def integrated_gradients(ids: Tensor, target: int) -> Tensor:
            mask = torch.ones_like(ids)
            attr = LayerIntegratedGradients(forward, embeddings).attribute(
                ids, baselines=self.baseline_ids(ids), target=target, additional_forward_args=(mask,),
                n_steps=self.ig_steps, internal_batch_size=self.internal_batch,
            )
            return attr.sum(-1)[0].detach()

        def gradient_shap(ids: Tensor, target: int) -> Tensor:
            # GradientShap interpolates in input space, which token ids are not: it runs on the word
            # embeddings instead (a hook puts each interpolated embedding in place of the layer's output).
            with torch.no_grad():
                embedded = embeddings(ids)
                replacement = embeddings(self.baseline_ids(ids))

            def on_embeddings(values: Tensor) -> Tensor:
                rows = values.shape[0]
                handle = embeddings.register_forward_hook(lambda module, args, out: values)
                try:
                    return forward(ids.expand(rows, -1), torch.ones(rows, ids.shape[1], dtype=ids.dtype))
                finally:
                    handle.remove()

            attr = GradientShap(on_embeddings).attribute(
                embedded, baselines=torch.cat([replacement, torch.zeros_like(replacement)]), target=target,
                n_samples=self.shap_samples, stdevs=0.0,
            )
            return attr.sum(-1)[0].detach()

        def input_x_gradient(ids: Tensor, target: int) -> Tensor:
            mask = torch.ones_like(ids)
            attr = LayerGradientXActivation(forward, embeddings).attribute(
                ids, target=target, additional_forward_args=(mask,)
            )
            return attr.sum(-1)[0].detach()

        def saliency(ids: Tensor, target: int) -> Tensor:
            mask = torch.ones_like(ids)
            grad = LayerGradientXActivation(forward, embeddings, multiply_by_inputs=False).attribute(
                ids, target=target, additional_forward_args=(mask,)
            )
            return grad.abs().sum(-1)[0].detach()

        return [
            Method("IntegratedGradients", "gradient",
                   f"LayerIntegratedGradients, n_steps={self.ig_steps}, baseline = replacement tokens",
                   integrated_gradients),
            Method("GradientShap", "gradient",
                   f"GradientShap on the word embeddings, n_samples={self.shap_samples}, "
                   "baselines = replacement tokens "
                   "and zero embeddings", gradient_shap),
            Method("InputXGradient", "gradient", "LayerGradientXActivation at the word embeddings", input_x_gradient),
            Method("Saliency", "gradient", "L1 norm of the gradient at each token's embedding", saliency),
        ]
