"""Explaining image classifiers: DynamicLRP beside Captum's gradient methods, and the ``demo`` command."""

from __future__ import annotations

import platform
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .errors import DemoError
from .images import DEMO_PHOTOS, demo_photo
from .models import LoadedModel, load_efficientnet_lite0, resolve_device
from .report import ImageExplanation, MethodResult, save_image_grid, write_image_report

# A method: (name, settings text, function(model, x, target, baseline) -> (attribution, delta or None)).
Method = tuple[str, str, Callable[[nn.Module, Tensor, int, Tensor], tuple[Tensor, Optional[float]]]]


def dynamiclrp_method(rules: str = "epsilon", fallback: bool = False, name: str = "DynamicLRP") -> Method:
    """DynamicLRP with a preset; the delta is its conservation delta."""
    from .. import DynamicLRP

    cache: dict[int, Any] = {}

    def run(model: nn.Module, x: Tensor, target: int, baseline: Tensor) -> tuple[Tensor, Optional[float]]:
        # One DynamicLRP per model, so that the promise plans it caches serve the next images.
        if id(model) not in cache:
            cache[id(model)] = DynamicLRP(model, rules=rules, fallback=fallback)
        lrp = cache[id(model)]
        attribution, delta = lrp.attribute(x, target=target, return_convergence_delta=True)
        return attribution, float(delta.sum())

    return (name, f"rules={rules}", run)


def captum_methods(ig_steps: int = 16, shap_samples: int = 8, internal_batch_size: int = 8) -> list[Method]:
    """IntegratedGradients, InputXGradient and GradientShap with settings a laptop CPU can afford."""
    from captum.attr import GradientShap, InputXGradient, IntegratedGradients

    def integrated_gradients(model, x, target, baseline):
        attribution, delta = IntegratedGradients(model).attribute(
            x,
            baselines=baseline,
            target=target,
            n_steps=ig_steps,
            internal_batch_size=internal_batch_size,
            return_convergence_delta=True,
        )
        return attribution, float(delta.sum())

    def input_x_gradient(model, x, target, baseline):
        with warnings.catch_warnings():  # Captum warns that the input did not require grad; that is fine
            warnings.simplefilter("ignore", UserWarning)
            return InputXGradient(model).attribute(x, target=target), None

    def gradient_shap(model, x, target, baseline):
        baselines = torch.cat([baseline, torch.zeros_like(baseline)])
        attribution, delta = GradientShap(model).attribute(
            x,
            baselines=baselines,
            target=target,
            n_samples=shap_samples,
            stdevs=0.1,
            return_convergence_delta=True,
        )
        return attribution, float(delta.mean())

    return [
        ("IntegratedGradients", f"n_steps={ig_steps}, black baseline", integrated_gradients),
        ("InputXGradient", "", input_x_gradient),
        ("GradientShap", f"n_samples={shap_samples}, black+grey baselines, stdevs=0.1", gradient_shap),
    ]


def top_classes(scores: Tensor, labels: Optional[Sequence[str]], k: int = 5) -> list[tuple[int, str, float]]:
    """(index, name, probability) of the ``k`` best classes of one row of logits."""
    probs = scores.detach().float().softmax(-1).flatten()
    values, indices = probs.topk(min(k, probs.numel()))
    return [
        (int(i), labels[int(i)] if labels and int(i) < len(labels) else f"class {int(i)}", float(v))
        for v, i in zip(values, indices)
    ]


def explain_image(
    loaded: LoadedModel,
    image: np.ndarray,
    title: str,
    methods: Sequence[Method],
    device: torch.device,
    target: Optional[int] = None,
    on_method: Optional[Callable[[str], None]] = None,
) -> ImageExplanation:
    """Classify one image and explain the target class (default: the predicted one) with each method."""
    crop, x = loaded.image_input(image)
    x = x.to(device)
    baseline = loaded.preprocess(np.zeros_like(crop)).to(device)  # a black image
    with torch.no_grad():
        scores = loaded.scores(x)
    if scores.dim() != 2:
        raise DemoError(f"the model returns scores of shape {tuple(scores.shape)}; expected (batch, classes)", 1)
    num_classes = scores.shape[1]
    if target is None:
        target = int(scores[0].argmax())
    elif not 0 <= target < num_classes:
        raise DemoError(f"target {target} is out of range: the model has {num_classes} classes (0..{num_classes - 1})")
    labels = loaded.labels
    explanation = ImageExplanation(
        title=title,
        image=crop,
        top=top_classes(scores[0], labels),
        target=target,
        target_name=labels[target] if labels and target < len(labels) else f"class {target}",
        target_score=float(scores[0, target]),
    )
    for name, detail, run in methods:
        if on_method is not None:
            on_method(name)
        start = time.perf_counter()
        attribution, delta = run(loaded.scores, x, target, baseline)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        explanation.methods.append(MethodResult(name, attribution.detach().cpu(), seconds, delta, detail))
    return explanation


def run_demo(
    out: str | Path = "dynamiclrp-demo-output",
    photos: int = 3,
    device: str = "auto",
    rules: Sequence[str] = ("epsilon", "gamma"),
    ig_steps: int = 16,
    shap_samples: int = 8,
    progress: bool = True,
) -> Path:
    """Explain EfficientNet-Lite0 (ImageNet) on real photos with DynamicLRP, IG, InputXGradient, GradientShap.

    Writes one PNG per photo and ``report.html`` into ``out``; returns the report's path.
    """
    from tqdm.auto import tqdm

    from .. import coverage as op_coverage

    if not 1 <= photos <= len(DEMO_PHOTOS):
        raise DemoError(f"--photos must be between 1 and {len(DEMO_PHOTOS)}")
    torch_device = resolve_device(device)
    torch.manual_seed(0)  # GradientShap draws random baselines and noise
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    names = DEMO_PHOTOS[:photos]
    methods = [dynamiclrp_method(r, name=f"DynamicLRP {r}") for r in rules]
    methods += captum_methods(ig_steps, shap_samples)
    bar = tqdm(
        total=1 + photos * len(methods) + 1, desc="loading EfficientNet-Lite0", unit="step", disable=not progress
    )
    loaded = load_efficientnet_lite0().to(torch_device)
    bar.update()
    explanations = []
    for name in names:
        image = demo_photo(name)

        first = [True]

        def step(method: str, name: str = name, first: list = first) -> None:
            if not first[0]:  # the method before this one has finished
                bar.update()
            first[0] = False
            bar.set_description(f"{name}: {method}")

        explanation = explain_image(loaded, image, name, methods, torch_device, on_method=step)
        bar.update()
        explanation.picture = save_image_grid(explanation, out / f"{name}.png")
        explanations.append(explanation)
    bar.set_description("op coverage")
    sample = explanations[0]
    x = loaded.preprocess(sample.image).to(torch_device)
    start = time.perf_counter()
    report = op_coverage(loaded.scores, x, rules=rules[0])
    coverage_seconds = time.perf_counter() - start
    bar.update()
    bar.close()
    total = time.perf_counter() - started
    meta = {
        "model": f"{loaded.name}, {loaded.num_parameters / 1e6:.1f}M parameters",
        "weights": loaded.source,
        "input": "224 x 224 centre crop, (pixel - 127) / 128",
        "DynamicLRP presets": ", ".join(rules),
        "device": f"{torch_device} ({torch.get_num_threads()} CPU threads)"
        if torch_device.type == "cpu"
        else str(torch_device),
        "versions": _versions(),
        "total time": f"{total:.1f} s (op coverage {coverage_seconds:.1f} s)",
    }
    notes = [
        "The first DynamicLRP call builds and caches the promise plan of the model's graph; later photos reuse it.",
        "Heatmaps are drawn with captum.attr.visualization.visualize_image_attr (sign='all', 1% outliers clipped), "
        "each scaled to its own largest value: red pixels speak for the class, blue against it.",
    ]
    path = write_image_report(
        out / "report.html", "DynamicLRP demo: EfficientNet-Lite0 on ImageNet photos", explanations, meta, report, notes
    )
    return path


def _versions() -> str:
    import captum

    from .. import __version__

    return (
        f"captum-dynamiclrp {__version__}, torch {torch.__version__}, captum {captum.__version__}, "
        f"python {platform.python_version()}"
    )
